"""Compare the runs of a sweep: ranked tables (markdown + CSV), plots (PNG), side-by-side samples, and a footer
naming the jobs that did not finish.

    python -m peftlab.compare outputs/multirun/2026-11-22/10-00-00            # a sweep directory
    python -m peftlab.compare RUN_DIR RUN_DIR ... --metric eval/accuracy --out report/

A run directory holds .hydra/; it finished when its summary.json says "status": "finished". Other statuses
(diverged, stopped, failed) and directories without summary.json (still running, or killed) are listed, not
compared. Runs of different algorithms report different metrics: the first table holds the metrics every
finished run has, one table per algorithm the rest. Exit status 0 when at least one run finished, else 2.
Works without W&B (offline clusters); the notebook in notebooks/ uses the same functions, or the W&B API.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from peftlab.compare_plots import has, plots, shorten

# The default ranking metric: the first of these that every finished run reports.
RANKING_METRICS = ("eval/accuracy", "eval/pref_accuracy", "eval/reward", "eval/loss")
LOWER_IS_BETTER = ("loss", "unsafe", "cost", "perplexity", "error")  # a metric whose last part names one of these
IDENTITY = ["run", "model", "algo", "peft", "r", "alpha", "targets"]
COSTS = ["trainable_params", "tokens_per_s", "peak_mem_bytes", "runtime_s"]
METRIC_PREFIXES = ("eval/", "base/")
SAMPLE_PROMPTS = 3  # prompts shown side by side in the report
ANSWER_CHARS, PROMPT_CHARS = 160, 200


class CompareError(ValueError):
    """Nothing to compare; the message says why in one line."""


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories under the given paths: each one holding .hydra/ (a run), searched recursively."""
    runs = []
    for path in map(Path, paths):
        if (path / ".hydra").is_dir():
            runs.append(path)
        else:
            runs += sorted((p.parent for p in path.rglob(".hydra") if p.is_dir()), key=_job_order)
    if not runs:
        raise CompareError(f"no run directories (with .hydra/) under {', '.join(map(str, paths))}")
    return runs


def _job_order(path: Path):
    return (str(path.parent), int(path.name)) if path.name.isdigit() else (str(path), 0)


def run_overrides(run: Path) -> list[str]:
    """The command-line overrides a run was started with (Hydra's .hydra/overrides.yaml)."""
    import yaml

    path = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(path.read_text()) if path.exists() else []
    return [o for o in overrides or [] if not o.startswith(("hydra.", "logger"))]


def configured_targets(run: Path):
    """peft.targets as the run's config wrote it (`attn`, `all-linear`...), shorter than the module list."""
    import yaml

    path = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.exists() else None
    return ((config or {}).get("peft") or {}).get("targets")


def label_runs(rows: list[dict]) -> None:
    """Name each run by the overrides that set it apart from the others (`swept`), else by its directory."""
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        r["swept"] = [o for o in r["overrides"] if o not in shared]
        r["run"] = ",".join(r["swept"]) or Path(r["dir"]).name


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file (a line cut short by a killed writer is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def last_samples(run: Path) -> list[dict]:
    """The samples of the run's last evaluation (samples.jsonl, prefix "eval", the highest step)."""
    rows = [r for r in read_jsonl(run / "samples.jsonl") if r.get("prefix") == "eval"]
    last = max((r["step"] for r in rows), default=None)
    return [r for r in rows if r["step"] == last]


def status_detail(summary: dict, curve: list, run: Path) -> str:
    """What happened to a run that did not finish, in a few words."""
    status = summary.get("status", "unfinished")
    last = f"; last logged step {curve[-1][0]}" if curve else ""
    if status == "failed":
        return f"failed: {summary.get('error') or 'no error recorded'}"
    if status == "diverged":
        step = summary.get("diverged_at", summary.get("step"))
        return f"diverged at step {step}" + (f": {summary['error']}" if summary.get("error") else "")
    if status == "stopped":
        step = summary.get("stopped_at", summary.get("interrupted_at"))
        return f"stopped at step {step} (continue with trainer.resume={run})"
    return f"{status}: no summary.json (still running, or killed){last}"


def read_run(run: Path) -> dict:
    """One run: its summary (if any) + `status`, `dir`, `overrides`, `curve` (step, train/loss) and `samples`."""
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"status": "unfinished"}
    summary.setdefault("status", "finished")  # summaries from before statuses existed were written on success
    curve = [(m["step"], m["train/loss"]) for m in read_jsonl(run / "metrics.jsonl")
             if isinstance(m.get("train/loss"), (int, float))]
    row = {**summary, "dir": str(run), "overrides": run_overrides(run), "curve": curve}
    if summary["status"] == "finished":
        row["samples"] = last_samples(run)
        targets = configured_targets(run)
        if isinstance(targets, str):
            row["targets"] = targets
    else:
        row["detail"] = status_detail(summary, curve, run)
    return row


def load_runs(paths: list[Path]) -> list[dict]:
    """Every run directory under paths, finished or not, labelled by the overrides that set it apart."""
    rows = [read_run(run) for run in find_runs(paths)]
    label_runs(rows)
    return rows


def finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "finished"]


def higher_is_better(metric: str) -> bool:
    return not any(word in metric.rsplit("/", 1)[-1] for word in LOWER_IS_BETTER)


def pick_metric(rows: list[dict], metric: str | None = None) -> str:
    """The metric to rank by: `metric` if given (some finished run must report it), else the first of
    RANKING_METRICS that every finished run reports (else that any reports), else train/loss."""
    done = finished(rows)
    if metric:
        if not any(has(r, metric) for r in done):
            reported = sorted({k for r in done for k in r if k.startswith(METRIC_PREFIXES) and has(r, k)})
            raise CompareError(f"no finished run reports {metric} (they report: {', '.join(reported) or 'nothing'})")
        return metric
    for test in (all, any):
        for candidate in RANKING_METRICS:
            if test(has(r, candidate) for r in done):
                return candidate
    return "train/loss"


def rank(rows: list[dict], metric: str) -> list[dict]:
    """Finished rows, best first by metric; those without it last, in their sweep order."""
    sign = -1 if higher_is_better(metric) else 1
    scored = [r for r in finished(rows) if has(r, metric)]
    return sorted(scored, key=lambda r: sign * r[metric]) + [r for r in finished(rows) if not has(r, metric)]


def metric_keys(rows: list[dict]) -> list[str]:
    """eval/* and base/* keys the rows report, in first-seen order."""
    keys = {}
    for r in rows:
        keys.update((k, None) for k in r if k.startswith(METRIC_PREFIXES) and has(r, k))
    return list(keys)


def shared_keys(rows: list[dict]) -> list[str]:
    return [k for k in metric_keys(rows) if all(has(r, k) for r in rows)]


def cell(row: dict, column: str):
    value = row.get(column)
    return "+".join(map(str, value)) if isinstance(value, list) else value


def shared_table(rows: list[dict], metric: str) -> tuple[list[str], list[list]]:
    """Every finished run, ranked by metric: identity, the metrics all of them report, train/loss, costs."""
    ranked = rank(rows, metric)
    metrics = [metric] + [k for k in shared_keys(ranked) if k != metric]
    columns = IDENTITY[:1] + metrics + IDENTITY[1:] + ["train/loss"] + COSTS
    return columns, [[cell(r, c) for c in columns] for r in ranked]


def algo_tables(rows: list[dict]) -> list[tuple[str, str, list[str], list[list]]]:
    """(algo, its ranking metric, columns, body) for each algorithm whose runs report metrics that not every
    finished run reports (DPO's eval/pref_accuracy beside SFT runs, GRPO's eval/reward...)."""
    done = finished(rows)
    everyone = set(shared_keys(done))
    tables = []
    for algo in dict.fromkeys(r.get("algo") for r in done):
        own = [r for r in done if r.get("algo") == algo]
        extra = [k for k in metric_keys(own) if k not in everyone]
        if not extra:
            continue
        metric = pick_metric(own)
        columns = ["run", metric] + [k for k in extra if k != metric]
        tables.append((algo, metric, columns, [[cell(r, c) for c in columns] for r in rank(own, metric)]))
    return tables


def markdown(columns: list[str], body: list[list]) -> str:
    def show(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else escape(str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(show(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def escape(text: str) -> str:
    """Text safe inside a markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def samples_section(rows: list[dict], prompts: int = SAMPLE_PROMPTS) -> str:
    """For the prompts answered by the most runs (first-seen order among equals), each run's answer of its
    last evaluation, side by side with its per-sample scores."""
    ranked = [r for r in rows if r.get("samples")]
    if not ranked:
        return ""
    seen: dict[str, list] = {}
    for r in ranked:
        for s in r["samples"]:
            seen.setdefault(s["prompt"], []).append((r, s))
    order = sorted(seen, key=lambda p: (-len({id(r) for r, _ in seen[p]}), list(seen).index(p)))
    steps = sorted({r["samples"][0]["step"] for r in ranked})
    lines = [f"## Samples (last evaluation: step {', '.join(map(str, steps))})"]
    for number, prompt in enumerate(order[:prompts], 1):
        answers = seen[prompt]
        fixed = ("step", "prefix", "prompt", "answer")
        scores = list(dict.fromkeys(k for _, s in answers for k in s if k not in fixed))
        body = [[r["run"], shorten(s["answer"], ANSWER_CHARS), *(s.get(k) for k in scores)] for r, s in answers]
        lines += ["", f"**Prompt {number}:** {escape(shorten(prompt, PROMPT_CHARS))}", "",
                  markdown(["run", "answer", *scores], body)]
    return "\n".join(lines)


def not_finished_section(rows: list[dict]) -> str:
    others = [r for r in rows if r["status"] != "finished"]
    if not others:
        return ""
    lines = [f"## Not finished ({len(others)})", ""]
    lines += [f"- `{r['run']}` ({r['dir']}): {r['detail']}" for r in others]
    return "\n".join(lines)


def report(rows: list[dict], metric: str) -> str:
    """runs.md: the ranking, the shared table, one table per algorithm, samples, the runs that did not finish."""
    done = finished(rows)
    goal = "higher" if higher_is_better(metric) else "lower"
    ranking = f"ranked by {metric} ({goal} is better)"
    algos = list(dict.fromkeys(str(r.get("algo")) for r in done))
    if len(algos) > 1:
        ranking += (f"; the runs span {', '.join(algos)}, whose metrics measure different objectives: "
                    "compare within each algorithm's table")
    lines = [f"# {len(done)} finished runs of {len(rows)}", "", ranking]
    columns, body = shared_table(rows, metric)
    lines += ["", "## All finished runs (metrics every run reports)", "", markdown(columns, body)]
    for algo, algo_metric, columns, body in algo_tables(rows):
        lines += ["", f"## {algo} (metrics only {algo} runs report), ranked by {algo_metric}", "",
                  markdown(columns, body)]
    lines += [s for part in (samples_section(rank(rows, metric)), not_finished_section(rows)) if part
              for s in ("", part)]
    return "\n".join(lines)


def csv_rows(rows: list[dict], metric: str) -> tuple[list[str], list[list]]:
    """One row per run directory (finished ones ranked first), with every metric any run reports."""
    ordered = rank(rows, metric) + [r for r in rows if r["status"] != "finished"]
    columns = ["run", "status"] + IDENTITY[1:] + metric_keys(rows) + ["train/loss"] + COSTS + ["detail", "dir"]
    return columns, [[cell(r, c) for c in columns] for r in ordered]


def compare(paths: list[Path], metric: str | None = None, out: Path | None = None) -> dict:
    """Load, rank, tabulate and plot. Returns {"markdown", "csv", "plots", "rows" (finished, ranked),
    "not_finished", "metric"}; raises CompareError when no run finished."""
    rows = load_runs(paths)
    if not finished(rows):
        counts = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        raise CompareError(f"no finished run among {len(rows)} under {', '.join(map(str, paths))} "
                           f"({', '.join(f'{n} {s}' for s, n in counts.items())})")
    metric = pick_metric(rows, metric)
    out = Path(out or (Path(paths[0]) / "compare"))
    out.mkdir(parents=True, exist_ok=True)
    columns, body = csv_rows(rows, metric)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(body)
    md = report(rows, metric)
    (out / "runs.md").write_text(md + "\n")
    return {"markdown": md, "csv": out / "runs.csv", "plots": plots(rank(rows, metric), metric, out), "rows": rank(rows, metric),
            "not_finished": [r for r in rows if r["status"] != "finished"], "metric": metric}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or sweep directories")
    parser.add_argument("--metric", default=None,
                        help=f"summary metric to rank by (default: the first of {', '.join(RANKING_METRICS)} "
                             "that every finished run reports)")
    parser.add_argument("--out", type=Path, default=None, help="where to write runs.csv, runs.md and the PNGs")
    args = parser.parse_args(argv)
    try:
        result = compare(args.paths, args.metric, args.out)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result["markdown"])
    print(f"\nranked by {result['metric']}; wrote {result['csv']}, runs.md and {len(result['plots'])} plots "
          f"to {result['csv'].parent}")


if __name__ == "__main__":
    main()
