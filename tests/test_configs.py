"""Every config in conf/ composes, resolves and (for offline models) validates: configs cannot drift from code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, REPO, compose
from peftlab.validate import validate

GROUPS = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in CONF.iterdir() if d.is_dir() and d.name != "hydra"}
OFFLINE_MODELS = [m for m in GROUPS["model"] if m.startswith("tiny_")]
HUB_DATA = {"ultrafeedback", "hh_rlhf", "pku_saferlhf", "gsm8k", "alpaca"}


def group_overrides():
    """One override list per option of every group (an algo brings its own data and trainer choices)."""
    for group, options in GROUPS.items():
        for option in options:
            if group == "trainer" and option != "base" and option not in GROUPS["algo"]:
                continue
            if group in ("trainer", "data") and option.startswith("toy_") and option[4:] in GROUPS["algo"]:
                yield [f"algo={option[4:]}", f"{group}={option}"]
            elif (group, option) == ("model", "local"):  # your checkpoint: its directory is required
                yield [f"model.name_or_path={REPO / 'assets' / 'models' / 'tiny_llama'}", "model=local"]
            else:
                yield [f"{group}={option}"]


@pytest.mark.parametrize("overrides", list(group_overrides()), ids=lambda o: ",".join(o))
def test_every_option_composes_and_resolves(overrides):
    cfg, choices = compose(overrides)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert container["peft"]["method"] in ("none", "lora", "dora", "qlora")
    group, option = overrides[-1].split("=")
    assert choices[group] == option


@pytest.mark.parametrize("model", OFFLINE_MODELS)
@pytest.mark.parametrize("peft", GROUPS["peft"])
@pytest.mark.parametrize("algo", GROUPS["algo"])
def test_offline_combinations_validate(model, peft, algo):
    """Every shipped model × peft × algo passes the pre-load checks (files exist, targets exist, bnb runs)."""
    cfg, _ = compose([f"model={model}", f"peft={peft}", f"algo={algo}"])
    validate(cfg, torch.device("cpu"))


@pytest.mark.parametrize("preset", GROUPS.get("experiment", []))
def test_experiment_presets_validate(preset):
    cfg, _ = compose([f"experiment={preset}"])
    validate(cfg, torch.device("cpu"))


KEY = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$")


@pytest.mark.parametrize("path", sorted(p for p in CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_key_has_a_comment(path: Path):
    """Each key line in every config carries a one-line `# comment` (defaults lists and their entries excepted)."""
    uncommented = []
    in_defaults = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = KEY.match(line)
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        if in_defaults and (line.startswith(" ") or line.startswith("-")):
            continue
        in_defaults = False
        if match and "#" not in match.group(3) and match.group(2) not in ("hydra", "run", "sweep", "job", "tasks_doc"):
            uncommented.append(f"{number}: {line.strip()}")
    assert not uncommented, f"{path.relative_to(CONF)} keys without a comment: {uncommented}"


SWEEPS = sorted(p.stem for p in (CONF.parent / "sweeps" / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("preset", SWEEPS)
def test_sweep_presets_compose(preset):
    """`+sweep=<name>` finds sweeps/sweep/<name>.yaml; its swept keys exist in the config they sweep."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"+sweep={preset}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, preset
    for key in params:
        assert OmegaConf.select(cfg, key, default=KeyError) is not KeyError or key in GROUPS, \
            f"{preset} sweeps unknown key {key}"


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")))
def test_launcher_presets_compose(launcher):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
