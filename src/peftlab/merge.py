"""Merge a run's adapter into its base and save a standalone model.

    python -m peftlab.merge RUN_DIR [--out DIR]        # default DIR: RUN_DIR/merged

The base is the one the adapter's adapter_config.json names (a run's adapter is a standard PEFT adapter of its
checkpoint, also when the run started from an SFT adapter), loaded as the run's own config (.hydra/config.yaml)
loads it. For a quantized (qlora) run the adapter was trained against the 4-bit weights, so it is merged into
those weights dequantized to the compute dtype, not into the original full-precision checkpoint: the merged model
then reproduces the adapter model's logits. An adapter with non-finite weights (a diverged run) is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

import peftlab  # noqa: F401  (registers ${repo:...})
from peftlab.models import (build_base, load_pretrained, load_tokenizer, quantized_compute_dtype, same_checkpoint,
                            train_dtype, weights_dtype)


def run_config(run_dir: Path):
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no .hydra/config.yaml)")
    return OmegaConf.load(path)


def run_base(cfg, device: torch.device):
    """The frozen base a run trained on, rebuilt from its config (quantized for qlora)."""
    return build_base(cfg.model, cfg.peft, compute=train_dtype(cfg.trainer.precision, device), device=device)


def dequantized_base(cfg, device: torch.device):
    """The run's 4-bit/8-bit base with every quantized linear replaced by its dequantized weight, in a plain model."""
    from peft.utils.integrations import dequantize_bnb_weight

    dtype = quantized_compute_dtype(cfg.peft, train_dtype(cfg.trainer.precision, device))
    quantized = run_base(cfg, device)
    weights = {}
    for name, module in quantized.named_modules():
        if hasattr(module, "weight") and type(module.weight).__name__ in ("Params4bit", "Int8Params"):
            state = getattr(module, "state", None)
            weights[f"{name}.weight"] = dequantize_bnb_weight(module.weight, state).to(dtype)
    others = {k: v for k, v in quantized.state_dict().items() if k not in weights and not _is_quant_aux(k)}
    del quantized
    plain = load_pretrained(str(cfg.model.name_or_path), cfg.model, dtype, device)
    missing = set(plain.state_dict()) - set(weights) - set(others)
    if missing:
        raise RuntimeError(f"could not rebuild the dequantized base: {sorted(missing)[:3]} missing")
    plain.load_state_dict({**others, **weights}, strict=False)
    return plain.to(dtype)


def _is_quant_aux(key: str) -> bool:
    """State-dict entries that hold quantization constants rather than weights."""
    return any(tag in key for tag in ("absmax", "quant_map", "quant_state", "nested_", "SCB", "weight_format"))


def merge_run(run_dir: Path, out_dir: Path | None = None, device: str = "cpu") -> Path:
    """Merge RUN_DIR/adapter into the run's base and save to out_dir (model + tokenizer). Returns out_dir."""
    from peft import PeftModel
    from peft.utils import load_peft_weights

    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "merged")
    cfg = run_config(run_dir)
    if cfg.peft.method == "none":
        raise ValueError(f"{run_dir} is a full fine-tune (peft=none): its model/ is already standalone")
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter} holds no adapter (did the run finish?)")
    named = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not same_checkpoint(named, str(cfg.model.name_or_path)):
        raise ValueError(f"{adapter} names base {named}, but the run trained on {cfg.model.name_or_path}")
    if not all(bool(torch.isfinite(w).all()) for w in load_peft_weights(str(adapter), device="cpu").values()):
        raise ValueError(f"{adapter} has non-finite weights (a diverged run?): refusing to merge it")
    dev = torch.device(device)
    compute = train_dtype(cfg.trainer.precision, dev)
    if cfg.peft.quantize:
        base = dequantized_base(cfg, dev)
        note = f"merged into the {cfg.peft.quantize} base dequantized to {quantized_compute_dtype(cfg.peft, compute)}"
    else:
        base = run_base(cfg, dev)
        note = f"merged into the {weights_dtype(cfg.model, compute)} base"
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out_dir)
    load_tokenizer(cfg.model).save_pretrained(out_dir)
    print(f"{adapter} {note} → {out_dir}")
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run directory (with adapter/ and .hydra/)")
    parser.add_argument("--out", type=Path, default=None, help="where to save the merged model (default RUN_DIR/merged)")
    parser.add_argument("--device", default="cpu", help="device to merge on (cpu, cuda)")
    args = parser.parse_args(argv)
    try:
        merge_run(args.run_dir, args.out, args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
