"""The type and range of every config value, as a table, and the keys each group has.

`check_values(cfg)` reads the composed config against `RULES` (a key missing from the composed config is skipped:
dist.zero_stage exists only under DeepSpeed); `check_known_keys(cfg)` refuses a key that no file of its group
declares (`+trainer.learning_rate=1e-4` is not read by anything, so it must not be silently accepted). Both run
before any weight loads and fail with one line naming the key, what it must be, and what it got.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from peftlab import REPO_ROOT
from peftlab.adapters import TARGET_PRESETS
from peftlab.errors import ConfigError

CONF = REPO_ROOT / "conf"
FREE_FORM = ("eval.tasks", "dist.deepspeed", "algo.rewards")  # values the user names or passes through as a whole


@dataclass(frozen=True)
class Rule:
    """What a value must be: kind is int | number | bool | choice | text | list; low/high bounds (strict when
    `above`/`below`), the allowed choices, and whether null is allowed."""

    kind: str
    low: float | None = None
    high: float | None = None
    above: bool = False
    below: bool = False
    choices: tuple = ()
    null: bool = False
    hint: str = ""  # what the key is, appended to the message

    def problem(self, value) -> str | None:
        """Why `value` breaks the rule (a phrase such as "must be an integer >= 1"), or None."""
        if value is None:
            return None if self.null else f"must be set ({self.describe()})"
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be true or false"
        if self.kind == "choice":
            return None if value in self.choices else f"must be one of {', '.join(map(str, self.choices))}"
        if self.kind == "text":
            return None if isinstance(value, str) else "must be a string"
        if self.kind == "list":
            return None if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else "must be a list"
        integer = isinstance(value, int) and not isinstance(value, bool)
        if self.kind == "int" and (not integer or self.low is not None and value < self.low
                                   or self.high is not None and value > self.high):
            return f"must be {self.describe()}"
        if self.kind == "number" and not (integer or isinstance(value, float)):
            return f"must be a number{self.bounds()}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number{self.bounds()}"
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return f"must be {self.bounds().strip()}"
        if self.high is not None and (value >= self.high if self.below else value > self.high):
            return f"must be {self.bounds().strip()}"
        return None

    def bounds(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.above else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.below else '<='} {self.high:g}")
        return " " + " and ".join(parts) if parts else ""

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind == "int" and self.low == 1 and self.high is None:
            return "a positive integer"
        return {"int": "an integer", "number": "a number", "bool": "true or false", "text": "a string",
                "list": "a list"}[self.kind] + self.bounds()


def integer(low=None, high=None, null=False, hint=""):
    return Rule("int", low, high, null=null, hint=hint)


def number(low=None, high=None, above=False, below=False, null=False):
    return Rule("number", low, high, above, below, null=null)


def one_of(*choices, null=False):
    return Rule("choice", choices=choices, null=null)


FLAG, TEXT = Rule("bool"), Rule("text")
POSITIVE, FRACTION = number(0, above=True), number(0, 1, below=True)

RULES: dict[str, Rule] = {
    # top level
    "objective": Rule("text", null=True), "save_merged": FLAG, "run_name": Rule("text", null=True),
    "output_root": TEXT,
    # model
    "model.name_or_path": TEXT, "model.family": one_of(*TARGET_PRESETS),
    "model.tokenizer": Rule("text", null=True), "model.adapter": Rule("text", null=True),
    "model.sft_adapter": Rule("text", null=True), "model.dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "model.attn_implementation": one_of("sdpa", "eager", "flash_attention_2"), "model.max_length": integer(8),
    "model.trust_remote_code": FLAG,
    # peft
    "peft.method": one_of("none", "lora", "dora", "qlora"), "peft.r": integer(1, hint="the adapter rank"), "peft.alpha": POSITIVE,
    "peft.alpha_ratio": number(0, above=True, null=True), "peft.dropout": FRACTION, "peft.rslora": FLAG,
    "peft.dora": FLAG, "peft.merged_matmul": FLAG, "peft.init": one_of("default", "gaussian", "pissa", "olora"),
    "peft.bias": one_of("none", "all", "lora_only"), "peft.modules_to_save": Rule("list"),
    "peft.quantize": one_of("nf4", "fp4", "int8", null=True), "peft.double_quant": FLAG,
    "peft.compute_dtype": one_of("auto", "float32", "bfloat16"),
    # trainer
    "trainer.max_steps": integer(1), "trainer.batch_size": integer(1), "trainer.grad_accum": integer(1),
    "trainer.lr": POSITIVE, "trainer.optimizer": one_of("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw"),
    "trainer.weight_decay": number(0), "trainer.betas": Rule("list"), "trainer.warmup_ratio": FRACTION,
    "trainer.min_lr_ratio": number(0, 1), "trainer.max_grad_norm": number(0, above=True, null=True),
    "trainer.on_nonfinite": one_of("stop", "skip"), "trainer.max_skipped_steps": integer(0),
    "trainer.log_every": integer(1), "trainer.eval_every": integer(0), "trainer.save_every": integer(0),
    "trainer.keep_checkpoints": integer(0), "trainer.gradient_checkpointing": one_of(True, False, "auto"),
    "trainer.precision": one_of("auto", "fp32", "bf16"), "trainer.seed": integer(0),
    "trainer.resume": Rule("text", null=True), "trainer.num_threads": integer(1, null=True),
    "trainer.eval_base": FLAG,
    "trainer.release_host_memory": FLAG,
    # data
    "data.path": TEXT, "data.name": Rule("text", null=True), "data.eval_path": Rule("text", null=True),
    "data.split": TEXT, "data.eval_split": Rule("text", null=True), "data.eval_size": integer(0),
    "data.schema": TEXT, "data.max_rows": integer(1, null=True), "data.max_eval_rows": integer(1, null=True),
    "data.data_dir": Rule("text", null=True), "data.system_prompt": Rule("text", null=True),
    # eval
    "eval.max_new_tokens": integer(0), "eval.batch_size": integer(1), "eval.applies": FLAG,
    "eval.num_samples": integer(0), "eval.limit": number(0, above=True, null=True),
    "eval.num_fewshot": integer(0, null=True), "eval.apply_chat_template": FLAG,
    "eval.max_length": integer(1, null=True), "eval.bootstrap_iters": integer(0),
    # logger
    "logger.backend": one_of("wandb", "none"), "logger.mode": one_of("offline", "online", "disabled"),
    "logger.project": TEXT, "logger.entity": Rule("text", null=True), "logger.group": Rule("text", null=True),
    "logger.tags": Rule("list"),
    # dist
    "dist.strategy": one_of("single", "ddp", "deepspeed"), "dist.find_unused_parameters": FLAG,
    "dist.zero_stage": one_of(2, 3), "dist.offload_optimizer": FLAG, "dist.offload_params": FLAG,
    # algo (the constructors check the combinations; these are the values' kinds)
    "algo.start_from": one_of("base", "sft"), "algo.packing": FLAG, "algo.beta": number(0), "algo.loss_type": TEXT,
    "algo.rpo_alpha": number(0), "algo.label_smoothing": number(0, 0.5, below=True), "algo.precompute_ref": FLAG,
    "algo.ref_batch_size": integer(1), "algo.objective": one_of("reward", "cost"),
    "algo.safety_margin": number(0), "algo.beta_scaling.weight": number(0), "algo.beta_scaling.rate": POSITIVE,
    "algo.lagrangian.lambda_init": POSITIVE, "algo.lagrangian.lambda_lr": number(0),
    "algo.lagrangian.lambda_max": POSITIVE, "algo.lagrangian.threshold": number(),
    "algo.lagrangian.window": integer(1), "algo.lagrangian.update_every": integer(1),
    "algo.lagrangian.update_delay_steps": integer(0), "algo.sampling.num_prompts": integer(1),
    "algo.sampling.max_new_tokens": integer(1), "algo.sampling.temperature": POSITIVE,
    "algo.sampling.top_p": number(0, 1, above=True), "algo.sampling.batch_size": integer(1),
    "algo.reward_model": Rule("text", null=True), "algo.cost_model": Rule("text", null=True),
    "algo.share_base": FLAG, "algo.score_batch_size": integer(1), "algo.rewards": Rule("list"),
    "algo.accuracy_reward": Rule("text", null=True), "algo.num_generations": integer(2),
    "algo.max_new_tokens": integer(1), "algo.temperature": POSITIVE, "algo.top_p": number(0, 1, above=True),
    "algo.top_k": integer(0), "algo.scale_rewards": one_of("group", "batch", "none"), "algo.epsilon": number(0),
    "algo.epsilon_high": number(0, null=True), "algo.num_iterations": integer(1),
    "algo.mask_truncated_completions": FLAG, "algo.eval_num_generations": integer(1),
}

MISSING = object()


def check_values(cfg) -> None:
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=MISSING)
        if value is MISSING:
            continue
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{key}={value} {problem}" + (f" ({rule.hint})" if rule.hint else ""))
    betas = list(cfg.trainer.betas)
    if len(betas) != 2 or any(FRACTION.problem(b) for b in betas):
        raise ConfigError(f"trainer.betas={betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]")


def flat_keys(tree, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in (tree or {}).items():
        if key == "defaults" or str(key).startswith("_"):
            continue
        path = f"{prefix}{key}"
        keys.add(path)
        if isinstance(value, dict) and path not in FREE_FORM:
            keys |= flat_keys(value, path + ".")
    return keys


@lru_cache(maxsize=None)
def declared_keys() -> frozenset[str]:
    """Every key any file of conf/ declares, with its group's name in front (the union over a group's options)."""
    keys = flat_keys({k: v for k, v in yaml.safe_load((CONF / "config.yaml").read_text()).items() if k != "hydra"})
    for group in (d for d in CONF.iterdir() if d.is_dir() and d.name not in ("hydra", "experiment")):
        for path in group.glob("*.yaml"):
            keys |= flat_keys(yaml.safe_load(path.read_text()), f"{group.name}.")
    return frozenset(keys)


def check_known_keys(cfg) -> None:
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    declared = declared_keys()
    groups = {k.split(".")[0] for k in declared if "." in k}
    for key in sorted(flat_keys(tree)):
        if key in declared or key in groups or any(key.startswith(f"{free}.") for free in FREE_FORM):
            continue
        near = difflib.get_close_matches(key, declared, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"{key} is not a config key: nothing reads it{hint}; see conf/{key.split('.')[0]}/")
