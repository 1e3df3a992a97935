"""Atomic, verifiable checkpoints and exact resume.

A checkpoint is a directory `checkpoints/step-<N>/` holding what the next step depends on:

    state.pt          step, the trainable weights (gathered whole), optimizer and scheduler state, the algorithm's
                      extra state (rank 0 writes it)
    rng-<rank>.pt     each process's RNGs (ranks draw different dropout masks)
    deepspeed/        under DeepSpeed only: its own checkpoint, where each rank writes its shard of the optimizer
                      state (and of the fp32 weights); the optimizer entry of state.pt is then empty
    manifest.json     written last: format, step, `finite` (every saved weight is finite) and, for every other
                      file, its relative path, size and sha256

It is written under a temporary name (`.tmp-step-<N>`) and renamed into place, and `checkpoints/latest` is replaced
atomically after it, so a kill at any moment leaves the previous checkpoint loadable. A directory is a checkpoint
only if its manifest matches its files: resume verifies it, skips a damaged latest checkpoint for the newest valid
one (with one warning line), and never restarts from step 0 while checkpoints exist that it cannot use.

Every file is read with `torch.load(weights_only=True)`: tensors and plain Python values only, so a checkpoint
cannot run code when it is loaded. The RNG states are stored in that form too (numpy's key array as a tensor).

The data order is a pure function of (seed, step), so no loader state is needed. Saving and loading are
collective: every rank calls them. A DeepSpeed checkpoint resumes under the same ZeRO stage and number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from peftlab import dist
from peftlab.models import unwrap
from peftlab.errors import ConfigError

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
REQUIRED = ("state.pt", "rng-0.pt")  # a manifest that lists neither is not one of ours
DEEPSPEED_TAG = "state"  # the one DeepSpeed checkpoint inside a step directory
STEP_NAME = re.compile(r"step-(\d+)")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---- RNG states in a form weights_only=True loads ------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG a step draws from, as tensors and plain values (python's state is already a tuple of ints)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def refuse_unsafe(step_dir: Path) -> None:
    """ConfigError naming the first of our files (state.pt, rng-<rank>.pt) whose pickle references anything
    weights_only=True would not load: found by reading the pickle's opcodes, without unpickling anything."""
    for path in sorted(Path(step_dir).glob("*.pt")):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"{path}: not a readable checkpoint file ({type(err).__name__})") from None
        if unsafe:
            raise ConfigError(f"{path}: refused to load: it holds a pickled {unsafe[0]}, which could run code "
                              "(a peftlab checkpoint holds only tensors and plain values); do not resume from it")


def safe_load(path: Path):
    """torch.load that accepts only tensors and plain values: an object that would run code on load is refused
    with a one-line ConfigError before anything of it executes."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        refused = re.search(r"GLOBAL (\S+)", str(err))
        if refused:
            raise ConfigError(f"{path}: refused to load: it holds a pickled {refused.group(1)}, which could run code "
                              "(a peftlab checkpoint holds only tensors and plain values); do not resume from it"
                              ) from None
        raise ConfigError(f"{path}: not a readable checkpoint file ({type(err).__name__})") from None


# ---- the manifest -----------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(step_dir: Path, step: int, finite: bool) -> None:
    """manifest.json for every file now in step_dir (call it after all of them are written)."""
    step_dir = Path(step_dir)
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = [{"path": p.relative_to(step_dir).as_posix(), "size": p.stat().st_size, "sha256": sha256_of(p)}
               for p in files]
    manifest = {"format": MANIFEST_FORMAT, "step": step, "finite": bool(finite), "files": entries}
    write_text_atomic(step_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def read_manifest(step_dir: Path) -> dict | None:
    try:
        return json.loads((Path(step_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def problem_with(step_dir: Path) -> str | None:
    """Why step_dir is not a complete, intact checkpoint (None: it is). Sizes first, then checksums."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "does not exist"
    if not (step_dir / MANIFEST).exists():
        return f"no {MANIFEST} (incomplete: the save did not finish)"
    manifest = read_manifest(step_dir)
    entry_keys = {"path", "size", "sha256"}
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), list)
            and all(isinstance(e, dict) and entry_keys <= e.keys() for e in manifest["files"])):
        return f"{MANIFEST} is unreadable"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"{MANIFEST} has format {manifest.get('format')} (this peftlab reads {MANIFEST_FORMAT})"
    named = STEP_NAME.fullmatch(step_dir.name)
    if named and manifest.get("step") != int(named.group(1)):
        return f"{MANIFEST} says step {manifest.get('step')}"
    listed = {entry["path"] for entry in manifest["files"]}
    for required in REQUIRED:
        if required not in listed:
            return f"{MANIFEST} does not list {required}"
    for entry in manifest["files"]:
        path = step_dir / entry["path"]
        if not path.is_file():
            return f"{entry['path']} missing"
        size = path.stat().st_size
        if size != entry["size"]:
            kind = "truncated" if size < entry["size"] else "has the wrong size"
            return f"{entry['path']} {kind} (size {size} ≠ {entry['size']})"
    for entry in manifest["files"]:
        if sha256_of(step_dir / entry["path"]) != entry["sha256"]:
            return f"{entry['path']} is corrupted (sha256 differs from {MANIFEST})"
    return None


def is_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point())


# ---- saving -----------------------------------------------------------------------------------------------------

def step_dirs(root: Path) -> list[Path]:
    """checkpoints/step-<N> directories, oldest first (temporary `.tmp-step-<N>` ones are not checkpoints)."""
    found = [p for p in Path(root).glob("step-*") if p.is_dir() and STEP_NAME.fullmatch(p.name)]
    return sorted(found, key=step_of)


def to_prune(root: Path, keep: int, just_saved: Path) -> list[Path]:
    """The checkpoints beyond the `keep` newest (keep=0: none), sparing the one just saved and the newest whose
    weights are finite (a diverged run keeps the last point it could be restarted from)."""
    dirs = step_dirs(root)
    if keep <= 0:
        return []
    spared = set(dirs[-keep:]) | {just_saved}
    finite = [d for d in dirs if (read_manifest(d) or {}).get("finite") is True]
    if finite:
        spared.add(finite[-1])
    return [d for d in dirs if d not in spared]


def save(run_dir: Path, step: int, model, optimizer, scheduler, algo, accelerator, extra: dict | None = None,
         keep: int = 2) -> Path:
    """Write checkpoints/step-<step> atomically with its manifest, point `latest` at it, and prune old ones (every
    rank calls it)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    main, deepspeed = accelerator.is_main_process, dist.uses_deepspeed(accelerator)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".tmp-step-*"):  # saves killed midway (the run lock says no one else writes)
            shutil.rmtree(leftover, ignore_errors=True)
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
    accelerator.wait_for_everyone()  # every rank's files are in tmp/
    if main:
        write_manifest(tmp, step, is_finite(weights))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name)
        for old in to_prune(root, keep, final):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---- finding and loading ----------------------------------------------------------------------------------------

def is_checkpoint_dir(path: Path) -> bool:
    """A step directory (as opposed to a run directory, which holds checkpoints/)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return False
    return bool(STEP_NAME.fullmatch(path.name)) or (path / "state.pt").exists() or (path / MANIFEST).exists()


def find(resume: str | None, run_dir: Path, warn=warn) -> Path | None:
    """trainer.resume → a verified checkpoint directory (None: start fresh).

    `auto` looks in this run's directory (a requeued job continues itself); a run directory means its newest valid
    checkpoint; a checkpoint directory means itself and must be valid (the user named it: no fallback).
    A damaged newest checkpoint is skipped for the newest valid one with one line through `warn`; checkpoints
    that exist but none of them valid are a ConfigError, never a silent restart from step 0.
    """
    if not resume:
        return None
    path = Path(run_dir) if resume == "auto" else Path(resume).expanduser()
    if resume != "auto" and is_checkpoint_dir(path):
        problem = problem_with(path)
        if problem:
            raise ConfigError(f"trainer.resume={resume}: {problem}; name another checkpoint, or the run directory "
                              "to resume its newest valid one")
        refuse_unsafe(path)
        return path
    root = path / "checkpoints"
    candidates = step_dirs(root)[::-1]
    if not candidates:
        if resume == "auto":
            unfinished = sorted(root.glob(".tmp-step-*"), key=step_of)
            if unfinished:
                warn(f"checkpoints/{unfinished[-1].name} is a save that did not finish (no checkpoint was "
                     "completed); starting from step 0")
            return None
        raise ConfigError(f"trainer.resume={resume}: no checkpoint there (expected <run dir>/checkpoints/step-<N>)")
    skipped = []
    for candidate in candidates:
        problem = problem_with(candidate)
        if problem is None:
            refuse_unsafe(candidate)  # hostile content is an error to look into, not a reason to fall back
            notes = skipped + pointer_note(root, candidate)
            if notes:
                warn(f"{'; '.join(notes)}; resuming from {candidate.name}")
            return candidate
        skipped.append(f"checkpoints/{candidate.name}: {problem}")
    raise ConfigError(f"no valid checkpoint in {root} ({'; '.join(skipped)}): remove {root} to start over, or "
                      "choose another hydra.run.dir")


def pointer_note(root: Path, chosen: Path) -> list[str]:
    """A note when checkpoints/latest names a directory that does not exist. It is written after each rename, so
    lagging one save behind is harmless: the step directories and their manifests decide, not the pointer."""
    pointer = root / LATEST
    named = pointer.read_text().strip() if pointer.exists() else chosen.name
    if (root / named).is_dir():
        return []
    return [f"checkpoints/{LATEST} names {named}, which does not exist"]


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


def load(path: Path, model, optimizer, scheduler, algo, accelerator, verify: bool = True) -> dict:
    """Restore a checkpoint in place on every rank; returns its dict (step, extra).

    verify=False skips the manifest check when `find` has just done it (it reads every byte once more).
    """
    path = Path(path)
    if verify:
        problem = problem_with(path)
        if problem:
            raise ConfigError(f"checkpoint {path}: {problem}")
        refuse_unsafe(path)
    check_resumable(path, accelerator)
    state = safe_load(path / "state.pt")
    own = path / f"rng-{accelerator.process_index}.pt"
    # A resume with more processes than wrote the checkpoint: the new ranks continue rank 0's streams.
    rng = safe_load(own if own.exists() else path / "rng-0.pt")
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
    set_rng_state(rng)
    return state
