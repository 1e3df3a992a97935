"""How the benchmark measures: runs take turns one optimizer step at a time, each step is clocked, trained tokens
are counted by a forward hook, memory is the peak while a run holds its turn, FLOPs come from the shapes."""

from __future__ import annotations

import re
import statistics
import threading
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peak (FLOP/s) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("A10G", 125e12), ("L4", 121e12), ("RTX 4090", 165e12), ("A6000", 155e12),
]

class Turns:
    """A baton passed round the runs of one algo (each in its own thread), one optimizer step at a time.

    The machine is shared, and its load changes over minutes: run one tool after the other and a busy minute
    lands on one of them only. Taking turns step by step, every run sees the same load; only one computes at a time.
    """

    def __init__(self, names: list[str]):
        self.order, self.active, self.current = list(names), set(names), 0
        self.condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.order[self.current] == name)

    def pass_on(self, name: str, finished: bool = False) -> None:
        """Hand the baton to the next run still going (`finished`: this one leaves the round)."""
        with self.condition:
            if finished:
                self.active.discard(name)
            if self.active:
                self.current = (self.current + 1) % len(self.order)
                while self.order[self.current] not in self.active:
                    self.current = (self.current + 1) % len(self.order)
            self.condition.notify_all()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a CUDA clock read without it measures the launch, not the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepLog:
    """One run's steps: how long each took while the run held the baton, its trained tokens and peak memory.

    `loaded()` (optional, called once the run has built its model and before its first step) keeps the peak of
    the loading apart: the steps' peak then counts from there.
    """

    def __init__(self, name: str, turns: Turns, memory: "PeakMemory"):
        self.name, self.turns, self.memory = name, turns, memory
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.peak_mb = 0.0
        self.load_peak_mb: float | None = None
        self.checkpointing: bool | None = None  # set by the runner once the model is built
        self.held_mb = 0.0  # memory in use after the last optimizer step: what the run keeps between its turns
        self.load_s: float | None = None
        self.pending_tokens = 0
        self.started = 0.0

    def begin(self) -> None:
        """Wait for this run's turn, then start the clock (of a step, or of the setup and first step)."""
        self.turns.wait(self.name)
        synchronize(self.memory.device)
        self.memory.reset()
        self.started = time.perf_counter()

    def loaded(self) -> None:
        """The model is built: its loading peak is recorded, and the peak memory counts anew from here."""
        synchronize(self.memory.device)
        self.load_s = time.perf_counter() - self.started
        self.load_peak_mb = self.memory.peak_mb()
        self.memory.reset()

    def count(self, num_tokens: int) -> None:
        self.pending_tokens += int(num_tokens)

    def step_end(self) -> None:
        """After an optimizer step: record it, let the other runs take their step, and start the next clock."""
        synchronize(self.memory.device)
        self.times.append(time.perf_counter() - self.started)
        self.tokens.append(self.pending_tokens)
        self.pending_tokens = 0
        self.peak_mb = max(self.peak_mb, self.memory.peak_mb())
        self.held_mb = self.memory.current_mb()
        self.turns.pass_on(self.name)
        self.begin()

    def summary(self, warmup: int) -> dict:
        """Medians over the steps after the first `warmup` (the first also holds the run's setup)."""
        times, tokens = self.times[warmup:], self.tokens[warmup:]
        if not times or min(tokens) == 0:
            raise RuntimeError(f"{self.name}: no timed step with tokens ({len(self.times)} steps, warmup {warmup})")
        return {
            "steps": len(times),
            "step_s": statistics.median(times),
            "tokens_per_step": statistics.median(tokens),
            "tokens_total": sum(self.tokens),  # the warm-up's too: one epoch, every row once
            "us_per_token": statistics.median(t / n for t, n in zip(times, tokens)) * 1e6,
            "tokens_per_s": sum(tokens) / sum(times),
            "peak_mem_mb": self.peak_mb,
            "load_peak_mb": self.load_peak_mb,
            "load_s": self.load_s,
            "held_mb": self.held_mb,
        }


def count_forward_tokens(model, log: StepLog):
    """Hook: non-padding tokens of every forward that builds a graph (training); no-grad forwards (generation,
    reference) are not trained tokens. Padding-free inputs have no attention mask and no padding."""

    def hook(module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        log.count(int(mask.sum()) if torch.is_tensor(mask) and mask.dim() == 2 else ids.numel())

    return model.register_forward_pre_hook(hook, with_kwargs=True)


class PeakMemory:
    """Peak memory while a run holds the baton: CUDA max allocated (its own tensors), or on CPU the process's
    resident high-water mark (VmHWM, reset at each turn), which also holds the other runs' resident weights."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current resident size
        except OSError:
            pass

    def current_mb(self) -> float:
        """In use now: CUDA allocated, or the process's resident size."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return process_status_mb("VmRSS") or 0.0

    def peak_mb(self) -> float:
        from peftlab.loop import peak_memory_bytes

        if self.device.type != "cuda":
            high_water = process_status_mb("VmHWM")
            if high_water is not None:
                return high_water
        return peak_memory_bytes(self.device) / 2**20  # CUDA max allocated; else the process's ru_maxrss


def process_status_mb(field: str, pid: int | str = "self") -> float | None:
    """A memory line of /proc/<pid>/status in MB (VmRSS: resident now, VmHWM: its high-water mark); None where
    there is no such file (not Linux, or the process has gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else None


def flops_per_token(model_dir: Path, peft: str, seq_len: int) -> float:
    """Training FLOPs per token: 4N + attention for an adapter (no weight gradients of the base), 6N + attention
    for a full fine-tune. N counts matmul weights (the tied embedding once, as the lm_head); attention is
    12 · layers · hidden · seq_len (forward QKᵀ and AV, 2·2·L·d, times 3 with the backward)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    d, layers, heads, kv = config.hidden_size, config.num_hidden_layers, config.num_attention_heads, \
        config.num_key_value_heads
    head_dim = d // heads
    attention_weights = d * d * 2 + d * kv * head_dim * 2  # q, o and k, v
    mlp_weights = 3 * d * config.intermediate_size
    n = layers * (attention_weights + mlp_weights) + config.vocab_size * d
    return (6 if peft == "none" else 4) * n + 12 * layers * d * seq_len


def peak_bf16_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


