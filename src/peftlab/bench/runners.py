"""The runs the benchmark compares: ours (the repo's own build and loop) and TRL's trainer for the same job."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import torch

from peftlab import REPO_ROOT
from peftlab.bench.harness import PeakMemory, StepLog, Turns, count_forward_tokens, flops_per_token, peak_bf16_flops
from peftlab.bench.workloads import completion_length_reward, resolve_model, synthetic_rows, write_rows


def is_checkpointing(model) -> bool:
    """Whether the model (a PeftModel or a transformers model) recomputes activations in its backward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_gradient_checkpointing", False))


# ---- ours ----------------------------------------------------------------------------------------------------------


def our_config(model_dir: Path, data_file: Path, peft: str, algo: str, args):
    """The composed train.py config for this job, with the bench's rows, steps, batch and sequence length."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    overrides = [
        "model=local", f"model.name_or_path={model_dir}", f"model.max_length={args.seq_len}", f"peft={peft}",
        f"algo={algo}",
        "algo.start_from=base", "logger=none", "eval=none", "trainer.eval_base=false",
        f"data.path={data_file}", "data.eval_path=null", "data.eval_size=0",
        f"trainer.max_steps={args.warmup + args.steps}",
        f"trainer.batch_size={args.grpo_prompts if algo == 'grpo' else args.batch_size}",
        "trainer.grad_accum=1", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0",
        f"trainer.num_threads={args.threads}", f"trainer.seed={args.seed}", f"trainer.precision={args.precision}",
        "trainer.release_host_memory=false",  # the bench sets the allocator, the same for both tools
    ]
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if algo == "grpo":
        with open_dict(cfg):
            cfg.algo.rewards = [{"function": "peftlab.bench.workloads.completion_length_reward", "weight": 1.0}]
            cfg.algo.accuracy_reward = None
            cfg.algo.num_generations = args.num_generations
            cfg.algo.max_new_tokens = args.max_new_tokens
    OmegaConf.resolve(cfg)
    return cfg


class StepClock:
    """Stands in for tracking.RunLog: with trainer.log_every=1 the loop logs once after every optimizer step."""

    def __init__(self, steps: StepLog):
        self.steps = steps

    def log(self, metrics: dict, step: int) -> None:
        if "train/loss" in metrics:  # the end-of-run evaluation logs too, without a loss
            self.steps.step_end()

    def log_samples(self, samples: list[dict], step: int, prefix: str) -> None:
        pass


def run_ours(cfg, device, log: StepLog) -> None:
    """Our real path: what train.run builds from `cfg` (peftlab.build.build_run), then peftlab.loop.train, one
    StepLog entry per step."""
    from peftlab import dist, loop
    from peftlab.build import build_run
    from peftlab.models import train_dtype

    bf16 = train_dtype(cfg.trainer.precision, device) == torch.bfloat16
    accelerator = dist.make_accelerator(cfg.dist, cfg.trainer, bf16)
    built = build_run(cfg, accelerator)
    log.checkpointing = is_checkpointing(built.policy)
    log.loaded()
    handle = count_forward_tokens(built.policy, log)  # the same count as TRL's runs get
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as run_dir:
        loop.train(cfg.trainer, built, accelerator=accelerator, run_dir=Path(run_dir), runlog=StepClock(log))
    handle.remove()


# ---- TRL -----------------------------------------------------------------------------------------------------------


def trl_rows(algo: str, rows: list[dict]) -> list[dict]:
    """Canonical rows → TRL's conversational columns (the same text; TRL applies the same chat template)."""
    if algo == "sft":
        return [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}]}
                for r in rows]
    if algo == "dpo":
        return [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    return [{"prompt": r["prompt"]} for r in rows]


# TRL's settings per algo: "default" changes nothing; "best" is its fastest configuration for the job, with the
# gradient checkpointing our memory policy picks for the same job (trl_settings); "liger" is "best" with Liger's
# Triton kernels (GPU only).
TRL_SETTINGS = {
    "sft": {"default": {}, "best": {"packing": True}, "liger": {"packing": True, "use_liger_kernel": True}},
    "dpo": {"default": {}, "best": {"precompute_ref_log_probs": True},
            "liger": {"precompute_ref_log_probs": True, "use_liger_kernel": True}},
    "grpo": {"default": {}},  # generation dominates; TRL has no packing or precompute for it
}


def trl_settings(cfg, algo: str, setting: str) -> dict:
    """TRL_SETTINGS[algo][setting]; beyond "default", gradient checkpointing as our trainer.gradient_checkpointing
    decides for this job (peftlab.memory.use_checkpointing: on where the kept activations would pass 1 GiB and
    outweigh the weights), so that "best" differs from ours in how it computes, not in what it chooses to keep."""
    from hydra.utils import get_class

    from peftlab.memory import use_checkpointing
    from peftlab.models import load_model_config, weights_dtype

    settings = dict(TRL_SETTINGS[algo][setting])
    if setting != "default":
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        tokens = int(cfg.trainer.batch_size) * int(cfg.model.max_length) * \
            get_class(cfg.algo._target_).sequences_per_example
        settings["gradient_checkpointing"] = use_checkpointing(
            cfg.trainer.gradient_checkpointing, load_model_config(cfg.model), tokens,
            weights_dtype(cfg.model, compute), quantized=False)
    return settings


def unavailable(setting: str, device) -> str | None:
    """Why a TRL setting cannot run here (None: it can)."""
    if setting != "liger":
        return None
    if device.type != "cuda":
        return "Liger's kernels are Triton: GPU only"
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed"
    return None


def run_trl(cfg, algo: str, setting: str, rows: list[dict], args, device, log: StepLog) -> None:
    """TRL's trainer on the same model, rows, batch, length, LoRA config, lr and precision as `cfg` (ours)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

    from peftlab.adapters import lora_config
    from peftlab.models import train_dtype

    model_dir = str(cfg.model.name_or_path)
    bf16 = train_dtype(cfg.trainer.precision, device) == torch.bfloat16
    set_seed(cfg.trainer.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation=cfg.model.attn_implementation).to(device)
    peft_config = lora_config(cfg.peft, cfg.model.family)
    dataset = Dataset.from_list(trl_rows(algo, rows))

    class StepEnd(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            log.step_end()

    common = dict(output_dir=tempfile.mkdtemp(prefix="peftlab-bench-trl-"), max_steps=args.warmup + args.steps,
                  learning_rate=float(cfg.trainer.lr), use_cpu=device.type == "cpu", bf16=bf16, report_to=[],
                  save_strategy="no", seed=int(cfg.trainer.seed), disable_tqdm=True, dataloader_num_workers=0,
                  **trl_settings(cfg, algo, setting))
    if algo == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(per_device_train_batch_size=args.batch_size, max_length=args.seq_len, **common)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[StepEnd()])
    elif algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(per_device_train_batch_size=args.batch_size, max_length=args.seq_len,
                           beta=float(cfg.algo.beta), **common)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[StepEnd()])
    else:
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(per_device_train_batch_size=args.grpo_prompts * args.num_generations,  # completions
                            num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
                            **common)
        trainer = GRPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              reward_funcs=completion_length_reward, peft_config=peft_config, callbacks=[StepEnd()])
    # transformers' Trainer turns checkpointing on inside train(): its argument says what the steps will do.
    log.checkpointing = bool(trainer.args.gradient_checkpointing)
    log.loaded()
    handle = count_forward_tokens(trainer.model, log)
    try:
        trainer.train()
    finally:
        handle.remove()


# ---- the benchmark -------------------------------------------------------------------------------------------------


def default_runs(algo: str, args, device) -> list[tuple[str, str, str]]:
    """(peft, tool, setting) of every run of one algo: ours and the asked-for TRL settings that can run here."""
    for setting in args.trl:
        reason = unavailable(setting, device) if setting in TRL_SETTINGS[algo] else None
        if reason:
            print(f"{algo}: TRL {setting} not run: {reason}", flush=True)
    settings = [s for s in TRL_SETTINGS[algo] if s in args.trl and not unavailable(s, device)]
    return [(peft, tool, setting) for peft in args.peft
            for tool, setting in [("ours", "default")] + [("trl", s) for s in settings]]


def run_algo(model_dir: Path, algo: str, rows: list[dict], args, device, work_dir: Path,
             runs: list[tuple[str, str, str]] | None = None) -> list[dict]:
    """`runs` ((peft, tool, setting); default: every peft of args, ours and TRL's settings) of one algo, each in a
    thread, taking turns step by step (`Turns`): ours vs TRL and DoRA vs LoRA are then measured under the same
    machine load."""
    runs = runs or default_runs(algo, args, device)
    data_file = write_rows(rows, work_dir / f"{algo}-rows.jsonl")
    configs = {peft: our_config(model_dir, data_file, peft, algo, args) for peft, _, _ in runs}  # not in threads
    turns = Turns([" ".join(run) for run in runs])
    logs = {run: StepLog(" ".join(run), turns, PeakMemory(device)) for run in runs}
    errors = []

    def take_turns(peft: str, tool: str, setting: str) -> None:
        log = logs[(peft, tool, setting)]
        try:
            log.begin()
            if tool == "ours":
                run_ours(configs[peft], device, log)
            else:
                run_trl(configs[peft], algo, setting, rows, args, device, log)
        except BaseException as err:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(err)
        finally:
            turns.pass_on(log.name, finished=True)

    if len(runs) == 1:  # nothing to take turns with: run in this thread, as train.py does (its allocator arena too)
        take_turns(*runs[0])
    else:
        threads = [threading.Thread(target=take_turns, args=run, name="-".join(run)) for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    results = []
    for run in runs:
        peft, tool, setting = run
        results.append({"algo": algo, "peft": peft, "tool": tool, "setting": setting,
                        **logs[run].summary(args.warmup), "checkpointing": logs[run].checkpointing})
    return results


def run_all(args) -> list[dict]:
    """Every algo (its pefts and tools interleaved); one CSV row per run."""
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_flops = peak_bf16_flops()
    results = []
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-model-") as tmp:
        model_dir = resolve_model(args.model, Path(tmp), args.seed, args.vocab_size, Path(args.arch_dir))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for algo in args.algo:
            per_step = args.grpo_prompts if algo == "grpo" else args.batch_size
            num_rows = per_step * (args.warmup + args.steps)  # one epoch: both tools see every row once
            rows = synthetic_rows(algo, num_rows, tokenizer, args.seq_len, args.max_new_tokens, args.seed)
            for row in run_algo(model_dir, algo, rows, args, device, Path(tmp)):
                flops = flops_per_token(model_dir, row["peft"], args.seq_len)
                row["mfu"] = row["tokens_per_s"] * flops / peak_flops if peak_flops else None
                row["threads"] = torch.get_num_threads()
                row["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
                results.append(row)
                print(f"{algo:5s} {row['peft']:5s} {row['tool']:4s} {row['setting']:8s} step {row['step_s']:.3f} s  "
                      f"{row['us_per_token']:.1f} µs/token  {row['tokens_per_s']:.0f} tok/s  "
                      f"{row['peak_mem_mb']:.0f} MB", flush=True)
    return results


