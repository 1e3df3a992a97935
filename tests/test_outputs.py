"""What a run measures follows its data, and what it answers can be read: evaluation rows from the run's own data
source (no toy task on other data), samples in samples.jsonl and W&B, lm-evaluation-harness in the loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST, REPO, compose, read_metrics, train_run
from peftlab.tracking import read_offline_run

TOY_ARITH = REPO / "data" / "lm_eval" / "toy_arith" / "toy_arith.yaml"
TINY = [*FAST, "trainer.max_steps=2", "trainer.batch_size=4", "trainer.save_every=0", "trainer.eval_base=true"]


def samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


# ---- evaluation follows the data --------------------------------------------------------------------------------

def user_files(directory: Path) -> dict[str, Path]:
    alpaca = [{"instruction": f"Name a colour number {i}.", "input": "", "output": f"Colour {i} is blue."}
              for i in range(60)]
    chats = [{"messages": [{"role": "user", "content": f"Say hello {i}."},
                           {"role": "assistant", "content": f"Hello {i}!"}]} for i in range(60)]
    pairs = [{"prompt": f"Greet person {i}.", "chosen": f"Hello, person {i}.", "rejected": "Go away."}
             for i in range(60)]
    files = {"alpaca.jsonl": alpaca, "chats.jsonl": chats, "pairs.jsonl": pairs}
    for name, rows in files.items():
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: directory / name for name in files}


def test_the_composed_config_drops_the_toy_evaluation_for_other_data(tmp_path):
    files = user_files(tmp_path)
    toy, _ = compose([])
    assert toy.data.eval_path.endswith("data/toy/sft_eval.jsonl") and toy.eval.applies is True
    cfg, _ = compose([f"data.path={files['alpaca.jsonl']}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["eval_path"] is None and resolved["eval"]["applies"] is False
    hub, choices = compose(["data=alpaca"])
    assert choices["eval"] == "none" and hub.data.eval_path is None  # a hub preset names its own evaluation


@pytest.mark.parametrize("file, overrides, metric", [
    ("alpaca.jsonl", [], "eval/loss"),
    ("chats.jsonl", [], "eval/loss"),
    ("pairs.jsonl", ["algo=dpo", "algo.start_from=base"], "eval/pref_accuracy"),
])
def test_a_run_on_its_own_data_is_evaluated_on_that_data(tmp_path, file, overrides, metric):
    files = user_files(tmp_path)
    run_dir = train_run(tmp_path / "run", [*TINY, "eval=toy", *overrides, f"data.path={files[file]}",
                                           "data.eval_size=12"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "eval/accuracy" not in summary and "eval/unsafe_rate" not in summary  # no toy task on user data
    assert summary["data/eval_rows"] == 12 and summary["data/train_rows"] == 48
    assert summary["data/eval_source"].startswith(f"12 rows carved from data.path={files[file]}")
    toy = json.loads((train_run(tmp_path / "toy", [*TINY, *overrides]).joinpath("summary.json")).read_text())
    assert summary[metric] != toy[metric]
    prompts = {s["prompt"] for s in samples(run_dir)}
    held_out = [json.loads(l) for l in files[file].read_text().splitlines()]
    assert prompts and all(any(p in json.dumps(r) for r in held_out) for p in prompts)  # the user's own prompts


# ---- samples ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [["algo=sft"], ["algo=dpo", "algo.precompute_ref=false"],
                                       ["algo=grpo", "trainer.batch_size=2", "algo.num_generations=2",
                                        "algo.max_new_tokens=8"]], ids=["sft", "dpo", "grpo"])
def test_every_evaluation_writes_samples_and_a_wandb_table(tmp_path, overrides):
    run_dir = train_run(tmp_path / "run", [*TINY, "eval=toy", "logger=wandb", "logger.mode=offline", *overrides])
    rows = samples(run_dir)
    assert {(r["step"], r["prefix"]) for r in rows} == {(0, "base"), (2, "eval")}
    held = [r for r in rows if "task" not in r]
    assert held and all(r["prompt"] and isinstance(r["answer"], str) and r["reference"] for r in held)
    assert any(r.get("task") == "accuracy" and r["accuracy"] in (0.0, 1.0) for r in rows)
    if overrides[0] == "algo=grpo":
        assert all(isinstance(r["reward"], float) for r in held)  # the algorithm's own score beside each answer
    import wandb

    wandb.teardown()
    run = read_offline_run(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    tables = run["tables"]
    assert [t["step"] for t in tables["samples/base"]] == [0] and [t["step"] for t in tables["samples/eval"]] == [2]
    assert "answer" in tables["samples/eval"][0]["columns"] and tables["samples/eval"][0]["data"]


# ---- lm-evaluation-harness --------------------------------------------------------------------------------------

def test_eval_lm_eval_reports_base_and_eval_task_metrics(tmp_path):
    run_dir = train_run(tmp_path / "run", [*TINY, "algo.start_from=sft", "eval=lm_eval", f"eval.tasks=[{TOY_ARITH}]",
                                           "eval.limit=10"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 <= summary["base/toy_arith/acc"] <= 1 and 0 <= summary["eval/toy_arith/acc"] <= 1
    assert any("eval/toy_arith/acc" in m for m in read_metrics(run_dir))


@pytest.mark.slow
def test_lm_eval_in_the_loop_equals_lm_evals_cli_on_the_merged_model(tmp_path):
    """`python train.py eval=lm_eval eval.tasks=[toy_arith] eval.limit=50`: the figures logged at the end equal what
    lm-eval's own CLI reports for the run's adapter merged into its base."""
    from peftlab.merge import merge_run

    run_dir = train_run(tmp_path / "run", [*FAST, "trainer.max_steps=20", "eval=lm_eval", f"eval.tasks=[{TOY_ARITH}]",
                                           "eval.limit=50", "trainer.eval_base=true"])
    summary = json.loads((run_dir / "summary.json").read_text())
    merged = merge_run(run_dir, tmp_path / "merged")
    result = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                             f"pretrained={merged},dtype=float32", "--tasks", "toy_arith", "--include_path",
                             str(TOY_ARITH.parent), "--limit", "50", "--apply_chat_template", "--device", "cpu",
                             "--output_path", str(tmp_path / "cli")], cwd=REPO, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    cli = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]["toy_arith"]
    assert abs(cli["acc,none"] - summary["eval/toy_arith/acc"]) <= 1e-6, (cli, summary["eval/toy_arith/acc"])
    assert summary["eval/toy_arith/acc"] != summary["base/toy_arith/acc"]
