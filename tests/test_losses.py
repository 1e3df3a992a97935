"""Tests for peftlab.losses: hand-computed numbers, and TRL 1.16's own loss code run on the same log-probs.

The TRL references execute `DPOTrainer._compute_loss` and `GRPOTrainer._compute_loss` (and, for GRPO, the real
`_get_per_token_logps_and_entropies`) unbound, on a bare stand-in for `self` that carries only the attributes those
methods read, with a stand-in model whose forward returns the given per-token log-probs as `log_probs` (the
fused-LM-head output TRL 1.16 asks for). Nothing of TRL's loss arithmetic is re-implemented here.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from peftlab.losses import (
    bradley_terry_loss,
    chosen_nll,
    cost_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    lagrange_step,
    sequence_logps,
    sft_loss,
    token_logprobs,
)

DTYPE = torch.float64  # the TRL comparisons run in float64 so that 1e-6 measures semantics, not rounding


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------------------------------------
# token_logprobs / sequence_logps / sft_loss against hand-computed numbers
# ----------------------------------------------------------------------------------------------------------------------

# B=2, T=4, V=3. Row 0: prompt token then 3 completion tokens; row 1: 2 prompt tokens, 1 completion token, 1 pad.
LOGITS = [
    [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0], [9.0, 9.0, 9.0]],
    [[0.3, 0.1, -0.2], [1.5, -0.5, 0.0], [4.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
]
LABELS = [[-100, 1, 2, 0], [-100, -100, 0, -100]]


def _hand_log_softmax(row: list[float], k: int) -> float:
    return row[k] - math.log(sum(math.exp(v) for v in row))


# logits[:, t] predicts labels[:, t+1]
HAND_LOGPS = [
    [_hand_log_softmax(LOGITS[0][0], 1), _hand_log_softmax(LOGITS[0][1], 2), _hand_log_softmax(LOGITS[0][2], 0)],
    [0.0, _hand_log_softmax(LOGITS[1][1], 0), 0.0],
]
HAND_MASK = [[True, True, True], [False, True, False]]


def test_token_logprobs_hand_computed():
    logps, mask = token_logprobs(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert logps.shape == (2, 3) and mask.shape == (2, 3)
    assert mask.tolist() == HAND_MASK
    torch.testing.assert_close(logps, torch.tensor(HAND_LOGPS), rtol=0, atol=1e-6)
    # the uniform row: log(1/3)
    assert abs(logps[0, 2].item() - math.log(1 / 3)) < 1e-6


def test_token_logprobs_half_precision_path_and_custom_ignore_index():
    logits = torch.tensor(LOGITS)
    labels = torch.tensor(LABELS).masked_fill(torch.tensor(LABELS) == -100, 7)  # 7 is out of vocab: must be masked
    logps32, mask = token_logprobs(logits, labels, ignore_index=7)
    assert mask.tolist() == HAND_MASK
    logps_bf16, _ = token_logprobs(logits.to(torch.bfloat16), labels, ignore_index=7)
    assert logps_bf16.dtype == torch.float32
    torch.testing.assert_close(logps_bf16, logps32, rtol=0, atol=3e-2)  # bf16 rounding of the logits only


def test_sequence_logps_is_sum():
    seq = sequence_logps(torch.tensor(LOGITS), torch.tensor(LABELS))
    torch.testing.assert_close(seq, torch.tensor([sum(HAND_LOGPS[0]), HAND_LOGPS[1][1]]), rtol=0, atol=1e-6)


def test_sft_loss_hand_computed_and_matches_cross_entropy():
    logits = torch.tensor(LOGITS, requires_grad=True)
    loss, n = sft_loss(logits, torch.tensor(LABELS))
    hand = -(sum(HAND_LOGPS[0]) + HAND_LOGPS[1][1]) / 4
    assert n.item() == 4 and n.dtype == torch.int64
    assert abs(loss.item() - hand) < 1e-6
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 3), torch.tensor(LABELS)[:, 1:].reshape(-1))
    assert abs(loss.item() - ce.item()) < 1e-6
    loss.backward()
    assert logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_chosen_nll_is_the_token_mean_cross_entropy_of_the_chosen_answers():
    """RPO's term (TRL's rpo_alpha: cross-entropy on the chosen half) from summed log-probs and token counts."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)  # (B, L, V)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3], labels[1, :5], labels[2, :2] = -100, -100, -100  # prompts of different lengths
    lengths = (labels[:, 1:] != -100).sum(-1)  # (B,) the first position is never predicted
    nll = chosen_nll(sequence_logps(logits, labels), lengths)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(nll.item() - ce.item()) < 1e-6
    (g_ours,) = torch.autograd.grad(nll, logits)
    (g_ce,) = torch.autograd.grad(ce, logits)
    torch.testing.assert_close(g_ours, g_ce, rtol=0, atol=1e-7)


def test_sft_loss_no_label_tokens_is_zero_not_nan():
    loss, n = sft_loss(torch.randn(1, 3, 5), torch.full((1, 3), -100))
    assert n.item() == 0 and loss.item() == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Reward and cost models against hand-computed numbers
# ----------------------------------------------------------------------------------------------------------------------


def test_bradley_terry_hand_computed():
    c, r = [1.0, -0.5, 2.0], [0.0, 0.5, 2.5]
    hand = -sum(_log_sigmoid(a - b) for a, b in zip(c, r)) / 3
    assert abs(bradley_terry_loss(torch.tensor(c), torch.tensor(r)).item() - hand) < 1e-6


def test_cost_loss_hand_computed():
    # (cost_0, cost_1, safer_id, is_0_safe, is_1_safe)
    rows = [
        (-1.0, 2.0, 0, True, False),  # answer 0 safe & safer: c_s=-1 (sign -1), c_u=2 (sign +1)
        (0.5, -0.3, 1, False, True),  # answer 1 safer & safe
        (1.2, 0.4, 1, False, False),  # both unsafe, answer 1 less unsafe: both signs +1
        (-0.2, -0.7, 0, True, True),  # both safe, answer 0 "safer" although its cost is higher
    ]
    total = 0.0
    for c0, c1, sid, s0, s1 in rows:
        c_s, c_u = (c0, c1) if sid == 0 else (c1, c0)
        safe_s, safe_u = (s0, s1) if sid == 0 else (s1, s0)
        sign_s, sign_u = (-1.0 if safe_s else 1.0), (-1.0 if safe_u else 1.0)
        total += -_log_sigmoid(c_u - c_s) - _log_sigmoid(sign_s * c_s) - _log_sigmoid(sign_u * c_u)
    got = cost_loss(
        torch.tensor([r[0] for r in rows]),
        torch.tensor([r[1] for r in rows]),
        torch.tensor([r[2] for r in rows]),
        torch.tensor([r[3] for r in rows]),
        torch.tensor([r[4] for r in rows]),
    )
    assert abs(got.item() - total / len(rows)) < 1e-6


def test_cost_loss_pushes_safe_down_and_unsafe_up():
    c0 = torch.zeros(1, requires_grad=True)
    c1 = torch.zeros(1, requires_grad=True)
    cost_loss(c0, c1, torch.tensor([0]), torch.tensor([True]), torch.tensor([False])).backward()
    assert c0.grad.item() > 0 and c1.grad.item() < 0  # gradient descent lowers the safe cost, raises the unsafe one


# ----------------------------------------------------------------------------------------------------------------------
# DPO: own properties
# ----------------------------------------------------------------------------------------------------------------------


def test_dpo_hand_computed_sigmoid_margin_and_rewards():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    h = (-3.0 + 4.0) - (-5.0 + 4.5)  # 1.5
    beta, delta, eps = 0.2, 0.1, 0.1
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta, margin=torch.tensor([delta]))
    assert abs(losses.item() + _log_sigmoid(beta * h - delta)) < 1e-6
    assert abs(cr.item() - beta * 1.0) < 1e-6 and abs(rj.item() - beta * -0.5) < 1e-6
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    hand = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    assert abs(losses.item() - hand) < 1e-6
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type="hinge", margin=torch.tensor([delta]))
    assert abs(losses.item() - max(0.0, 1 - (beta * h - delta))) < 1e-6
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    assert abs(losses.item() - (h - 1 / (2 * beta)) ** 2) < 1e-6


def test_dpo_tensor_beta_equals_per_pair_float_beta():
    g = torch.Generator().manual_seed(1)
    lp = [-torch.rand(4, generator=g, dtype=DTYPE) * 10 for _ in range(4)]
    betas = torch.tensor([0.05, 0.1, 0.5, 1.0], dtype=DTYPE)
    for loss_type in ("sigmoid", "ipo", "hinge"):
        batch, cr, _ = dpo_loss(*lp, betas, loss_type=loss_type)
        for i in range(4):
            single, cr_i, _ = dpo_loss(*[x[i : i + 1] for x in lp], betas[i].item(), loss_type=loss_type)
            torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=1e-12)
            torch.testing.assert_close(cr[i : i + 1], cr_i, rtol=0, atol=1e-12)


def test_dpo_rejects_undefined_combinations():
    x = torch.zeros(2)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, 0.1, loss_type="ipo", margin=x)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, 0.1, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, 0.1, loss_type="robust")


# ----------------------------------------------------------------------------------------------------------------------
# DPO against TRL 1.16 DPOTrainer._compute_loss
# ----------------------------------------------------------------------------------------------------------------------


class _Accel:
    """The accelerator calls TRL's loss methods make, for a single process."""

    device = torch.device("cpu")
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def autocast(self):
        return contextlib.nullcontext()


class _LogProbModel:
    """Stands in for the policy: forward returns fixed per-token log-probs as the fused-LM-head output."""

    training = False  # eval mode: TRL skips the train-only token counters and gradient-accumulation scaling

    def __init__(self, per_token_logps: torch.Tensor):
        self.per_token_logps = per_token_logps  # (N, L): TRL keeps the last positions it needs

    def __call__(self, input_ids, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head
        z = torch.zeros_like(self.per_token_logps)
        return SimpleNamespace(
            log_probs=self.per_token_logps, entropy=z, mean_logits=z, is_top1=torch.zeros_like(z, dtype=torch.bool)
        )


def _trl_dpo(seq_logps, ref_chosen, ref_rejected, lengths, beta, loss_type, label_smoothing=0.0):
    """TRL 1.16 `DPOTrainer._compute_loss` on given sequence log-probs.

    seq_logps: (2B,) leaf, [chosen; rejected] as TRL lays out the batch. The model's per-token output puts each
    sequence's log-prob on its first completion token and 0 elsewhere, so TRL's sum over positions returns it.
    lengths: (2B,) completion token counts (IPO reads them from completion_mask). Reference log-probs take TRL's
    `precompute_ref_log_probs` path (read from the batch).
    """
    trainer_mod = pytest.importorskip("trl.trainer.dpo_trainer")
    n = seq_logps.shape[0]
    L = int(lengths.max().item()) + 1  # one prompt token, then the completion
    completion_mask = torch.zeros(n, L, dtype=torch.long)
    for i, k in enumerate(lengths.tolist()):
        completion_mask[i, 1 : 1 + int(k)] = 1
    shift_mask = completion_mask[:, 1:]  # (2B, L-1)
    first_completion = torch.zeros_like(shift_mask, dtype=seq_logps.dtype)
    first_completion[:, 0] = 1.0
    per_token = seq_logps[:, None] * first_completion  # (2B, L-1), row sum == seq_logps exactly
    stub = SimpleNamespace(
        model=_LogProbModel(per_token),
        accelerator=_Accel(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, L, dtype=torch.long),
        "attention_mask": torch.ones(n, L, dtype=torch.long),
        "completion_mask": completion_mask,  # (2B, L); TRL shifts it itself
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trainer_mod.DPOTrainer._compute_loss(stub, stub.model, inputs, False)
    return loss, stub._metrics["eval"]


def _random_pairs(seed: int, batch: int = 6):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(4, batch, generator=g, dtype=DTYPE) * 30  # policy chosen/rejected, ref chosen/rejected
    lengths = torch.randint(1, 12, (2, batch), generator=g)
    return logps, lengths


DPO_CASES = [("sigmoid", 0.1), ("sigmoid", 0.5), ("hinge", 0.1), ("hinge", 0.02), ("ipo", 0.1), ("ipo", 0.5)]


@pytest.mark.parametrize("loss_type,beta", DPO_CASES)
def test_dpo_matches_trl(loss_type, beta):
    logps, lengths = _random_pairs(seed=DPO_CASES.index((loss_type, beta)))
    B = logps.shape[1]
    # TRL
    trl_leaf = torch.cat([logps[0], logps[1]]).clone().requires_grad_(True)  # (2B,) [chosen; rejected]
    trl_loss, metrics = _trl_dpo(trl_leaf, logps[2], logps[3], torch.cat([lengths[0], lengths[1]]), beta, loss_type)
    trl_loss.backward()
    # ours
    pc, pr = logps[0].clone().requires_grad_(True), logps[1].clone().requires_grad_(True)
    kw = {"chosen_lengths": lengths[0], "rejected_lengths": lengths[1]} if loss_type == "ipo" else {}
    losses, cr, rr = dpo_loss(pc, pr, logps[2], logps[3], beta, loss_type=loss_type, **kw)
    losses.mean().backward()

    err_loss = abs(losses.mean().item() - trl_loss.item())
    err_grad = max((pc.grad - trl_leaf.grad[:B]).abs().max().item(), (pr.grad - trl_leaf.grad[B:]).abs().max().item())
    assert err_loss < 1e-6, err_loss
    assert err_grad < 1e-6, err_grad
    assert trl_leaf.grad.abs().max() > 0  # the comparison is not vacuous
    assert abs(cr.mean().item() - metrics["rewards/chosen"][0]) < 1e-6
    assert abs(rr.mean().item() - metrics["rewards/rejected"][0]) < 1e-6


def test_dpo_ipo_without_lengths_differs_from_trl():
    """Documents TRL's IPO length normalization: our unnormalized Eq. 17 is a different number."""
    logps, lengths = _random_pairs(seed=3)
    trl_leaf = torch.cat([logps[0], logps[1]])
    trl_loss, _ = _trl_dpo(trl_leaf, logps[2], logps[3], torch.cat([lengths[0], lengths[1]]), 0.1, "ipo")
    ours, _, _ = dpo_loss(*logps, 0.1, loss_type="ipo")
    assert abs(ours.mean().item() - trl_loss.item()) > 1e-3


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_label_smoothing_matches_trl(label_smoothing):
    """cDPO vs TRL. TRL 1.16's `sigmoid` ignores label_smoothing; its `aot` loss is -(1-ε)logσ(βδ) - ε logσ(-βδ) with
    δ the batch-SORTED log-ratio difference, which for a batch of one pair is exactly h. So TRL runs once per pair."""
    beta = 0.2
    logps, lengths = _random_pairs(seed=11)
    B = logps.shape[1]
    pc, pr = logps[0].clone().requires_grad_(True), logps[1].clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, logps[2], logps[3], beta, label_smoothing=label_smoothing)
    losses.sum().backward()
    for i in range(B):
        leaf = torch.stack([logps[0, i], logps[1, i]]).clone().requires_grad_(True)
        trl_loss, _ = _trl_dpo(
            leaf, logps[2, i : i + 1], logps[3, i : i + 1], lengths[:, i], beta, "aot", label_smoothing
        )
        trl_loss.backward()
        assert abs(losses[i].item() - trl_loss.item()) < 1e-6
        assert abs(pc.grad[i].item() - leaf.grad[0].item()) < 1e-6
        assert abs(pr.grad[i].item() - leaf.grad[1].item()) < 1e-6
    if label_smoothing == 0.0:  # and with ε = 0 it is TRL's plain sigmoid loss on the whole batch
        trl_loss, _ = _trl_dpo(
            torch.cat([logps[0], logps[1]]), logps[2], logps[3], torch.cat([lengths[0], lengths[1]]), beta, "sigmoid"
        )
        assert abs(losses.mean().item() - trl_loss.item()) < 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# GRPO against TRL 1.16 GRPOTrainer._compute_loss
# ----------------------------------------------------------------------------------------------------------------------


def _trl_grpo(logps_leaf, inputs_extra, *, loss_type, beta, epsilon, epsilon_high, max_completion_length, mask):
    """TRL 1.16 `GRPOTrainer._compute_loss` (through its real `_get_per_token_logps_and_entropies`).

    The stand-in model returns log_probs (B, P+C) whose last C columns are `logps_leaf`; TRL slices them back out.
    Single process, gradient accumulation 1, steps_per_generation 1, eval mode (so no accumulation scaling).
    """
    trainer_mod = pytest.importorskip("trl.trainer.grpo_trainer")
    GRPOTrainer = trainer_mod.GRPOTrainer
    B, C = logps_leaf.shape
    P = 2
    full = torch.cat([torch.zeros(B, P, dtype=logps_leaf.dtype), logps_leaf], dim=1)  # (B, P+C)
    stub = SimpleNamespace(
        model=_LogProbModel(full),
        accelerator=_Accel(),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    stub._get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies.__get__(stub)
    inputs = {
        "prompt_ids": torch.zeros(B, P, dtype=torch.long),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.zeros(B, C, dtype=torch.long),
        "completion_mask": mask.long(),
        **inputs_extra,
    }
    loss = GRPOTrainer._compute_loss(stub, stub.model, inputs)
    return loss, stub._metrics["eval"]


def _grpo_inputs(seed: int, B: int = 8, C: int = 7, mu_gt_1: bool = True):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, C, generator=g, dtype=DTYPE) * 3
    # μ > 1: the policy has moved since generation; large enough that some ratios leave [1-ε, 1+ε]
    old = logps + (torch.randn(B, C, generator=g, dtype=DTYPE) * 0.3 if mu_gt_1 else 0.0)
    ref = logps + torch.randn(B, C, generator=g, dtype=DTYPE) * 0.2
    adv = torch.randn(B, generator=g, dtype=DTYPE)
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    lengths[0] = C
    mask = torch.arange(C)[None, :] < lengths[:, None]  # (B, C) right-padded completions
    return logps, old, ref, adv, mask


GRPO_CASES = [
    # (beta, mu_gt_1, epsilon_high)
    (0.0, False, None),  # μ = 1, no KL: TRL uses per_token_logps.detach() as old
    (0.04, False, None),  # μ = 1 with KL
    (0.0, True, None),  # μ > 1
    (0.04, True, 0.28),  # μ > 1, KL, clip-higher
]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,mu_gt_1,epsilon_high", GRPO_CASES)
def test_grpo_matches_trl(loss_type, beta, mu_gt_1, epsilon_high):
    logps, old, ref, adv, mask = _grpo_inputs(seed=7 + int(mu_gt_1) + int(100 * beta), mu_gt_1=mu_gt_1)
    max_len = 10
    num_items = mask.sum() + 13  # dapo: tokens of the whole accumulation window (other micro-batches too)
    extra = {"advantages": adv, "num_items_in_batch": num_items}
    if mu_gt_1:
        extra["old_per_token_logps"] = old
    if beta != 0.0:
        extra["ref_per_token_logps"] = ref

    trl_leaf = logps.clone().requires_grad_(True)
    trl_loss, metrics = _trl_grpo(
        trl_leaf, extra, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
        max_completion_length=max_len, mask=mask,
    )
    trl_loss.backward()

    ours_leaf = logps.clone().requires_grad_(True)
    loss, stats = grpo_loss(
        ours_leaf, old if mu_gt_1 else ours_leaf.detach(), adv, mask,
        ref_logps=ref if beta != 0.0 else None, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
        loss_type=loss_type, max_completion_length=max_len, num_items_in_batch=num_items,
    )
    loss.backward()

    err_loss = abs(loss.item() - trl_loss.item())
    err_grad = (ours_leaf.grad - trl_leaf.grad).abs().max().item()
    assert err_loss < 1e-6, err_loss
    assert err_grad < 1e-6, err_grad
    assert trl_leaf.grad.abs().max() > 0
    assert (ours_leaf.grad[~mask] == 0).all()
    for ours_key, trl_key in [
        ("clip_ratio/low", "clip_ratio/low_mean"),
        ("clip_ratio/high", "clip_ratio/high_mean"),
        ("clip_ratio/region", "clip_ratio/region_mean"),
    ]:
        assert abs(stats[ours_key].item() - metrics[trl_key][0]) < 1e-6
    if beta != 0.0:
        assert abs(stats["kl"].item() - metrics["kl"][0]) < 1e-6
    if mu_gt_1:  # make sure the clipping branch was exercised
        assert stats["clip_ratio/region"].item() > 0


def test_grpo_dapo_default_normalizer_is_local_token_count():
    logps, old, _, adv, mask = _grpo_inputs(seed=5)
    dapo, _ = grpo_loss(logps, old, adv, mask, loss_type="dapo")
    bnpo, _ = grpo_loss(logps, old, adv, mask, loss_type="bnpo")
    assert abs(dapo.item() - bnpo.item()) < 1e-12
    with pytest.raises(ValueError):
        grpo_loss(logps, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError):
        grpo_loss(logps, old, adv, mask, beta=0.1)


# ----------------------------------------------------------------------------------------------------------------------
# group_advantages against hand-computed numbers (TRL computes them inline in _generate_and_score_completions)
# ----------------------------------------------------------------------------------------------------------------------

REWARDS = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0, -1.0, 0.0, 1.0, 4.0]  # 3 prompts × 4 generations; group 2 constant


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_hand_computed(scale):
    G, eps = 4, 1e-4
    groups = [REWARDS[i : i + G] for i in range(0, len(REWARDS), G)]
    batch_std = statistics.stdev(REWARDS)  # unbiased, like TRL's nanstd
    hand = []
    for grp in groups:
        mu, sd = statistics.fmean(grp), statistics.stdev(grp)
        for r in grp:
            denom = {"group": sd + eps, "batch": batch_std + eps, "none": 1.0}[scale]
            hand.append((r - mu) / denom)
    adv, zero_std = group_advantages(torch.tensor(REWARDS, dtype=DTYPE), G, scale_rewards=scale, eps=eps)
    torch.testing.assert_close(adv, torch.tensor(hand, dtype=DTYPE), rtol=0, atol=1e-9)
    assert zero_std.tolist() == [False] * 4 + [True] * 4 + [False] * 4


def test_group_advantages_single_generation_is_zero():
    adv, zero_std = group_advantages(torch.tensor([1.0, 2.0]), 1)
    assert adv.tolist() == [0.0, 0.0] and zero_std.all()


# ----------------------------------------------------------------------------------------------------------------------
# lagrange_step
# ----------------------------------------------------------------------------------------------------------------------


def test_lagrange_step_direction_bound_and_positivity():
    lam_max, log_lam = 5.0, math.log(1.0)
    history = []
    for _ in range(200):  # cost above threshold: λ rises until the cap, never above it
        log_lam = lagrange_step(log_lam, cost_mean=2.0, threshold=0.0, lambda_lr=0.05, lambda_max=lam_max)
        history.append(math.exp(log_lam))
    assert all(b >= a for a, b in zip(history, history[1:])) and history[0] > 1.0
    assert max(history) <= lam_max + 1e-12 and abs(history[-1] - lam_max) < 1e-9
    for _ in range(500):  # cost below threshold: λ falls but stays > 0
        new = lagrange_step(log_lam, cost_mean=-3.0, threshold=0.0, lambda_lr=0.5, lambda_max=lam_max)
        assert new < log_lam
        log_lam = new
        assert math.exp(log_lam) > 0
    # tensors accepted, Python float returned
    out = lagrange_step(torch.tensor(0.0), torch.tensor(1.0), 0.5, 0.1, None)
    assert isinstance(out, float) and abs(out - 0.05) < 1e-12


def test_lagrange_step_equals_safe_rlhf_sgd_update():
    """safe-rlhf: SGD(lr=α) on loss -(J_C - d)·exp(log λ), then clamp at log λ_max."""
    log_lambda = torch.nn.Parameter(torch.tensor(math.log(0.7), dtype=DTYPE))
    opt = torch.optim.SGD([log_lambda], lr=0.3)
    ours = math.log(0.7)
    for cost in [1.0, 0.4, -0.2, 2.5, 3.0]:
        loss = -(torch.tensor(cost, dtype=DTYPE) - 0.5) * log_lambda.exp()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            log_lambda.clamp_(max=math.log(2.0))
        ours = lagrange_step(ours, cost, 0.5, 0.3, 2.0)
        assert abs(ours - log_lambda.item()) < 1e-12
