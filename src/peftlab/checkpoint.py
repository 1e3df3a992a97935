"""Atomic checkpoints and exact resume.

A checkpoint is a directory `checkpoints/step-<N>/` holding what the next step depends on:

    state.pt          step, the trainable weights (gathered whole), optimizer and scheduler state, the algorithm's
                      extra state (rank 0 writes it)
    rng-<rank>.pt     each process's RNGs (ranks draw different dropout masks)
    deepspeed/        under DeepSpeed only: its own checkpoint, where each rank writes its shard of the optimizer
                      state (and of the fp32 weights); the optimizer entry of state.pt is then empty

It is written under a temporary name and renamed into place, and `checkpoints/latest` is replaced atomically after
it, so a kill at any moment leaves the previous checkpoint loadable. The data order is a pure function of
(seed, step), so no loader state is needed. Saving and loading are collective: every rank calls them.
A DeepSpeed checkpoint resumes under the same ZeRO stage and number of processes.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from peftlab import dist
from peftlab.models import unwrap
from peftlab.validate import ConfigError

LATEST = "latest"
DEEPSPEED_TAG = "state"  # the one DeepSpeed checkpoint inside a step directory


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, model, optimizer, scheduler, algo, accelerator, extra: dict | None = None,
         keep: int = 2) -> Path:
    """Write checkpoints/step-<step> atomically, point `latest` at it, and prune old ones (every rank calls it)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    main, deepspeed = accelerator.is_main_process, dist.uses_deepspeed(accelerator)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    weights = dist.trainable_state(model, accelerator)  # collective under ZeRO-3
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if deepspeed:  # collective: each rank writes its own optimizer shard
        model.save_checkpoint(str(tmp / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False,
                              exclude_frozen_parameters=True)
    if main:
        torch.save(
            {
                "step": step,
                "model": weights,
                "optimizer": None if deepspeed else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "algo": algo.state_dict(),
                "extra": extra or {},
            },
            tmp / "state.pt",
        )
    accelerator.wait_for_everyone()
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find(resume: str | None, run_dir: Path) -> Path | None:
    """trainer.resume → a checkpoint directory (None: start fresh).

    `auto` looks in this run's directory (a requeued job continues itself); a run directory means its latest
    checkpoint; a checkpoint directory means itself.
    """
    if not resume:
        return None
    path = Path(run_dir) if resume == "auto" else Path(resume).expanduser()
    if (path / "state.pt").exists():
        return path
    root = path / "checkpoints"
    pointer = root / LATEST
    if pointer.exists() and (root / pointer.read_text().strip() / "state.pt").exists():
        return root / pointer.read_text().strip()
    if resume == "auto":
        return None
    raise FileNotFoundError(f"trainer.resume={resume}: no checkpoint there (expected <run dir>/checkpoints/{LATEST})")


def step_of(path: Path) -> int:
    """The step a checkpoint directory was written at (from its name, without loading it)."""
    return int(Path(path).name.split("-")[-1])


def check_resumable(path: Path, accelerator) -> None:
    """ConfigError unless this launch can continue the checkpoint: DeepSpeed's shards load only under DeepSpeed,
    and only into as many processes as wrote them (one rng-<rank>.pt each)."""
    written_with_deepspeed = (Path(path) / "deepspeed").exists()
    if written_with_deepspeed != dist.uses_deepspeed(accelerator):
        raise ConfigError(f"trainer.resume: checkpoint {path} was written {'with' if written_with_deepspeed else 'without'}"
                          " DeepSpeed: resume it with the dist= it was written with")
    writers = len(list(Path(path).glob("rng-*.pt")))
    if written_with_deepspeed and writers != accelerator.num_processes:
        raise ConfigError(f"trainer.resume: checkpoint {path} holds DeepSpeed shards of {writers} processes: "
                          f"resume it with {writers} processes, not {accelerator.num_processes}")


def load(path: Path, model, optimizer, scheduler, algo, accelerator) -> dict:
    """Restore a checkpoint in place on every rank; returns its dict (step, extra)."""
    path = Path(path)
    check_resumable(path, accelerator)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if dist.uses_deepspeed(accelerator):  # weights (fp32 master shards) and optimizer shards, as DeepSpeed wrote them
        model.load_checkpoint(str(path / "deepspeed"), tag=DEEPSPEED_TAG, load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        params = dict(unwrap(model).named_parameters())
        missing = [n for n in state["model"] if n not in params]
        if missing:
            raise ValueError(f"checkpoint {path} does not match this model: {missing[:3]}... are unknown parameters")
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value.to(params[name].device))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    algo.load_state_dict(state["algo"])
    own = path / f"rng-{accelerator.process_index}.pt"
    # A resume with more processes than wrote the checkpoint: the new ranks continue rank 0's streams.
    set_rng_state(torch.load(own if own.exists() else path / "rng-0.pt", weights_only=False))
    return state
