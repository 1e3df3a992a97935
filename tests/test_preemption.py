"""Preemption under submitit (the SLURM launcher's job runner): SLURM warns a job with USR2 before it is killed, and
submitit's own USR2 handler requeues it. The run checkpoints the step it is on first, then hands the signal to
submitit, and the requeued job continues from that checkpoint exactly.

Run with submitit's local executor (hydra/launcher=submitit_local), which installs the same handler and requeues
the same way (a job that exits with its requeue code is started again, into the same directory)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, step_losses, train_run

RUN = [*FAST, "trainer.max_steps=40", "trainer.batch_size=8", "trainer.save_every=100", "peft.dropout=0.1",
       "logger=none", "trainer.num_threads=1"]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_usr2_under_submitit_checkpoints_the_current_step_and_the_requeued_job_resumes_exactly(tmp_path):
    uninterrupted = step_losses(train_run(tmp_path / "full", RUN))
    sweep, folder = tmp_path / "sweep", tmp_path / "submitit"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "train.py", "-m", "hydra/launcher=submitit_local",
                                 f"hydra.launcher.submitit_folder={folder}", f"hydra.sweep.dir={sweep}", *RUN],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_dir, deadline = sweep / "0", time.time() + 600
    while not (job_dir / "metrics.jsonl").exists() or len((job_dir / "metrics.jsonl").read_text().splitlines()) < 5:
        assert time.time() < deadline and launcher.poll() is None, "the job did not start training"
        time.sleep(0.05)
    controller = int(next(folder.glob("*_0_log.out")).name.split("_")[0])  # a local job's id is its controller's pid
    (task,) = children(controller)
    os.kill(task, signal.SIGUSR2)
    _, stderr = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, stderr[-3000:]

    logs = "".join(p.read_text() for p in folder.glob("*_0_log.*"))
    stopped_at = int(re.search(r"stopped by signal 12 after step (\d+)", logs).group(1))
    assert 0 < stopped_at < 40 and "Requeued job" in logs
    assert re.search(rf"resumed from .*step-{stopped_at} at step {stopped_at}", logs), logs[-3000:]
    resumed = step_losses(job_dir)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 41))
    assert max(abs(resumed[s] - uninterrupted[s]) for s in uninterrupted) <= 1e-6
