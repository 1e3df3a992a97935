"""Run-directory ownership: one process (a lock) and one training config (a fingerprint checked on resume).

What this module keeps in a run directory:

    .lock       held with fcntl.flock by the process running in the directory (the OS releases it when that
                process dies); while held it says who holds it: {"pid", "host", "started"} as one JSON line
    run.json    written by the first start: {"format", "fingerprint", "config" (the comparable config),
                "resumable_keys", "created", "hydra" (the texts of .hydra/config.yaml, overrides.yaml and, under
                Hydra, hydra.yaml of the latest launch that trained here), "launches" ([{"time", "action",
                "max_steps"}])}

Hydra rewrites `.hydra/*` at every launch before our code runs, so a launch that is refused, or finds nothing to
do, puts back the texts recorded in run.json: a run directory is never re-labelled by a launch that did not
train in it.

A launch into a directory (`decide_launch`):
    no run.json                           start: record run.json (a legacy directory's checkpoints still resume)
    same config, not finished             continue from the newest valid checkpoint
    same config, finished, max_steps ≤    done: one line, exit 0, nothing rewritten
    same config, finished, max_steps >    extend: continue from the newest valid checkpoint
    another config                        ConfigError naming the keys that differ
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from peftlab import checkpoint
from peftlab.errors import ConfigError

LOCK = ".lock"
RUN_RECORD = "run.json"
RUN_RECORD_FORMAT = 1
HYDRA_DIR = ".hydra"  # hydra.output_subdir's default

# Keys a launch may change when it continues a run: none of them changes what is trained or how it is measured.
RESUMABLE_KEYS = (
    "trainer.max_steps",         # extends (or shortens) a run; the LR schedule is rebuilt for the new length
    "trainer.resume",            # how this launch finds its checkpoint, not what it trains
    "trainer.eval_every",        # when evaluation runs; it samples on a forked RNG, so training draws are the same
    "trainer.save_every",        # when checkpoints are written
    "trainer.log_every",         # when train/* lines are written
    "trainer.keep_checkpoints",  # disk use
    "trainer.num_threads",       # CPU threads: speed, e.g. a requeue on another machine
    "trainer.eval_base",         # read only by a fresh start: a resumed run's base/* come from its checkpoint
    "logger",                    # where metrics go besides metrics.jsonl
    "output_root",               # where new run directories are made; this one exists already
    "run_name",                  # the label of summary.json and W&B
    "save_merged",               # an extra output written after training
    "objective",                 # which summary figure main() hands a sweeper
    "hydra",                     # the launcher's own node (run dir, sweeper, logging)
)


# ---- the lock ---------------------------------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run directory for the run's lifetime (taken on construction).

        with RunLock(run_dir):          # or: lock = RunLock(run_dir) ... lock.release()
            train()

    A second process on the same directory gets a one-line ConfigError naming the holder. The lock is
    fcntl.flock on <run>/.lock, so the OS drops it when the holder dies, however it dies.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no truncation: the holder's line stays readable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise ConfigError(f"run directory {self.path.parent} is in use by {describe_holder(holder)}; "
                              "wait for it or choose another hydra.run.dir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # before unlocking: a stale holder line is never read as a live one
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(line: str) -> str:
    try:
        holder = json.loads(line)
        started = datetime.fromisoformat(holder["started"]).strftime("%Y-%m-%d %H:%M:%S")
        return f"pid {holder['pid']} on host {holder['host']} since {started}"
    except (ValueError, KeyError, TypeError):  # the holder has locked but not yet written its line
        return "another process"


# ---- the fingerprint ----------------------------------------------------------------------------------------------

def comparable_config(cfg) -> dict:
    """The resolved training config without RESUMABLE_KEYS: what must be equal for a launch to continue a run."""
    cfg = copy.deepcopy(cfg)
    if "hydra" in cfg:  # resolvable only inside a Hydra app, and not training config anyway
        with open_dict(cfg):
            del cfg["hydra"]
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUMABLE_KEYS:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(recorded: dict, launched: dict) -> list[str]:
    """["peft.r: 16 → 8", ...]: the keys whose values differ, recorded value first."""
    old, new = flatten(recorded), flatten(launched)

    def shown(flat: dict, key: str) -> str:
        if key not in flat:
            return "(absent)"
        return flat[key] if isinstance(flat[key], str) else json.dumps(flat[key])

    keys = list(new) + [k for k in old if k not in new]
    return [f"{k}: {shown(old, k)} → {shown(new, k)}" for k in keys if old.get(k, ...) != new.get(k, ...)]


# ---- run.json and Hydra's files -------------------------------------------------------------------------------

def hydra_texts(cfg, overrides: list[str]) -> dict[str, str]:
    """The .hydra/ files of this launch as Hydra writes them, made from the launch's own config (not read back from
    disk, where a concurrent launch into the same directory may already have replaced them)."""
    texts = {"config.yaml": OmegaConf.to_yaml(cfg),
             "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(overrides)))}
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        texts["hydra.yaml"] = OmegaConf.to_yaml(HydraConfig.instance().cfg)
    return texts


def read_run_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"{path} is not valid JSON: restore it, or choose another hydra.run.dir") from None
    if record.get("format") != RUN_RECORD_FORMAT:
        raise ConfigError(f"{path} has format {record.get('format')} (this peftlab reads {RUN_RECORD_FORMAT})")
    return record


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def record_launch(run_dir: Path, cfg, overrides: list[str], action: str) -> dict:
    """Write run.json for a launch that trains here: created by a start, its Hydra texts refreshed by a continue or
    an extend (so that a later refused launch restores the texts of the launch that trained last)."""
    record = read_run_record(run_dir) if action != "start" else None
    if record is None:
        config = comparable_config(cfg)
        record = {"format": RUN_RECORD_FORMAT, "fingerprint": fingerprint(config), "config": config,
                  "resumable_keys": list(RESUMABLE_KEYS), "created": now(), "launches": []}
    record["hydra"] = hydra_texts(cfg, overrides)
    record["launches"].append({"time": now(), "action": action, "max_steps": int(cfg.trainer.max_steps)})
    checkpoint.write_text_atomic(Path(run_dir) / RUN_RECORD, json.dumps(record, indent=1) + "\n")
    return record


def restore_hydra_files(run_dir: Path) -> None:
    """Put back .hydra/* as run.json recorded them (nothing to do without run.json)."""
    try:
        record = read_run_record(run_dir)
    except ConfigError:
        return
    if not record:
        return
    hydra_dir = Path(run_dir) / HYDRA_DIR
    hydra_dir.mkdir(exist_ok=True)
    for name, text in record.get("hydra", {}).items():
        checkpoint.write_text_atomic(hydra_dir / name, text)


def read_summary(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def holds_a_run(run_dir: Path) -> bool:
    """Whether the directory holds (part of) a run: what an error exit must not delete."""
    run_dir = Path(run_dir)
    return ((run_dir / RUN_RECORD).exists() or (run_dir / "summary.json").exists()
            or bool(checkpoint.step_dirs(run_dir / "checkpoints")))


# ---- the decision -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """What a launch into a run directory does.

    action: start (first launch here) | continue | extend (a finished run, to a larger max_steps) | done (exit 0)
    resume_from: the verified checkpoint to load (None: step 0)
    message: the line to print for done and extend
    warning: the line about skipped checkpoints, if any
    """

    action: str
    resume_from: Path | None = None
    message: str | None = None
    warning: str | None = None


def continues_this_dir(resume, run_dir: Path) -> bool:
    if resume == "auto":
        return True
    if not resume:
        return False
    named, own = Path(str(resume)).expanduser().resolve(), Path(run_dir).resolve()
    return named == own or own in named.parents


def decide_launch(run_dir: Path, cfg) -> Launch:
    """Decide what a launch with `cfg` does in run_dir, from run.json, summary.json and the checkpoints.

    Reads only; raises a one-line ConfigError when the launch must not proceed.
    """
    run_dir = Path(run_dir)
    resume, max_steps = cfg.trainer.resume, int(cfg.trainer.max_steps)
    if not continues_this_dir(resume, run_dir) and holds_a_run(run_dir):
        raise ConfigError(f"run directory {run_dir} already holds a run: trainer.resume={resume or 'null'} would "
                          "overwrite it; choose another hydra.run.dir (or trainer.resume=auto to continue it)")
    record = read_run_record(run_dir)
    summary = read_summary(run_dir)
    if record is not None:
        check_same_config(run_dir, record, cfg)
        nothing_to_do = nothing_left(run_dir, summary, max_steps)
        if nothing_to_do:
            return Launch("done", message=nothing_to_do)

    notes = []
    resume_from = checkpoint.find(resume, run_dir, warn=notes.append)
    warning = notes[0] if notes else None
    if resume_from is not None and checkpoint.step_of(resume_from) > max_steps:
        raise ConfigError(f"checkpoint {resume_from} is past trainer.max_steps={max_steps}: "
                          f"pass trainer.max_steps>={checkpoint.step_of(resume_from)}")
    if record is None:
        if resume_from is not None and continues_this_dir(resume, run_dir):
            legacy = f"{run_dir} has checkpoints but no {RUN_RECORD}, so their config cannot be checked"
            warning = f"{warning}; {legacy}" if warning else legacy
        return Launch("start", resume_from, warning=warning)
    if summary.get("status") == "finished":
        if resume_from is None:
            raise ConfigError(f"run {run_dir} finished {summary.get('steps')} steps and has no checkpoint to extend "
                              f"from: run trainer.max_steps={max_steps} in another hydra.run.dir")
        return Launch("extend", resume_from, warning=warning,
                      message=f"run {run_dir} finished {summary.get('steps')} steps; extending it to "
                              f"trainer.max_steps={max_steps} from {resume_from.name} (the LR schedule is rebuilt "
                              "for the new length)")
    return Launch("continue", resume_from, warning=warning)


def check_same_config(run_dir: Path, record: dict, cfg) -> None:
    """ConfigError unless cfg is the recorded training config, apart from RESUMABLE_KEYS."""
    launched = comparable_config(cfg)
    if record.get("fingerprint") == fingerprint(launched):
        return
    changed = differences(record.get("config", {}), launched)
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    raise ConfigError(f"run directory {run_dir} holds a run with another training config "
                      f"({shown or 'its fingerprint differs'}): continue it with the config in its {RUN_RECORD}, "
                      "or start a new run in another hydra.run.dir")


def nothing_left(run_dir: Path, summary: dict, max_steps: int) -> str | None:
    """The line to print when the run is over and this launch asks for no more steps (None: there is work)."""
    status = summary.get("status")
    if status == "diverged":
        return f"run {run_dir} diverged (summary.json): nothing to continue; change the config in another hydra.run.dir"
    steps = summary.get("steps")
    if status == "finished" and isinstance(steps, int) and max_steps <= steps:
        return f"run {run_dir} already finished {steps} steps (trainer.max_steps={max_steps}): nothing to do"
    return None


def open_run(run_dir: Path, cfg, overrides: list[str], warn=checkpoint.warn) -> Launch:
    """decide_launch, then what the decision writes: run.json for a launch that trains; for one that is refused
    (ConfigError) or finds nothing to do, the .hydra/ files put back as they were."""
    try:
        launch = decide_launch(run_dir, cfg)
    except ConfigError:
        restore_hydra_files(run_dir)
        raise
    if launch.warning:
        warn(launch.warning)
    if launch.action == "done":
        restore_hydra_files(run_dir)
    else:
        record_launch(run_dir, cfg, overrides, launch.action)
    return launch


def claim(run_dir: Path, cfg, overrides: list[str], warn=checkpoint.warn) -> tuple[RunLock, Launch]:
    """Rank 0's whole entry into a run directory: take the lock, then open_run. Whatever refuses the launch
    (the lock, the config) leaves the directory as it was, .hydra/ included."""
    try:
        lock = RunLock(run_dir)
    except ConfigError:
        restore_hydra_files(run_dir)
        raise
    try:
        launch = open_run(run_dir, cfg, overrides, warn)
    except BaseException:
        lock.release()
        raise
    if launch.action == "done":
        lock.release()
    return lock, launch
