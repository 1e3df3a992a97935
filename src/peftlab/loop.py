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
from peftlab import checkpoint, dist
from peftlab.console import Progress
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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)  # preemption / kill, Ctrl-C, SLURM's warning


class StopFlag:
    """A stop signal asks the loop to checkpoint and leave after the current step: SIGTERM (a scheduler's
    preemption, `kill`), SIGINT (Ctrl-C) and SIGUSR2 (what SLURM sends before a time limit; submitit requeues on
    it). The handler that was installed before (submitit's requeue) is kept, to be called once the checkpoint is
    written (`forward`)."""

    def __init__(self):
        self.signum = None
        self.previous = {}
        for signum in STOP_SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not in the main thread (e.g. some launchers): no handler
                pass

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def forward(self) -> None:
        """After the checkpoint: hand the signal to the handler it would have reached (e.g. submitit's requeue)."""
        handler = self.previous.get(self.signum)
        self.restore()
        if callable(handler) and handler is not signal.default_int_handler:  # Ctrl-C's is a KeyboardInterrupt
            handler(self.signum, None)


def nonfinite_grad_norm(params) -> torch.Tensor:
    """The global gradient norm without clipping (for the divergence check when clipping is off)."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def train(t, run, *, accelerator, run_dir: Path, runlog, resume_from: Path | None = None):
    """Train `run.policy` with `run.algo` for t.max_steps (t: the trainer config group).

    Returns (model as prepared by accelerate, figures for summary.json). A run stopped by a signal returns after
    its checkpoint with `interrupted_at` (and the `stop` flag, to forward the signal); a diverged run (a non-finite
    loss or gradient with trainer.on_nonfinite=stop, or more than trainer.max_skipped_steps in a row with skip)
    returns `diverged_at` without touching the weights with that step.
    """
    algo, evaluate = run.algo, run.evaluate
    params = [p for p in run.policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(t, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.max_steps, t.warmup_ratio, t.min_lr_ratio))
    model, optimizer, scheduler = dist.prepare(accelerator, run.policy, optimizer, scheduler)
    batches = Batches(run.train_examples, t.batch_size, t.seed, accelerator.process_index, accelerator.num_processes)
    device, deepspeed = accelerator.device, dist.uses_deepspeed(accelerator)
    results: dict = {}

    stop = StopFlag()  # from here on, a stop signal ends the run cleanly (a resumable directory, never a bare one)
    start_step = 0
    if resume_from is not None:
        state = checkpoint.load(resume_from, model, optimizer, scheduler, algo, accelerator, verify=False)
        start_step = state["step"]
        results.update(state["extra"].get("base", {}))  # the starting model's figures, measured by the first run
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    elif t.eval_base:
        metrics, samples = evaluate(model, "base")
        results.update(metrics)
        runlog.log(results, step=0)
        runlog.log_samples(samples, step=0, prefix="base")
    base_figures = dict(results)
    if accelerator.reduce(torch.tensor(float(stop.raised), device=device), reduction="sum").item() > 0:
        return model, {"interrupted_at": start_step, "stop": stop}  # during the base evaluation: nothing to save

    model.train()
    train_tokens, train_time, last, skipped, skipped_in_a_row = 0, 0.0, {}, 0, 0
    progress = Progress(t.max_steps, start_step, accelerator.is_main_process, t.log_every)
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
                if deepspeed and not accelerator.reduce(torch.isfinite(loss.detach()).float(), "min").item():
                    local_loss = math.nan  # DeepSpeed steps inside backward: a non-finite loss must not reach it
                    break
                accelerator.backward(loss * (weight * accelerator.num_processes * t.grad_accum))
            local_loss += loss.item() * weight
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v / len(micro)
            local_tokens += algo.num_tokens(batch)
        if deepspeed:
            grad_norm = None
        else:
            grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm else \
                nonfinite_grad_norm(params)
        finite = math.isfinite(local_loss) and (grad_norm is None or bool(torch.isfinite(grad_norm)))
        # The step's loss over all ranks (each holds its weighted share), tokens summed, metrics averaged over
        # ranks; and a stop signal or a non-finite loss or gradient on any rank counts for all of them.
        local = [local_loss, local_tokens, float(stop.raised), float(not finite), *metric_sums.values()]
        summed = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=device), reduction="sum").tolist()
        step_loss, train_tokens, stopping, nonfinite = summed[0], train_tokens + int(summed[1]), summed[2] > 0, \
            summed[3] > 0
        if nonfinite:  # the update never reaches the weights: no optimizer or scheduler step
            optimizer.zero_grad(set_to_none=True)
            skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
            if t.on_nonfinite == "stop" or skipped_in_a_row > t.max_skipped_steps:
                runlog.log({"train/loss": step_loss, "train/skipped_steps": skipped}, step=step + 1)
                progress.close()
                stop.restore()
                return model, {"diverged_at": step + 1, "train/skipped_steps": skipped}
            accelerator.print(f"step {step + 1}: non-finite loss or gradient, step skipped ({skipped_in_a_row} in a "
                              f"row, trainer.max_skipped_steps={t.max_skipped_steps})")
        else:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            skipped_in_a_row = 0
        metric_sums = {k: v / accelerator.num_processes for k, v in zip(metric_sums, summed[4:])}
        metric_sums.update(algo.on_step_end(model, step + 1))
        train_time += time.perf_counter() - began

        done = step + 1
        last = {**metric_sums, "train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0],
                "train/skipped_steps": skipped}
        if grad_norm is not None:
            last["train/grad_norm"] = float(grad_norm)
        tokens_per_s = train_tokens / max(train_time, 1e-9)
        progress.update(done, step_loss, tokens_per_s)
        if done % t.log_every == 0 or done == t.max_steps:
            runlog.log({**last, "perf/tokens_per_s": tokens_per_s}, step=done)
        if t.eval_every and done % t.eval_every == 0 and done != t.max_steps:
            metrics, samples = evaluate(model, "eval")
            runlog.log(metrics, step=done)
            runlog.log_samples(samples, step=done, prefix="eval")
        if stopping or (t.save_every and done % t.save_every == 0) or done == t.max_steps:
            checkpoint.save(run_dir, done, model, optimizer, scheduler, algo, accelerator, {"base": base_figures},
                            t.keep_checkpoints)
        if stopping:
            progress.close()
            return model, {"interrupted_at": done, "stop": stop}
    progress.close()
    stop.restore()

    final, samples = evaluate(model, "eval")
    runlog.log(final, step=t.max_steps)
    runlog.log_samples(samples, step=t.max_steps, prefix="eval")
    results.update(final)
    results.update({k: v for k, v in last.items() if k.startswith("train/")})
    results["tokens_per_s"] = train_tokens / max(train_time, 1e-9)
    results["train_time_s"] = train_time
    results["peak_mem_bytes"] = peak_memory_bytes(device)
    return model, results
