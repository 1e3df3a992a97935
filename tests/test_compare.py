"""compare on a real sweep across algorithms (SFT and DPO report different eval metrics) with jobs that failed,
diverged, stopped or never finished; samples side by side; readable plots; exit status."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from peftlab import compare, compare_plots

CROSS = ["peft=lora,dora", "algo=sft,dpo", "trainer.max_steps=2", "eval=none", "trainer.eval_base=false",
         "logger=none", "trainer.num_threads=1", "trainer.log_every=1", "trainer.save_every=0"]
FAILED_ERROR = "peft.targets: unknown module 'qq_proj' for qwen2"


@pytest.fixture(scope="module")
def cross_sweep(tmp_path_factory):
    """README's cross-group sweep for real (4 jobs of 2 steps)."""
    sweep_dir = tmp_path_factory.mktemp("cross") / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train.py", "-m", *CROSS, f"hydra.sweep.dir={sweep_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def answer(job: str, i: int) -> str:
    return f"job {job} answers {2 * i} | with a pipe\nand a newline " + "and more words " * 20


def with_troubles(sweep_dir, tmp_path):
    """A copy of the sweep with samples.jsonl in each finished job (steps 1 and 2) and four more jobs copied from
    job 0: failed (with its error line), diverged (at step 7), stopped (at step 3), and one without summary.json."""
    sweep = tmp_path / "sweep"
    shutil.copytree(sweep_dir, sweep)
    for job in "0123":
        rows = [{"step": step, "prefix": "eval", "prompt": f"What is {i} + {i}?", "answer": answer(job, i) * step,
                 "correct": i % 2 == 0, "reward": i / 4} for step in (1, 2) for i in range(5)]
        rows.append({"step": 0, "prefix": "base", "prompt": "What is 0 + 0?", "answer": "base answer"})
        (sweep / job / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    troubles = {"4": {"status": "failed", "error": FAILED_ERROR},
                "5": {"status": "diverged", "diverged_at": 7, "error": "train/loss is nan"},
                "6": None,
                "7": {"status": "stopped", "stopped_at": 3}}
    for job, fields in troubles.items():
        shutil.copytree(sweep / "0", sweep / job)
        overrides = sweep / job / ".hydra" / "overrides.yaml"
        overrides.write_text(overrides.read_text() + f"- trainer.seed={job}\n")
        if fields is None:
            (sweep / job / "summary.json").unlink()
        else:
            summary = {k: v for k, v in json.loads((sweep / "0" / "summary.json").read_text()).items()
                       if not k.startswith("eval/")}
            (sweep / job / "summary.json").write_text(json.dumps({**summary, **fields}))
    return sweep


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "peftlab.compare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def section(markdown: str, title: str) -> list[str]:
    """The lines of the markdown section whose heading starts with `title`."""
    lines = markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0].splitlines()
    return lines


def table_rows(lines: list[str]) -> list[list[str]]:
    rows = [[c.strip() for c in l.strip("|").split(" | ")] for l in lines if l.startswith("| ")]
    return rows[1:]  # without the header


def test_cross_group_sweep_with_troubles(cross_sweep, tmp_path):
    sweep = with_troubles(cross_sweep, tmp_path)
    result = run_cli(sweep, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert "ranked by eval/loss (lower is better)" in result.stdout
    report = (tmp_path / "report" / "runs.md").read_text()

    shared = section(report, "All finished runs")
    header = next(l for l in shared if l.startswith("| run"))
    assert "eval/loss" in header and "eval/pref_accuracy" not in header  # SFT runs do not report it
    for column in ("train/loss", "tokens_per_s", "peak_mem_bytes", "trainable_params", "r", "alpha", "targets"):
        assert f"| {column} |" in header
    rows = table_rows(shared)
    assert sorted(r[0] for r in rows) == ["peft=dora,algo=dpo", "peft=dora,algo=sft", "peft=lora,algo=dpo",
                                         "peft=lora,algo=sft"]
    losses = [float(r[1]) for r in rows]
    assert losses == sorted(losses)

    dpo = section(report, "dpo (metrics only dpo runs report), ranked by eval/pref_accuracy")
    assert "| run | eval/pref_accuracy | eval/margin | eval/logp_accuracy |" in dpo
    dpo_rows = table_rows(dpo)
    assert [r[0].endswith("algo=dpo") for r in dpo_rows] == [True, True]
    assert float(dpo_rows[0][1]) >= float(dpo_rows[1][1])
    assert "## sft" not in report  # SFT reports nothing beyond the shared metrics

    footer = section(report, "Not finished (4)")
    assert f"`peft=lora,algo=sft,trainer.seed=4` ({sweep / '4'}): failed: {FAILED_ERROR}" in report
    assert any("seed=5" in l and "diverged at step 7: train/loss is nan" in l for l in footer)
    assert any(f"({sweep / '6'}): unfinished: no summary.json" in l and "last logged step 2" in l for l in footer)
    assert any("seed=7" in l and f"stopped at step 3 (continue with trainer.resume={sweep / '7'})" in l for l in footer)

    with open(tmp_path / "report" / "runs.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["status"] for r in csv_rows] == ["finished"] * 4 + ["failed", "diverged", "unfinished", "stopped"]
    assert {r["eval/pref_accuracy"] != "" for r in csv_rows[:4]} == {True, False}  # every metric, blank if absent
    assert len(list((tmp_path / "report").glob("*.png"))) == 4


def test_samples_of_the_last_evaluation_side_by_side(cross_sweep, tmp_path):
    result = compare.compare([with_troubles(cross_sweep, tmp_path)], out=tmp_path / "report")
    samples = section(result["markdown"], "Samples")
    assert samples[0] == " (last evaluation: step 2)"
    prompts = [l for l in samples if l.startswith("**Prompt")]
    assert prompts == [f"**Prompt {n}:** What is {i} + {i}?" for n, i in ((1, 0), (2, 1), (3, 2))]
    first = table_rows(samples[samples.index(prompts[0]):samples.index(prompts[1])])
    assert sorted(r[0] for r in first) == sorted(r["run"] for r in result["rows"])
    assert samples[samples.index(prompts[0]) + 2] == "| run | answer | correct | reward |"
    for run, text, correct, reward in first:
        job = next(r["dir"] for r in result["rows"] if r["run"] == run).rsplit("/", 1)[1]
        assert text.startswith(f"job {job} answers 0 \\| with a pipe and a newline and more words")
        assert text.endswith("…") and len(text.replace("\\|", "|")) <= compare.ANSWER_CHARS
        assert (correct, reward) == ("True", "0")
    assert "base answer" not in result["markdown"]


def test_metric_flag_ranks_by_that_metric(cross_sweep, tmp_path):
    result = run_cli(cross_sweep, "--metric", "eval/pref_accuracy", "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert "ranked by eval/pref_accuracy (higher is better)" in result.stdout
    runs = [r[0] for r in table_rows(section(result.stdout, "All finished runs"))]
    assert [r.endswith("algo=dpo") for r in runs] == [True, True, False, False]  # runs without it come last

    unknown = run_cli(cross_sweep, "--metric", "eval/bleu", "--out", tmp_path / "other")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "error: no finished run reports eval/bleu (they report: eval/logp_accuracy, eval/loss, eval/margin, "
        "eval/pref_accuracy)"]


def test_no_finished_run_exits_2_with_one_line(cross_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        shutil.copytree(cross_sweep / job, sweep / job)
    (sweep / "0" / "summary.json").write_text(json.dumps({"status": "failed", "error": FAILED_ERROR}))
    (sweep / "1" / "summary.json").unlink()
    result = run_cli(sweep)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no finished run among 2 under {sweep} (1 failed, 1 unfinished)"]
    assert not (sweep / "compare").exists()


def row(name, algo="sft", **figures):
    return {"run": name, "status": "finished", "algo": algo, "peft": "lora", "r": 8, "trainable_params": 1000,
            "tokens_per_s": 1.0, "peak_mem_bytes": 1, "curve": [(1, 1.0), (2, 0.5)], "overrides": [name],
            "dir": name, **figures}


def test_default_ranking_metric():
    both = [row("a", **{"eval/accuracy": 0.5, "eval/loss": 1.0}), row("b", **{"eval/accuracy": 0.7, "eval/loss": 2.0})]
    assert compare.pick_metric(both) == "eval/accuracy"
    assert [r["run"] for r in compare.rank(both, "eval/accuracy")] == ["b", "a"]
    assert [r["run"] for r in compare.rank(both, "eval/loss")] == ["a", "b"]
    mixed = [row("a", **{"eval/accuracy": 0.5, "eval/loss": 1.0}), row("b", "dpo", **{"eval/pref_accuracy": 0.6,
                                                                                      "eval/loss": 0.7})]
    assert compare.pick_metric(mixed) == "eval/loss"  # the first candidate that every run reports
    partial = [row("a", **{"eval/reward": 0.1}), row("b")]
    assert compare.pick_metric(partial) == "eval/reward"  # else the first any run reports
    assert compare.pick_metric([row("a", **{"train/loss": 1.0})]) == "train/loss"
    failed = {**row("c", **{"eval/accuracy": 0.9}), "status": "failed"}
    assert compare.pick_metric([failed, *mixed]) == "eval/loss"  # only finished runs count


def test_plots_are_readable():
    """12 runs with long names: legends at 8 pt or more, markers on curves of few points only, and the bar
    chart's run labels do not overlap."""
    rows = [row(f"peft.r={r},peft.alpha_ratio={k},peft.targets=all-linear", r=r, **{"eval/loss": 1.0 / (r * k)})
            for r in (4, 8, 16, 32) for k in (1, 2, 4)]
    rows[0]["curve"] = [(s, 1.0 / s) for s in range(1, 51)]
    figs = compare_plots.figures(rows, "eval/loss")
    try:
        for name, fig in figs.items():
            for ax in fig.axes:
                if ax.get_legend():
                    assert min(t.get_fontsize() for t in ax.get_legend().get_texts()) >= 8, name
        markers = {line.get_label(): line.get_marker() for line in figs["loss_curves.png"].axes[0].get_lines()}
        assert markers.pop(rows[0]["run"]) == "None" and list(markers.values()) == ["o"] * 11
        bars = figs["throughput_memory.png"]
        bars.canvas.draw()
        renderer = bars.canvas.get_renderer()
        boxes = sorted((t.get_window_extent(renderer) for t in bars.axes[0].get_yticklabels() if t.get_text()),
                       key=lambda b: b.y0)
        assert len(boxes) == 12 and min(t.get_fontsize() for t in bars.axes[0].get_yticklabels()) >= 8
        assert all(low.y1 <= high.y0 for low, high in zip(boxes, boxes[1:]))
    finally:
        import matplotlib.pyplot as plt

        for fig in figs.values():
            plt.close(fig)
