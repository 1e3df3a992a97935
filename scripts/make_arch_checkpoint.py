"""Write a random-weight checkpoint with the exact architecture of a public model, without downloading it.

    python scripts/make_arch_checkpoint.py --preset qwen2.5-0.5b --out /tmp/arch/qwen2.5-0.5b
    python scripts/make_arch_checkpoint.py --list
    python scripts/make_arch_checkpoint.py --preset mistral-7b-v0.3 --out DIR --seed 1 --shard-gb 1

The result loads with `AutoModelForCausalLM.from_pretrained(DIR)` and trains through `python train.py
model.name_or_path=DIR`: the same modules, shapes, parameter count and memory as the real model, so memory and
speed measured on it hold for the real one (the loss does not). The weights are random, the tokenizer is the shipped
toy one (its ids replace the model's bos/eos/pad), and nothing but the architecture is the real model's.

Each tensor is generated on its own and written shard by shard (safetensors shards + model.safetensors.index.json,
the layout `save_pretrained` writes), so a 7B model never has to fit in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "assets" / "models" / "tiny_qwen"
DEFAULT_SHARD_BYTES = 1_000_000_000

# Each preset: the hub id it copies, its parameter count as published (the hub's safetensors total, embeddings
# counted once when tied), and its config.json as published, minus bookkeeping keys (architectures, torch_dtype,
# transformers_version). bos/eos/pad are replaced by the toy tokenizer's ids when the checkpoint is written.
PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": {
        "hub_id": "Qwen/Qwen2.5-0.5B-Instruct",
        "parameters": 494_032_768,
        "config": {
            "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
            "tie_word_embeddings": True, "sliding_window": 32768, "use_sliding_window": False,
            "max_window_layers": 21, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
        },
    },
    "qwen2.5-1.5b": {
        "hub_id": "Qwen/Qwen2.5-1.5B-Instruct",
        "parameters": 1_543_714_304,
        "config": {
            "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
            "tie_word_embeddings": True, "sliding_window": 32768, "use_sliding_window": False,
            "max_window_layers": 21, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
        },
    },
    "qwen2.5-7b": {
        "hub_id": "Qwen/Qwen2.5-7B-Instruct",
        "parameters": 7_615_616_512,
        "config": {
            "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
            "tie_word_embeddings": False, "sliding_window": 131072, "use_sliding_window": False,
            "max_window_layers": 28, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
        },
    },
    "llama-3.2-1b": {
        "hub_id": "meta-llama/Llama-3.2-1B-Instruct",
        "parameters": 1_235_814_400,
        "config": {
            "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            "rms_norm_eps": 1e-05, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
            "pretraining_tp": 1, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "use_cache": True,
        },
    },
    "llama-3.2-3b": {
        "hub_id": "meta-llama/Llama-3.2-3B-Instruct",
        "parameters": 3_212_749_824,
        "config": {
            "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
            "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            "rms_norm_eps": 1e-05, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
            "pretraining_tp": 1, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "use_cache": True,
        },
    },
    "llama-3.1-8b": {
        "hub_id": "meta-llama/Llama-3.1-8B-Instruct",
        "parameters": 8_030_261_248,
        "config": {
            "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0,
            # Llama 3.1 stretches its 8k pretraining context by 8 (Llama 3.2 by 32).
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "pretraining_tp": 1, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "use_cache": True,
        },
    },
    "mistral-7b-v0.3": {
        "hub_id": "mistralai/Mistral-7B-Instruct-v0.3",
        "parameters": 7_248_023_552,
        "config": {
            "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-05,
            "tie_word_embeddings": False, "sliding_window": None, "hidden_act": "silu", "attention_dropout": 0.0,
            "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
        },
    },
    # Not a public model: Qwen2's 151,936-token vocabulary on a tiny body, so tests reach the large-vocabulary
    # paths (embedding and logits memory, tied lm_head, several shards) in seconds.
    "tiny-qwen-152k": {
        "hub_id": None,
        "parameters": 9_798_208,
        "config": {
            "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151936,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
            "tie_word_embeddings": True, "sliding_window": 32768, "use_sliding_window": False,
            "max_window_layers": 2, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
        },
    },
}


def load_toy_tokenizer():
    """The shipped toy tokenizer (byte-level BPE, ChatML template) that every arch checkpoint carries."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def toy_token_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad of the toy tokenizer. It has no bos token; like Qwen's own config, bos is <|endoftext|> (= pad)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    return {"bos_token_id": bos, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def build_config(preset: str, dtype: torch.dtype = torch.bfloat16, token_ids: dict[str, int] | None = None):
    """The preset's transformers Config; `token_ids` (bos/eos/pad) replace the public model's ids when given."""
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    fields = dict(PRESETS[preset]["config"])
    fields.update(token_ids or {})
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.dtype = dtype
    return config


def meta_model(config):
    """The model with every tensor on the meta device: its classes, names and shapes, and no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_shapes(model) -> dict[str, torch.Size]:
    """Name → shape of every stored tensor. `named_parameters` lists a tied lm_head once, under the embedding's
    name, as save_pretrained stores it."""
    return {name: p.shape for name, p in model.named_parameters()}


def random_tensor(name: str, shape: torch.Size, std: float, dtype: torch.dtype, generator: torch.Generator):
    """A weight as a freshly initialized model holds it: norm scales 1, biases 0, matrices N(0, std)."""
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # RMSNorm weights are the only 1-D non-bias tensors in these architectures
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def plan_shards(shapes: dict[str, torch.Size], bytes_per_element: int, shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most shard_bytes (a single larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, shape in shapes.items():
        size = shape.numel() * bytes_per_element
        if shards[-1] and current + size > shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def shard_file_names(n_shards: int) -> list[str]:
    """save_pretrained's names: model.safetensors alone, else model-0000i-of-0000n.safetensors."""
    if n_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def write_checkpoint(preset: str, out_dir, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `preset` with random weights to out_dir (config, generation config, weights, toy tokenizer).

    Memory: about one shard's tensors, whatever the model's size. The weights depend only on (preset, seed, dtype),
    not on shard_bytes. Weights already in out_dir are replaced (a stale index would otherwise win).
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("model*.safetensors"), *out_dir.glob("model.safetensors.index.json")]:
        old.unlink()
    tokenizer = load_toy_tokenizer()
    token_ids = toy_token_ids(tokenizer)
    config = build_config(preset, dtype, token_ids)
    model = meta_model(config)
    shapes = parameter_shapes(model)
    if max(token_ids.values()) >= config.vocab_size:
        raise ValueError(f"the toy tokenizer's ids {token_ids} do not fit the vocabulary of {config.vocab_size}")

    bytes_per_element = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(shapes, bytes_per_element, shard_bytes)
    file_names = shard_file_names(len(shards))
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for names, file_name in zip(shards, file_names):
        tensors = {name: random_tensor(name, shapes[name], config.initializer_range, dtype, generator)
                   for name in names}
        save_file(tensors, out_dir / file_name, metadata={"format": "pt"})
        weight_map.update({name: file_name for name in names})
        del tensors
    if len(shards) > 1:
        total_parameters = sum(shape.numel() for shape in shapes.values())
        metadata = {"total_parameters": total_parameters, "total_size": total_parameters * bytes_per_element}
        index = {"metadata": metadata, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    GenerationConfig(do_sample=False, **token_ids).save_pretrained(out_dir)
    # The toy tokenizer's own limit (its toy models' context) would truncate long rows of this bigger model.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="architecture to copy (see --list)")
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1e9,
                        help="largest shard, in GB (bounds the writer's memory)")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name:18s} {preset['parameters']:>15,d}  {preset['hub_id'] or '(test preset)'}")
        return
    if not args.preset or not args.out:
        parser.error("--preset and --out are required (or --list)")
    start = time.perf_counter()
    out = write_checkpoint(args.preset, args.out, seed=args.seed, shard_bytes=int(args.shard_gb * 1e9))
    print(f"wrote {args.preset} ({PRESETS[args.preset]['parameters']:,d} parameters, bf16) to {out} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
