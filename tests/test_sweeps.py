"""Sweeps end to end: Hydra multirun (basic, joblib, Optuna), compare on the sweep, the notebook, the SLURM preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import CONF, REPO
from peftlab.compare import CompareError, compare, load_runs
from peftlab.tracking import read_offline_run

TINY = ["eval=none", "trainer.eval_base=false", "trainer.max_steps=3", "trainer.batch_size=4",
        "trainer.log_every=1", "trainer.save_every=0"]


def multirun(sweep_dir, *overrides, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def rank_sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "rank"
    multirun(sweep_dir, "peft.r=8,16,32", "logger=wandb", *TINY)
    return sweep_dir


def test_rank_sweep_runs_compare_and_wandb(rank_sweep, tmp_path):
    jobs = sorted(p for p in rank_sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    for job, r in zip(jobs, (8, 16, 32)):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["r"] == r and f"peft.r={r}" in summary["overrides"]
        run = read_offline_run(next((job / "wandb").glob("offline-run-*/run-*.wandb")))
        assert run["group"] == f"{rank_sweep.parent.name}_{rank_sweep.name}"  # one group per sweep
        assert run["name"].startswith(f"peft.r={r}")
        assert run["config"]["peft.r"] == r and run["config"]["peft"] == "lora"
        assert run["summary"]["trainable_params"] == summary["trainable_params"]
    result = compare([rank_sweep], metric="eval/loss", out=tmp_path / "report")
    lines = result["markdown"].splitlines()
    assert len(lines) == 2 + 3 and lines[2].startswith("| peft.r=8 |")
    assert (tmp_path / "report" / "runs.csv").read_text().count("\n") == 4
    assert sorted(p.name for p in result["plots"]) == ["loss_curves.png", "metric_vs_params.png",
                                                         "metric_vs_rank.png", "throughput_memory.png"]
    assert all(p.stat().st_size > 1000 for p in result["plots"])


def test_compare_refuses_unfinished_and_mixed_runs(rank_sweep, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(rank_sweep, broken)
    (broken / "1" / "summary.json").unlink()
    with pytest.raises(CompareError, match=r"no summary.json .* in: .*broken/1$"):
        load_runs([broken], "eval/loss")
    with pytest.raises(CompareError, match=r"metric 'eval/accuracy' is missing from: .*rank/0"):
        load_runs([rank_sweep], "eval/accuracy")
    mixed = tmp_path / "mixed"
    shutil.copytree(rank_sweep, mixed)
    summary = json.loads((mixed / "2" / "summary.json").read_text())
    summary["eval/pref_accuracy"] = 0.5
    (mixed / "2" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CompareError, match=r"different eval metrics .* differing: .*mixed/2"):
        load_runs([mixed], "eval/loss")


def test_notebook_executes_on_the_sweep(rank_sweep, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    os.environ.update(PEFTLAB_RUNS=str(rank_sweep), PEFTLAB_METRIC="eval/loss",
                      PEFTLAB_COMPARE_OUT=str(tmp_path / "nb"))
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "3 runs" in outputs and "best eval/loss" in outputs
    assert len(list((tmp_path / "nb").glob("*.png"))) == 4


def test_joblib_sweep(tmp_path):
    sweep_dir = tmp_path / "joblib"
    multirun(sweep_dir, "hydra/launcher=local_parallel", "peft.targets=attn,mlp", "logger=none",
             "trainer.num_threads=1", *TINY)
    summaries = [json.loads((sweep_dir / j / "summary.json").read_text()) for j in ("0", "1")]
    assert [s["targets"] for s in summaries] == [["q_proj", "k_proj", "v_proj", "o_proj"],
                                                  ["gate_proj", "up_proj", "down_proj"]]


def test_optuna_sweep_optimizes_the_objective(tmp_path):
    """3 trials; Optuna's best value is the smallest eval/loss that train.py's main returned."""
    import yaml

    sweep_dir = tmp_path / "optuna"
    multirun(sweep_dir, "hydra/sweeper=search", "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=minimize",
             "objective=eval/loss", "logger=none", *TINY)
    losses = [json.loads((sweep_dir / j / "summary.json").read_text())["eval/loss"] for j in ("0", "1", "2")]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(losses))


def test_slurm_preset_renders_submission_parameters(tmp_path, monkeypatch):
    """Without a cluster: the real submitit launcher builds its executor from the preset; we stop it at submission
    and read the sbatch script it would send."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")  # submitit only checks that srun exists
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    rendered = {}

    class Submitted(Exception):
        pass

    def capture(self, fn, *args):
        rendered["sbatch"] = self._executor._make_submission_file_text("python train.py", "0")
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.timeout_min=60", f"hydra.sweep.dir={tmp_path / 's'}",
                                           "hydra.launcher.submitit_folder=" + str(tmp_path / "sub")],
                      return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["peft.r=8"]], initial_job_idx=0)
    sbatch = rendered["sbatch"]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=60",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --nodes=1", "#SBATCH --signal=USR2@"):
        assert line in sbatch, line
    assert cfg.trainer.resume == "auto"  # a requeued job continues from its own run directory


def test_wandb_sweep_file_drives_train_py_with_hydra_overrides():
    """The W&B sweep file's parameters are config keys and its command passes them as key=value."""
    import itertools

    import yaml

    from conftest import compose

    spec = yaml.safe_load((REPO / "sweeps" / "wandb_rank_targets.yaml").read_text())
    assert spec["program"] == "train.py" and "${args_no_hyphens}" in spec["command"]
    keys = list(spec["parameters"])
    for values in itertools.product(*(spec["parameters"][k]["values"] for k in keys)):
        overrides = [f"{k}={v}" for k, v in zip(keys, values)]  # what ${args_no_hyphens} renders
        cfg, _ = compose(overrides)
        assert [cfg.peft.r, cfg.peft.targets] == list(values)
