"""Where metrics go: metrics.jsonl always, W&B when logger=wandb; run naming and summary.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from omegaconf import OmegaConf


def flatten(d: dict, prefix: str = "") -> dict:
    """{'peft': {'r': 8}} → {'peft.r': 8}: flat keys so W&B can group and draw parallel coordinates on them."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def write_json_atomic(path: Path, obj) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_name(cfg, overrides: list[str]) -> str:
    """The run's name: logger/hydra overrides left out, the rest joined (`peft.r=8,peft=dora`), or `default`."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    skip = ("logger", "hydra.", "trainer.resume", "output_root", "+experiment", "experiment")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(skip)]
    return ",".join(kept) if kept else "default"


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    """A W&B run configured from the resolved Hydra config (flattened) plus the group choices."""

    def __init__(self, logger_cfg, run_dir: Path, config: dict, name: str, group: str, tags: list[str]):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        mode = os.environ.get("WANDB_MODE") or logger_cfg.mode
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            dir=str(run_dir),
            name=name,
            group=group,
            tags=tags,
            config=config,
            mode=mode,
            reinit="finish_previous",
        )

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def summary(self, values):
        for k, v in values.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                self.run.summary[k] = v

    def finish(self):
        self.run.finish()


class RunLog:
    """Every logged dict goes to metrics.jsonl (one line per call, with `step`) and to the tracker."""

    def __init__(self, run_dir: Path, tracker, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tracker = tracker
        self.file = None
        if not enabled:  # a rank other than 0 of a multi-process run: rank 0 writes the run's one log
            return
        if resume_step is not None and self.path.exists():  # continuing in place: drop lines past the checkpoint
            lines = [l for l in self.path.read_text().splitlines() if l.strip()]
            kept = [l for l in lines if json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        self.file = open(self.path, "a")

    def log(self, metrics: dict, step: int) -> None:
        if self.file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        self.tracker.log(metrics, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def sweep_group(sweep_dir) -> str:
    """The W&B group of a sweep's runs: its directory's last two parts, e.g. "2026-11-22_09-00-06" for
    outputs/multirun/2026-11-22/09-00-06 (the time alone would put same-time sweeps of different days together)."""
    path = Path(sweep_dir)
    return f"{path.parent.name}_{path.name}" if path.parent.name else path.name


def make_tracker(cfg, run_dir: Path, choices: dict, overrides: list[str], sweep: str | None, is_main: bool):
    if cfg.logger.backend != "wandb" or not is_main:
        return NullTracker()
    config = flatten(OmegaConf.to_container(cfg, resolve=True))
    config.update({k: choices.get(k) for k in ("model", "algo", "peft", "data")})
    group = cfg.logger.group or sweep or f"{choices.get('model')}-{choices.get('algo')}-{choices.get('peft')}"
    tags = [str(choices.get(k)) for k in ("model", "algo", "peft")] + [str(t) for t in cfg.logger.tags]
    return WandbTracker(cfg.logger, run_dir, config, run_name(cfg, overrides), group, tags)


def read_offline_run(wandb_file: Path) -> dict:
    """What an offline W&B run recorded (name, group, tags, config, summary, history), read from its .wandb file.

    The file is W&B's record log: a 7-byte header (":W&B", magic, version) then LevelDB-log blocks of 32 KiB whose
    chunks (7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) carry protobuf `Record`s. Reading it lets
    tests and offline clusters check runs without `wandb sync`.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(wandb_file).read_bytes()
    block, pos, pending, payloads = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - (pos % block)
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            payloads.append(pending)
            pending = b""
    def items(updates) -> dict:
        """W&B items name their key by `key` or by `nested_key` parts, and carry a value as JSON or typed."""
        out = {}
        for item in updates:
            key = item.key or ".".join(item.nested_key)
            typed = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
            if typed and typed != "value_json":
                out[key] = getattr(item, typed)
            else:
                out[key] = json.loads(item.value_json)
        return out

    run = {"name": None, "group": None, "tags": [], "config": {}, "summary": {}, "history": []}
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group, tags=list(record.run.tags))
            run["config"].update(items(record.run.config.update))
        elif kind == "config":
            run["config"].update(items(record.config.update))
        elif kind == "summary":
            run["summary"].update(items(record.summary.update))
        elif kind == "history":
            run["history"].append(items(record.history.item))
    return run
