"""Tokenizer, policy (base + quantization + adapter), reference and parameter counts.

The policy is built in one place so every algorithm gets the same thing:

    base (the checkpoint, 4-bit if qlora; nothing merged into it)
      + the trainable adapter "default": fresh, or initialised from the start adapter (algo.start_from=sft or
        model.adapter=<dir>), which the policy then continues to train
      + when a reference is needed and there is a start adapter: a frozen copy of it, the adapter "reference"

So the saved adapter is a standard PEFT adapter of the base its adapter_config.json names, and a run from an SFT
adapter never builds a full-precision copy of a quantized base. The reference of KL-regularized algorithms is the
same model with its adapter disabled (from the base) or switched to "reference" (from an SFT adapter): no copy.
A frozen full copy exists only for full fine-tuning (peft=none, where a start adapter is merged into the weights).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab import REPO_ROOT
from peftlab.adapters import lora_config, quantization_config, use_merged_matmul
from peftlab.errors import ConfigError
from peftlab.sampling import unwrap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute precision of a run (trainer.precision): auto is bf16 on a GPU that supports it, fp32 elsewhere."""
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision, torch.float32)  # others: validate refuses


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
    """A local path as an absolute resolved string (so `./x` and `/abs/x` compare equal); hub ids unchanged. A
    relative path that does not exist here is read from the repository root (the shipped adapters name their base
    as assets/models/<name>)."""
    if path is None:
        return None
    local = Path(str(path)).expanduser()
    if not local.exists() and not local.is_absolute() and (REPO_ROOT / local).exists():
        local = REPO_ROOT / local
    return str(local.resolve()) if local.exists() else str(path)


def same_checkpoint(a: str, b: str) -> bool:
    """Whether two model.name_or_path values name the same checkpoint (local paths compared resolved)."""
    return _canonical(a) == _canonical(b)


@dataclass(frozen=True)
class PolicyIdentity:
    """What a run's policy is built from, computed once from the model and peft groups and algo.start_from.

    Two runs with equal (base, quantize) have bit-identical frozen bases, so an adapter trained on one fits the
    other (what lets safe_dpo hold reward and cost models as adapters on its policy's base): a start adapter only
    initialises the trained adapter, it never changes the base.
    """

    base: str                   # the checkpoint: a canonical local path or a hub id
    start_adapter: str | None   # the adapter the trained one starts from (null: a fresh adapter)
    quantize: str | None        # the frozen base's bitsandbytes quantization (nf4, fp4, int8) or None
    peft_method: str            # none | lora | dora | qlora

    def describe(self) -> str:
        base = f"{self.base}" + (f" ({self.quantize})" if self.quantize else "")
        start = f" continuing {self.start_adapter}" if self.start_adapter else ""
        return f"{self.peft_method} on {base}{start}"

    def same_base(self, other: "PolicyIdentity") -> bool:
        return (self.base, self.quantize) == (other.base, other.quantize)


def policy_identity(model_cfg, peft_cfg, start_from: str) -> PolicyIdentity:
    quantize = peft_cfg.quantize if peft_cfg.method != "none" else None
    return PolicyIdentity(base=_canonical(model_cfg.name_or_path),
                          start_adapter=_canonical(starting_adapter(model_cfg, start_from)),
                          quantize=quantize or None, peft_method=str(peft_cfg.method))


def hub_hint(name: str) -> str:
    return (
        f"model.name_or_path={name} is not a local directory and could not be fetched from the hub "
        f"(offline?). Download it where the hub is reachable (`hf download {name} --local-dir DIR`) "
        "and pass model.name_or_path=DIR"
    )


def load_model_config(model_cfg):
    """The architecture config alone (no weights): from a local dir, the local hub cache, or the hub."""
    from transformers import AutoConfig

    name = str(model_cfg.name_or_path)
    if Path(name).expanduser().exists():
        if not (Path(name).expanduser() / "config.json").exists():
            raise ConfigError(f"model.name_or_path={name} has no config.json")
        return AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    for local_only in (True, False):
        try:
            return AutoConfig.from_pretrained(
                name, local_files_only=local_only, trust_remote_code=model_cfg.trust_remote_code
            )
        except Exception:  # not cached / unreachable / no such repo: all end in the same advice
            continue
    raise ConfigError(hub_hint(name))


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


def lazy_safetensors(directory: Path) -> dict | None:
    """The tensors of a local safetensors checkpoint as lazy slices read with pread rather than mmap, or None when
    the directory holds no safetensors. Each tensor is then read once, converted (to the run's dtype, or to 4-bit)
    and dropped; an mmap'd file keeps every page it touched resident until the model is built, a second copy of
    the base on top of the converted one."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    tensors = {}
    for file in files:
        handle = safe_open(str(file), framework="pt", device="cpu", backend="pread")
        tensors.update({name: handle.get_slice(name) for name in handle.keys()})
    return tensors


def load_local_checkpoint(directory: Path, model_cfg, model_class, **kwargs):
    """A local checkpoint built from pread slices (see lazy_safetensors), or None when that route does not apply
    (no safetensors, remote code, an architecture `model_class` does not map); the caller then uses plain
    `from_pretrained`."""
    from transformers import AutoConfig, GenerationConfig

    tensors = lazy_safetensors(directory)
    if tensors is None or model_cfg.trust_remote_code:
        return None
    config = AutoConfig.from_pretrained(directory)
    if type(config) not in model_class._model_mapping:
        return None
    for key in [k for k in kwargs if hasattr(config, k)]:  # e.g. num_labels: with a config given, they go on it
        setattr(config, key, kwargs.pop(key))
    concrete = model_class._model_mapping[type(config)]
    model = concrete.from_pretrained(None, config=config, state_dict=tensors, **kwargs)
    model.name_or_path = model.config._name_or_path = str(directory)  # what PEFT writes as the adapter's base
    if model.can_generate():
        try:
            model.generation_config = GenerationConfig.from_pretrained(directory)
        except OSError:  # no generation_config.json: the model config's defaults, as from_pretrained does
            model.generation_config = GenerationConfig.from_model_config(config)
    return model


def load_pretrained(name_or_path: str, model_cfg, dtype, device, quant=None, model_class=None, **kwargs):
    """`from_pretrained` with our dtype/device/quantization conventions (used for policy, reward and cost models).
    A local checkpoint takes the lean route of load_local_checkpoint."""
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    kwargs = dict(kwargs, dtype=dtype, quantization_config=quant, attn_implementation=model_cfg.attn_implementation,
                  device_map={"": device} if quant is not None else None)
    local = Path(name_or_path).expanduser()
    model = load_local_checkpoint(local, model_cfg, model_class, **kwargs) if local.is_dir() else None
    if model is None:
        model = model_class.from_pretrained(name_or_path, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
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
REFERENCE_ADAPTER = "reference"  # the frozen copy of the start adapter that computes π_ref


def build_base(model_cfg, peft_cfg, *, compute: torch.dtype, device: torch.device, head: str = "causal_lm"):
    """The frozen base of a run: the checkpoint, quantized for qlora (nothing merged into it)."""
    dtype = weights_dtype(model_cfg, compute)
    quant = quantization_config(peft_cfg, quantized_compute_dtype(peft_cfg, compute))
    model = load_pretrained(str(model_cfg.name_or_path), model_cfg, dtype, device, quant, auto_class(head),
                            **HEAD_KWARGS[head])
    if head == "score" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id  # the score is read at the last non-pad token
    return model


def load_start_adapter(model, adapter_dir: str) -> None:
    """Initialise the trainable adapter "default" of `model` (a PeftModel built with the start adapter's rank,
    alpha and targets) from the start adapter's LoRA weights, so the policy begins as exactly that model.

    A causal-LM (SFT) adapter can start a scoring model too: its LoRA weights fit the same body, the score head
    starts fresh. A DoRA policy from a LoRA adapter gets its magnitudes recomputed from W + ΔW, which makes DoRA's
    output equal to the LoRA model's at the start.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    weights = {k: v for k, v in load_peft_weights(adapter_dir, device="cpu").items() if ".lora_" in k}  # no head
    own = get_peft_model_state_dict(model, adapter_name="default")  # a fresh score head keeps its own weights
    result = set_peft_model_state_dict(model, {**{k: v for k, v in own.items() if ".lora_" not in k}, **weights},
                                       adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter {adapter_dir} does not fit the model: {unexpected[:2]} ...")
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and layer.use_dora.get("default") and "default" in layer.lora_magnitude_vector \
                and not any(".lora_magnitude_vector" in k for k in weights):
            layer.lora_magnitude_vector["default"].update_layer(
                base_layer=layer.get_base_layer(), lora_A=layer.lora_A["default"].weight,
                lora_B=layer.lora_B["default"].weight, scaling=layer.scaling["default"])


def build_policy(model_cfg, peft_cfg, *, start_adapter: str | None, compute: torch.dtype, device: torch.device,
                 head: str, gradient_checkpointing: bool, reference_adapter: bool = False):
    """The model a run trains: the base, prepared for training, with its trainable adapter (peft=none: every
    weight trains). With `reference_adapter` and a start adapter, a frozen copy of it is loaded as "reference"."""
    from peft import get_peft_model

    model = build_base(model_cfg, peft_cfg, compute=compute, device=device, head=head)
    # The base is frozen (get_peft_model freezes it too); unlike PEFT's prepare_model_for_kbit_training, the 4-bit
    # base's other weights (embeddings, norms, head) keep model.dtype instead of a float32 copy.
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    if peft_cfg.method == "none":  # a full fine-tune from an adapter starts from the merged weights
        model = merge_adapter_into(model, start_adapter) if start_adapter else model
        model.requires_grad_(True)
        return model
    model = get_peft_model(model, lora_config(peft_cfg, model_cfg.family, TASK_TYPES[head]))
    model.peft_config["default"].base_model_name_or_path = str(model_cfg.name_or_path)
    if start_adapter:
        load_start_adapter(model, start_adapter)
        if reference_adapter:
            model.load_adapter(start_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            model.set_adapter("default")
    if peft_cfg.merged_matmul:
        use_merged_matmul(model)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # so checkpointed blocks see an input that requires grad
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of the policy, counting each 4-bit weight by its logical size rather than its
    packed bytes; frozen extra adapters (the reference copy, scorers held on the base) are not the policy's."""
    others = [f".{name}." for name in getattr(unwrap(model), "peft_config", {}) if name != "default"]
    trainable = total = 0
    for name, p in model.named_parameters():
        if any(tag in name for tag in others):
            continue
        quant_state = getattr(p, "quant_state", None)
        n = int(torch.Size(quant_state.shape).numel()) if quant_state is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


class Reference:
    """The frozen reference policy π_ref of KL-regularized objectives: the start model.

    With an adapter, π_ref is the policy with its adapter disabled (the base) or with the frozen "reference"
    adapter active (the start adapter, e.g. the SFT model): the same weights, no copy. For full fine-tuning
    (peft=none), a frozen copy taken before the first step.
    """

    def __init__(self, policy, peft_method: str):
        self.copy = None
        if peft_method == "none":
            self.copy = copy.deepcopy(unwrap(policy)).eval().requires_grad_(False)
        peft_config = getattr(unwrap(policy), "peft_config", {})
        self.adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in peft_config else None
        self.policy = policy

    @contextmanager
    def model(self):
        """Yields a module that computes π_ref; use under torch.no_grad()."""
        if self.copy is not None:
            yield self.copy
            return
        peft_model = unwrap(self.policy)
        if self.adapter is not None:
            with active_adapter(peft_model, self.adapter):
                yield self.policy
            return
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
