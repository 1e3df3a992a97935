"""Artifacts you can trust: verified checkpoints, loads that run no code, one owner and one config per run dir.

Unit tests use a tiny torch model, optimizer and scheduler (no training loop); one end-to-end test kills a real
`python train.py` and resumes it past a damaged checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, REPO, compose, step_losses, train_run
from peftlab import checkpoint, rundir
from peftlab.loop import warmup_cosine
from peftlab.errors import ConfigError

ACCELERATOR = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1,
                              wait_for_everyone=lambda: None, state=SimpleNamespace(deepspeed_plugin=None))


class Algo:
    """Stands in for an algorithm: its state is shaped like GRPO's (a step and buffered rollouts of tensors)."""

    def __init__(self):
        self.state = {}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


class Parts:
    """A model with dropout, AdamW and the loop's warmup-cosine LambdaLR, seeded."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(20, 0.1, 0.1))
        self.algo = Algo()

    def step(self) -> list[float]:
        """One optimizer step on random data; returns the loss and one draw of each RNG a step may use."""
        loss = self.model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return [loss.item(), random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn())]

    def save(self, run_dir: Path, step: int, keep: int = 2) -> Path:
        return checkpoint.save(run_dir, step, self.model, self.optimizer, self.scheduler, self.algo, ACCELERATOR,
                               {"base": {"base/loss": 1.5}}, keep)

    def load(self, path: Path) -> dict:
        return checkpoint.load(path, self.model, self.optimizer, self.scheduler, self.algo, ACCELERATOR)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with valid checkpoints at steps 3 and 6 (latest → step-6)."""
    parts = Parts()
    for step in range(1, 7):
        parts.step()
        if step % 3 == 0:
            parts.save(tmp_path / "run", step)
    return tmp_path / "run"


def find_auto(run_dir: Path) -> tuple[Path | None, list[str]]:
    warnings = []
    return checkpoint.find("auto", run_dir, warn=warnings.append), warnings


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---- the manifest, the round trip, weights_only ---------------------------------------------------------------

def test_the_manifest_covers_every_file_of_the_checkpoint(run_dir):
    step_dir = run_dir / "checkpoints" / "step-6"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["format"] == checkpoint.MANIFEST_FORMAT and manifest["step"] == 6 and manifest["finite"] is True
    on_disk = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.name != "manifest.json")
    assert [f["path"] for f in manifest["files"]] == on_disk == ["rng-0.pt", "state.pt"]
    for entry in manifest["files"]:
        assert entry["size"] == (step_dir / entry["path"]).stat().st_size
        assert entry["sha256"] == checkpoint.sha256_of(step_dir / entry["path"])
    assert checkpoint.problem_with(step_dir) is None
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-6"


def test_a_resumed_run_continues_exactly(tmp_path):
    """Weights, AdamW moments, the LambdaLR position, the algorithm's state and all RNGs (torch, python, numpy,
    including their cached Gaussians) travel through weights_only files: the next steps repeat exactly."""
    parts = Parts()
    for _ in range(3):
        parts.step()
    parts.algo.state = {"step": 3, "rollouts": [{"input_ids": torch.arange(6).view(2, 3), "truncated":
                        torch.tensor([True, False]), "rollout_metrics": {"train/reward": 0.25}}]}
    saved = parts.save(tmp_path / "run", 3)
    expected = [parts.step() for _ in range(3)]

    resumed = Parts(seed=1)  # other initial weights and RNG position: everything must come from the checkpoint
    state = resumed.load(saved)
    assert state["step"] == 3 and state["extra"] == {"base": {"base/loss": 1.5}}
    assert resumed.scheduler.last_epoch == 3
    rollout = resumed.algo.state["rollouts"][0]
    assert torch.equal(rollout["input_ids"], torch.arange(6).view(2, 3)) and rollout["truncated"].dtype == torch.bool
    assert rollout["rollout_metrics"] == {"train/reward": 0.25}
    assert [resumed.step() for _ in range(3)] == expected


def test_every_checkpoint_file_is_read_with_weights_only(run_dir, monkeypatch):
    flags = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        flags.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    Parts().load(run_dir / "checkpoints" / "step-6")
    assert flags == [True, True]  # state.pt and rng-0.pt


class RunsCode:
    """Unpickling this runs a shell command (it creates the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["state.pt", "rng-0.pt"])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(run_dir, tmp_path, name):
    step_dir = run_dir / "checkpoints" / "step-6"
    marker = tmp_path / "code-ran"
    torch.save({"step": 6, "payload": RunsCode(marker)}, step_dir / name)
    checkpoint.write_manifest(step_dir, 6, finite=True)  # a consistent manifest: only the content is hostile
    refusal = f"{step_dir / name}: refused to load: it holds a pickled posix.system, which could run code"
    with pytest.raises(ConfigError, match=refusal) as err:  # resume=auto: an error, not a fallback to step-3
        find_auto(run_dir)
    one_line(err)
    with pytest.raises(ConfigError, match=refusal):
        Parts().load(step_dir)
    parts = Parts()
    with pytest.raises(ConfigError, match=refusal):  # past the static check, torch.load(weights_only=True) refuses
        checkpoint.load(step_dir, parts.model, parts.optimizer, parts.scheduler, parts.algo, ACCELERATOR,
                        verify=False)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(step_dir / name, weights_only=False)
    assert marker.exists()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.gauss(0, 1)  # python and numpy each cache a second Gaussian: the cached one must travel too
    np.random.randn()
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = [random.random(), random.gauss(0, 1), *np.random.rand(3), np.random.randn(), *torch.rand(3).tolist()]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert [random.random(), random.gauss(0, 1), *np.random.rand(3), np.random.randn(),
            *torch.rand(3).tolist()] == expected


# ---- faults and the fallback --------------------------------------------------------------------------------------

def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def garble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))  # same size: only the checksum can tell


FAULTS = {
    "deleted": (lambda d: delete(d / "state.pt"), "state.pt missing"),
    "truncated": (lambda d: truncate(d / "state.pt"), r"state.pt truncated \(size 1000 ≠ \d+\)"),
    "garbage": (lambda d: garble(d / "state.pt"), r"state.pt is corrupted \(sha256 differs"),
    "rng garbage": (lambda d: garble(d / "rng-0.pt"), r"rng-0.pt is corrupted"),
    "no manifest": (lambda d: delete(d / "manifest.json"), r"no manifest.json \(incomplete"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_valid_one(run_dir, fault):
    damage, reason = FAULTS[fault]
    damage(run_dir / "checkpoints" / "step-6")
    found, warnings = find_auto(run_dir)
    assert found == run_dir / "checkpoints" / "step-3"
    assert len(warnings) == 1
    assert re.fullmatch(f"checkpoints/step-6: {reason}.*; resuming from step-3", warnings[0])
    assert Parts().load(found)["step"] == 3
    # named by hand, the damaged checkpoint is an error, not a fallback
    with pytest.raises(ConfigError, match=f"trainer.resume=.*step-6: {reason}") as err:
        checkpoint.find(str(run_dir / "checkpoints" / "step-6"), run_dir)
    one_line(err)
    with pytest.raises(ConfigError, match=reason):
        Parts().load(run_dir / "checkpoints" / "step-6")


def test_the_latest_pointer_is_only_a_hint(run_dir):
    pointer = run_dir / "checkpoints" / "latest"
    pointer.unlink()  # a kill between the rename and the pointer: the renamed checkpoint is complete
    assert find_auto(run_dir) == (run_dir / "checkpoints" / "step-6", [])
    pointer.write_text("step-9")
    found, warnings = find_auto(run_dir)
    assert found == run_dir / "checkpoints" / "step-6"
    assert warnings == ["checkpoints/latest names step-9, which does not exist; resuming from step-6"]


def test_a_save_killed_midway_is_ignored_then_cleaned_up(run_dir):
    checkpoints = run_dir / "checkpoints"
    shutil.copytree(checkpoints / "step-6", checkpoints / ".tmp-step-9")  # complete files, never renamed
    assert find_auto(run_dir) == (checkpoints / "step-6", [])
    parts = Parts()
    parts.load(checkpoints / "step-6")
    parts.step()
    parts.save(run_dir, 7)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-6", "step-7"]


def test_an_unfinished_first_save_starts_over_with_a_warning(tmp_path):
    (tmp_path / "run" / "checkpoints" / ".tmp-step-3").mkdir(parents=True)
    assert find_auto(tmp_path / "run") == (None, ["checkpoints/.tmp-step-3 is a save that did not finish (no "
                                                  "checkpoint was completed); starting from step 0"])


def test_checkpoints_that_are_all_invalid_are_an_error_not_a_restart(run_dir):
    truncate(run_dir / "checkpoints" / "step-6" / "state.pt")
    delete(run_dir / "checkpoints" / "step-3" / "manifest.json")
    with pytest.raises(ConfigError) as err:
        find_auto(run_dir)
    message = one_line(err)
    assert "checkpoints/step-6: state.pt truncated" in message and "checkpoints/step-3: no manifest.json" in message
    assert f"remove {run_dir / 'checkpoints'} to start over" in message


def test_a_run_directory_named_by_hand_needs_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint there"):
        checkpoint.find(str(tmp_path / "empty"), tmp_path / "new")
    assert checkpoint.find("auto", tmp_path / "empty") is None  # auto in a new run: a fresh start


def test_pruning_keeps_the_newest_checkpoint_whose_weights_are_finite(tmp_path):
    parts, checkpoints = Parts(), tmp_path / "run" / "checkpoints"
    for step in (3, 6, 9):
        parts.save(tmp_path / "run", step, keep=2)
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-6", "step-9"]
    with torch.no_grad():
        parts.model[0].weight[0, 0] = math.nan  # diverged
    for step in (12, 15):
        parts.save(tmp_path / "run", step, keep=1)
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-15", "step-9"]
    assert json.loads((checkpoints / "step-15" / "manifest.json").read_text())["finite"] is False
    assert json.loads((checkpoints / "step-9" / "manifest.json").read_text())["finite"] is True


# ---- the run lock -----------------------------------------------------------------------------------------------

def take_lock_in_another_process(run_dir: Path) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom peftlab.rundir import RunLock\nfrom peftlab.errors import ConfigError\n"
            f"try:\n    RunLock({str(run_dir)!r}).release()\nexcept ConfigError as err:\n"
            "    print(err, file=sys.stderr)\n    sys.exit(2)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_a_second_process_cannot_take_a_held_run_directory(tmp_path):
    import socket

    run_dir = tmp_path / "run"
    with rundir.RunLock(run_dir) as lock:
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        refused = take_lock_in_another_process(run_dir)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [
            f"run directory {run_dir} is in use by pid {os.getpid()} on host {socket.gethostname()} since "
            f"{holder['started'][:10]} {holder['started'][11:19]}; wait for it or choose another hydra.run.dir"]
        with pytest.raises(ConfigError, match="is in use by pid"):  # a second open file in this process too
            rundir.RunLock(run_dir)
    assert lock.fd is None and (run_dir / ".lock").read_text() == ""  # no stale holder left to read
    rundir.RunLock(run_dir).release()


def test_the_os_releases_the_lock_of_a_process_that_dies(tmp_path):
    run_dir = tmp_path / "run"
    code = f"from peftlab.rundir import RunLock\nlock = RunLock({str(run_dir)!r})\nprint('held', flush=True)\n" \
           "import time\ntime.sleep(600)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"in use by pid {holder.pid} "):
        rundir.RunLock(run_dir)
    holder.kill()
    holder.wait()
    rundir.RunLock(run_dir).release()


# ---- the config fingerprint and the launch decision --------------------------------------------------------------

BASE = [*FAST, "trainer.max_steps=6"]


def hydra_launch(run_dir: Path, overrides: list[str]):
    """What Hydra does before train.py's code runs: compose, and (re)write .hydra/ in the run directory."""
    cfg, _ = compose(overrides)
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rundir.hydra_texts(cfg, overrides).items():
        (hydra_dir / name).write_text(text)
    return cfg


def started_run(tmp_path, finished_steps: int | None = None) -> Path:
    """A run directory as a first launch leaves it: run.json, checkpoints 3 and 6, summary.json if finished."""
    run_dir = tmp_path / "run"
    cfg = hydra_launch(run_dir, BASE)
    assert rundir.open_run(run_dir, cfg, BASE).action == "start"
    parts = Parts()
    for step in (3, 6):
        parts.save(run_dir, step)
    if finished_steps:
        (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "steps": finished_steps}))
    return run_dir


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_first_launch_records_its_config(tmp_path):
    run_dir = tmp_path / "run"
    cfg = hydra_launch(run_dir, BASE)
    launch = rundir.open_run(run_dir, cfg, BASE)
    assert launch == rundir.Launch("start", None)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["fingerprint"] == rundir.fingerprint(rundir.comparable_config(cfg))
    assert record["config"]["peft"]["r"] == 16 and "max_steps" not in record["config"]["trainer"]
    assert record["resumable_keys"] == list(rundir.RESUMABLE_KEYS)
    assert record["hydra"]["config.yaml"] == (run_dir / ".hydra" / "config.yaml").read_text()
    assert record["hydra"]["overrides.yaml"] == (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_the_same_config_continues_from_the_newest_valid_checkpoint(tmp_path):
    run_dir = started_run(tmp_path)
    truncate(run_dir / "checkpoints" / "step-6" / "state.pt")
    overrides = [*BASE, "trainer.save_every=2", "logger=wandb", "trainer.num_threads=1"]  # resumable keys only
    warnings = []
    launch = rundir.open_run(run_dir, hydra_launch(run_dir, overrides), overrides, warn=warnings.append)
    assert launch.action == "continue" and launch.resume_from == run_dir / "checkpoints" / "step-3"
    assert len(warnings) == 1 and warnings[0].startswith("checkpoints/step-6: state.pt truncated")
    record = json.loads((run_dir / "run.json").read_text())
    assert [entry["action"] for entry in record["launches"]] == ["start", "continue"]
    assert "trainer.save_every=2" in record["hydra"]["overrides.yaml"]  # the texts of the launch that trained last


def test_a_finished_run_is_left_alone(tmp_path):
    run_dir = started_run(tmp_path, finished_steps=6)
    before = snapshot(run_dir)
    overrides = [*BASE, "trainer.log_every=5"]
    cfg = hydra_launch(run_dir, overrides)  # Hydra rewrote .hydra/ already
    assert snapshot(run_dir) != before
    launch = rundir.open_run(run_dir, cfg, overrides)
    assert launch == rundir.Launch("done", message=f"run {run_dir} already finished 6 steps (trainer.max_steps=6): "
                                                   "nothing to do")
    assert snapshot(run_dir) == before


def test_a_diverged_run_has_nothing_to_continue(tmp_path):
    run_dir = started_run(tmp_path)
    (run_dir / "summary.json").write_text(json.dumps({"status": "diverged", "steps": 6}))
    launch = rundir.decide_launch(run_dir, compose([*FAST, "trainer.max_steps=9"])[0])
    assert launch.action == "done" and "diverged" in launch.message


def test_a_directory_from_before_run_json_still_resumes(tmp_path):
    run_dir = started_run(tmp_path)
    (run_dir / "run.json").unlink()
    launch = rundir.decide_launch(run_dir, compose(BASE)[0])
    assert launch.action == "start" and launch.resume_from == run_dir / "checkpoints" / "step-6"
    assert "no run.json, so their config cannot be checked" in launch.warning


def test_claim_refused_by_the_lock_leaves_the_directory_as_it_was(tmp_path):
    run_dir = started_run(tmp_path)
    with rundir.RunLock(run_dir):  # the run that owns the directory
        before = snapshot(run_dir)
        overrides = [*BASE, "trainer.log_every=5"]
        cfg = hydra_launch(run_dir, overrides)
        with pytest.raises(ConfigError, match="is in use by pid"):
            rundir.claim(run_dir, cfg, overrides)
        assert snapshot(run_dir) == before
    lock, launch = rundir.claim(run_dir, cfg, overrides)
    assert launch.action == "continue" and lock.fd is not None
    lock.release()


def test_a_finished_run_extends_to_a_larger_max_steps(tmp_path):
    run_dir = started_run(tmp_path, finished_steps=6)
    overrides = [*FAST, "trainer.max_steps=9"]
    launch = rundir.open_run(run_dir, hydra_launch(run_dir, overrides), overrides)
    assert launch.action == "extend" and launch.resume_from == run_dir / "checkpoints" / "step-6"
    assert "extending it to trainer.max_steps=9 from step-6" in launch.message


def test_another_config_is_refused_and_the_run_keeps_its_labels(tmp_path):
    run_dir = started_run(tmp_path, finished_steps=6)
    before = snapshot(run_dir)
    overrides = [*BASE, "peft.r=8"]
    cfg = hydra_launch(run_dir, overrides)
    assert "r: 8" in (run_dir / ".hydra" / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        rundir.open_run(run_dir, cfg, overrides)
    assert one_line(err) == (f"run directory {run_dir} holds a run with another training config (peft.r: 16 → 8): "
                             "continue it with the config in its run.json, or start a new run in another "
                             "hydra.run.dir")
    assert snapshot(run_dir) == before  # .hydra/config.yaml says r=16 again, as summary.json's run was trained
    many = [*BASE, "peft.r=8", "trainer.lr=1e-3", "peft.targets=attn", "trainer.seed=3", "trainer.precision=fp32"]
    with pytest.raises(ConfigError, match=r"\(peft.r: 16 → 8, peft.targets: all-linear → attn, trainer.lr: 0.003 "
                                          r"→ 0.001 and 2 more\)"):
        rundir.decide_launch(run_dir, compose(many)[0])


def test_a_launch_that_would_overwrite_a_run_is_refused(tmp_path):
    run_dir = started_run(tmp_path)
    for resume in ("null", str(tmp_path / "elsewhere")):
        (tmp_path / "elsewhere").mkdir(exist_ok=True)
        with pytest.raises(ConfigError, match=f"already holds a run: trainer.resume={resume} would overwrite"):
            rundir.decide_launch(run_dir, compose([*BASE, f"trainer.resume={resume}"])[0])
    with pytest.raises(ConfigError, match="is past trainer.max_steps=4: pass trainer.max_steps>=6"):
        rundir.decide_launch(run_dir, compose([*FAST, "trainer.max_steps=4"])[0])
    named = compose([*BASE, f"trainer.resume={run_dir / 'checkpoints' / 'step-3'}"])[0]  # this run's own checkpoint
    assert rundir.decide_launch(run_dir, named).resume_from == run_dir / "checkpoints" / "step-3"


def test_resumable_keys_exist_and_only_they_leave_the_fingerprint_unchanged():
    cfg, _ = compose([])
    for key in rundir.RESUMABLE_KEYS:
        assert key == "hydra" or OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key
    reference = rundir.fingerprint(rundir.comparable_config(cfg))
    resumable = ["trainer.max_steps=7", "trainer.resume=null", "trainer.eval_every=3", "trainer.save_every=3",
                 "trainer.log_every=3", "trainer.keep_checkpoints=5", "trainer.num_threads=1",
                 "trainer.eval_base=false", "logger=none", "output_root=elsewhere", "run_name=x",
                 "save_merged=true", "objective=eval/loss"]
    for override in resumable:
        assert rundir.fingerprint(rundir.comparable_config(compose([override])[0])) == reference, override
    for override in ["peft.r=8", "trainer.lr=1e-3", "trainer.seed=1", "trainer.grad_accum=2", "eval=none",
                     "dist=ddp", "model=tiny_llama", "data.max_rows=10", "trainer.gradient_checkpointing=true"]:
        assert rundir.fingerprint(rundir.comparable_config(compose([override])[0])) != reference, override


def test_a_hydra_launch_writes_the_texts_and_has_the_fingerprint_we_compute(tmp_path):
    """Restoring .hydra/ from run.json puts back exactly what Hydra wrote at that launch; and a CLI launch and an
    in-process compose of the same overrides (as the tests' train_run) fingerprint the same."""
    app = tmp_path / "app.py"
    app.write_text(
        "import json\nfrom pathlib import Path\nimport hydra\nfrom hydra.core.hydra_config import HydraConfig\n"
        "import peftlab\nfrom peftlab import rundir\n"
        f"@hydra.main(config_path={str(REPO / 'conf')!r}, config_name='config', version_base='1.3')\n"
        "def main(cfg):\n"
        "    texts = rundir.hydra_texts(cfg, list(HydraConfig.get().overrides.task))\n"
        "    texts['fingerprint'] = rundir.fingerprint(rundir.comparable_config(cfg))\n"
        "    (Path(HydraConfig.get().runtime.output_dir) / 'texts.json').write_text(json.dumps(texts))\n"
        "main()\n")
    run_dir, overrides = tmp_path / "run", ["peft.r=8", "algo=dpo"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, str(app), *overrides, f"hydra.run.dir={run_dir}"], env=env, check=True,
                   capture_output=True, timeout=120)
    texts = json.loads((run_dir / "texts.json").read_text())
    assert texts.pop("fingerprint") == rundir.fingerprint(rundir.comparable_config(compose(overrides)[0]))
    assert sorted(texts) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    for name, text in texts.items():
        assert text == (run_dir / ".hydra" / name).read_text(), name


# ---- end to end: a killed train.py resumes past a damaged checkpoint --------------------------------------------

KILLED = [*FAST, "trainer.max_steps=30", "trainer.batch_size=8", "trainer.save_every=3", "peft.dropout=0.1"]


def test_a_killed_run_resumes_from_the_last_valid_checkpoint_exactly(tmp_path, capsys):
    """SIGKILL once two checkpoints exist, truncate the latest's state.pt: the resume warns, continues from the one
    before, and every per-step loss equals an uninterrupted run's (dropout on: the RNGs travel too)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "train.py", *KILLED, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.exists() and checkpoint.step_of(latest.read_text()) >= 6) and process.poll() is None:
        assert time.time() < deadline, "no second checkpoint in time"
        time.sleep(0.01)
    process.kill()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]
    kept = checkpoint.step_dirs(run_dir / "checkpoints")
    newest, previous = kept[-1], kept[-2]
    truncate(newest / "state.pt")

    train_run(run_dir, [*KILLED, "trainer.resume=auto"])
    out, err = capsys.readouterr()
    assert f"checkpoints/{newest.name}: state.pt" in err and f"resuming from {previous.name}" in err
    assert f"resumed from {previous} at step {checkpoint.step_of(previous)}" in out
    uninterrupted = step_losses(train_run(tmp_path / "full", KILLED))
    resumed = step_losses(run_dir)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 31))
    worst = max(abs(resumed[s] - uninterrupted[s]) for s in uninterrupted)
    assert worst <= 1e-6, f"resumed losses differ by up to {worst}"
