"""peft.merged_matmul: LoRA linears computed as one matmul with W + s·B·A give peft's own outputs and gradients."""

import pytest
import torch

from conftest import compose, nonzero_lora_b, policy_of
from peftlab.adapters import MERGED_MIN_ROWS, merged_matmul_class, use_merged_matmul


class Block(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.up = torch.nn.Linear(48, 80, bias=bias)
        self.down = torch.nn.Linear(80, 48, bias=bias)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def lora_block(bias: bool = True, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["up", "down"], **lora)
    model = get_peft_model(Block(bias), config).double()
    nonzero_lora_b(model)
    return model


def outputs_and_gradients(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(MERGED_MIN_ROWS, 48), (2, MERGED_MIN_ROWS // 2 + 3, 48)])
def test_merged_matmul_equals_peft_in_values_and_gradients(bias, shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = lora_block(bias)
    y_peft, dx_peft, grads_peft = outputs_and_gradients(model, x)
    assert use_merged_matmul(model) == 2
    calls = []
    merged = merged_matmul_class()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(type(module)) if type(module) is merged else None)
    y, dx, grads = outputs_and_gradients(model, x)
    handle.remove()
    assert calls == [merged, merged]
    torch.testing.assert_close(y, y_peft, rtol=0, atol=1e-10)
    torch.testing.assert_close(dx, dx_peft, rtol=0, atol=1e-10)
    assert grads.keys() == grads_peft.keys() and len(grads) == 4  # lora_A and lora_B of both layers
    for name in grads:
        torch.testing.assert_close(grads[name], grads_peft[name], rtol=0, atol=1e-10, msg=name)


def test_what_it_does_not_cover_runs_peft_own_forward():
    from peft.tuners.lora.layer import Linear

    model = lora_block()
    use_merged_matmul(model)
    few_rows = torch.randn(MERGED_MIN_ROWS - 1, 48, dtype=torch.float64)
    merged_path = []
    original = Linear.forward
    Linear.forward = lambda self, *a, **k: merged_path.append(1) or original(self, *a, **k)
    try:
        model(few_rows)  # too few rows: peft's forward
        with model.disable_adapter():
            model(torch.randn(MERGED_MIN_ROWS, 48, dtype=torch.float64))  # adapters off: peft's (base only)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(MERGED_MIN_ROWS, 48, dtype=torch.float64))  # autocast: peft's
    finally:
        Linear.forward = original
    assert len(merged_path) == 6
    dora = lora_block(use_dora=True)
    dropout = lora_block(lora_dropout=0.1)
    x = torch.randn(MERGED_MIN_ROWS, 48, dtype=torch.float64)
    for model in (dora, dropout):
        expected = model.eval()(x)
        use_merged_matmul(model)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # the same peft code ran


def test_the_policy_keeps_peft_parameters_and_logits():
    """A tiny policy built with and without the key: the same state dict and, on a batch of ≥ MERGED_MIN_ROWS
    tokens, float32 logits as close to the float64 ones as peft's own float32 logits are."""
    cfg, _ = compose(["peft=lora"])
    plain_cfg, _ = compose(["peft=lora", "peft.merged_matmul=false"])
    torch.manual_seed(0)
    merged = policy_of(cfg)
    torch.manual_seed(0)
    plain = policy_of(plain_cfg)
    assert sum(type(m) is merged_matmul_class() for m in merged.modules()) > 0
    assert not any(type(m) is merged_matmul_class() for m in plain.modules())
    nonzero_lora_b(merged)
    nonzero_lora_b(plain)
    assert merged.state_dict().keys() == plain.state_dict().keys()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor), name
    ids = torch.randint(0, merged.config.vocab_size, (2, MERGED_MIN_ROWS // 2), generator=torch.Generator().manual_seed(3))
    merged_logits, plain_logits = merged(input_ids=ids).logits, plain(input_ids=ids).logits
    exact = plain.double()(input_ids=ids).logits
    merged_error, plain_error = (merged_logits - exact).abs().max(), (plain_logits - exact).abs().max()
    print(f"max |logit error| vs float64: merged {merged_error:.2e}, peft {plain_error:.2e}")
    assert merged_error <= 2 * plain_error
    torch.testing.assert_close(merged_logits, plain_logits, rtol=1e-5, atol=1e-4)
