"""The benchmark's outputs: bench.csv (one row per run) and bench.md (ours vs TRL, DoRA vs LoRA); for
--suite scale, scale.csv (one row per measurement) and scale.md (the tables and the targets)."""

from __future__ import annotations

import csv
import datetime
import os
import platform
from pathlib import Path

CSV_COLUMNS = ["algo", "peft", "tool", "setting", "steps", "step_s", "tokens_per_step", "tokens_per_s",
               "us_per_token", "peak_mem_mb", "mfu", "threads", "device"]

TRL_NOTE = ("TRL default: its trainer's defaults (gradient checkpointing on). TRL best: SFT packing=True (best-fit "
            "decreasing, padding-free), DPO precompute_ref_log_probs=True (TRL 1.16 disables its padding_free), both "
            "with the gradient checkpointing our memory policy (trainer.gradient_checkpointing=auto) picks for the "
            "same job; GRPO: defaults only.")


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
        f"medians of {args.steps} steps after {args.warmup} warm-up; CPU memory: "
        f"{allocator_note(args.malloc_mmap_threshold)}.",
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
    lines += ["", "Ours: the repo's default settings of each algo. " + TRL_NOTE]
    return "\n".join(lines) + "\n"


def write_tables(out_dir: Path, stem: str, columns: list[str], rows: list[dict], text: str) -> tuple[Path, Path]:
    """<stem>.csv (the rows, in `columns`) and <stem>.md (`text`) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(text)
    return csv_path, md_path


def write_results(results: list[dict], out_dir: Path, args, command: str) -> tuple[Path, Path]:
    return write_tables(out_dir, "bench", CSV_COLUMNS, results, markdown(results, args, command))




# ---- --suite scale ---------------------------------------------------------------------------------------------------

SCALE_COLUMNS = ["part", "measure", "algo", "peft", "tool", "setting", "model", "seq_len", "batch_size", "precision",
                 "status",
                 "checkpointing", "tokens_per_step", "tokens_total", "steps", "step_s", "us_per_token", "tokens_per_s", "load_s",
                 "start_mb", "load_peak_mb", "train_peak_mb", "peak_mb", "host_peak_mb", "held_mb", "sampled_peak_mb",
                 "wall_s", "group", "mfu", "threads", "device"]
TARGETS = {  # ours / TRL default, lower is better (the issue "Real scale on one machine")
    ("sft", "memory"): 0.6, ("sft", "time"): 0.8, ("dpo", "memory"): 0.6, ("dpo", "time"): 0.6,
}
QLORA_OVER_LORA_TARGET = 0.5      # QLoRA's peak over LoRA's, small architecture
QLORA_LARGE_TARGET_MB = 6e9 / 2**20  # 6 GB (10^9 bytes) for the large architecture's QLoRA peak


def run_label(row: dict) -> str:
    return "ours" if row["tool"] == "ours" else f"TRL {row['setting']}"


def memory_cell(row: dict | None, limit_mb: float) -> str:
    """Peak MB (loading / training), or why there is none."""
    if row is None:
        return "–"
    if row["status"] != "ok":
        return f"> {limit_mb:.0f} (stopped)" if row["status"].startswith("stopped") else row["status"]
    return f"{row['peak_mb']:.0f} ({row['load_peak_mb']:.0f} / {row['train_peak_mb']:.0f})"


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "–"
    return f"{value:.2f} {'met' if value <= target else 'missed'} (≤ {target})"


def machine_line(facts: dict) -> str:
    machine, start, end = facts["machine"], facts["load_start"], facts["load_end"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    device = f", {machine['device']}" if machine["device"] != "cpu" else ""
    return (f"Measured {facts['started']} to {facts['finished']} on {machine['cpu']} ({machine['cores']} cores, "
            f"{machine['ram_gib']:.0f} GiB RAM){device}, {facts['threads']} torch thread(s); load average "
            f"(1/5/15 min) {start[0]:.1f}/{start[1]:.1f}/{start[2]:.1f} at the start, "
            f"{end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f} at the end; {versions}.")


def compare_tables(rows: list[dict], facts: dict) -> list[str]:
    sizes, limit = facts["sizes"], facts["limit_mb"]
    memory = {(r["algo"], r["tool"], r["setting"]): r for r in rows if r["part"] == "compare" and r["measure"] == "memory"}
    timing = [r for r in rows if r["part"] == "compare" and r["measure"] == "time"]
    lines = [f"## Ours vs TRL: {sizes.compare_model}, LoRA r16 all-linear, {sizes.batch_size} × {sizes.compare_seq} "
             "tokens per step", "",
             "| algo | run | gradient checkpointing | tokens/step | peak MB, own process (loading / training) "
             "| µs per trained token | step s | timed with |", "|---|---|---|---|---|---|---|---|"]
    for (algo, tool, setting), m in memory.items():
        times = [t for t in timing if (t["algo"], t["tool"], t["setting"]) == (algo, tool, setting)]
        checkpointing = {True: "on", False: "off"}.get(m.get("checkpointing"), "–")
        tokens = f"{m['tokens_per_step']:.0f}" if m.get("tokens_per_step") else "–"
        for t in times or [None]:
            lines.append(f"| {algo} | {run_label(m)} | {checkpointing} | {tokens} | {memory_cell(m, limit)} "
                         f"| {cell(t, 'us_per_token', '.0f')} | {cell(t, 'step_s', '.1f')} "
                         f"| {t['group'] if t else '–'} |")
    lines += ["", "| algo | ours / TRL default: memory | time per token | ours / TRL best: memory | time per token |",
              "|---|---|---|---|---|"]
    for algo in ("sft", "dpo"):
        ours, default, best = (memory.get((algo, *run)) for run in (("ours", "default"), ("trl", "default"),
                                                                     ("trl", "best")))
        if ours is None:
            continue
        lines.append(f"| {algo} | {verdict(peak_ratio(ours, default), TARGETS[(algo, 'memory')])} "
                     f"| {verdict(time_ratio(timing, algo, 'default'), TARGETS[(algo, 'time')])} "
                     f"| {ratio_or_dash(peak_ratio(ours, best))} | {ratio_or_dash(time_ratio(timing, algo, 'best'))} |")
    return lines


def ratio_or_dash(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def peak_ratio(ours: dict | None, other: dict | None) -> float | None:
    ok = ours and other and ours["status"] == other["status"] == "ok"
    return ours["peak_mb"] / other["peak_mb"] if ok else None


def time_ratio(timing: list[dict], algo: str, setting: str) -> float | None:
    """Ours over TRL `setting` per trained token, both from the group they were timed in together."""
    for group in dict.fromkeys(t["group"] for t in timing if t["algo"] == algo):
        runs = {(t["tool"], t["setting"]): t for t in timing if t["algo"] == algo and t["group"] == group}
        if ("ours", "default") in runs and ("trl", setting) in runs:
            return runs[("ours", "default")]["us_per_token"] / runs[("trl", setting)]["us_per_token"]
    return None


def kept_activation_mb(model_dir: str, tokens: int) -> tuple[float, float]:
    """fp32 MB of (what gradient checkpointing keeps for the backward: each layer's input, (tokens, hidden) per
    layer; one layer's activations, recomputed in the backward: peftlab.memory.activation_bytes / layers)."""
    import torch
    from transformers import AutoConfig

    from peftlab.memory import activation_bytes

    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    layers = config.num_hidden_layers
    boundaries = layers * tokens * config.hidden_size * 4
    one_layer = activation_bytes(config, tokens, torch.float32) / layers
    return boundaries / 2**20, one_layer / 2**20


def seqlen_table(rows: list[dict], facts: dict) -> list[str]:
    """Peak against length, and the check of the claim that ours grows by no more than what checkpointing keeps:
    each layer's input (held for the whole backward) plus, at most, one layer's recomputed activations."""
    sizes, limit = facts["sizes"], facts["limit_mb"]
    model_dir = facts["model_configs"][sizes.compare_model]
    runs = {(r["seq_len"], r["tool"]): r for r in rows if r["part"] == "seqlen"}
    lengths = sorted({length for length, _ in runs})
    if not lengths:
        return []
    first = runs.get((lengths[0], "ours"))
    first_inputs, first_layer = kept_activation_mb(model_dir, sizes.batch_size * lengths[0])
    lines = [f"## Peak memory against sequence length: SFT, {sizes.compare_model}, {sizes.batch_size} rows per step, "
             "one process per run", "",
             "| tokens per row | ours peak MB (loading / training) | TRL default peak MB | ours / TRL default "
             f"| ours growth from {lengths[0]} MB | growth of the layer inputs checkpointing keeps MB "
             "| the same + one layer recomputed MB | ours' growth within |", "|---|---|---|---|---|---|---|---|"]
    for length in lengths:
        ours, trl = runs.get((length, "ours")), runs.get((length, "trl"))
        inputs, one_layer = kept_activation_mb(model_dir, sizes.batch_size * length)
        inputs_growth, both_growth = inputs - first_inputs, inputs + one_layer - first_inputs - first_layer
        growth = ours["peak_mb"] - first["peak_mb"] if ours and first and ours["status"] == first["status"] == "ok" \
            else None
        if growth is None or length == lengths[0]:
            within = "–"
        else:
            within = "layer inputs" if growth <= inputs_growth else \
                "inputs + one layer" if growth <= both_growth else "neither"
        lines.append(f"| {length} | {memory_cell(ours, limit)} | {memory_cell(trl, limit)} "
                     f"| {ratio_or_dash(peak_ratio(ours, trl))} | {'–' if growth is None else f'{growth:.0f}'} "
                     f"| {inputs_growth:.0f} | {both_growth:.0f} | {within} |")
    return lines


def qlora_table(rows: list[dict], facts: dict) -> list[str]:
    sizes, limit = facts["sizes"], facts["limit_mb"]
    runs = [r for r in rows if r["part"] == "qlora"]
    if not runs:
        return []
    lines = ["## QLoRA: ours, SFT, batch 1, one process per run (loading included)", "",
             "| model | peft | precision | tokens/step | gradient checkpointing | peak MB (loading / training) "
             "| loading s | step s | µs per trained token |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        checkpointing = {True: "on", False: "off"}.get(r.get("checkpointing"), "–")
        lines.append(f"| {r['model']} | {r['peft']} | {r['precision']} | {cell(r, 'tokens_per_step', '.0f')} "
                     f"| {checkpointing} "
                     f"| {memory_cell(r, limit)} | {cell(r, 'load_s', '.0f')} | {cell(r, 'step_s', '.1f')} "
                     f"| {cell(r, 'us_per_token', '.0f')} |")
    small = {r["peft"]: r for r in runs if r["model"] == sizes.qlora_small_model and r["seq_len"] == sizes.qlora_small_seq}
    large = next((r for r in runs if r["model"] == sizes.qlora_large_model and r["seq_len"] == sizes.qlora_large_seq
                  and r["peft"] == "qlora"), None)
    large_gb = large["peak_mb"] * 2**20 / 1e9 if large and large["status"] == "ok" else None
    lines += ["", f"- {sizes.qlora_small_model}: QLoRA / LoRA peak "
                  f"{verdict(peak_ratio(small.get('qlora'), small.get('lora')), QLORA_OVER_LORA_TARGET)}.",
              f"- {sizes.qlora_large_model}: QLoRA peak "
              + (f"{large_gb:.1f} GB {'met' if large['peak_mb'] <= QLORA_LARGE_TARGET_MB else 'missed'} (≤ 6 GB)"
                 if large_gb is not None else f"not measured ({large['status'] if large else 'not run'})") + "."]
    for r in runs:
        if r["status"] == "ok":
            where = "loading" if r["load_peak_mb"] >= r["train_peak_mb"] else "the training step"
            lines.append(f"- {r['model']} {r['peft']}: the peak is in {where} (loading {r['load_peak_mb']:.0f} MB, "
                         f"training {r['train_peak_mb']:.0f} MB).")
    return lines


def allocator_note(threshold: int | None) -> str:
    if threshold:
        return f"glibc returning freed blocks of {threshold / 2**10:g} KiB and more at once (mallopt " \
               "M_MMAP_THRESHOLD: no freed memory kept in the allocator's heaps counts)"
    return "glibc's default allocator (memory it keeps after freeing counts)"


def scale_markdown(rows: list[dict], facts: dict, command: str) -> str:
    sizes = facts["sizes"]
    lines = ["# Scale suite", "", machine_line(facts), f"Command: `{command}`", "",
             "Models: random weights with the public architectures' exact configs (scripts/make_arch_checkpoint.py, "
             "bf16 on disk, trained in the run's precision: auto is fp32 on CPU, bf16 on GPU; the large QLoRA run trains in "
             "bf16, as QLoRA is used); rows of random words, each "
             "sequence filling its length (chat template included). Memory: the peak of the run's own process "
             f"(CPU: resident set, {allocator_note(facts.get('malloc_mmap_threshold'))}; GPU: max allocated), "
             "loading (everything before the first step: for ours build_run, which also precomputes DPO's "
             "reference log-probs; for TRL the trainer's construction) and training apart; a run "
             f"stopped at the {facts['limit_mb']:.0f} MB limit shows as such. Time: the median over "
             f"{sizes.timed_steps} optimizer step(s) after 1 warm-up of the time per trained token (non-padding "
             "tokens fed to the training forward), with the runs of a group taking turns step by step in one "
             "process. " + TRL_NOTE, ""]
    if "compare" in facts["parts"]:
        lines += compare_tables(rows, facts) + [""]
    if "seqlen" in facts["parts"]:
        lines += seqlen_table(rows, facts) + [""]
    if "qlora" in facts["parts"]:
        lines += qlora_table(rows, facts) + [""]
    return "\n".join(lines)


def write_scale(rows: list[dict], facts: dict, out_dir: Path, command: str) -> tuple[Path, Path]:
    """scale.csv, scale.md, and scale.json (everything both were made from, for `--render`)."""
    import dataclasses
    import json

    paths = write_tables(out_dir, "scale", SCALE_COLUMNS, rows, scale_markdown(rows, facts, command))
    saved = {"command": command, "rows": rows, "facts": {**facts, "sizes": dataclasses.asdict(facts["sizes"])}}
    (out_dir / "scale.json").write_text(json.dumps(saved, indent=1, default=str) + "\n")
    return paths


def read_scale(out_dir: Path) -> tuple[list[dict], dict, str]:
    """(rows, facts, command) as a suite run saved them in scale.json."""
    import json

    from peftlab.bench.scale import Sizes

    saved = json.loads((out_dir / "scale.json").read_text())
    sizes = saved["facts"]["sizes"]
    facts = {**saved["facts"], "sizes": Sizes(**{**sizes, "seq_lens": tuple(sizes["seq_lens"])})}
    return saved["rows"], facts, saved["command"]
