"""`python -m peftlab.bench --suite scale`: the real-architecture suite (ours vs TRL at Qwen2.5-0.5B, peak memory
against sequence length, QLoRA at Llama-3.2-1B and Mistral-7B-v0.3), its memory runs each in its own process.

    compare   SFT and DPO, LoRA r16 all-linear, full-length rows: ours, TRL default, TRL best (and TRL + Liger
              where it runs). Peak memory: one process per run. Time per trained token: the runs interleaved step
              by step in this process (`Turns`), in the largest groups whose estimated memory fits the budget.
    seqlen    SFT peak memory at each sequence length, ours and TRL default, one process per run.
    qlora     ours only: LoRA vs QLoRA on the small architecture, QLoRA on the large one; peak memory with the
              loading, and step time, from the run's own process.

A memory run (peftlab.bench.isolated) is `python -m peftlab.bench --one '<spec>'` (`measure_one`), a fresh
interpreter: it builds its run as the default bench does (peftlab.bench.runners: ours through build_run and
loop.train, TRL through its trainer), records the process's peak while loading (up to `StepLog.loaded`) and while training apart, and prints
its figures as one line. This process watches each one's resident memory and stops it above the limit, so a run
that cannot fit is recorded as such instead of taking the machine down. --quick forks its memory runs from one
process that has imported the libraries once (a multiprocessing forkserver) instead: the same measurement
without ten interpreter start-ups, its figures including the libraries every run then shares.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.bench.environment import machine_facts
from peftlab.bench.harness import flops_per_token, peak_bf16_flops
from peftlab.bench.isolated import (device_name, make_forkserver, run_args, run_isolated, spec_key, suite_rows,
                                    wait_for_memory)
from peftlab.bench.workloads import arch_checkpoint
from peftlab.models import train_dtype

PARTS = ("compare", "seqlen", "qlora")


@dataclass(frozen=True)
class Sizes:
    """What the suite runs on: the full suite's public architectures, or --quick's tiny stand-ins."""

    compare_model: str
    compare_seq: int
    batch_size: int                  # rows (SFT) or pairs (DPO) per step
    seq_lens: tuple[int, ...]        # the seqlen part, SFT
    qlora_small_model: str
    qlora_small_seq: int
    qlora_large_model: str
    qlora_large_seq: int
    qlora_large_precision: str       # trainer.precision of the large QLoRA run
    timed_steps: int                 # interleaved timing: optimizer steps after the warm-up
    memory_steps: int                # memory runs: timed steps after the warm-up (the peak is reached by then)


FULL = Sizes(compare_model="qwen2.5-0.5b", compare_seq=1024, batch_size=2, seq_lens=(512, 1024, 2048, 4096),
             qlora_small_model="llama-3.2-1b", qlora_small_seq=560, qlora_large_model="mistral-7b-v0.3",
             qlora_large_seq=512, qlora_large_precision="bf16", timed_steps=3, memory_steps=1)
QUICK = Sizes(compare_model="tiny-qwen-152k", compare_seq=64, batch_size=2, seq_lens=(32, 64),
              qlora_small_model="tiny-qwen-152k", qlora_small_seq=48, qlora_large_model="tiny-qwen-152k",
              qlora_large_seq=32, qlora_large_precision="bf16", timed_steps=1, memory_steps=1)
# qlora memory runs report the step time too: timed steps after the warm-up (the large model's take minutes)
QLORA_SMALL_STEPS, QLORA_LARGE_STEPS = 2, 1


# ---- the suite -----------------------------------------------------------------------------------------------------


def base_spec(sizes: Sizes, model: str, model_dir: Path, args) -> dict:
    return {"model": model, "model_dir": str(model_dir), "batch_size": sizes.batch_size, "warmup": 1,
            "steps": sizes.memory_steps, "threads": args.threads, "seed": args.seed, "precision": args.precision,
            "malloc_mmap_threshold": args.malloc_mmap_threshold}


def precision_name(spec: dict, device) -> str:
    """The dtype a spec's run trains in (its trainer.precision resolved on this device): float32 or bfloat16."""
    return str(train_dtype(spec["precision"], device)).removeprefix("torch.")


def compare_runs(algo: str) -> list[tuple[str, str, str]]:
    from peftlab.bench.runners import TRL_SETTINGS

    return [("lora", "ours", "default")] + [("lora", "trl", s) for s in TRL_SETTINGS[algo]]


def plan_specs(sizes: Sizes, parts: list[str], model_dirs: dict[str, Path], args, device) -> list[dict]:
    """Every memory run of the asked-for parts (a run two parts share is one spec, see spec_key)."""
    from peftlab.bench.runners import unavailable

    specs = []
    if "compare" in parts:
        base = base_spec(sizes, sizes.compare_model, model_dirs[sizes.compare_model], args)
        for algo in ("sft", "dpo"):
            specs += [{**base, "part": "compare", "algo": algo, "peft": peft, "tool": tool, "setting": setting,
                       "seq_len": sizes.compare_seq}
                      for peft, tool, setting in compare_runs(algo) if not unavailable(setting, device)]
    if "seqlen" in parts:
        base = base_spec(sizes, sizes.compare_model, model_dirs[sizes.compare_model], args)
        specs += [{**base, "part": "seqlen", "algo": "sft", "peft": "lora", "tool": tool, "setting": "default",
                   "seq_len": seq_len} for seq_len in sizes.seq_lens for tool in ("ours", "trl")]
    if "qlora" in parts:
        for model, seq_len, pefts, steps, precision in (
                (sizes.qlora_small_model, sizes.qlora_small_seq, ("lora", "qlora"), QLORA_SMALL_STEPS, args.precision),
                (sizes.qlora_large_model, sizes.qlora_large_seq, ("qlora",), QLORA_LARGE_STEPS,
                 sizes.qlora_large_precision)):
            base = {**base_spec(sizes, model, model_dirs[model], args), "batch_size": 1, "steps": steps,
                    "precision": precision}
            specs += [{**base, "part": "qlora", "algo": "sft", "peft": peft, "tool": "ours", "setting": "default",
                       "seq_len": seq_len} for peft in pefts]
    return specs


def estimated_mb(figures: list[dict]) -> float:
    """One process holding these runs side by side: each keeps its resident state between its turns (what its
    process held after its steps, less the shared start), and one at a time adds its step's transient peak."""
    start = max(f["start_mb"] for f in figures)
    held = sum(f["held_mb"] - f["start_mb"] for f in figures)
    return start + held + max(f["train_peak_mb"] - f["held_mb"] for f in figures)


def timing_groups(runs: list[tuple], figures: dict[tuple, dict], budget_mb: float) -> list[list[tuple]]:
    """Ours with every TRL setting in one group if their estimated memory fits the budget; else ours with each
    in turn; a pair that does not fit either is timed one run after the other (not interleaved)."""
    ours, others = runs[0], runs[1:]
    measured = [r for r in runs if r in figures]
    if ours not in figures or estimated_mb([figures[r] for r in measured]) <= budget_mb:
        return [runs]
    groups = []
    for other in others:
        if other not in figures or estimated_mb([figures[ours], figures[other]]) <= budget_mb:
            groups.append([ours, other])
        else:
            groups += [[ours], [other]]
    return groups


def time_interleaved(sizes: Sizes, algo: str, model_dir: Path, memory: dict[str, dict], specs: list[dict], args,
                     device, budget_mb: float) -> list[dict]:
    """Time per trained token of the compare runs of `algo`, interleaved in groups that fit (timing_groups)."""
    from transformers import AutoTokenizer

    from peftlab.bench.runners import run_algo

    spec_of = {(s["peft"], s["tool"], s["setting"]): s for s in specs if s["part"] == "compare" and s["algo"] == algo}
    runs = list(spec_of)
    ok = {run: memory[spec_key(spec)] for run, spec in spec_of.items() if memory[spec_key(spec)]["status"] == "ok"}
    timed = [run for run in runs if run in ok]
    if not timed or timed[0] != runs[0]:
        return []
    spec = {**spec_of[runs[0]], "steps": sizes.timed_steps}
    run_arguments = run_args(spec)
    rows = suite_rows(algo, AutoTokenizer.from_pretrained(model_dir), run_arguments)
    peak_flops = peak_bf16_flops()
    results = []
    for group in timing_groups(timed, ok, budget_mb):
        wait_for_memory(min(budget_mb, estimated_mb([ok[run] for run in group])))
        label = " + ".join(f"{tool} {setting}" if tool == "trl" else tool for _, tool, setting in group)
        print(f"timing {algo}: {label} ({sizes.timed_steps} steps after 1 warm-up, taking turns)", flush=True)
        with tempfile.TemporaryDirectory(prefix="peftlab-bench-time-") as tmp:
            for row in run_algo(model_dir, algo, rows, run_arguments, device, Path(tmp), runs=group):
                flops = flops_per_token(model_dir, row["peft"], spec["seq_len"])
                row.update(part="compare", measure="time", group=label, model=spec["model"], seq_len=spec["seq_len"],
                           batch_size=spec["batch_size"], precision=precision_name(spec, device), status="ok",
                           threads=torch.get_num_threads(),
                           device=device_name(device),
                           mfu=row["tokens_per_s"] * flops / peak_flops if peak_flops else None)
                results.append(row)
                print(f"  {row['tool']} {row['setting']}: {row['us_per_token']:.1f} µs/token, step "
                      f"{row['step_s']:.2f} s, {row['tokens_per_step']:.0f} tokens", flush=True)
        gc.collect()
    return results


def not_run_rows(sizes: Sizes, parts: list[str], device) -> list[dict]:
    """The compare runs that cannot run here, with the reason (Liger on CPU)."""
    from peftlab.bench.runners import TRL_SETTINGS, unavailable

    if "compare" not in parts:
        return []
    return [{"part": "compare", "measure": "memory", "algo": algo, "peft": "lora", "tool": "trl", "setting": s,
             "model": sizes.compare_model, "seq_len": sizes.compare_seq, "batch_size": sizes.batch_size,
             "status": f"not run: {unavailable(s, device)}"}
            for algo in ("sft", "dpo") for s in TRL_SETTINGS[algo] if unavailable(s, device)]


def run_suite(args) -> tuple[list[dict], dict]:
    """The whole suite: (one row per measurement, the facts of the machine and the run for the report)."""
    sizes = QUICK if args.quick else FULL
    parts = args.parts
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    facts = {"started": time.strftime("%Y-%m-%d %H:%M"), "load_start": os.getloadavg(), "sizes": sizes,
             "parts": parts, "limit_mb": args.mem_limit_gb * 1024, "threads": args.threads,
             "malloc_mmap_threshold": args.malloc_mmap_threshold}
    models = {sizes.compare_model} if {"compare", "seqlen"} & set(parts) else set()
    if "qlora" in parts:
        models |= {sizes.qlora_small_model, sizes.qlora_large_model}
    model_dirs = {}
    for model in sorted(models):
        began = time.perf_counter()
        model_dirs[model] = arch_checkpoint(model, Path(args.arch_dir))
        print(f"checkpoint {model}: {model_dirs[model]} ({time.perf_counter() - began:.0f} s)", flush=True)

    specs = plan_specs(sizes, parts, model_dirs, args, device)
    jobs = args.jobs or (2 if args.quick else 1)
    # The full suite waits for the memory its runs may take; --quick's tiny runs need none to speak of.
    needed_mb = 0 if args.quick or device.type == "cuda" else facts["limit_mb"]
    memory = run_isolated(specs, Path(args.out) / "logs", facts["limit_mb"], jobs, needed_mb,
                          make_forkserver() if args.quick else None)
    rows = [{**memory[spec_key(s)], **{k: s[k] for k in ("part", "algo", "peft", "tool", "setting", "model",
                                                           "seq_len", "batch_size")},
             "precision": precision_name(s, device), "measure": "memory"}
            for s in specs]
    rows += not_run_rows(sizes, parts, device)
    if "compare" in parts:
        for algo in ("sft", "dpo"):
            rows += time_interleaved(sizes, algo, model_dirs[sizes.compare_model], memory, specs, args, device,
                                     facts["limit_mb"])
    facts["load_end"] = os.getloadavg()
    facts["machine"] = machine_facts(device_name(device))
    facts["finished"] = time.strftime("%Y-%m-%d %H:%M")
    facts["model_configs"] = {m: str(d) for m, d in model_dirs.items()}
    return rows, facts
