"""The one training loop. Read it top to bottom: it knows nothing about any particular algorithm.

    for step: algo.step_batches → algo.loss per micro-batch → backward (weighted by algo.num_items) → clip → step
              → algo.on_step_end → log → evaluate → checkpoint

How a step gets its batches (the contract with `peftlab.algos.base.Algorithm`): the data order (`Batches`, a pure
function of (seed, k)) assigns the step's grad_accum micro-batches their examples; the loop hands that list to
`algo.step_batches(model, step, ...)` ONCE per step, before the first loss, and gets the micro-batches back
(collated ones by default; GRPO's rollouts, all from the step's starting weights, or reused ones when μ > 1).
`algo.num_items(batch)` is the unit the loss averages over (tokens, pairs, completions) and weights the
micro-batches exactly; `algo.num_tokens(batch)` is what the batch trained on, for tokens/s.
"""

from __future__ import annotations

import math
import resource
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peftlab import checkpoint, dist
from peftlab.errors import DataError
from peftlab.sampling import to_device


class Batches:
    """Micro-batch k of a run is a pure function of (seed, k): the data order needs no state to resume exactly.

    Each epoch is a seeded permutation cut into whole batches (the last incomplete one is dropped). The run has one
    sequence of micro-batches; with several data-parallel ranks, rank r's k-th micro-batch is number k·world + r
    of it, so 2 ranks × accumulation a see exactly the batches of one process × accumulation 2a, epochs included.
    """

    def __init__(self, examples: list, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.examples, self.batch_size, self.seed, self.rank, self.world = examples, batch_size, seed, rank, world
        self.per_epoch = len(examples) // batch_size
        if self.per_epoch == 0:
            raise DataError(f"{len(examples)} training rows cannot fill one batch of trainer.batch_size={batch_size} "
                            f"per process: lower trainer.batch_size or add rows")
        self._epoch, self._order = -1, None

    def __call__(self, k: int) -> list:
        epoch, position = divmod(k * self.world + self.rank, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        start = position * self.batch_size
        return [self.examples[int(i)] for i in self._order[start:start + self.batch_size]]


def make_optimizer(trainer_cfg, params):
    """AdamW (torch), or bitsandbytes' 8-bit / paged variants via trainer.optimizer."""
    kwargs = dict(lr=trainer_cfg.lr, betas=tuple(trainer_cfg.betas), weight_decay=trainer_cfg.weight_decay)
    name = trainer_cfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    return {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw": bnb.optim.PagedAdamW}[name](params, **kwargs)


def warmup_cosine(max_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """LR multiplier: linear warmup from ~0 to 1, then cosine down to min_lr_ratio at max_steps."""
    warmup = max(1, math.ceil(max_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, max_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class StopFlag:
    """SIGTERM (a scheduler's preemption, `kill`) asks the loop to checkpoint and leave after the current step."""

    def __init__(self):
        self.raised = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. some launchers): no handler
            pass

    def _handle(self, signum, frame):
        self.raised = True


def train(t, run, *, accelerator, run_dir: Path, runlog, resume_from: Path | None = None):
    """Train `run.policy` with `run.algo` for t.max_steps (t: the trainer config group).

    Returns (model as prepared by accelerate, figures for summary.json). A run stopped by SIGTERM returns after
    its checkpoint with `interrupted_at` set.
    """
    algo, evaluate = run.algo, run.evaluate
    params = [p for p in run.policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(t, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.max_steps, t.warmup_ratio, t.min_lr_ratio))
    model, optimizer, scheduler = dist.prepare(accelerator, run.policy, optimizer, scheduler)
    batches = Batches(run.train_examples, t.batch_size, t.seed, accelerator.process_index, accelerator.num_processes)
    device = accelerator.device
    results: dict = {}

    start_step = 0
    if resume_from is not None:
        state = checkpoint.load(resume_from, model, optimizer, scheduler, algo, accelerator)
        start_step = state["step"]
        results.update(state["extra"].get("base", {}))  # the starting model's figures, measured by the first run
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    elif t.eval_base:
        results.update(evaluate(model, "base"))
        runlog.log(results, step=0)
    base_figures = dict(results)

    stop = StopFlag()
    model.train()
    train_tokens, train_time, last = 0, 0.0, {}
    bar = tqdm(total=t.max_steps, initial=start_step, disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in range(start_step, t.max_steps):
        began = time.perf_counter()
        micro = algo.step_batches(model, step, [batches(step * t.grad_accum + i) for i in range(t.grad_accum)])
        micro = [to_device(b, device) for b in micro]
        # Weight each micro-batch by its share of the step's items (tokens, pairs...) across all ranks, so the
        # gradient equals that of one big batch whatever the accumulation or the number of processes. The
        # processes' gradients are averaged (× 1/world) and accelerator.backward divides by grad_accum (as
        # DeepSpeed's engine does), so both factors are put back into the weight.
        counts = [algo.num_items(b) for b in micro]
        total = accelerator.reduce(torch.tensor(sum(counts), device=device), reduction="sum").item()
        local_loss, local_tokens, metric_sums = 0.0, 0, {}
        for batch, count in zip(micro, counts):
            # accumulate(): gradients are synced (and DeepSpeed steps) on the step's last micro-batch only
            with accelerator.accumulate(model):
                loss, metrics = algo.loss(model, batch)
                weight = count / max(total, 1)
                accelerator.backward(loss * (weight * accelerator.num_processes * t.grad_accum))
            local_loss += loss.item() * weight
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v / len(micro)
            local_tokens += algo.num_tokens(batch)
        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # The step's loss over all ranks (each holds its weighted share), tokens summed, metrics averaged over
        # ranks; and a SIGTERM seen by any rank stops all of them (checkpointing is collective).
        local = [local_loss, local_tokens, float(stop.raised), *metric_sums.values()]
        summed = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=device), reduction="sum").tolist()
        step_loss, train_tokens, stopping = summed[0], train_tokens + int(summed[1]), summed[2] > 0
        metric_sums = {k: v / accelerator.num_processes for k, v in zip(metric_sums, summed[3:])}
        metric_sums.update(algo.on_step_end(model, step + 1))
        train_time += time.perf_counter() - began

        done = step + 1
        last = {**metric_sums, "train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            last["train/grad_norm"] = float(grad_norm)
        tokens_per_s = train_tokens / max(train_time, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if done % t.log_every == 0 or done == t.max_steps:
            runlog.log({**last, "perf/tokens_per_s": tokens_per_s}, step=done)
        if t.eval_every and done % t.eval_every == 0 and done != t.max_steps:
            runlog.log(evaluate(model, "eval"), step=done)
        if stopping or (t.save_every and done % t.save_every == 0) or done == t.max_steps:
            checkpoint.save(run_dir, done, model, optimizer, scheduler, algo, accelerator, {"base": base_figures},
                            t.keep_checkpoints)
        if stopping:
            bar.close()
            return model, {"interrupted_at": done}
    bar.close()

    final = evaluate(model, "eval")
    runlog.log(final, step=t.max_steps)
    results.update(final)
    results.update({k: v for k, v in last.items() if k.startswith("train/")})
    results["tokens_per_s"] = train_tokens / max(train_time, 1e-9)
    results["train_time_s"] = train_time
    results["peak_mem_bytes"] = peak_memory_bytes(device)
    return model, results
