"""scripts/make_arch_checkpoint.py: real-architecture checkpoints with random weights, written shard by shard."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, step_losses, train_run
from scripts.make_arch_checkpoint import PRESETS, build_config, load_toy_tokenizer, main, meta_model, write_checkpoint

TINY = "tiny-qwen-152k"
FAMILIES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny preset with shards small enough that its ~20 MB of weights span several files."""
    return write_checkpoint(TINY, tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, shard_bytes=100_000)


def safetensors_tensors(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_with_its_published_parameter_count(preset):
    config = build_config(preset)
    model = meta_model(config)
    public = PRESETS[preset]["config"]
    assert type(model).__name__ == FAMILIES[public["model_type"]]
    assert sum(p.numel() for p in model.parameters()) == PRESETS[preset]["parameters"]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == public["tie_word_embeddings"]
    assert model.model.embed_tokens.weight.shape == (public["vocab_size"], public["hidden_size"])
    rope = config.rope_parameters
    assert rope["rope_theta"] == public["rope_theta"]
    if "rope_scaling" in public:
        assert rope["rope_type"] == "llama3" and rope["factor"] == public["rope_scaling"]["factor"]
    if public["model_type"] == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases


def test_tiny_checkpoint_is_sharded_and_loads(tiny_dir):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in tiny_dir.glob("model-*.safetensors"))
    assert len(shard_files) >= 3 and sorted(set(index["weight_map"].values())) == shard_files
    stored = safetensors_tensors(tiny_dir)
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert index["metadata"]["total_parameters"] == PRESETS[TINY]["parameters"]
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.config.dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == PRESETS[TINY]["parameters"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape == (151_936, 64)
    # Loaded tensors are the written ones (nothing left to from_pretrained's random init).
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, stored[name if name in stored else "model.embed_tokens.weight"]), name
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert not layer.self_attn.q_proj.bias.any()
    assert 0.015 < layer.mlp.up_proj.weight.float().std() < 0.025  # N(0, initializer_range = 0.02)


def test_tiny_checkpoint_carries_the_toy_tokenizer_and_its_ids(tiny_dir):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    toy = load_toy_tokenizer()
    assert tokenizer.get_vocab() == toy.get_vocab() and tokenizer.chat_template == toy.chat_template
    config = AutoConfig.from_pretrained(tiny_dir)
    generation = GenerationConfig.from_pretrained(tiny_dir)
    assert config.eos_token_id == generation.eos_token_id == toy.eos_token_id == toy.convert_tokens_to_ids("<|im_end|>")
    assert config.pad_token_id == generation.pad_token_id == toy.pad_token_id
    assert config.bos_token_id is not None and config.bos_token_id < len(toy)
    assert tokenizer.model_max_length == config.max_position_embeddings


def test_weights_depend_on_seed_not_on_shard_size(tiny_dir, tmp_path):
    same_seed = safetensors_tensors(write_checkpoint(TINY, tmp_path / "one_shard", seed=0, shard_bytes=10**9))
    other_seed = safetensors_tensors(write_checkpoint(TINY, tmp_path / "seed1", seed=1, shard_bytes=10**9))
    assert (tmp_path / "one_shard" / "model.safetensors").exists()
    assert not (tmp_path / "one_shard" / "model.safetensors.index.json").exists()
    sharded = safetensors_tensors(tiny_dir)
    assert all(torch.equal(sharded[name], same_seed[name]) for name in sharded)
    assert not torch.equal(sharded["model.embed_tokens.weight"], other_seed["model.embed_tokens.weight"])


def test_rewriting_a_directory_replaces_its_old_shards(tmp_path):
    write_checkpoint(TINY, tmp_path / "ckpt", shard_bytes=100_000)
    write_checkpoint(TINY, tmp_path / "ckpt", shard_bytes=10**9)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("model*")) == ["model.safetensors"]


def test_tiny_checkpoint_trains_through_train_py(tiny_dir, tmp_path):
    overrides = ["model=qwen", f"model.name_or_path={tiny_dir}", *FAST, "trainer.max_steps=1",
                 "trainer.batch_size=2", "model.max_length=128", "data.eval_path=null", "data.eval_size=2", "trainer.save_every=0", "peft.targets=all-linear"]
    run_dir = train_run(tmp_path / "run", overrides)
    losses = step_losses(run_dir)
    assert list(losses) == [1] and torch.isfinite(torch.tensor(losses[1]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_params"] > PRESETS[TINY]["parameters"] > summary["trainable_params"] > 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_cli_lists_every_preset(capsys):
    main(["--list"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(PRESETS)


@pytest.mark.parametrize("preset,tokens,dtype,quantized,expected", [
    ("qwen2.5-0.5b", 2 * 1024, torch.float32, False, True),   # 5.6 GB of fp32 activations against 2.1 GB of weights
    ("qwen2.5-0.5b", 2 * 128, torch.float32, False, False),   # a short batch keeps its activations
    ("mistral-7b-v0.3", 12 * 512, torch.float32, True, True),  # 4-bit weights are small: activations decide
    ("mistral-7b-v0.3", 512, torch.bfloat16, True, True),     # 3.2 GB of activations, under the 4.4 GB base: on
    ("mistral-7b-v0.3", 2 * 16, torch.bfloat16, True, False),  # a quantized base's short batch: under the floor
    ("mistral-7b-v0.3", 2 * 128, torch.float32, False, False),  # 29 GB of fp32 weights dwarf a short batch
    (TINY, 16 * 128, torch.float32, False, False),             # the toy scale never pays for recomputation
])
def test_auto_checkpointing_follows_the_architecture(preset, tokens, dtype, quantized, expected):
    """trainer.gradient_checkpointing=auto: on when the kept activations pass 1 GiB and, on a full-precision base,
    the weights."""
    from peftlab.memory import CHECKPOINTING_FLOOR_BYTES, activation_bytes, use_checkpointing, weight_bytes

    config = build_config(preset)
    assert use_checkpointing("auto", config, tokens, dtype, quantized) is expected
    assert use_checkpointing(True, config, 1, dtype, quantized) and not use_checkpointing(
        False, config, 10**6, dtype, quantized)
    kept, weights = activation_bytes(config, tokens, dtype), weight_bytes(config, dtype)
    floor = CHECKPOINTING_FLOOR_BYTES if quantized else max(weights, CHECKPOINTING_FLOOR_BYTES)
    assert (kept > floor) is expected


def test_layer_live_set_script_measures_one_layer(tiny_dir):
    """scripts/layer_live_set.py (the README's figure for one layer's live set) runs and reports a size that
    grows with the tokens."""
    import re
    import subprocess
    import sys

    from conftest import REPO

    def live_mb(length: int) -> float:
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "layer_live_set.py"), "--model-dir",
                              str(tiny_dir), "--rows", "2", "--length", str(length)],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout
        return float(re.search(r"live set (\d+) MB", out).group(1))

    assert 0 < live_mb(256) < live_mb(2048)
