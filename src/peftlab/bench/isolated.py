"""Memory runs, each in its own process: `measure_one` (one run, in this process: what `python -m peftlab.bench
--one SPEC` prints) and `run_isolated` (many runs, each a fresh process or a forkserver child, watched from here and
stopped above a memory limit). The scale suite (peftlab.bench.scale) says which runs; this module only runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from peftlab.bench.harness import PeakMemory, process_status_mb
from peftlab.bench.workloads import synthetic_rows
from peftlab.memory import release_host_memory

RESULT_PREFIX = "BENCH_RESULT "  # the line a memory run's figures come back on
MIN_FREE_MB = 1536  # a memory run is stopped when the machine's available memory falls below this
FORKSERVER_PRELOAD = ["peftlab.bench.isolated", "peftlab.bench.runners", "peftlab.build", "peftlab.loop", "peft",
                      "trl", "datasets"]


# ---- one run in its own process --------------------------------------------------------------------------------------


def run_args(spec: dict) -> SimpleNamespace:
    """The fields of the default bench's arguments that peftlab.bench.runners reads, for one spec."""
    return SimpleNamespace(seq_len=spec["seq_len"], batch_size=spec["batch_size"], warmup=spec["warmup"],
                           steps=spec["steps"], threads=spec["threads"], seed=spec["seed"],
                           precision=spec["precision"], grpo_prompts=1,
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

    if spec["malloc_mmap_threshold"]:
        release_host_memory(spec["malloc_mmap_threshold"])
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
