"""The benchmark's outputs: bench.csv (one row per run) and bench.md (ours vs TRL, DoRA vs LoRA)."""

from __future__ import annotations

import csv
import datetime
import os
import platform
from pathlib import Path

CSV_COLUMNS = ["algo", "peft", "tool", "setting", "steps", "step_s", "tokens_per_step", "tokens_per_s",
               "us_per_token", "peak_mem_mb", "mfu", "threads", "device"]

def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def cell(row: dict | None, key: str, spec: str) -> str:
    return format(row[key], spec) if row and row.get(key) is not None else "–"


def markdown(results: list[dict], args, command: str) -> str:
    """Ours vs TRL (time per trained token, lower is better) per algo × peft, then DoRA's step time vs LoRA's."""
    runs = {(r["algo"], r["peft"], r["tool"], r["setting"]): r for r in results}
    with_mfu = any(r["mfu"] for r in results)
    load = os.getloadavg()
    grpo = f" (GRPO: {args.grpo_prompts} prompt × {args.num_generations} completions ≤ {args.max_new_tokens} tokens)"
    lines = [
        f"Measured {datetime.date.today()} on {results[0]['device'] if results else '?'} ({os.cpu_count()} cores, "
        f"{platform.machine()}), {args.threads} torch thread(s), load average {load[0]:.1f} at the end; model "
        f"{args.model}, sequence length {args.seq_len}, batch {args.batch_size}{grpo if 'grpo' in args.algo else ''}; "
        f"medians of {args.steps} steps after {args.warmup} warm-up.",
        f"Command: `{command}`",
        "",
        "| algo | peft | ours µs/token | TRL default µs/token | ours / TRL default | TRL best µs/token "
        "| ours / TRL best | ours step s | ours tokens/s | peak MB (process) ours / TRL default / TRL best |"
        + (" ours MFU |" if with_mfu else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_mfu else ""),
    ]
    for algo in args.algo:
        for peft in args.peft:
            ours = runs.get((algo, peft, "ours", "default"))
            if ours is None:
                continue
            default, best = runs.get((algo, peft, "trl", "default")), runs.get((algo, peft, "trl", "best"))
            lines.append(
                f"| {algo} | {peft} | {cell(ours, 'us_per_token', '.1f')} | {cell(default, 'us_per_token', '.1f')} "
                f"| {ratio(ours['us_per_token'], default and default['us_per_token'])} "
                f"| {cell(best, 'us_per_token', '.1f')} | {ratio(ours['us_per_token'], best and best['us_per_token'])} "
                f"| {ours['step_s']:.3f} | {ours['tokens_per_s']:.0f} "
                f"| {cell(ours, 'peak_mem_mb', '.0f')} / {cell(default, 'peak_mem_mb', '.0f')} "
                f"/ {cell(best, 'peak_mem_mb', '.0f')} |" + (f" {cell(ours, 'mfu', '.1%')} |" if with_mfu else ""))
    if {"lora", "dora"} <= set(args.peft):
        lines += ["", "| algo | DoRA / LoRA step time (ours) | DoRA / LoRA time per token (ours) |", "|---|---|---|"]
        for algo in args.algo:
            lora, dora = runs.get((algo, "lora", "ours", "default")), runs.get((algo, "dora", "ours", "default"))
            if lora and dora:
                lines.append(f"| {algo} | {ratio(dora['step_s'], lora['step_s'])} "
                             f"| {ratio(dora['us_per_token'], lora['us_per_token'])} |")
    lines += ["", "Ours: the repo's default settings of each algo. TRL default: its trainer's defaults (gradient "
              "checkpointing on). TRL best: SFT packing=True (best-fit decreasing, padding-free), DPO "
              "precompute_ref_log_probs=True (TRL 1.16 disables its padding_free), both with gradient checkpointing "
              "off; GRPO: defaults only."]
    return "\n".join(lines) + "\n"


def write_results(results: list[dict], out_dir: Path, args, command: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "bench.csv", out_dir / "bench.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    md_path.write_text(markdown(results, args, command))
    return csv_path, md_path


