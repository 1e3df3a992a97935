"""Where metrics go: metrics.jsonl and samples.jsonl always, W&B when logger=wandb; run naming and summary.json."""

from __future__ import annotations

import json
import math
import netrc
import os
import socket
import sys
import threading
from configparser import ConfigParser
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import OmegaConf

from peftlab.adapters import effective_alpha


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


def finite_json(obj):
    """`obj` with every non-finite float as None, so the JSON written is strict (no bare NaN or Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(finite_json(obj), indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_name(cfg, overrides: list[str]) -> str:
    """The run's name: logger/hydra overrides left out, the rest joined (`peft.r=8,peft=dora`), or `default`."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    skip = ("logger", "hydra.", "trainer.resume", "output_root", "+experiment", "experiment")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(skip)]
    return ",".join(kept) if kept else "default"


WANDB_DEFAULT_BASE_URL = "https://api.wandb.ai"
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # older names W&B still accepts


def wandb_mode(logger_cfg) -> tuple[str, str]:
    """(the mode a W&B run gets, the setting that chose it, e.g. "WANDB_MODE=offline" or "logger.mode=online").

    The WANDB_MODE environment variable wins over logger.mode: it is W&B's own switch, the one a cluster's job
    script or a CI job sets to keep every run offline (or disabled) whatever a command line or a sweep file
    says. When it overrides a different logger.mode, WandbTracker prints one line saying so.
    """
    env = os.environ.get("WANDB_MODE")
    if env:
        return WANDB_MODE_ALIASES.get(env, env), f"WANDB_MODE={env}"
    mode = str(logger_cfg.mode)
    return WANDB_MODE_ALIASES.get(mode, mode), f"logger.mode={mode}"


def wandb_base_url() -> str:
    """The W&B server runs talk to, found where wandb looks: WANDB_BASE_URL, then the workspace and global
    settings files (`wandb login --host` writes base_url there), then W&B's cloud."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"].rstrip("/")
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    for settings in (Path("wandb") / "settings", config_dir / "settings"):
        parser = ConfigParser()
        try:
            parser.read(settings)
        except Exception:  # an unreadable settings file is wandb's problem to report, not ours
            continue
        if parser.get("default", "base_url", fallback=None):
            return parser.get("default", "base_url").rstrip("/")
    return WANDB_DEFAULT_BASE_URL


def netrc_path() -> Path:
    """The netrc file wandb reads and `wandb login` writes (wandb/sdk/lib/wbauth/wbnetrc.py): $NETRC, else
    ~/.netrc, else ~/_netrc."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix = Path.home() / ".netrc"
    windows = Path.home() / "_netrc"
    return windows if not unix.exists() and windows.exists() else unix


def wandb_credentials(base_url: str) -> str | None:
    """Where an API key for base_url would come from (as wandb looks: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE,
    then a netrc entry for the host), or None when there is none."""
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(variable):
            return variable
    path = netrc_path()
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(base_url).netloc)
    except (OSError, netrc.NetrcParseError):
        return None
    return str(path) if entry and entry[2] else None


def reachable(host: str, port: int, timeout_s: float) -> str | None:
    """None if a TCP connection to host:port opens within timeout_s, else why not.

    Name resolution has no timeout of its own (a cluster node with an unreachable DNS server can wait much
    longer), so resolution and connection run in a thread the caller stops waiting for.
    """
    outcome: list = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(str(err) or type(err).__name__)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def check_wandb_online(logger_cfg, timeout_s: float = 2.5) -> None:
    """Refuse, in one line, a W&B run that would go online without credentials or without a reachable server.

    Call it before any weight loads: W&B itself waits a long time before failing when offline, after the model
    is built. Does nothing unless logger.backend=wandb and the mode (see wandb_mode) is online.
    """
    from peftlab.errors import ConfigError

    mode, setting = wandb_mode(logger_cfg)
    if logger_cfg.backend != "wandb" or mode != "online":
        return
    fix = ("or unset WANDB_MODE (or set it to offline)" if setting.startswith("WANDB_MODE")
           else "or pass logger.mode=offline")
    url = urlsplit(wandb_base_url())
    if wandb_credentials(url.geturl()) is None:
        raise ConfigError(f"{setting}: no W&B credentials for {url.netloc} (no WANDB_API_KEY, no entry in "
                          f"{netrc_path()}): run `wandb login`, {fix} (upload later with `wandb sync`)")
    port = url.port or (80 if url.scheme == "http" else 443)
    problem = reachable(url.hostname, port, timeout_s)
    if problem:
        raise ConfigError(f"{setting}: the W&B server {url.hostname}:{port} is unreachable ({problem}): check the "
                          f"network or WANDB_BASE_URL, {fix} (upload later with `wandb sync`)")


def samples_table_columns(rows: list[dict]) -> list[str]:
    """prompt, answer, then each score any row carries (reward, cost, correct...), in first-seen order."""
    columns = ["prompt", "answer"]
    for row in rows:
        columns += [k for k in row if k not in ("step", "prefix", *columns)]
    return columns


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_samples(self, rows: list[dict], step: int) -> None:
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
        mode, setting = wandb_mode(logger_cfg)
        if setting.startswith("WANDB_MODE") and mode != logger_cfg.mode:
            print(f"W&B mode {mode} from {setting}, which wins over logger.mode={logger_cfg.mode} "
                  "(unset WANDB_MODE to use logger.mode)", file=sys.stderr)
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

    def log_samples(self, rows, step):
        """One W&B table per prefix, `samples/<prefix>` (samples/eval, samples/base): prompt, answer, scores."""
        import wandb

        for prefix in dict.fromkeys(r["prefix"] for r in rows):
            chosen = [r for r in rows if r["prefix"] == prefix]
            columns = samples_table_columns(chosen)
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in chosen],
                                allow_mixed_types=True)
            self.run.log({f"samples/{prefix}": table}, step=step)

    def summary(self, values):
        for k, v in values.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                self.run.summary[k] = v

    def finish(self):
        self.run.finish()



class RunLog:
    """Every logged dict goes to metrics.jsonl (one line per call, with `step`) and to the tracker; generated
    samples go to samples.jsonl (one line per sample: step, prefix, prompt, answer, scores) and to the tracker."""

    def __init__(self, run_dir: Path, tracker, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        self.tracker = tracker
        self.file = self.samples_file = None
        if not enabled:  # a rank other than 0 of a multi-process run: rank 0 writes the run's one log
            return
        for path in (self.path, self.samples_path):
            kept = []
            if resume_step is not None and path.exists():  # continuing in place: drop lines past the checkpoint
                lines = [l for l in path.read_text().splitlines() if l.strip()]
                kept = [l for l in lines if json.loads(l).get("step", 0) <= resume_step]
            path.write_text("".join(l + "\n" for l in kept))  # a fresh start keeps no lines of an earlier one
        self.file = open(self.path, "a")

    def log(self, metrics: dict, step: int) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(finite_json({"step": step, **metrics}), allow_nan=False) + "\n")
        self.file.flush()
        self.tracker.log(metrics, step)

    def log_samples(self, samples: list[dict], step: int, prefix: str = "eval") -> None:
        """samples: [{"prompt": str, "answer": str, optional scores such as "reward", "correct"}]; `prefix` is
        "eval" or "base" (the starting model), as in the metric names."""
        if self.file is None or not samples:
            return
        if self.samples_file is None:
            self.samples_file = open(self.samples_path, "a")
        rows = [{"step": step, "prefix": prefix, **finite_json(s)} for s in samples]
        self.samples_file.write("".join(json.dumps(r) + "\n" for r in rows))
        self.samples_file.flush()
        self.tracker.log_samples(rows, step)

    def close(self) -> None:
        for file in (self.file, self.samples_file):
            if file is not None:
                file.close()


def sweep_group(sweep_dir) -> str:
    """The W&B group of a sweep's runs: its directory's last two parts, e.g. "2026-11-22_09-00-06" for
    outputs/multirun/2026-11-22/09-00-06 (the time alone would put same-time sweeps of different days together)."""
    path = Path(sweep_dir)
    return f"{path.parent.name}_{path.name}" if path.parent.name else path.name


def make_tracker(cfg, run_dir: Path, choices: dict, overrides: list[str], sweep: str | None, is_main: bool):
    """The run's tracker. Its config is the resolved Hydra config, flattened, with the group choices added and
    `peft.alpha` the alpha the run trains with (adapters.effective_alpha: peft.alpha_ratio × r when set)."""
    if cfg.logger.backend != "wandb" or not is_main:
        return NullTracker()
    config = flatten(OmegaConf.to_container(cfg, resolve=True))
    config["peft.alpha"] = effective_alpha(cfg.peft)
    config.update({k: choices.get(k) for k in ("model", "algo", "peft", "data")})
    group = cfg.logger.group or sweep or f"{choices.get('model')}-{choices.get('algo')}-{choices.get('peft')}"
    tags = [str(choices.get(k)) for k in ("model", "algo", "peft")] + [str(t) for t in cfg.logger.tags]
    return WandbTracker(cfg.logger, run_dir, config, run_name(cfg, overrides), group, tags)


def read_offline_run(wandb_file: Path) -> dict:
    """What an offline W&B run recorded (name, group, tags, config, summary, history, tables), read from its
    .wandb file; `tables` maps a logged table's key to [{"step", "columns", "data"}], read from the media files
    the history records point to.

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
    run["tables"] = {}
    for entry in run["history"]:
        for key in [k[:-len("._type")] for k, v in entry.items() if k.endswith("._type") and v == "table-file"]:
            media = Path(wandb_file).parent / "files" / entry[f"{key}.path"]
            table = json.loads(media.read_text()) if media.exists() else {"columns": None, "data": None}
            run["tables"].setdefault(key, []).append({"step": entry.get("_step"), **table})
    return run
