"""The `peft` config group → peft.LoraConfig and transformers.BitsAndBytesConfig.

Target presets are per architecture family, so `peft.targets=attn` means the same thing on every model.
QLoRA is LoRA on a quantized base and DoRA is a flag on LoRA (as in torchtune): one builder covers all.
"""

from __future__ import annotations

import torch

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# family → preset → module names. Families share names today; the table is where a new family says otherwise.
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    family: {"attn": ATTN, "mlp": MLP, "all-linear": ATTN + MLP} for family in ("qwen2", "llama", "mistral")
}

PEFT_METHODS = ("none", "lora", "dora", "qlora")


def resolve_targets(targets, family: str) -> list[str]:
    """A preset name or an explicit list → module names (an explicit list passes through unchanged)."""
    if isinstance(targets, str):
        presets = TARGET_PRESETS.get(family, TARGET_PRESETS["llama"])
        if targets not in presets:
            return [targets]  # a single module name; validation checks it against the model
        return list(presets[targets])
    return [str(t) for t in targets]


def enable_dora_eval_cache() -> None:
    """Let DoRA layers in eval mode keep ||W + BA|| (and BA) from their first forward instead of recomputing both on
    every call.

    Generation (GRPO rollouts, evaluation) calls each layer once per new token, and peft otherwise rebuilds BA and
    the full weight norm each time: several weight-sized passes per token. The cache lives only while the model is
    in eval mode (peft clears it on `.train()`), where the weights do not change; training-mode forwards always
    recompute. It is peft's own switch (peft.tuners.lora.dora.ENABLE_DORA_CACHING), process-wide.
    """
    from peft.tuners.lora import dora

    dora.ENABLE_DORA_CACHING = True


def effective_alpha(peft_cfg):
    """The LoRA alpha a run trains with: `alpha_ratio` × r when the ratio is set, else `alpha`.

    A ratio lets a sweep hold alpha/r fixed, or vary it, while r varies: Hydra resolves a sweep's values once,
    before any job exists, so `alpha: ${mul:${peft.r},2}` in a sweep would see the default rank, not the job's.
    Summaries and trackers report this value, not the config's `alpha`, which the ratio overrides.
    """
    ratio = peft_cfg.alpha_ratio
    return peft_cfg.alpha if ratio is None else ratio * peft_cfg.r


def lora_config(peft_cfg, family: str, task_type: str = "CAUSAL_LM"):
    """peft group → peft.LoraConfig. `dora` and `rslora` are flags; quantization is handled at load time."""
    from peft import LoraConfig

    if peft_cfg.dora:
        enable_dora_eval_cache()
    init = peft_cfg.init
    return LoraConfig(
        r=int(peft_cfg.r),
        lora_alpha=float(effective_alpha(peft_cfg)),
        lora_dropout=float(peft_cfg.dropout),
        target_modules=resolve_targets(peft_cfg.targets, family),
        use_rslora=bool(peft_cfg.rslora),
        use_dora=bool(peft_cfg.dora),
        init_lora_weights=True if init == "default" else init,
        bias=str(peft_cfg.bias),
        modules_to_save=list(peft_cfg.modules_to_save) or None,
        task_type=task_type,
    )


def quantization_config(peft_cfg, compute_dtype: torch.dtype):
    """peft group → BitsAndBytesConfig, or None when the base stays in full precision."""
    quant = peft_cfg.quantize
    if peft_cfg.method == "none" or not quant:
        return None
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(quant),
        bnb_4bit_use_double_quant=bool(peft_cfg.double_quant),
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
