"""`python -m peftlab.pipeline safe_dpo OUT_DIR`: the stages' wiring (fast) and the whole toy pipeline (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, compose
from peftlab.pipeline import STAGES, stage_commands


def overrides_of(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv[2:])


def test_safe_dpo_stages_read_the_previous_stages_outputs(tmp_path):
    commands = dict(stage_commands("safe_dpo", tmp_path, ["model=tiny_llama"]))
    assert list(commands) == ["sft", "reward", "cost", "safe_dpo"]
    out = tmp_path.resolve()
    sft, reward, cost, safe = (overrides_of(commands[name]) for name in commands)
    assert sft["algo"] == "sft" and sft["hydra.run.dir"] == str(out / "sft")
    for stage, objective in ((reward, "reward"), (cost, "cost")):
        assert stage["algo"] == "rm" and stage["algo.objective"] == objective
        assert stage["model.adapter"] == str(out / "sft" / "adapter")
    assert safe["model.adapter"] == str(out / "sft" / "adapter")  # the same base as the scorers: they share it
    assert safe["algo.reward_model"] == str(out / "reward") and safe["algo.cost_model"] == str(out / "cost")
    assert all(overrides_of(argv)["model"] == "tiny_llama" for argv in commands.values())
    assert all(overrides_of(argv)["trainer.resume"] == "auto" for argv in commands.values())


def test_every_stage_composes():
    for name, overrides in STAGES["safe_dpo"]:
        cfg, _ = compose([o.format(out="/tmp/out") for o in overrides])
        assert cfg.algo._target_


def test_dry_run_prints_the_commands(tmp_path):
    result = subprocess.run([sys.executable, "-m", "peftlab.pipeline", "safe_dpo", str(tmp_path), "--dry-run"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("train.py") == 4 and "algo.cost_model=" in result.stdout
    assert not (tmp_path / "sft").exists()


@pytest.mark.slow
def test_toy_pipeline_makes_the_policy_safer_without_losing_accuracy(tmp_path):
    """Done-when of issue 3: eval/unsafe_rate ≤ ½ base/unsafe_rate (the SFT model's, ≥ 0.3), eval/accuracy ≥
    base/accuracy − 0.05. (Its wall time, under 10 minutes on 2 cores, is measured and reported, not asserted.)"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "peftlab.pipeline", "safe_dpo", str(tmp_path / "out"),
                             "logger=none"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "safe_dpo" / "summary.json").read_text())
    assert summary["algo_hparams"]["scorers_share_base"] == {"reward": True, "cost": True}
    assert summary["base/unsafe_rate"] >= 0.3, summary
    assert summary["eval/unsafe_rate"] <= 0.5 * summary["base/unsafe_rate"], summary
    assert summary["eval/accuracy"] >= summary["base/accuracy"] - 0.05, summary
