"""The `peft` config group → peft.LoraConfig and transformers.BitsAndBytesConfig.

Target presets are per architecture family, so `peft.targets=attn` means the same thing on every model.
QLoRA is LoRA on a quantized base and DoRA is a flag on LoRA (as in torchtune): one builder covers all.
"""

from __future__ import annotations

import functools

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


# ---- LoRA linears as one matmul ------------------------------------------------------------------------------------

# Below about this many rows per call the merge's weight-sized pass costs more than the two narrow matmuls and the
# elementwise scale-and-add it replaces (generation calls a layer with a handful of rows).
MERGED_MIN_ROWS = 1024


def _merged_weight(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """W + s·B·A: (out, in), (r, in), (out, r) → (out, in), a new tensor (W is not changed)."""
    return torch.addmm(weight, lora_B, lora_A, alpha=scaling)


class _MergedLoraMatmul(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, computed as ONE matmul with the merged weight W + s·B·A (Hu et al. 2021, eq. 3:
    h = W₀x + ΔWx, ΔW = BA), rebuilt in backward rather than kept.

    peft's LoRA forward makes the (n, out) low-rank output, scales it and adds it to the base output: three passes
    over an (n, out) tensor each way, on top of the base matmul. The merged weight costs one (out, in) pass instead,
    which is less once n is large. W and b are frozen (not differentiated); A and B get their usual gradients.

    Shapes: x (..., in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r) → (..., out).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float):
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return torch.nn.functional.linear(x, _merged_weight(weight, lora_A, lora_B, scaling), bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        rows_x, rows_grad = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])  # (n, in), (n, out)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (rows_grad @ _merged_weight(weight, lora_A, lora_B, s)).view_as(x)  # (n, in)
        if ctx.needs_input_grad[3]:
            grad_A = (rows_grad @ lora_B).t() @ rows_x * s  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_B = rows_grad.t() @ (rows_x @ lora_A.t()) * s  # (out, r)
        return grad_x, None, None, grad_A, grad_B, None


def _merged_matmul_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | None:
    """`_MergedLoraMatmul` for a peft `lora.Linear` call it covers, else None (the caller runs peft's forward).

    Covered: one active plain LoRA adapter (no dropout, no DoRA, no LoRA bias) on an unmerged, full-precision
    nn.Linear whose weight and bias are frozen, all in x's dtype, at least MERGED_MIN_ROWS rows, outside autocast,
    and no parameter partitioned by DeepSpeed ZeRO-3 (its gathering hooks fire on the submodules' calls, which this
    skips).
    """
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    if torch.is_autocast_enabled(x.device.type):  # its backward would not see the forward's cast
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.fan_in_fan_out:
        return None
    base, lora_A, lora_B = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if type(base) is not torch.nn.Linear or not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    if lora_B.bias is not None or x.numel() < MERGED_MIN_ROWS * x.shape[-1]:
        return None
    frozen = [base.weight] + ([base.bias] if base.bias is not None else [])
    params = frozen + [lora_A.weight, lora_B.weight]
    if any(p.requires_grad for p in frozen) or any(p.dtype != x.dtype or hasattr(p, "ds_id") for p in params):
        return None
    return _MergedLoraMatmul.apply(x, base.weight, base.bias, lora_A.weight, lora_B.weight, layer.scaling[name])


@functools.cache
def merged_matmul_class() -> type:
    """peft's LoRA `Linear` with `_merged_matmul_forward` first (peft is imported only when a run uses it)."""
    from peft.tuners.lora.layer import Linear

    class MergedMatmulLoraLinear(Linear):
        def forward(self, x, *args, **kwargs):
            merged = _merged_matmul_forward(self, x, *args, **kwargs)
            return super().forward(x, *args, **kwargs) if merged is None else merged

    return MergedMatmulLoraLinear


def use_merged_matmul(model: torch.nn.Module) -> int:
    """Route every peft LoRA `Linear` of `model` through `_merged_matmul_forward` where it applies (peft's own
    forward everywhere else: generation's few rows, DoRA, quantized bases, mixed-adapter batches). Parameters,
    state dicts and saved adapters are peft's, unchanged. Returns the number of layers switched."""
    merged_class = merged_matmul_class()
    layers = [m for m in model.modules() if type(m) is merged_class.__base__]
    for layer in layers:
        layer.__class__ = merged_class
    return len(layers)
