"""`python -m peftlab.bench --suite scale`: the real-architecture suite (ours vs TRL at Qwen2.5-0.5B, peak memory
against sequence length, QLoRA at Llama-3.2-1B and Mistral-7B-v0.3), its memory runs each in its own process.

    compare   SFT and DPO, LoRA r16 all-linear, full-length rows: ours, TRL default, TRL best (and TRL + Liger
              where it runs). Peak memory: one process per run. Time per trained token: the runs interleaved step
              by step in this process (`Turns`), in the largest groups whose estimated memory fits the budget.
    seqlen    SFT peak memory at each sequence length, ours and TRL default, one process per run.
    qlora     ours only: LoRA vs QLoRA on the small architecture, QLoRA on the large one; peak memory with the
              loading, and step time, from the run's own process.

A memory run is `python -m peftlab.bench --one '<spec>'` (`measure_one`), a fresh interpreter: it builds its run
as the default bench does (peftlab.bench.runners: ours through build_run and loop.train, TRL through its
trainer), records the process's peak while loading (up to `StepLog.loaded`) and while training apart, and prints
its figures as one line. This process watches each one's resident memory and stops it above the limit, so a run
that cannot fit is recorded as such instead of taking the machine down. --quick forks its memory runs from one
process that has imported the libraries once (a multiprocessing forkserver) instead: the same measurement
without ten interpreter start-ups, its figures including the libraries every run then shares.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from peftlab.bench.harness import (PeakMemory, flops_per_token, peak_bf16_flops, process_status_mb,
                                   set_mmap_threshold)
from peftlab.bench.workloads import arch_checkpoint, synthetic_rows

RESULT_PREFIX = "BENCH_RESULT "  # the line a memory run's figures come back on
PARTS = ("compare", "seqlen", "qlora")
MIN_FREE_MB = 1536  # a memory run is stopped when the machine's available memory falls below this


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
    timed_steps: int                 # interleaved timing: optimizer steps after the warm-up
    memory_steps: int                # memory runs: timed steps after the warm-up (the peak is reached by then)


FULL = Sizes(compare_model="qwen2.5-0.5b", compare_seq=1024, batch_size=2, seq_lens=(512, 1024, 2048, 4096),
             qlora_small_model="llama-3.2-1b", qlora_small_seq=560, qlora_large_model="mistral-7b-v0.3",
             qlora_large_seq=512, timed_steps=3, memory_steps=1)
QUICK = Sizes(compare_model="tiny-qwen-152k", compare_seq=64, batch_size=2, seq_lens=(32, 64),
              qlora_small_model="tiny-qwen-152k", qlora_small_seq=48, qlora_large_model="tiny-qwen-152k",
              qlora_large_seq=32, timed_steps=1, memory_steps=1)
FORKSERVER_PRELOAD = ["peftlab.bench.scale", "peftlab.bench.runners", "peftlab.build", "peftlab.loop", "peft", "trl",
                      "datasets"]
# qlora memory runs report the step time too: timed steps after the warm-up (the large model's take minutes)
QLORA_SMALL_STEPS, QLORA_LARGE_STEPS = 2, 1


# ---- one run in its own process --------------------------------------------------------------------------------------


def run_args(spec: dict) -> SimpleNamespace:
    """The fields of the default bench's arguments that peftlab.bench.runners reads, for one spec."""
    return SimpleNamespace(seq_len=spec["seq_len"], batch_size=spec["batch_size"], warmup=spec["warmup"],
                           steps=spec["steps"], threads=spec["threads"], seed=spec["seed"], grpo_prompts=1,
                           num_generations=8, max_new_tokens=64, peft=[spec["peft"]], trl=[spec["setting"]])


def suite_rows(algo: str, tokenizer, args) -> list[dict]:
    """One epoch of full-length rows: every step trains on batch_size sequences (pairs) of seq_len tokens."""
    num_rows = args.batch_size * (args.warmup + args.steps)
    return synthetic_rows(algo, num_rows, tokenizer, args.seq_len, 0, args.seed, full_length=True)


def measure_one(spec: dict) -> dict:
    """One run (spec: algo, peft, tool, setting, model_dir, seq_len, batch_size, warmup, steps, threads, seed,
    malloc_mmap_threshold) in this process: its step figures (runners.run_algo) and memory: start (in use before
    loading), load_peak, train_peak (after loading), peak (the larger) and, on a GPU, host_peak (the process's
    resident peak)."""
    from transformers import AutoTokenizer

    from peftlab.bench.runners import run_algo

    set_mmap_threshold(spec["malloc_mmap_threshold"])
    import_run_libraries(spec["tool"])
    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = run_args(spec)
    model_dir = Path(spec["model_dir"])
    rows = suite_rows(spec["algo"], AutoTokenizer.from_pretrained(model_dir), args)
    start_mb = PeakMemory(device).current_mb()
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-one-") as tmp:
        [row] = run_algo(model_dir, spec["algo"], rows, args, device, Path(tmp),
                         runs=[(spec["peft"], spec["tool"], spec["setting"])])
    row["train_peak_mb"] = row.pop("peak_mem_mb")
    row["peak_mb"] = max(row["load_peak_mb"], row["train_peak_mb"])
    # On CPU the high-water mark was reset after loading (the training peak); on a GPU it never was.
    host_peak = process_status_mb("VmHWM")
    row["host_peak_mb"] = row["peak_mb"] if device.type == "cpu" else host_peak
    row.update(start_mb=start_mb, threads=torch.get_num_threads(), device=device_name(device))
    return row


def import_run_libraries(tool: str) -> None:
    """What the run will import, imported before `start` is read: start is then the process before loading."""
    import peft  # noqa: F401

    if tool == "trl":
        import datasets  # noqa: F401
        from trl import DPOTrainer, SFTTrainer  # noqa: F401
    else:
        import peftlab.build  # noqa: F401
        import peftlab.loop  # noqa: F401


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


# ---- many runs, each in its own process ----------------------------------------------------------------------------


def spec_key(spec: dict) -> str:
    """Specs that differ only in the part that asked for them are one run."""
    return json.dumps({k: v for k, v in spec.items() if k != "part"}, sort_keys=True)


def spec_name(spec: dict) -> str:
    return "-".join(str(spec[k]) for k in ("model", "algo", "peft", "tool", "setting")) + \
        f"-{spec['batch_size']}x{spec['seq_len']}"


def available_mb() -> float:
    """The machine's MemAvailable (what can be allocated without swapping or the OOM killer)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def wait_for_memory(needed_mb: float, most_s: float = 900) -> None:
    """Let a shared machine's other jobs finish before starting a run that needs `needed_mb`."""
    waited = 0.0
    while available_mb() < needed_mb and waited < most_s:
        if waited % 60 == 0:
            print(f"waiting for memory: {available_mb():.0f} MB available, {needed_mb:.0f} MB wanted", flush=True)
        time.sleep(5)
        waited += 5


def child_env(threads: int) -> dict:
    import peftlab

    source = str(Path(peftlab.__file__).resolve().parents[1])  # this checkout's src/, ahead of any installed copy
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


class Child:
    """A memory run's process: a fresh `python -m peftlab.bench --one SPEC`, or with `forkserver` (a
    multiprocessing context) a fork of the server's process; its output goes to log_path either way."""

    def __init__(self, spec: dict, log_path: Path, forkserver=None):
        if forkserver is None:
            with open(log_path, "w") as log:
                self.process = subprocess.Popen([sys.executable, "-m", "peftlab.bench", "--one", json.dumps(spec)],
                                                stdout=log, stderr=subprocess.STDOUT, env=child_env(spec["threads"]))
        else:
            self.process = forkserver.Process(target=forked_run, args=(spec, str(log_path)), daemon=True)
            self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        if isinstance(self.process, subprocess.Popen):
            return self.process.poll()
        return None if self.process.is_alive() else self.process.exitcode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait() if isinstance(self.process, subprocess.Popen) else self.process.join()


def forked_run(spec: dict, log_path: str) -> None:
    """measure_one in a forkserver child, printing where a fresh process's output would go."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    print(RESULT_PREFIX + json.dumps(measure_one(spec)), flush=True)


def make_forkserver():
    """A forkserver that has imported what every memory run imports (--quick: seconds instead of an interpreter
    start-up per run)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return context


def read_result(log_path: Path) -> dict | None:
    lines = [l for l in log_path.read_text(errors="replace").splitlines() if l.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


def run_isolated(specs: list[dict], log_dir: Path, limit_mb: float, jobs: int, needed_mb: float,
                 forkserver=None) -> dict[str, dict]:
    """Every spec in its own process (`Child`), at most `jobs` at a time, each started once the machine has
    `needed_mb` available; spec_key → its figures, or a `status` saying why there are none (stopped at the
    memory limit, failed). `sampled_peak_mb`: the largest resident size seen from outside (every 0.2 s), a check
    on the process's own figures."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = list({spec_key(s): s for s in specs}.values())
    running: dict[str, dict] = {}
    results: dict[str, dict] = {}
    while pending or running:
        while pending and len(running) < jobs:
            spec = pending.pop(0)
            wait_for_memory(needed_mb)
            log_path = log_dir / f"{spec_name(spec)}.log"
            process = Child(spec, log_path, forkserver)
            print(f"memory run: {spec_name(spec)} (pid {process.pid}, log {log_path})", flush=True)
            running[spec_key(spec)] = {"spec": spec, "process": process, "log": log_path, "sampled": 0.0,
                                       "status": None, "began": time.perf_counter()}
        time.sleep(0.2)
        for key, run in list(running.items()):
            process = run["process"]
            resident = process_status_mb("VmRSS", process.pid) or 0.0
            run["sampled"] = max(run["sampled"], resident)
            exit_code = process.poll()
            if exit_code is None:
                if resident > limit_mb:
                    run["status"] = f"stopped: resident memory passed the {limit_mb:.0f} MB limit"
                elif available_mb() < MIN_FREE_MB:
                    run["status"] = f"stopped: the machine's available memory fell below {MIN_FREE_MB} MB " \
                                    f"(the run held {resident:.0f} MB)"
                if not run["status"]:
                    continue
                process.kill()
            del running[key]
            figures = read_result(run["log"]) if run["status"] is None else None
            status = run["status"] or ("ok" if figures else f"failed (exit {exit_code}; see {run['log']})")
            results[key] = {**(figures or {}), "status": status, "sampled_peak_mb": run["sampled"],
                            "wall_s": time.perf_counter() - run["began"]}
            print(f"  {spec_name(run['spec'])}: {status}" + (
                f", peak {figures['peak_mb']:.0f} MB (loading {figures['load_peak_mb']:.0f}, training "
                f"{figures['train_peak_mb']:.0f})" if figures else ""), flush=True)
    return results


# ---- the suite -----------------------------------------------------------------------------------------------------


def base_spec(sizes: Sizes, model: str, model_dir: Path, args) -> dict:
    return {"model": model, "model_dir": str(model_dir), "batch_size": sizes.batch_size, "warmup": 1,
            "steps": sizes.memory_steps, "threads": args.threads, "seed": args.seed,
            "malloc_mmap_threshold": args.malloc_mmap_threshold}


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
        for model, seq_len, pefts, steps in (
                (sizes.qlora_small_model, sizes.qlora_small_seq, ("lora", "qlora"), QLORA_SMALL_STEPS),
                (sizes.qlora_large_model, sizes.qlora_large_seq, ("qlora",), QLORA_LARGE_STEPS)):
            base = {**base_spec(sizes, model, model_dirs[model], args), "batch_size": 1, "steps": steps}
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
                           batch_size=spec["batch_size"], status="ok", threads=torch.get_num_threads(),
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
                                                           "seq_len", "batch_size")}, "measure": "memory"}
            for s in specs]
    rows += not_run_rows(sizes, parts, device)
    if "compare" in parts:
        for algo in ("sft", "dpo"):
            rows += time_interleaved(sizes, algo, model_dirs[sizes.compare_model], memory, specs, args, device,
                                     facts["limit_mb"])
    from peftlab.bench.report import machine_facts

    facts["load_end"] = os.getloadavg()
    facts["machine"] = machine_facts(device_name(device))
    facts["finished"] = time.strftime("%Y-%m-%d %H:%M")
    facts["model_configs"] = {m: str(d) for m, d in model_dirs.items()}
    return rows, facts
