"""Shared test fixtures: offline environment, config composition, and in-process training runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(REPO))  # train.py lives at the repository root

import peftlab  # noqa: E402,F401  (registers ${repo:...})

@pytest.fixture(autouse=True)
def own_environment():
    """Each test gets the environment it started with back: an in-process DeepSpeed run sets RANK, MASTER_PORT and
    the like for its world of one, and later tests' subprocesses (parallel sweep jobs) would inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


FAST = ["logger=none", "eval=none", "trainer.eval_base=false", "trainer.log_every=1"]


def compose(overrides: list[str]):
    """The config `python train.py <overrides>` would run, plus the group choices Hydra made."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def train_run(run_dir: Path, overrides: list[str]) -> Path:
    """Run train.run in this process as the CLI would (with .hydra/config.yaml written), return the run dir."""
    from omegaconf import OmegaConf

    import train

    cfg, choices = compose(overrides)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    train.run(cfg, run_dir, choices, list(overrides))
    return run_dir


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def nonzero_lora_b(model, seed: int = 1, std: float = 0.05) -> None:
    """LoRA starts with B = 0 (policy = reference, every gradient of A zero); seed B so both differ from that."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


CPU_DEVICE = "cpu"


def policy_of(cfg, head: str = "causal_lm"):
    """The policy train.py would build for `cfg` (peftlab.build's call), on the CPU."""
    import torch

    from peftlab.models import build_policy, starting_adapter, train_dtype

    device = torch.device(CPU_DEVICE)
    return build_policy(cfg.model, cfg.peft, start_adapter=starting_adapter(cfg.model, cfg.algo.start_from),
                        compute=train_dtype(cfg.trainer.precision, device), device=device, head=head,
                        gradient_checkpointing=cfg.trainer.gradient_checkpointing is True, reference_adapter=True)


def base_of(cfg, head: str = "causal_lm"):
    """The frozen base train.py would build for `cfg`, on the CPU."""
    import torch

    from peftlab.models import build_base, train_dtype

    device = torch.device(CPU_DEVICE)
    return build_base(cfg.model, cfg.peft, compute=train_dtype(cfg.trainer.precision, device), device=device, head=head)


def live_policy(overrides: list[str]):
    """(cfg, tokenizer, policy): a tiny LoRA policy built as train.py builds it, with a non-zero adapter."""
    import torch

    from peftlab.models import load_tokenizer

    cfg, _ = compose(overrides)
    torch.manual_seed(0)
    policy = policy_of(cfg)
    nonzero_lora_b(policy)
    return cfg, load_tokenizer(cfg.model), policy


def algorithm(overrides: list[str] = (), **options):
    """An algorithm built from conf/algo/ exactly as train.py builds it; `options` override its keys."""
    from omegaconf import OmegaConf

    from peftlab.build import make_algorithm
    from peftlab.models import load_tokenizer, policy_identity

    cfg, _ = compose(list(overrides))
    algo_cfg = OmegaConf.merge(cfg.algo, options)
    return make_algorithm(algo_cfg, tokenizer=load_tokenizer(cfg.model), max_length=cfg.model.max_length,
                          policy=policy_identity(cfg.model, cfg.peft, algo_cfg.start_from),
                          logits_chunk_size=cfg.trainer.logits_chunk_size)


def set_up(algo, policy, reference=None, train_examples=(), eval_examples=()):
    """algo.setup as the builder calls it, on the CPU; returns the algorithm."""
    import torch

    algo.setup(policy, reference=reference, device=torch.device(CPU_DEVICE), train_examples=list(train_examples),
               eval_examples=list(eval_examples))
    return algo


@pytest.fixture
def run_training(tmp_path):
    def _run(*overrides, name="run"):
        return train_run(tmp_path / name, list(overrides))

    return _run
