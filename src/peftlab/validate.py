"""Checks that run before any weight is loaded, each failing with one line that names the key and the fix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from peftlab import REPO_ROOT
from peftlab.adapters import effective_alpha, resolve_targets
from peftlab.errors import ConfigError
from peftlab.models import load_model_config, same_checkpoint, starting_adapter
from peftlab.evaluation import check_eval
from peftlab.schema import check_known_keys, check_values
from peftlab.tracking import check_wandb_online


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def linear_module_names(model_config) -> set[str]:
    """Leaf names of the model's nn.Linear modules, from a weightless (meta-device) instance."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def bitsandbytes_problem(device: torch.device) -> str | None:
    """Why 4/8-bit bitsandbytes cannot run here, or None if it can."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        x = torch.randn(64, 64, device=device)
        F.quantize_4bit(x, quant_type="nf4")
    except Exception as err:  # a missing native library shows up here, not at import
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot quantize on {device.type}: {type(err).__name__}: {err}"
    return None


def check_start_adapter(source: str, adapter: Path, model_cfg, peft_cfg, head: str) -> None:
    """The adapter a run starts from must be a LoRA adapter of this very base, with the run's adapter shape: the
    policy continues it (so peft.r/alpha/targets are its own, not a fresh adapter's), and a saved adapter must
    load onto the base its adapter_config.json names."""
    config_file = adapter / "adapter_config.json"
    check(config_file.exists(), f"{source}: no adapter_config.json there (a PEFT adapter directory is expected)")
    config = json.loads(config_file.read_text())
    check(config.get("peft_type") == "LORA", f"{source}: a {config.get('peft_type')} adapter; only LoRA/DoRA start a run")
    base = str(config.get("base_model_name_or_path"))
    check(same_checkpoint(base, str(model_cfg.name_or_path)),
          f"{source} was trained on {base}, not on model.name_or_path={model_cfg.name_or_path}: start from an "
          "adapter of this model (or algo.start_from=base); if the two are copies of one checkpoint, edit "
          "base_model_name_or_path in its adapter_config.json")
    check(head == "score" or config.get("task_type") == "CAUSAL_LM",
          f"{source}: a {config.get('task_type')} adapter cannot start a causal-LM policy")
    if peft_cfg.method == "none":
        return  # a full fine-tune merges it into the weights
    wanted = {"peft.r": (int(peft_cfg.r), int(config["r"])),
              "peft.alpha": (float(effective_alpha(peft_cfg)), float(config["lora_alpha"])),
              "peft.targets": (sorted(resolve_targets(peft_cfg.targets, model_cfg.family)),
                               sorted(config["target_modules"] or [])),
              "peft.rslora": (bool(peft_cfg.rslora), bool(config.get("use_rslora"))),
              "peft.bias": (str(peft_cfg.bias), str(config.get("bias", "none")))}
    differ = [f"{k}={mine} (the adapter has {theirs})" for k, (mine, theirs) in wanted.items() if mine != theirs]
    check(not differ, f"{source} is continued by this run, so its shape must be the run's: "
                      f"{'; '.join(differ)}: set those keys to the adapter's values, or algo.start_from=base")
    check(not config.get("use_dora") or bool(peft_cfg.dora),
          f"{source} is a DoRA adapter: continue it with peft=dora")


def validate(cfg, device: torch.device) -> None:
    """Raise ConfigError on the first problem found. Touches configs and files only, never weights."""
    check_wandb_online(cfg.logger)  # before anything slow: an online run without a login stops within seconds
    missing = OmegaConf.missing_keys(cfg)
    check(not missing, f"required key(s) not set: {sorted(missing)} (pass them as key=value)")
    check_known_keys(cfg)
    model_config = load_model_config(cfg.model)  # before the values: a missing checkpoint explains what follows
    check_values(cfg)

    t = cfg.trainer
    chunk = t.logits_chunk_size
    check(chunk in (None, "auto") or isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > 0,
          f"trainer.logits_chunk_size={chunk} must be auto, null or a positive integer (positions per chunk)")
    check(not (t.on_nonfinite == "skip" and cfg.dist.strategy == "deepspeed"),
          "trainer.on_nonfinite=skip is not supported under DeepSpeed (its optimizer steps inside the backward "
          "pass): use trainer.on_nonfinite=stop, or dist=ddp")
    if t.precision == "bf16" and device.type == "cuda":
        check(torch.cuda.is_bf16_supported(), "trainer.precision=bf16: this GPU has no bf16; use trainer.precision=fp32")
    if t.resume and t.resume != "auto":
        check(Path(str(t.resume)).expanduser().exists(), f"trainer.resume={t.resume}: no such run or checkpoint directory")

    p = cfg.peft
    if p.method != "none" and p.quantize:
        problem = bitsandbytes_problem(device)
        check(problem is None, f"peft={p.method} (peft.quantize={p.quantize}) cannot run here: {problem}; use peft=lora")

    shipped_adapter = Path(str(cfg.model.sft_adapter or "")).is_relative_to(REPO_ROOT / "assets" / "adapters")
    check(not shipped_adapter or Path(str(cfg.model.name_or_path)).is_relative_to(REPO_ROOT / "assets" / "models"),
          f"model.name_or_path={cfg.model.name_or_path} with a shipped toy model preset (its max_length "
          f"{cfg.model.max_length}, its SFT adapter): use model=local model.name_or_path={cfg.model.name_or_path}")
    start = cfg.algo.start_from
    if start == "sft" and not cfg.model.adapter:
        check(bool(cfg.model.sft_adapter),
              f"algo.start_from=sft but model {cfg.model.name_or_path} has no sft_adapter: "
              "pass model.adapter=<SFT adapter dir> or algo.start_from=base")
    key = "adapter" if cfg.model.adapter else "sft_adapter"
    adapter = starting_adapter(cfg.model, start)
    if adapter:
        head = get_class(cfg.algo._target_).head
        check_start_adapter(f"model.{key}={adapter}", Path(str(adapter)), cfg.model, cfg.peft, head)

    if p.method != "none":
        linears = linear_module_names(model_config)
        for target in resolve_targets(p.targets, cfg.model.family):
            check(target in linears,
                  f"peft.targets: unknown module {target!r} for {model_config.model_type} "
                  f"(linear modules: {', '.join(sorted(linears))}; presets: attn, mlp, all-linear)")

    check_eval(cfg.eval, generates=get_class(cfg.algo._target_).generates)
