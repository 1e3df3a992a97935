"""Tokenizer, policy (base + quantization + adapter), reference and parameter counts.

The policy is built in one place so every algorithm gets the same thing:
    base (4-bit if qlora)  [+ a starting adapter merged in]  + a fresh trainable adapter  (peft=none: all weights train)
The reference of KL-regularized algorithms is the same model with its adapter disabled, so it costs no memory;
a frozen copy exists only for full fine-tuning.
"""

from __future__ import annotations

import copy
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.adapters import lora_config, quantization_config
from peftlab.sampling import unwrap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute precision of a run (trainer.precision): auto is bf16 on a GPU that supports it, fp32 elsewhere."""
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def weights_dtype(model_cfg, compute: torch.dtype) -> torch.dtype:
    """The dtype weights are loaded in: model.dtype, where auto follows the run's compute precision."""
    return compute if model_cfg.dtype == "auto" else DTYPES[model_cfg.dtype]


def quantized_compute_dtype(peft_cfg, compute: torch.dtype) -> torch.dtype:
    """The 4-bit matmul dtype of qlora: peft.compute_dtype, where auto follows the run's compute precision."""
    return compute if peft_cfg.compute_dtype == "auto" else DTYPES[peft_cfg.compute_dtype]


def load_tokenizer(model_cfg):
    """The model's tokenizer (or model.tokenizer), with a pad token and left padding for generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_cfg.tokenizer or model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def starting_adapter(model_cfg, start_from: str) -> str | None:
    """The adapter a run continues from: model.adapter, else model.sft_adapter when algo.start_from=sft."""
    if model_cfg.adapter:
        return str(model_cfg.adapter)
    if start_from == "sft":
        return str(model_cfg.sft_adapter)
    return None


def _canonical(path) -> str | None:
    """A local path as an absolute resolved string (so `./x` and `/abs/x` compare equal); hub ids unchanged."""
    if path is None:
        return None
    local = Path(str(path)).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


@dataclass(frozen=True)
class PolicyIdentity:
    """What a run's policy is built from, computed once from the model and peft groups and algo.start_from.

    Two runs with equal (base, start_adapter, quantize) have bit-identical frozen bases, so an adapter trained on
    one fits the other (what lets safe_dpo hold reward and cost models as adapters on its policy's base).
    """

    base: str                   # the checkpoint: a canonical local path or a hub id
    start_adapter: str | None   # the adapter merged into the base before training (null: none)
    quantize: str | None        # the frozen base's bitsandbytes quantization (nf4, fp4, int8) or None
    peft_method: str            # none | lora | dora | qlora

    def same_base(self, other: "PolicyIdentity") -> bool:
        return (self.base, self.start_adapter, self.quantize) == (other.base, other.start_adapter, other.quantize)


def policy_identity(model_cfg, peft_cfg, start_from: str) -> PolicyIdentity:
    quantize = peft_cfg.quantize if peft_cfg.method != "none" else None
    return PolicyIdentity(base=_canonical(model_cfg.name_or_path),
                          start_adapter=_canonical(starting_adapter(model_cfg, start_from)),
                          quantize=quantize or None, peft_method=str(peft_cfg.method))


def disable_cpu_4bit_repack(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' 4-bit CPU layers on their trainable path.

    On CPUs with avx512_bf16, the first no-grad eval-mode forward of a `Linear4bit` repacks its weight for an
    inference kernel with no backward; later training forwards then silently lose the gradient through the layer
    (only a UserWarning shows). Turning the fast path off keeps gradients exact. Returns the number of layers touched.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_pretrained(name_or_path: str, model_cfg, dtype, device, quant=None, model_class=None, **kwargs):
    """`from_pretrained` with our dtype/device/quantization conventions (used for policy, reward and cost models)."""
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    model = model_class.from_pretrained(
        name_or_path,
        dtype=dtype,
        quantization_config=quant,
        device_map={"": device} if quant is not None else None,
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        **kwargs,
    )
    if quant is None:
        model.to(device)
    disable_cpu_4bit_repack(model)
    return model


def merge_adapter_into(model, adapter_dir: str):
    """base + adapter → one plain model with the adapter's update folded into the weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def auto_class(head: str):
    """causal_lm → AutoModelForCausalLM; score → AutoModelForSequenceClassification (one scalar per sequence)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"causal_lm": AutoModelForCausalLM, "score": AutoModelForSequenceClassification}[head]


HEAD_KWARGS = {"causal_lm": {}, "score": {"num_labels": 1}}
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "score": "SEQ_CLS"}  # SEQ_CLS makes peft train and save the score head


def build_base(model_cfg, peft_cfg, *, start_adapter: str | None, compute: torch.dtype, device: torch.device,
               head: str = "causal_lm"):
    """The frozen base of a run: the checkpoint (quantized for qlora) with any starting adapter merged in."""
    dtype = weights_dtype(model_cfg, compute)
    quant = quantization_config(peft_cfg, quantized_compute_dtype(peft_cfg, compute))
    name, start = str(model_cfg.name_or_path), start_adapter
    with tempfile.TemporaryDirectory(prefix="peftlab-merged-") as merged_dir:
        if start and (quant is not None or head != "causal_lm"):
            # A quantized base cannot absorb an adapter exactly, and a causal-LM (SFT) adapter must reach the body
            # of a scoring model: merge into the full-precision causal LM first, then load that as the base.
            merged = merge_adapter_into(load_pretrained(name, model_cfg, dtype, device), start)
            merged.save_pretrained(merged_dir)
            name, start = merged_dir, None
        model = load_pretrained(name, model_cfg, dtype, device, quant, auto_class(head), **HEAD_KWARGS[head])
    if head == "score" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id  # the score is read at the last non-pad token
    return merge_adapter_into(model, start) if start else model


def build_policy(model_cfg, peft_cfg, *, start_adapter: str | None, compute: torch.dtype, device: torch.device,
                 head: str, gradient_checkpointing: bool):
    """`build_base` prepared for training, with a fresh trainable adapter (peft=none: every weight trains)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = build_base(model_cfg, peft_cfg, start_adapter=start_adapter, compute=compute, device=device, head=head)
    ckpt_kwargs = {"use_reentrant": False}
    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if gradient_checkpointing:
        model.config.use_cache = False

    if peft_cfg.method == "none":
        model.requires_grad_(True)
        return model
    model = get_peft_model(model, lora_config(peft_cfg, model_cfg.family, TASK_TYPES[head]))
    if gradient_checkpointing:
        model.enable_input_require_grads()  # so checkpointed blocks see an input that requires grad
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting each 4-bit weight by its logical size rather than its packed bytes."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        n = int(torch.Size(quant_state.shape).numel()) if quant_state is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


class Reference:
    """The frozen reference policy π_ref of KL-regularized objectives.

    With an adapter, π_ref is the policy with its adapter disabled: the same weights, no copy. (When the run
    started from an SFT adapter, that adapter was merged into the base, so π_ref is the SFT model.)
    For full fine-tuning (peft=none), a frozen copy taken before the first step.
    """

    def __init__(self, policy, peft_method: str):
        self.copy = None
        if peft_method == "none":
            self.copy = copy.deepcopy(unwrap(policy)).eval().requires_grad_(False)
        self.policy = policy

    @contextmanager
    def model(self):
        """Yields a module that computes π_ref; use under torch.no_grad()."""
        if self.copy is not None:
            yield self.copy
            return
        peft_model = unwrap(self.policy)
        with peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else nullcontext():
            yield self.policy


@contextmanager
def active_adapter(peft_model, name: str):
    """Make adapter `name` the active one for the duration, then restore the previous one.

    peft's `set_adapter` also flips `requires_grad` (the active adapter trainable, the others frozen); every flag is
    restored afterwards, so the optimizer's view of the policy never changes.
    """
    previous = peft_model.active_adapter
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    peft_model.set_adapter(name)
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)
