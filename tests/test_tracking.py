"""W&B offline files carry the run's name, group, tags, flattened config and summary; logger=none writes none."""

from __future__ import annotations

import json

from conftest import read_metrics, train_run
from peftlab.tracking import read_offline_run

RUN = ["eval=none", "trainer.eval_base=false", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.log_every=1"]


def test_wandb_offline_run_files(tmp_path):
    run_dir = train_run(tmp_path / "run", ["logger=wandb", "peft.r=8", "peft.alpha=16", *RUN])
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    run = read_offline_run(files[0])
    assert run["name"] == "peft.r=8,peft.alpha=16," + ",".join(RUN)
    assert run["group"] == "tiny_qwen-sft-lora"
    assert {"tiny_qwen", "sft", "lora"} <= set(run["tags"])
    config = run["config"]
    assert config["peft.r"] == 8 and config["peft.alpha"] == 16 and config["peft"] == "lora"
    assert config["algo"] == "sft" and config["model"] == "tiny_qwen" and config["trainer.max_steps"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run["summary"]["train/loss"] == summary["train/loss"]
    assert run["summary"]["trainable_params"] == summary["trainable_params"]
    logged = [h for h in run["history"] if "train/loss" in h]
    assert [h["train/loss"] for h in logged] == [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


def test_logger_none_writes_no_wandb_files(tmp_path):
    run_dir = train_run(tmp_path / "run", ["logger=none", *RUN])
    assert not (run_dir / "wandb").exists()
    lines = read_metrics(run_dir)
    assert [m["step"] for m in lines if "train/loss" in m] == [1, 2]
    assert "eval/loss" in lines[-1]


def test_sweep_group_is_the_sweep_directorys_date_and_time():
    from peftlab.tracking import sweep_group

    assert sweep_group("outputs/multirun/2026-11-22/09-00-06") == "2026-11-22_09-00-06"
    assert sweep_group("/runs/rank_sweep") == "runs_rank_sweep"
    assert sweep_group("rank_sweep") == "rank_sweep"
