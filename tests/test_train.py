"""End-to-end behaviour of the one loop on the shipped tiny checkpoints (CPU, a few steps each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, base_of, compose, nonzero_lora_b, policy_of, step_losses, train_run
from peftlab.merge import merge_run
from peftlab.models import load_tokenizer

MODELS = ["tiny_qwen", "tiny_llama", "tiny_mistral"]
PEFTS = ["none", "lora", "dora", "qlora"]
SHORT = [*FAST, "trainer.max_steps=3", "trainer.batch_size=4", "trainer.save_every=0", "trainer.lr=1e-2"]
CPU = torch.device("cpu")
SUMMARY_KEYS = {"algo", "peft", "model", "r", "alpha", "targets", "trainable_params", "total_params", "steps",
                "runtime_s", "tokens_per_s", "peak_mem_bytes", "train/loss"}


def probe_inputs(tokenizer):
    return tokenizer(["12 + 30 = 42. The answer is", "How do I make a"], return_tensors="pt", padding=True)


@torch.no_grad()
def logits_of(model, inputs):
    model.eval()
    return model(**inputs).logits.float()


@pytest.mark.parametrize("peft", PEFTS)
@pytest.mark.parametrize("model", MODELS)
def test_train_save_reload_merge(tmp_path, model, peft):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = train_run(tmp_path / "run", [f"model={model}", f"peft={peft}", *SHORT])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["model"] == model and summary["peft"] == peft and summary["steps"] == 3
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    assert (summary["trainable_params"] == summary["total_params"]) == (peft == "none")

    cfg, _ = compose([f"model={model}", f"peft={peft}"])
    tokenizer = load_tokenizer(cfg.model)
    inputs = probe_inputs(tokenizer)
    base_logits = logits_of(base_of(cfg), inputs)
    if peft == "none":
        trained = AutoModelForCausalLM.from_pretrained(run_dir / "model")
        assert (logits_of(trained, inputs) - base_logits).abs().max() > 1e-4  # the weights did train
        return
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["use_dora"] == (peft == "dora")
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(base_of(cfg), str(run_dir / "adapter"))
    adapter_logits = logits_of(reloaded, inputs)
    assert (adapter_logits - base_logits).abs().max() > 1e-4  # the adapter is not a no-op

    merged_dir = merge_run(run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not hasattr(merged.config, "quantization_config")
    difference = (logits_of(merged, inputs) - adapter_logits).abs().max().item()
    # lora/dora in fp32: the bound. qlora: the 4-bit forward dequantizes the very weights merged into,
    # so only float rounding separates them as well.
    assert difference < 1e-4, f"merged logits differ from the adapter model's by {difference}"


def cli(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


RESUME = [*FAST, "trainer.max_steps=40", "trainer.batch_size=8", "trainer.save_every=3", "peft.dropout=0.1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return step_losses(train_run(tmp_path_factory.mktemp("full") / "run", RESUME))


def wait_for(condition, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, uninterrupted, sig):
    """Killed (or asked to stop) mid-run, then resumed: every per-step loss equals the uninterrupted run's.

    Dropout is on, so this also checks that the RNG state travels with the checkpoint.
    """
    run_dir = tmp_path / "run"
    process = cli(run_dir, *RESUME)
    assert wait_for(lambda: (run_dir / "checkpoints" / "latest").exists() or process.poll() is not None)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert not (run_dir / "summary.json").exists(), "a stopped run must not look finished"
    if sig == signal.SIGTERM:
        assert process.returncode == 143 and "Traceback" not in stderr
        stopped_at = int((run_dir / "checkpoints" / "latest").read_text().split("-")[1])
        assert stopped_at == max(step_losses(run_dir)), "SIGTERM checkpoints the step it stopped after"
    train_run(run_dir, [*RESUME, "trainer.resume=auto"])  # continue in place, as a requeued job does
    resumed = step_losses(run_dir)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 41))
    worst = max(abs(resumed[s] - uninterrupted[s]) for s in uninterrupted)
    assert worst <= 1e-6, f"resumed losses differ by up to {worst}"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def batch_for(cfg):
    tokenizer = load_tokenizer(cfg.model)
    return tokenizer(["37 + 45 = 82. The answer is 82.", "I can't help with that."], return_tensors="pt", padding=True)


def test_gradient_checkpointing_trains_adapters():
    """With checkpointing on, every adapter gradient equals the one without (input grads enabled under PEFT)."""
    grads = {}
    for checkpointing in (False, True):
        cfg, _ = compose(["peft=lora", f"trainer.gradient_checkpointing={checkpointing}"])
        torch.manual_seed(0)
        model = policy_of(cfg)
        nonzero_lora_b(model)
        model.train()
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        grads[checkpointing] = lora_grads(model, batch_for(cfg))
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for name, g in grads[False].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_qlora_gradients_survive_an_eval_pass(guarded):
    """bitsandbytes on avx512_bf16 CPUs repacks 4-bit weights on the first no-grad eval forward, after which
    training forwards silently lose the gradient through those layers. Our loader turns that path off; this test
    compares adapter gradients after an eval pass with those before it, and shows the trap is real where it exists.
    """
    import bitsandbytes as bnb

    cfg, _ = compose(["peft=qlora"])
    torch.manual_seed(0)
    model = policy_of(cfg)
    nonzero_lora_b(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers)
    if not guarded and not bnb.nn.modules.has_avx512bf16():
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes never takes the repacking path here")
    batch = batch_for(cfg)
    model.train()
    before = lora_grads(model, batch)
    if not guarded:
        for m in layers:
            m.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model.eval()
        model(input_ids=batch["input_ids"])
    model.train()
    try:
        after = lora_grads(model, batch)
    except RuntimeError:  # unguarded, the repacked weight can also break autograd outright
        assert not guarded
        return
    worst = max((after[n] - before[n]).abs().max().item() / (before[n].abs().max().item() + 1e-12) for n in before)
    if guarded:
        assert worst < 1e-5, f"adapter gradients changed by {worst:.3g} (relative) after an eval pass"
    else:
        assert worst > 1e-2, "expected the unguarded repack to corrupt gradients on this CPU"


@pytest.mark.parametrize("peft", ["lora", "qlora"])
@pytest.mark.parametrize("head", ["causal_lm", "score"])
@pytest.mark.parametrize("model", MODELS)
def test_lean_load_equals_from_pretrained(model, head, peft, monkeypatch):
    """A local base is read from pread slices (models.load_local_checkpoint): the same model (fp32 or 4-bit),
    name and generation settings as transformers' own from_pretrained, which the fallback still uses."""
    import peftlab.models as models

    cfg, _ = compose([f"peft={peft}", f"model={model}"])
    lean = base_of(cfg, head=head)
    monkeypatch.setattr(models, "load_local_checkpoint", lambda *args, **kwargs: None)
    plain = base_of(cfg, head=head)
    assert type(lean) is type(plain) and lean.name_or_path == plain.name_or_path == str(cfg.model.name_or_path)
    assert lean.config.to_dict() == plain.config.to_dict()
    if head == "causal_lm":
        assert lean.generation_config.to_dict() == plain.generation_config.to_dict()
    lean_weights, plain_weights = lean.state_dict(), plain.state_dict()
    assert lean_weights.keys() == plain_weights.keys()
    for name, tensor in plain_weights.items():
        if name.endswith("score.weight"):  # a fresh head: random in both
            continue
        assert torch.equal(lean_weights[name], tensor), name


def test_4bit_base_keeps_model_dtype_for_its_other_weights():
    """Embeddings, norms and head stay at model.dtype (no float32 copy as PEFT's prepare_model_for_kbit_training
    makes): a bf16 4-bit policy holds bf16 and uint8 base weights, and its adapter trains in float32."""
    cfg, _ = compose(["peft=qlora", "model.dtype=bfloat16"])
    model = policy_of(cfg)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16, torch.uint8} and trainable == {torch.float32}


HEAP_PROBE = """
import sys, torch
from peftlab.memory import release_host_memory
released = sys.argv[1] == "release" and release_host_memory()
numel = int(sys.argv[2])
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
first = torch.ones(1 << 20); del first  # freeing one mapped 4 MiB buffer raises glibc's own threshold past 4 MiB
start = resident()
buffers = [torch.ones(numel) for _ in range((400 << 20) // (4 * numel))]  # 400 MiB in buffers of numel floats
pin = torch.ones(numel)  # a buffer still in use above them, as a step's later tensors are
del buffers
print(released, (resident() - start) / 2**20)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
@pytest.mark.parametrize("buffer_kib", [4096, 256])
def test_release_host_memory_gives_freed_buffers_back(buffer_kib):
    """trainer.release_host_memory: 400 MiB of freed buffers leave the process, large ones (activations) and small
    ones (a layer's rank-r LoRA activations: 256 KiB), where glibc's default keeps them in its heap below a buffer
    still in use."""
    def held_after_free(mode):
        result = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode, str(buffer_kib * 256)], capture_output=True,
                                text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        released, mib = result.stdout.split()
        return released == "True", float(mib)

    released, held = held_after_free("release")
    if not released:
        pytest.skip("no glibc mallopt here: the setting changes nothing")
    assert held < 40, f"{held:.0f} MiB still resident after freeing 400 MiB"
    assert held_after_free("default")[1] > 200, "expected glibc's default heap to keep the freed buffers"


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """2 micro-batches of 4 give the same per-step losses as one batch of 8 (token-weighted accumulation)."""
    common = [*FAST, "trainer.max_steps=4", "trainer.save_every=0", "peft.dropout=0.0"]
    accumulated = step_losses(train_run(tmp_path / "a", [*common, "trainer.batch_size=4", "trainer.grad_accum=2"]))
    single = step_losses(train_run(tmp_path / "b", [*common, "trainer.batch_size=8", "trainer.grad_accum=1"]))
    assert sorted(accumulated) == sorted(single) == [1, 2, 3, 4]
    for step in single:
        assert abs(accumulated[step] - single[step]) < 1e-5, (step, accumulated[step], single[step])
