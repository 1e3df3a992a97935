"""Throughput and memory: our training step against TRL's trainer for the same job, in one process.

    python -m peftlab.bench                                       # qwen2-50m, seq 256, lora,dora × sft,dpo,grpo
    python -m peftlab.bench --algo sft --peft lora --steps 3 --out /tmp/bench

For each algo and peft, in this process:

    ours         train.py's builders (tokenizer, algo, policy, reference, algo.setup) and `peftlab.loop.train`
                 itself: the step that runs is the step a run runs, with the repo's default algo settings
    TRL default  SFTTrainer / DPOTrainer / GRPOTrainer with its defaults (gradient checkpointing on, ...)
    TRL best     its fastest settings for the job: SFT packing (best-fit decreasing, padding-free rows), DPO
                 precomputed reference log-probs, both with gradient checkpointing off (as ours); GRPO: defaults only

with the same weights (a random-init model saved once, loaded fresh by each run), the same rows, batch, sequence
length, LoRA config (peftlab.adapters.lora_config), learning rate and precision (fp32 on CPU, bf16 on GPU), the
same torch thread count and seed. The runs of one algo (every peft, ours and TRL) live in threads that take turns
one optimizer step at a time (`Turns`): a shared machine's changing load then falls on all of them alike. Each
does `--warmup` steps (the first also holds its setup), then `--steps` timed ones.

Measured per optimizer step: wall time (time.perf_counter) from receiving the turn to the end of the optimizer
step (data, forward, backward, optimizer), and trained tokens = non-padding tokens fed to the forward with
gradients (prompt + answer; for GRPO prompt + sampled completion). Reported: medians over the timed steps of the
step time and of the time per trained token, peak memory during the run's own steps (GPU: max allocated; CPU: the
process's resident high-water mark, reset at each turn, which includes the other runs' resident weights) and, on a
GPU, MFU. Results: <out>/bench.csv (one row per run) and <out>/bench.md (ours vs TRL per peft × algo, and DoRA's
step time vs LoRA's).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from peftlab import REPO_ROOT

TOKENIZER_DIR = REPO_ROOT / "assets" / "models" / "tiny_qwen"  # the shipped byte-level BPE (vocab 512)

# Qwen2-architecture shapes built from a config with random weights (the vocabulary is the tokenizer's unless set).
MODEL_PRESETS = {
    "qwen2-50m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                      num_key_value_heads=4),
    "qwen2-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),  # for tests: seconds per run
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),  # the GPU MFU check
}

# Dense bf16 tensor-core peak (FLOP/s) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("A10G", 125e12), ("L4", 121e12), ("RTX 4090", 165e12), ("A6000", 155e12),
]

CSV_COLUMNS = ["algo", "peft", "tool", "setting", "steps", "step_s", "tokens_per_step", "tokens_per_s",
               "us_per_token", "peak_mem_mb", "mfu", "threads", "device"]

WORDS = ("the cat sat on a mat while seven birds sang about rivers and stones near old red houses where people "
         "count apples add numbers write short notes ask careful questions answer them kindly refuse harmful "
         "requests explain simple facts about water light time music maps trains bread and small green hills").split()


# ---- model and data ------------------------------------------------------------------------------------------------


def save_random_model(preset: str, out_dir: Path, seed: int, vocab_size: int | None = None) -> Path:
    """A Qwen2ForCausalLM of `preset`'s shape with seeded random weights and the shipped tokenizer, saved to out_dir."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    shape = dict(MODEL_PRESETS[preset])
    shape["vocab_size"] = vocab_size or shape.get("vocab_size", len(tokenizer))
    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def random_text(generator: torch.Generator, num_tokens: int, word_tokens: dict[str, int]) -> str:
    """Random words whose token count (each word with its leading space) adds up to about `num_tokens`."""
    words, count = [], 0
    while count < num_tokens:
        word = WORDS[int(torch.randint(len(WORDS), (1,), generator=generator))]
        words.append(word)
        count += word_tokens[word]
    return " ".join(words)


def chat_overhead(tokenizer) -> int:
    """Tokens the chat template adds around one user turn and one assistant turn."""
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    ids = tokenizer.apply_chat_template(turns, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def synthetic_rows(algo: str, num_rows: int, tokenizer, seq_len: int, max_new_tokens: int, seed: int) -> list[dict]:
    """Canonical rows (peftlab.data.schemas) of random words with realistic, varied lengths.

    prompt + answer spans seq_len/4 to seq_len tokens (uniform: 64-256 at 256), the prompt taking 20-60% of it, so
    a padded batch wastes about a third of its positions, as real data does. DPO: chosen and rejected get
    independent lengths. GRPO: prompts of seq_len/8 to seq_len - max_new_tokens tokens (the completion is sampled).
    """
    generator = torch.Generator().manual_seed(seed)
    word_tokens = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in WORDS}
    overhead = chat_overhead(tokenizer)

    def uniform(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    def split_lengths() -> tuple[int, int]:
        total = uniform(seq_len // 4, seq_len - overhead - 4)
        prompt = int(total * (0.2 + 0.4 * float(torch.rand((), generator=generator))))
        return prompt, total - prompt

    rows = []
    for _ in range(num_rows):
        if algo == "grpo":
            prompt = random_text(generator, uniform(seq_len // 8, seq_len - max_new_tokens - overhead), word_tokens)
            rows.append({"prompt": [{"role": "user", "content": prompt}]})
            continue
        prompt_len, answer_len = split_lengths()
        prompt = [{"role": "user", "content": random_text(generator, prompt_len, word_tokens)}]
        if algo == "sft":
            rows.append({"prompt": prompt, "completion": random_text(generator, answer_len, word_tokens)})
        else:  # dpo: two answers to the prompt, each within the sequence budget
            rejected_len = uniform(8, max(8, seq_len - overhead - 4 - prompt_len))
            rows.append({"prompt": prompt, "chosen": random_text(generator, answer_len, word_tokens),
                         "rejected": random_text(generator, rejected_len, word_tokens)})
    return rows


def completion_length_reward(completions, **kwargs) -> list[float]:
    """A GRPO reward with spread inside every group (TRL's reward signature): characters of the answer / 100."""
    return [len(c[-1]["content"] if isinstance(c, list) else c) / 100 for c in completions]


# ---- measurement ---------------------------------------------------------------------------------------------------


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


class StepLog:
    """One run's steps: how long each took while the run held the baton, its trained tokens and peak memory."""

    def __init__(self, name: str, turns: Turns, memory: "PeakMemory"):
        self.name, self.turns, self.memory = name, turns, memory
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.peak_mb = 0.0
        self.pending_tokens = 0
        self.started = 0.0

    def begin(self) -> None:
        """Wait for this run's turn, then start the clock (of a step, or of the setup and first step)."""
        self.turns.wait(self.name)
        self.memory.reset()
        self.started = time.perf_counter()

    def count(self, num_tokens: int) -> None:
        self.pending_tokens += int(num_tokens)

    def step_end(self) -> None:
        """After an optimizer step: record it, let the other runs take their step, and start the next clock."""
        self.times.append(time.perf_counter() - self.started)
        self.tokens.append(self.pending_tokens)
        self.pending_tokens = 0
        self.peak_mb = max(self.peak_mb, self.memory.peak_mb())
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
            "us_per_token": statistics.median(t / n for t, n in zip(times, tokens)) * 1e6,
            "tokens_per_s": sum(tokens) / sum(times),
            "peak_mem_mb": self.peak_mb,
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

    def peak_mb(self) -> float:
        from peftlab.loop import peak_memory_bytes

        status = Path("/proc/self/status")
        if self.device.type != "cuda" and status.exists():
            match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
            if match:
                return int(match.group(1)) / 1024
        return peak_memory_bytes(self.device) / 2**20  # CUDA max allocated; else the process's ru_maxrss


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


# ---- ours ----------------------------------------------------------------------------------------------------------


def our_config(model_dir: Path, peft: str, algo: str, args):
    """The composed train.py config for this job, with the bench's steps, batch and sequence length."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    overrides = [
        f"model.name_or_path={model_dir}", f"model.max_length={args.seq_len}", f"peft={peft}", f"algo={algo}",
        "algo.start_from=base", "logger=none", "eval=none", "trainer.eval_base=false",
        f"trainer.max_steps={args.warmup + args.steps}",
        f"trainer.batch_size={args.grpo_prompts if algo == 'grpo' else args.batch_size}",
        "trainer.grad_accum=1", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0",
        f"trainer.num_threads={args.threads}", f"trainer.seed={args.seed}",
    ]
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if algo == "grpo":
        with open_dict(cfg):
            cfg.algo.rewards = [{"function": f"{__name__}.completion_length_reward", "weight": 1.0}]
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


def run_ours(cfg, rows: list[dict], device, log: StepLog) -> None:
    """Our real path: the objects train.run builds from `cfg`, then peftlab.loop.train, one StepLog entry per step."""
    from hydra.utils import instantiate
    from transformers import set_seed

    from peftlab import dist, loop
    from peftlab.models import Reference, build_policy, load_tokenizer, train_dtype

    bf16 = train_dtype(cfg, device) == torch.bfloat16
    accelerator = dist.make_accelerator(cfg, bf16)
    set_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model)
    algo = instantiate(cfg.algo, tokenizer=tokenizer, max_length=cfg.model.max_length, _convert_="all")
    model = build_policy(cfg, accelerator.device, algo.head)
    examples = algo.build_examples(rows)
    reference = Reference(model, cfg.peft.method) if algo.needs_reference else None
    algo.setup(model, reference=reference, device=accelerator.device, train_examples=examples, eval_examples=[])

    handle = count_forward_tokens(model, log)  # the same count as TRL's runs get
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as run_dir:
        loop.train(cfg, model=model, tokenizer=tokenizer, algo=algo, train_examples=examples, eval_examples=[],
                   accelerator=accelerator, run_dir=Path(run_dir), runlog=StepClock(log))
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


# TRL's settings per algo: "default" changes nothing; "best" is its fastest configuration for the job.
TRL_SETTINGS = {
    "sft": {"default": {}, "best": {"packing": True, "gradient_checkpointing": False}},
    "dpo": {"default": {}, "best": {"precompute_ref_log_probs": True, "gradient_checkpointing": False}},
    "grpo": {"default": {}},  # generation dominates; TRL has no packing or precompute for it
}


def run_trl(cfg, algo: str, setting: str, rows: list[dict], args, device, log: StepLog) -> None:
    """TRL's trainer on the same model, rows, batch, length, LoRA config, lr and precision as `cfg` (ours)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

    from peftlab.adapters import lora_config
    from peftlab.models import train_dtype

    model_dir = str(cfg.model.name_or_path)
    bf16 = train_dtype(cfg, device) == torch.bfloat16
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
                  **TRL_SETTINGS[algo][setting])
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
    handle = count_forward_tokens(trainer.model, log)
    try:
        trainer.train()
    finally:
        handle.remove()


# ---- the benchmark -------------------------------------------------------------------------------------------------


def run_algo(model_dir: Path, algo: str, rows: list[dict], args, device) -> list[dict]:
    """Every peft of one algo, ours and TRL's settings, each run in a thread, taking turns step by step (`Turns`):
    ours vs TRL and DoRA vs LoRA are then measured under the same machine load."""
    configs = {peft: our_config(model_dir, peft, algo, args) for peft in args.peft}  # Hydra is not for threads
    runs = [(peft, tool, setting) for peft in args.peft
            for tool, setting in [("ours", "default")] + [("trl", s) for s in TRL_SETTINGS[algo] if s in args.trl]]
    turns = Turns([" ".join(run) for run in runs])
    logs = {run: StepLog(" ".join(run), turns, PeakMemory(device)) for run in runs}
    errors = []

    def take_turns(peft: str, tool: str, setting: str) -> None:
        log = logs[(peft, tool, setting)]
        try:
            log.begin()
            if tool == "ours":
                run_ours(configs[peft], rows, device, log)
            else:
                run_trl(configs[peft], algo, setting, rows, args, device, log)
        except BaseException as err:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(err)
        finally:
            turns.pass_on(log.name, finished=True)

    threads = [threading.Thread(target=take_turns, args=run, name="-".join(run)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [{"algo": algo, "peft": peft, "tool": tool, "setting": setting, **logs[(peft, tool, setting)].summary(
        args.warmup)} for peft, tool, setting in runs]


def run_all(args) -> list[dict]:
    """Every algo (its pefts and tools interleaved); one CSV row per run."""
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_flops = peak_bf16_flops()
    results = []
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-model-") as tmp:
        model_dir = Path(args.model) if Path(args.model).is_dir() else \
            save_random_model(args.model, Path(tmp), args.seed, args.vocab_size)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for algo in args.algo:
            per_step = args.grpo_prompts if algo == "grpo" else args.batch_size
            num_rows = per_step * (args.warmup + args.steps)  # one epoch: both tools see every row once
            rows = synthetic_rows(algo, num_rows, tokenizer, args.seq_len, args.max_new_tokens, args.seed)
            for row in run_algo(model_dir, algo, rows, args, device):
                flops = flops_per_token(model_dir, row["peft"], args.seq_len)
                row["mfu"] = row["tokens_per_s"] * flops / peak_flops if peak_flops else None
                row["threads"] = torch.get_num_threads()
                row["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
                results.append(row)
                print(f"{algo:5s} {row['peft']:5s} {row['tool']:4s} {row['setting']:8s} step {row['step_s']:.3f} s  "
                      f"{row['us_per_token']:.1f} µs/token  {row['tokens_per_s']:.0f} tok/s  "
                      f"{row['peak_mem_mb']:.0f} MB", flush=True)
    return results


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
        f"medians of {args.steps} steps after {args.warmup} warm-up.",
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
    lines += ["", "Ours: the repo's default settings of each algo. TRL default: its trainer's defaults (gradient "
              "checkpointing on). TRL best: SFT packing=True (best-fit decreasing, padding-free), DPO "
              "precompute_ref_log_probs=True (TRL 1.16 disables its padding_free), both with gradient checkpointing "
              "off; GRPO: defaults only."]
    return "\n".join(lines) + "\n"


def write_results(results: list[dict], out_dir: Path, args, command: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "bench.csv", out_dir / "bench.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    md_path.write_text(markdown(results, args, command))
    return csv_path, md_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m peftlab.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2-50m",
                        help=f"a preset ({', '.join(MODEL_PRESETS)}: random weights) or a local model directory")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="model vocabulary (default: the preset's, else the tokenizer's)")
    parser.add_argument("--seq-len", type=int, default=256, help="longest prompt + answer (model.max_length)")
    parser.add_argument("--peft", default="lora,dora", help="comma-separated peft groups")
    parser.add_argument("--algo", default="sft,dpo,grpo", help="comma-separated algos (sft, dpo, grpo)")
    parser.add_argument("--trl", default="default,best", help="TRL settings to run (default, best); empty: none")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (>= 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences (SFT) or pairs (DPO) per step")
    parser.add_argument("--grpo-prompts", type=int, default=1, help="GRPO prompts per step (× --num-generations)")
    parser.add_argument("--num-generations", type=int, default=8, help="GRPO completions per prompt (TRL's default)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="GRPO completion budget")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both tools")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench", help="directory for bench.csv and bench.md")
    args = parser.parse_args(argv)
    args.peft = [p for p in args.peft.split(",") if p]
    args.algo = [a for a in args.algo.split(",") if a]
    args.trl = [s for s in args.trl.split(",") if s]
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: a step's time is measured from the end of the step before it")
    return args


def main(argv=None) -> None:
    import shlex
    import sys

    args = parse_args(argv)
    command = "python -m peftlab.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    results = run_all(args)
    csv_path, md_path = write_results(results, Path(args.out), args, command.strip())
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
