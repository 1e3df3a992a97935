"""Sweeps end to end: every preset's jobs get what its comment says; Hydra multirun (basic, joblib, Optuna); the
W&B sweep file run as wandb's agent runs it; compare and the notebook on a real sweep; the SLURM preset."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from conftest import CONF, REPO
from peftlab.adapters import effective_alpha, resolve_targets
from peftlab.compare import compare
from peftlab.compare_plots import rank_series
from peftlab.tracking import read_offline_run

TINY = ["eval=none", "trainer.eval_base=false", "trainer.max_steps=3", "trainer.batch_size=4",
        "trainer.log_every=1", "trainer.save_every=0", "trainer.num_threads=1"]
PRESETS = sorted(p.stem for p in (REPO / "sweeps" / "sweep").glob("*.yaml"))
ALL_LINEAR = resolve_targets("all-linear", "qwen2")

# What each preset's header comment promises: one (method, algo, r, alpha, targets) per job.
DOCUMENTED = {
    "rank": {("lora", "sft", r, 2 * r, "all-linear") for r in (4, 8, 16, 32, 64)},
    "rank_alpha": {("lora", "sft", r, ratio * r, "all-linear") for r in (8, 16, 32) for ratio in (1, 2, 4)},
    "targets": {("lora", "sft", 16, 32, t) for t in ("attn", "mlp", "all-linear")},
    "method_algo": {(m, a, 16, 32, "all-linear") for m in ("lora", "dora", "qlora") for a in ("sft", "dpo")},
}


def multirun(sweep_dir, *overrides, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def sweep_jobs(overrides: list[str], sweep_dir) -> list[tuple[list[str], object]]:
    """(overrides, composed config) of each job `python train.py -m <overrides>` would launch: Hydra's own
    sweeper (instantiated from the config, as in a multirun) hands its batches to a launcher that composes each
    job's config the way the basic launcher does, and runs nothing."""
    from hydra import initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext, RunMode
    from omegaconf import OmegaConf

    jobs = []

    class ComposingLauncher:
        def launch(self, batch, initial_job_idx):
            jobs.extend((list(o), loader.load_sweep_config(master, list(o))) for o in batch)
            return []

    with initialize_config_dir(str(CONF), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        loader = hydra.config_loader
        master = hydra.compose_config("config", [*overrides, f"hydra.sweep.dir={sweep_dir}"],
                                      run_mode=RunMode.MULTIRUN, with_log_configuration=False)
        sweeper = Plugins.instance().instantiate_sweeper(
            config=master, hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks(master)),
            task_function=lambda cfg: None)
        sweeper.launcher = ComposingLauncher()
        sweeper.sweep(arguments=OmegaConf.to_container(master.hydra.overrides.task))
    return jobs


def test_every_preset_has_documented_jobs():
    assert sorted(DOCUMENTED) == PRESETS, "a new preset needs its documented jobs in DOCUMENTED"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_jobs_get_what_the_preset_documents(preset, tmp_path):
    """Each job's resolved method, algo, r, effective alpha and targets: the jobs are exactly the documented set."""
    jobs = sweep_jobs([f"+sweep={preset}"], tmp_path)
    got = [(cfg.peft.method, cfg.hydra.runtime.choices.algo, cfg.peft.r, effective_alpha(cfg.peft),
            cfg.peft.targets) for _, cfg in jobs]
    assert len(got) == len(set(got)) and set(got) == DOCUMENTED[preset]
    for overrides, cfg in jobs:  # each algorithm brings its own data
        assert f"+sweep={preset}" in overrides
        assert cfg.hydra.runtime.choices.data == f"toy_{cfg.hydra.runtime.choices.algo}"


def test_rank_alpha_keeps_each_ratio_for_each_rank(tmp_path):
    """alpha/r = 1, 2, 4 for every r (the preset used to give every r the alphas 16, 32, 64)."""
    ratios = {}
    for _, cfg in sweep_jobs(["+sweep=rank_alpha"], tmp_path):
        ratios.setdefault(cfg.peft.r, set()).add(effective_alpha(cfg.peft) / cfg.peft.r)
    assert ratios == {8: {1, 2, 4}, 16: {1, 2, 4}, 32: {1, 2, 4}}


def test_command_line_narrows_a_preset(tmp_path):
    """A key given on the command line replaces the preset's values for it (Hydra's merge, kept documented)."""
    jobs = sweep_jobs(["+sweep=rank_alpha", "peft.r=8"], tmp_path)
    got = {(cfg.peft.r, effective_alpha(cfg.peft)) for _, cfg in jobs}
    assert got == {(8, 8), (8, 16), (8, 32)}


@pytest.fixture(scope="module")
def rank_alpha_sweep(tmp_path_factory):
    """The rank_alpha preset for real: 9 jobs of 1 step, with W&B offline."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "rank_alpha"
    multirun(sweep_dir, "+sweep=rank_alpha", "logger=wandb", *TINY, "trainer.max_steps=1")
    return sweep_dir


def test_rank_alpha_multirun_summaries_and_wandb_runs(rank_alpha_sweep):
    jobs = sorted((p for p in rank_alpha_sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    pairs = set()
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        adapter = json.loads((job / "adapter" / "adapter_config.json").read_text())
        assert summary["alpha"] == adapter["lora_alpha"] == summary["r"] * int(
            next(o for o in summary["overrides"] if o.startswith("peft.alpha_ratio=")).split("=")[1])
        assert summary["targets"] == ALL_LINEAR and summary["peft"] == "lora" and summary["algo"] == "sft"
        pairs.add((summary["r"], summary["alpha"]))
        run = read_offline_run(next((job / "wandb").glob("offline-run-*/run-*.wandb")))
        assert run["group"] == f"{rank_alpha_sweep.parent.name}_{rank_alpha_sweep.name}"  # one group per sweep
        assert run["name"].startswith(f"peft.r={summary['r']},peft.alpha_ratio=")
        assert run["config"]["peft.r"] == summary["r"] and run["config"]["peft.alpha"] == summary["alpha"]
    assert pairs == {(r, k * r) for r in (8, 16, 32) for k in (1, 2, 4)}


def test_compare_on_the_rank_alpha_sweep(rank_alpha_sweep, tmp_path):
    result = compare([rank_alpha_sweep], out=tmp_path / "report")
    assert result["metric"] == "eval/loss" and "ranked by eval/loss (lower is better)" in result["markdown"]
    losses = [r["eval/loss"] for r in result["rows"]]
    assert len(losses) == 9 and losses == sorted(losses)
    table = result["markdown"].split("## All finished runs")[1].split("\n## ")[0].splitlines()
    assert table[2].startswith("| run | eval/loss |") and len([l for l in table if l.startswith("| peft.r=")]) == 9
    assert "Not finished" not in result["markdown"]
    series = rank_series(result["rows"], "eval/loss")  # metric_vs_rank.png: one line per alpha ratio
    assert {k: sorted(r["r"] for r in v) for k, v in series.items()} == {
        f"peft.alpha_ratio={k}": [8, 16, 32] for k in (1, 2, 4)}
    assert (tmp_path / "report" / "runs.csv").read_text().count("\n") == 1 + 9
    assert sorted(p.name for p in result["plots"]) == ["loss_curves.png", "metric_vs_params.png",
                                                         "metric_vs_rank.png", "throughput_memory.png"]
    assert all(p.stat().st_size > 1000 for p in result["plots"])


def test_notebook_executes_on_the_sweep(rank_alpha_sweep, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    monkeypatch.setenv("PEFTLAB_RUNS", str(rank_alpha_sweep))
    monkeypatch.setenv("PEFTLAB_COMPARE_OUT", str(tmp_path / "nb"))
    monkeypatch.delenv("PEFTLAB_METRIC", raising=False)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                      for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "9 runs finished of 9; ranked by eval/loss" in outputs and "best eval/loss" in outputs
    assert "## All finished runs" in outputs
    assert len(list((tmp_path / "nb").glob("*.png"))) == 4


def test_joblib_sweep(tmp_path):
    sweep_dir = tmp_path / "joblib"
    multirun(sweep_dir, "hydra/launcher=local_parallel", "peft.targets=attn,mlp", "logger=none", *TINY)
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


WANDB_SWEEP = REPO / "sweeps" / "wandb_rank_targets.yaml"


def wandb_grid(spec: dict) -> list[dict]:
    """The grid a W&B sweep controller hands its agents: one {param: {"value": v}} per combination."""
    keys = list(spec["parameters"])
    choices = [spec["parameters"][k].get("values", [spec["parameters"][k].get("value")]) for k in keys]
    return [{k: {"value": v} for k, v in zip(keys, combo)} for combo in itertools.product(*choices)]


def agent_argv(spec: dict, args: dict, program: str) -> list[str]:
    """The argv `wandb agent` builds for one run (wandb/wandb_agent.py, Agent._command_run): each `${macro}` item
    of the sweep's command replaced by wandb's own renderings of the run's parameters."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    macros = sweep_utils.create_sweep_command_args({"args": args})
    macros.update(interpreter=["python"], program=[program], env=["/usr/bin/env"])
    argv = []
    for item in sweep_utils.create_sweep_command(list(spec["command"])):
        item = str(item)
        argv += (macros.get(item[2:-1]) or []) if item.startswith("${") and item.endswith("}") else [item]
    return argv


def test_wandb_sweep_grid_composes():
    """Every combination of the W&B sweep file's grid is a config train.py accepts, with the values asked for."""
    import yaml

    from conftest import compose

    spec = yaml.safe_load(WANDB_SWEEP.read_text())
    assert spec["program"] == "train.py" and "${args_no_hyphens}" in spec["command"]
    for args in wandb_grid(spec):
        argv = agent_argv(spec, args, "train.py")
        cfg, _ = compose(argv[argv.index("train.py") + 1:])
        assert cfg.peft.r == args["peft.r"]["value"] and cfg.peft.targets == args["peft.targets"]["value"]
        assert effective_alpha(cfg.peft) == 2 * cfg.peft.r and cfg.logger.mode == "online"


def test_wandb_sweep_file_drives_train_py_as_the_agent_does(tmp_path):
    """Two grid runs executed with the argv and environment the agent gives them, WANDB_MODE=offline winning over
    the command's logger.mode=online: each W&B run carries its own r, alpha and targets, and is named by them.
    Fixed `value:` parameters keep the runs tiny, passed the way a sweep file passes any fixed value."""
    import yaml

    spec = yaml.safe_load(WANDB_SWEEP.read_text())
    spec["parameters"].update({k: {"value": v} for k, v in (
        ("trainer.max_steps", 1), ("eval", "none"), ("trainer.eval_base", False), ("trainer.num_threads", 1))})
    grid = wandb_grid(spec)
    for number, args in enumerate([grid[0], grid[-1]]):
        run_id = f"agentrun{number}"
        param_path = tmp_path / "wandb" / "sweep-testsweep" / f"config-{run_id}.yaml"
        param_path.parent.mkdir(parents=True, exist_ok=True)
        param_path.write_text(yaml.safe_dump(args))
        env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "WANDB_SWEEP_ID": "testsweep", "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(param_path),
               "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # `python` = this interpreter
        # ${program} resolved against the repository, so the runs' outputs/ land in tmp_path
        argv = agent_argv(spec, args, str(REPO / spec["program"]))
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "W&B mode offline from WANDB_MODE=offline, which wins over logger.mode=online" in result.stderr

        r, targets = args["peft.r"]["value"], args["peft.targets"]["value"]
        wandb_file = next(tmp_path.glob(f"outputs/*/*/wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
        run = read_offline_run(wandb_file)
        assert run["config"]["peft.r"] == r and run["config"]["peft.targets"] == targets
        assert run["config"]["peft.alpha"] == 2 * r and run["config"]["logger.mode"] == "online"
        assert f"peft.r={r}" in run["name"] and f"peft.targets={targets}" in run["name"]
        assert "peft.alpha_ratio=2" in run["name"] and "logger" not in run["name"]
        summary = json.loads((wandb_file.parents[2] / "summary.json").read_text())
        assert (summary["r"], summary["alpha"]) == (r, 2 * r)
        assert summary["targets"] == resolve_targets(targets, "qwen2")
