"""peftlab entry point: compose → validate → build → loop → save → summary.

    python train.py                                   # tiny Qwen2 + LoRA + SFT on the toy world, offline, ~1 min on CPU
    python train.py peft=qlora algo=dpo model=qwen    # any model × peft × algo
    python train.py -m peft.r=8,16,32                 # a sweep (Hydra multirun)
    torchrun --nproc_per_node=2 train.py dist=zero3   # several processes (dist=ddp | zero2 | zero3)
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import peftlab  # noqa: F401  (registers the ${repo:...} resolver)
from peftlab import checkpoint, dist, loop
from peftlab.adapters import effective_alpha, resolve_targets
from peftlab.data import load_splits
from peftlab.data.load import DataError
from peftlab.models import Reference, build_policy, count_parameters, load_tokenizer, train_dtype
from peftlab.tracking import RunLog, check_wandb_online, make_tracker, run_name, sweep_group, write_json_atomic
from peftlab.validate import ConfigError, validate


def fail(err: Exception, run_dir: Path) -> None:
    """A user mistake: one line, no traceback, and no run directory left behind to be mistaken for a run."""
    print(f"error: {err}", file=sys.stderr)
    shutil.rmtree(run_dir, ignore_errors=True)
    sys.exit(2)


def save_outputs(run_dir: Path, model, weights: dict, tokenizer, peft_method: str) -> Path:
    """adapter/ in PEFT format (or model/ for a full fine-tune), written under a temporary name then renamed.

    `weights` are the trainable weights gathered whole (`dist.trainable_state`): under ZeRO-3 the model's own
    parameters are shards, and saving them would write an empty adapter.
    """
    final = run_dir / ("model" if peft_method == "none" else "adapter")
    tmp = run_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    group = sweep_group(hydra_cfg.sweep.dir) if hydra_cfg.mode.name == "MULTIRUN" else None
    return run(cfg, Path(hydra_cfg.runtime.output_dir), dict(hydra_cfg.runtime.choices),
               list(hydra_cfg.overrides.task), group)


def run(cfg: DictConfig, run_dir: Path, choices: dict, overrides: list[str], group: str | None = None):
    """One run into run_dir; returns the summary figure named by `objective` (None if absent)."""
    started = time.time()
    from accelerate.utils import set_seed

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    bf16 = train_dtype(cfg, device) == torch.bfloat16
    accelerator = dist.make_accelerator(cfg, bf16)
    run_dir = dist.shared_run_dir(run_dir, accelerator)
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))

    try:
        check_wandb_online(cfg.logger)  # h-sweeps stand-in: the main developer calls this from validate
        validate(cfg, accelerator.device)
        set_seed(cfg.trainer.seed)
        tokenizer = load_tokenizer(cfg.model)
        algo = instantiate(cfg.algo, tokenizer=tokenizer, max_length=cfg.model.max_length, _convert_="all")
        dist.check(cfg, algo.needs_reference)
        train_rows, eval_rows = load_splits(cfg.data, algo.data_kind, cfg.trainer.seed)
        resume_from = checkpoint.find(cfg.trainer.resume, run_dir)
        if resume_from:
            checkpoint.check_resumable(resume_from, accelerator)
    except (ConfigError, DataError, FileNotFoundError) as err:
        fail(err, run_dir)

    model = build_policy(cfg, accelerator.device, algo.head)
    trainable, total = count_parameters(model)
    accelerator.print(f"{choices.get('model')} + {cfg.peft.method}: {trainable:,} trainable of {total:,} parameters "
                      f"({100 * trainable / total:.2f}%)")
    train_examples, eval_examples = algo.build_examples(train_rows), algo.build_examples(eval_rows)
    reference = Reference(model, cfg.peft.method) if algo.needs_reference else None
    algo.setup(model, reference=reference, device=accelerator.device, train_examples=train_examples,
               eval_examples=eval_examples)

    tracker = make_tracker(cfg, run_dir, choices, overrides, group, accelerator.is_main_process)
    runlog = RunLog(run_dir, tracker, checkpoint.step_of(resume_from) if resume_from else None,
                    enabled=accelerator.is_main_process)
    model, results = loop.train(cfg, model=model, tokenizer=tokenizer, algo=algo, train_examples=train_examples,
                                eval_examples=eval_examples, accelerator=accelerator, run_dir=run_dir,
                                runlog=runlog, resume_from=resume_from)
    runlog.close()
    if "interrupted_at" in results:
        tracker.finish()
        accelerator.print(f"stopped by SIGTERM after step {results['interrupted_at']}; "
                          f"continue with trainer.resume={run_dir}")
        sys.exit(143)

    weights = dist.trainable_state(model, accelerator)  # every rank: under ZeRO-3 this gathers the shards
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        saved = save_outputs(run_dir, unwrapped, weights, tokenizer, cfg.peft.method)
        if cfg.save_merged:
            from peftlab.merge import merge_run

            merge_run(run_dir, run_dir / "merged")
        adapter = cfg.peft.method != "none"
        summary = {
            "status": "finished",
            "run_name": run_name(cfg, overrides),
            "overrides": overrides,
            "algo": choices.get("algo"),
            "peft": cfg.peft.method,
            "model": choices.get("model"),
            "model_name_or_path": str(cfg.model.name_or_path),
            "dist": choices.get("dist"),
            "processes": accelerator.num_processes,
            "r": cfg.peft.r if adapter else None,
            "alpha": effective_alpha(cfg.peft) if adapter else None,
            "targets": resolve_targets(cfg.peft.targets, cfg.model.family) if adapter else "all",
            "trainable_params": trainable,
            "total_params": total,
            "steps": cfg.trainer.max_steps,
            "runtime_s": time.time() - started,
            "saved": str(saved.relative_to(run_dir)),
            "algo_hparams": algo.hparams(),
            **results,
        }
        write_json_atomic(run_dir / "summary.json", summary)
        tracker.summary(summary)
        accelerator.print(json_line(summary))
    tracker.finish()
    accelerator.wait_for_everyone()  # no rank leaves while rank 0 still writes the run's outputs
    objective = cfg.get("objective")
    return float(results[objective]) if objective and objective in results else None


def json_line(summary: dict) -> str:
    keys = [k for k in summary if k.startswith(("base/", "eval/"))] + ["train/loss", "tokens_per_s", "runtime_s"]
    return "summary: " + "  ".join(f"{k}={summary[k]:.4g}" for k in keys if isinstance(summary.get(k), float))


if __name__ == "__main__":
    # The deepspeed launcher appends --local_rank=N, which Hydra rejects; the rank is in the environment anyway
    # (launch with `deepspeed --no_local_rank` to avoid it).
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    main()
