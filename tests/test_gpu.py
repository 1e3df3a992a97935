"""CUDA checks (`-m gpu`; each skips without a GPU): what only a GPU can show, run by scripts/gpu_check.sh.

- QLoRA on CUDA trains a step, and its LoRA gradients match those of the same model with the 4-bit weights
  dequantized into an fp32 (or bf16) reference, within a stated tolerance;
- a bf16 training run through train.py;
- the 4-bit gradient check: a no-grad eval-mode forward (inference kernels) leaves the next training gradients
  exactly as they were (on CPU bitsandbytes' repack broke them; PLATFORM.md);
- packed attention (one padding-free row, per-sequence sdpa) equals the padded batch on CUDA, SFT and DPO;
- DeepSpeed ZeRO-2 in one process (`python train.py dist=zero2`, a world of one) trains on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST, REPO, algorithm, compose, nonzero_lora_b, read_metrics
from peftlab.sampling import to_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
# LoRA gradients of the 4-bit model against the dequantized fp32 reference: relative L2 error per adapter tensor.
# In fp32 both compute the same matmuls on the same weights (the 4-bit kernels dequantize first); bf16 rounds the
# activations at every layer (8 mantissa bits, compounding over the layers), so its bound is loose, yet far below
# what a lost gradient path gives (an error near 1).
GRADIENT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1}


def qlora_policy(compute: torch.dtype):
    """The tiny Qwen as train.py builds it with peft=qlora on CUDA, LoRA B seeded so every gradient is non-zero."""
    from peftlab.models import build_policy

    cfg, _ = compose(["peft=qlora", f"peft.compute_dtype={'float32' if compute == torch.float32 else 'bfloat16'}"])
    torch.manual_seed(0)
    policy = build_policy(cfg.model, cfg.peft, start_adapter=None, compute=compute, device=CUDA, head="causal_lm",
                          gradient_checkpointing=False)
    nonzero_lora_b(policy)
    return cfg, policy


def dequantized_reference(cfg, policy, dtype: torch.dtype):
    """The same model in `dtype` with each 4-bit weight replaced by its dequantized values and the policy's LoRA
    weights copied in: the only difference left is how the matmuls are computed."""
    import bitsandbytes as bnb
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peftlab.adapters import lora_config

    base = AutoModelForCausalLM.from_pretrained(str(cfg.model.name_or_path), dtype=dtype).to(CUDA)
    quantized = {name.removesuffix(".base_layer"): module for name, module in policy.get_base_model().named_modules()
                 if isinstance(module, bnb.nn.Linear4bit)}  # peft wraps each one as <name>.base_layer
    assert quantized, "the qlora policy has no 4-bit layers"
    assert quantized.keys() <= dict(base.named_modules()).keys()
    with torch.no_grad():
        for name, module in base.named_modules():
            if name in quantized:
                weight = quantized[name].weight
                module.weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype))
    reference = get_peft_model(base, lora_config(cfg.peft, cfg.model.family))
    lora = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in lora:
                p.copy_(lora[name].to(dtype))
    return reference


def batch_of(cfg, n: int = 4) -> dict:
    """A padded SFT batch of the toy data, on CUDA."""
    from peftlab.data import load_splits

    algo = algorithm(packing=False)
    rows = load_splits(cfg.data, "sft", 0).train[:n]
    return to_device(algo.collate(algo.build_examples(rows)), CUDA)


def lora_gradients(model, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qlora_lora_gradients_match_the_dequantized_reference(compute):
    cfg, policy = qlora_policy(compute)
    batch = batch_of(cfg)
    reference = dequantized_reference(cfg, policy, torch.float32)
    ours, expected = lora_gradients(policy, batch), lora_gradients(reference, batch)
    assert ours.keys() == expected.keys() and len(ours) > 0
    errors = {n: float((ours[n] - expected[n]).norm() / expected[n].norm().clamp_min(1e-12)) for n in ours}
    worst = max(errors, key=errors.get)
    print(f"QLoRA {compute}: worst relative LoRA gradient error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= GRADIENT_TOLERANCE[compute], (worst, errors[worst])


def test_qlora_trains_a_step_on_cuda():
    cfg, policy = qlora_policy(torch.bfloat16)
    batch = batch_of(cfg)
    params = [p for p in policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(3):
        policy.zero_grad(set_to_none=True)
        loss = policy(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_4bit_gradients_survive_an_eval_forward():
    """Inference forwards (eval mode, no grad, one token: bitsandbytes' gemv path) must not change what the next
    training step computes."""
    cfg, policy = qlora_policy(torch.bfloat16)
    batch = batch_of(cfg)
    before = lora_gradients(policy, batch)
    policy.eval()
    with torch.no_grad():
        policy(input_ids=batch["input_ids"][:1, :1])
        policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    after = lora_gradients(policy, batch)
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-7)


def test_bf16_training_run(tmp_path):
    from conftest import train_run

    run_dir = train_run(tmp_path / "run", [*FAST, "trainer.precision=bf16", "trainer.max_steps=4",
                                           "trainer.save_every=0"])
    losses = [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"


def test_packed_sft_equals_padded_on_cuda():
    from conftest import live_policy
    from peftlab.data import load_splits

    cfg, _, policy = live_policy(["logger=none"])
    policy.to(CUDA)
    padded, packed = algorithm(packing=False), algorithm(packing=True)
    packed.setup(policy, reference=None, device=CUDA, train_examples=[], eval_examples=[])
    examples = padded.build_examples(load_splits(cfg.data, "sft", 0).train[:12])
    results = []
    for algo, batch in ((padded, padded.collate(examples)), (packed, packed.collate(examples))):
        policy.zero_grad(set_to_none=True)
        loss, _ = algo.loss(policy, to_device(batch, CUDA))
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in policy.parameters() if p.requires_grad]))
    (loss_padded, grads_padded), (loss_packed, grads_packed) = results
    assert abs(loss_padded - loss_packed) < 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(grads_padded, grads_packed)) < 1e-4


def test_packed_dpo_log_probs_equal_padded_on_cuda():
    from conftest import live_policy
    from peftlab.data import load_splits
    from peftlab.models import Reference

    cfg, _, policy = live_policy(["logger=none", "algo=dpo"])
    policy.to(CUDA)
    reference = Reference(policy, "lora")
    algos = []
    for packing in (False, True):
        algo = algorithm(["algo=dpo"], packing=packing, precompute_ref=False)
        algo.setup(policy, reference=reference, device=CUDA, train_examples=[], eval_examples=[])
        algos.append(algo)
    padded, packed = algos
    examples = padded.build_examples(load_splits(cfg.data, "preference", 0).train[:6])
    a, b = to_device(padded.collate(examples), CUDA), to_device(packed.collate(examples), CUDA)
    torch.testing.assert_close(packed.answer_logps(policy, b), padded.answer_logps(policy, a), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed.reference_logps(b), padded.reference_logps(a), atol=1e-4, rtol=1e-4)


def test_zero2_in_one_process_trains_on_cuda(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # train.py sets a world of one itself
    run_dir = tmp_path / "zero2"
    command = [sys.executable, "train.py", *FAST, "dist=zero2", "trainer.max_steps=3", "trainer.save_every=0",
               f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
