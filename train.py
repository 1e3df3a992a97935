"""peftlab entry point: compose → validate → build → loop → save → summary.

    python train.py                                   # tiny Qwen2 + LoRA + SFT on the toy world, offline, ~1 min on CPU
    python train.py peft=qlora algo=dpo model=qwen    # any model × peft × algo
    python train.py -m peft.r=8,16,32                 # a sweep (Hydra multirun)
    torchrun --nproc_per_node=2 train.py dist=zero3   # several processes (dist=ddp | zero2 | zero3)

How a run ends: finished (adapter/ and summary.json written, exit 0); diverged (a non-finite loss or gradient:
summary.json says where, no adapter, exit 3); stopped by a signal (a checkpoint of the step it was on, exit 143 for
SIGTERM / 130 for SIGINT; run it again to continue); a user mistake (one `error:` line before any weight loads,
exit 2, and no run directory left behind; in a sweep the job's directory stays with status failed and the sweep
goes on).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from peftlab.console import error_line, quiet_known_noise

quiet_known_noise()  # before the libraries below print their import-time lines

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import peftlab  # noqa: E402,F401  (registers the ${repo:...} resolver)
from peftlab import checkpoint, dist, loop, rundir  # noqa: E402
from peftlab.adapters import effective_alpha, resolve_targets  # noqa: E402
from peftlab.build import build_run  # noqa: E402
from peftlab.errors import ConfigError, DataError  # noqa: E402
from peftlab.models import count_parameters, train_dtype  # noqa: E402
from peftlab.tracking import RunLog, make_tracker, run_name, sweep_group, write_json_atomic  # noqa: E402
from peftlab.validate import validate  # noqa: E402

DIVERGED_EXIT = 3


class JobFailed(RuntimeError):
    """A sweep job that could not run or diverged: Hydra records it as a failed job and the sweep goes on."""


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    quiet_known_noise()  # again: a parallel launcher's worker process imports this module without running it
    hydra_cfg = HydraConfig.get()
    group = sweep_group(hydra_cfg.sweep.dir) if hydra_cfg.mode.name == "MULTIRUN" else None
    return run(cfg, Path(hydra_cfg.runtime.output_dir), dict(hydra_cfg.runtime.choices),
               list(hydra_cfg.overrides.task), group)


def run(cfg: DictConfig, run_dir: Path, choices: dict, overrides: list[str], group: str | None = None):
    """One run into run_dir; returns the summary figure named by `objective` (None if absent)."""
    started = time.time()
    bf16 = train_dtype(cfg.trainer.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    accelerator = dist.make_accelerator(cfg.dist, cfg.trainer, bf16 == torch.bfloat16)
    run_dir = dist.shared_run_dir(run_dir, accelerator)
    accelerator.print(f"run directory: {run_dir}")
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    lock, launch, built = start(cfg, run_dir, overrides, accelerator, in_sweep=group is not None)
    if built is None:  # a finished run launched again: nothing to do
        return None
    try:
        tracker = make_tracker(cfg, run_dir, choices, overrides, group, accelerator.is_main_process)
        runlog = RunLog(run_dir, tracker, checkpoint.step_of(launch.resume_from) if launch.resume_from else None,
                        enabled=accelerator.is_main_process)
        model, results = loop.train(cfg.trainer, built, accelerator=accelerator, run_dir=run_dir, runlog=runlog,
                                    resume_from=launch.resume_from)
        runlog.close()
        summary = finish(cfg, run_dir, choices, overrides, built, model, results, accelerator, started)
        tracker.summary(summary or {})
        tracker.finish()
    finally:
        if lock is not None:
            lock.release()
    accelerator.wait_for_everyone()  # no rank leaves while rank 0 still writes the run's outputs
    end(run_dir, summary, results, group is not None)
    return float(results[cfg.objective]) if cfg.objective in results else None


def start(cfg, run_dir: Path, overrides: list[str], accelerator, in_sweep: bool):
    """Everything before training: validation, the run directory's lock and launch decision (rank 0), the build.
    Returns (lock, launch, built); built is None when the run already finished. User mistakes end here."""
    held_a_run, lock = rundir.holds_a_run(run_dir), None
    try:
        validate(cfg, accelerator.device)
        outcome = None
        if accelerator.is_main_process:
            try:
                lock, outcome = rundir.claim(run_dir, cfg, overrides)
            except ConfigError as err:
                outcome = str(err)
        outcome = dist.broadcast(outcome, accelerator)  # every rank takes rank 0's decision (or its error)
        if isinstance(outcome, str):
            raise ConfigError(outcome)
        if outcome.action == "done":
            accelerator.print(outcome.message)
            return None, outcome, None
        if outcome.message:
            accelerator.print(outcome.message)
        if outcome.resume_from:
            checkpoint.check_resumable(outcome.resume_from, accelerator)
        elif accelerator.is_main_process:
            (run_dir / "summary.json").unlink(missing_ok=True)  # a restart from step 0 is not finished
        return lock, outcome, build_run(cfg, accelerator)  # raises config and data mistakes before any weight loads
    except (ConfigError, DataError) as err:
        if lock is not None:
            lock.release()
        fail(err, run_dir, overrides, held_a_run, in_sweep, accelerator.is_main_process)


def fail(err: Exception, run_dir: Path, overrides: list[str], held_a_run: bool, in_sweep: bool, main_process: bool):
    """A user mistake: one line, no traceback. A new run directory is removed (nothing there is a run); one that
    held a run is left as it was; a sweep job's directory stays with status failed, and the sweep goes on."""
    line = error_line(err)
    print(line, file=sys.stderr)
    if main_process and held_a_run:
        rundir.restore_hydra_files(run_dir)
    elif main_process and in_sweep:
        write_json_atomic(run_dir / "summary.json", {"status": "failed", "error": line.removeprefix("error: "),
                                                     "overrides": overrides})
    elif main_process:
        shutil.rmtree(run_dir, ignore_errors=True)
    if in_sweep:
        raise JobFailed(line)
    sys.exit(2)


def save_outputs(run_dir: Path, model, weights: dict, tokenizer, peft_method: str) -> Path:
    """adapter/ in PEFT format (or model/ for a full fine-tune), written under a temporary name then renamed.

    `weights` are the trainable weights gathered whole (`dist.trainable_state`): under ZeRO-3 the model's own
    parameters are shards, and saving them would write an empty adapter. Only the trained adapter is saved (not
    the frozen reference copy, nor safe_dpo's scorer adapters).
    """
    final = run_dir / ("model" if peft_method == "none" else "adapter")
    tmp = run_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    extra = {} if peft_method == "none" else {"selected_adapters": ["default"]}
    model.save_pretrained(tmp, state_dict=weights, **extra)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def finish(cfg, run_dir: Path, choices, overrides, built, model, results: dict, accelerator, started: float):
    """The run's outputs by how it ended: summary.json (and adapter/ when it finished) on rank 0."""
    if "interrupted_at" in results:
        return None  # a stopped run leaves its checkpoint, and no summary: it is not finished
    finished = "diverged_at" not in results
    weights = dist.trainable_state(model, accelerator) if finished else None  # every rank: ZeRO-3 gathers shards
    if not accelerator.is_main_process:
        return None
    saved = save_outputs(run_dir, accelerator.unwrap_model(model), weights, built.tokenizer, cfg.peft.method) \
        if finished else None
    if finished and cfg.save_merged:
        from peftlab.merge import merge_run

        merge_run(run_dir, run_dir / "merged")
    summary = summarize(cfg, choices, overrides, built, results, saved and saved.relative_to(run_dir),
                        accelerator.num_processes, time.time() - started)
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def summarize(cfg, choices: dict, overrides: list[str], built, results: dict, saved: Path | None, processes: int,
              runtime_s: float) -> dict:
    """summary.json: how the run ended, what ran (choices, the base and start adapter, resolved adapter settings)
    and what it measured."""
    adapter = cfg.peft.method != "none"
    trainable, total = count_parameters(built.policy)
    return {
        "status": "diverged" if "diverged_at" in results else "finished",
        "run_name": run_name(cfg, overrides),
        "overrides": overrides,
        "algo": choices.get("algo"),
        "peft": cfg.peft.method,
        "model": choices.get("model"),
        "model_name_or_path": str(cfg.model.name_or_path),
        "base_model": built.identity.base,
        "start_adapter": built.identity.start_adapter,
        "dist": choices.get("dist"),
        "processes": processes,
        "r": cfg.peft.r if adapter else None,
        "alpha": effective_alpha(cfg.peft) if adapter else None,
        "targets": resolve_targets(cfg.peft.targets, cfg.model.family) if adapter else "all",
        "trainable_params": trainable,
        "total_params": total,
        "steps": cfg.trainer.max_steps,
        "runtime_s": runtime_s,
        "saved": str(saved) if saved else None,
        "algo_hparams": built.algo.hparams(),
        **built.data,
        **results,
    }


def end(run_dir: Path, summary: dict | None, results: dict, in_sweep: bool) -> None:
    """The run's last line, and its exit status when it did not finish."""
    if "interrupted_at" in results:
        stop = results["stop"]
        print(f"stopped by signal {stop.signum} after step {results['interrupted_at']}: checkpoint in {run_dir}; "
              "run the same command again to continue (trainer.resume=auto)", file=sys.stderr)
        stop.forward()  # e.g. submitit's requeue, now that the step is saved
        sys.exit(130 if stop.signum == 2 else 143)
    if "diverged_at" in results:
        line = (f"error: diverged at step {results['diverged_at']} (non-finite loss or gradient; no adapter "
                f"written, the checkpoints kept are finite): {run_dir}")
        print(line, file=sys.stderr)
        if in_sweep:
            raise JobFailed(line)
        sys.exit(DIVERGED_EXIT)
    if summary is not None:
        print(json_line(summary) + f"  → {run_dir}")


def json_line(summary: dict) -> str:
    keys = [k for k in summary if k.startswith(("base/", "eval/"))] + ["train/loss", "tokens_per_s", "runtime_s"]
    return "summary: " + "  ".join(f"{k}={summary[k]:.4g}" for k in keys if isinstance(summary.get(k), float))


if __name__ == "__main__":
    # The deepspeed launcher appends --local_rank=N, which Hydra rejects; the rank is in the environment anyway
    # (launch with `deepspeed --no_local_rank` to avoid it).
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    main()
