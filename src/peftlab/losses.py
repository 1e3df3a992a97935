"""Pure loss functions: tensors and floats in, tensors out.

No model calls and no config objects live here, so every function can be checked against hand-computed numbers
and against TRL's own code (see tests/test_losses.py). Shape letters used throughout:

    B  batch size (number of sequences, or number of preference pairs)
    T  sequence length of the logits/labels passed in
    V  vocabulary size
    C  completion length (GRPO: the per-token tensors cover completion positions only)

Log-probabilities are natural-log. Sequence log-probabilities are SUMS over completion tokens (the DPO paper's
log π(y|x)), never means.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "token_logprobs",
    "next_token_entropy",
    "chunked_token_logprobs",
    "auto_chunk_size",
    "sequence_logps",
    "packed_sequence_logps",
    "packed_sequence_sums",
    "sft_loss",
    "sft_loss_from_logps",
    "dpo_loss",
    "bradley_terry_loss",
    "cost_loss",
    "group_advantages",
    "grpo_loss",
    "lagrange_step",
]


# ----------------------------------------------------------------------------------------------------------------------
# Token-level log-probabilities and SFT
# ----------------------------------------------------------------------------------------------------------------------


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token under the model, with the causal shift applied.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``, so both outputs have length ``T - 1``: position ``t`` of the
    outputs holds ``log p(labels[:, t + 1] | tokens <= t)``. Slicing the last ``C`` positions of the outputs therefore
    gives the log-probs of the last ``C`` label tokens (the completion), exactly as ``labels[:, -C:]``.

    Args:
        logits: (B, T, V) raw scores from a causal LM (any float dtype).
        labels: (B, T) token ids; prompt and padding positions set to ``ignore_index``.
        ignore_index: label value that marks positions to skip.

    Returns:
        logps: (B, T-1) float32 (float64 if the logits are float64); 0 where masked.
        mask:  (B, T-1) bool, ``labels[:, 1:] != ignore_index``.

    Memory: float32/float64 logits use gather − logsumexp (no log-softmax copy of the full tensor is kept);
    half-precision logits are upcast to float32 one sequence at a time, so the peak extra memory is one (T, V)
    float32 slab rather than a full (B, T, V) copy. No one-hot is ever built.
    """
    logits = logits[:, :-1, :]  # (B, T-1, V)
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != ignore_index  # (B, T-1)
    safe_labels = labels.masked_fill(~mask, 0).unsqueeze(-1)  # (B, T-1, 1) any valid id; masked out below

    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, safe_labels).squeeze(-1)  # (B, T-1)
        logps = picked - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    else:
        rows = []
        for row_logits, row_labels in zip(logits, safe_labels):  # (T-1, V), (T-1, 1)
            row_logps = torch.log_softmax(row_logits.float(), dim=-1)  # (T-1, V)
            rows.append(torch.gather(row_logps, -1, row_labels).squeeze(-1))  # (T-1,)
        logps = torch.stack(rows)  # (B, T-1)

    logps = torch.where(mask, logps, torch.zeros_like(logps))  # (B, T-1)
    return logps, mask


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution: H = logsumexp(z) − Σ_v softmax(z)_v · z_v (the same as
    −Σ p log p, without a log-softmax copy).

    Args:
        logits: (..., V) scores, already divided by any sampling temperature (any float dtype).

    Returns:
        (...) float32 (float64 for float64 logits), with no gradient.
    """
    with torch.no_grad():
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def _selected_logsoftmax_and_gradient(
    scores: torch.Tensor, targets: torch.Tensor, with_entropy: bool, with_gradient: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log softmax(z)[y] of each row, and optionally its entropy and its gradient onehot(y) − softmax(z).

    Args:
        scores: (n, V) float32/float64 temperature-scaled logits z, no gradient. When the gradient is asked for
            without the entropy it is formed IN PLACE in this buffer (so one (n, V) slab serves both).
        targets: (n,) label ids.

    Returns:
        logps (n,), entropy (n,) or None, gradient (n, V) or None.
    """
    log_normalizer = torch.logsumexp(scores, dim=-1, keepdim=True)  # (n, 1)
    logps = (torch.gather(scores, -1, targets.unsqueeze(-1)) - log_normalizer).squeeze(-1)  # (n,)
    if not (with_entropy or with_gradient):
        return logps, None, None
    if with_entropy:
        # softmax normalizes by the sum itself: exp(z − lse) would carry lse's rounding into Σ p z
        probs = torch.softmax(scores, dim=-1)  # (n, V)
        expected_score = (probs * scores).sum(dim=-1)  # (n,) Σ_v p_v z_v
        entropy = log_normalizer.squeeze(-1) - expected_score  # (n,)
    else:
        probs, entropy = scores.sub_(log_normalizer).exp_(), None  # (n, V), in place
    gradient = None
    if with_gradient:
        gradient = probs.neg_().scatter_add_(-1, targets.unsqueeze(-1), torch.ones_like(logps).unsqueeze(-1))
    return logps, entropy, gradient


def _scores_of(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, V) head output → float32 (float64 kept) logits divided by the temperature, without gradient."""
    scores = logits.detach()
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    return scores / temperature if temperature != 1.0 else scores


class _SelectedLogSoftmax(torch.autograd.Function):
    """log_softmax(z)[y] per row, whose backward forms its (n, V) gradient g·(onehot(y) − softmax(z)) in one buffer
    (autograd's gather − logsumexp backward makes several: the exp's operands, the gather's zero-filled scatter,
    their sum). Under a checkpoint the saved ``z`` is the recomputed chunk."""

    @staticmethod
    def forward(ctx, scores, targets):  # (n, V), (n,) → (n,)
        logps, _, _ = _selected_logsoftmax_and_gradient(scores, targets, with_entropy=False, with_gradient=False)
        ctx.save_for_backward(scores, targets)
        return logps

    @staticmethod
    def backward(ctx, grad_output):  # (n,) → (n, V)
        scores, targets = ctx.saved_tensors
        _, _, gradient = _selected_logsoftmax_and_gradient(scores.clone(), targets, False, True)  # (n, V)
        return gradient.mul_(grad_output.unsqueeze(-1)), None


def _recomputed_chunk(head, rows, targets, temperature: float, with_entropy: bool):
    """One chunk of the trainable-head strategy (run under a checkpoint): rows (n, H) → logps (n,), entropy or None.

    The log-probs come first and the entropy last, so that the checkpoint's recomputation, which stops once every
    tensor saved for backward is back, never redoes the entropy.
    """
    logits = head(rows)  # (n, V)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logps = _SelectedLogSoftmax.apply(logits, targets)  # (n,)
    entropy = None
    if with_entropy:
        _, entropy, _ = _selected_logsoftmax_and_gradient(logits.detach(), targets, True, False)
    return logps, entropy


class _FrozenHeadLogProbs(torch.autograd.Function):
    """The frozen-head strategy: label log-probs of rows (N, H) through a head with no trainable parameter, whose
    gradient w.r.t. the rows is computed chunk by chunk IN THE FORWARD.

    Each logits row depends on its own hidden row only, and d logp_i / d z_i = onehot(y_i) − softmax(z_i) is known
    once z_i is, so the vector-Jacobian product u_i = J_head(h_i)ᵀ (onehot − softmax)/τ can be taken right away
    (autograd through the head: LoRA-wrapped or quantized heads work) and the (n, V) logits freed. Backward is then
    g_i · u_i: no recomputation, and (N, H) kept, the size of the rows themselves (Liger's fused linear
    cross-entropy does the same for a mean loss; here any per-token upstream gradient g works).
    """

    @staticmethod
    def forward(ctx, rows, head, targets, chunk_size: int, temperature: float, with_entropy: bool):
        logps, entropies, row_gradients = [], [], []
        for start in range(0, max(len(rows), 1), chunk_size):
            chunk_rows = rows[start:start + chunk_size].detach().requires_grad_()  # (n, H)
            with torch.enable_grad():
                logits = head(chunk_rows)  # (n, V)
            chunk_logps, entropy, gradient = _selected_logsoftmax_and_gradient(
                _scores_of(logits, temperature), targets[start:start + chunk_size], with_entropy, True)
            if temperature != 1.0:
                gradient.div_(temperature)  # d z / d logits = 1/τ
            (row_gradient,) = torch.autograd.grad(logits, chunk_rows, gradient.to(logits.dtype))  # (n, H)
            del logits, gradient
            logps.append(chunk_logps)
            entropies.append(entropy)
            row_gradients.append(row_gradient)
        ctx.save_for_backward(torch.cat(row_gradients))
        entropy = torch.cat(entropies) if with_entropy else torch.zeros(0, device=rows.device)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(logps), entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):  # (N,) → (N, H)
        (row_gradients,) = ctx.saved_tensors
        return grad_logps.unsqueeze(-1).to(row_gradients.dtype) * row_gradients, None, None, None, None, None


def _has_trainable_parameters(head) -> bool:
    """A head that is not a module may close over parameters: count it as trainable (the always-exact strategy)."""
    if not isinstance(head, torch.nn.Module):
        return True
    return any(p.requires_grad for p in head.parameters())


def chunked_token_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`token_logprobs(head(hidden) / temperature, labels)` without ever holding the (B, T, V) logits.

    Only the N positions whose next label is not ``ignore_index`` are projected through the head (prompt and padding
    positions get no logits at all), ``chunk_size`` of them at a time, so that one chunk's (chunk_size, V) float32
    logits and one buffer of their size are all that is alive of the logits at any time, in forward and backward.
    Gradients reach ``hidden`` and every trainable parameter of the head, by one of two strategies:

    * frozen head (a module with no parameter that requires grad: LoRA/DoRA/QLoRA leave the head, tied or not,
      frozen): the gradient w.r.t. each chunk's rows is taken in the forward, right after its logits
      (`_FrozenHeadLogProbs`); backward only scales it by the upstream gradient. Two head projections per chunk,
      as the plain path's forward and backward make.
    * trainable head (full fine-tuning, tied embeddings that train, a LoRA-wrapped or saved ``lm_head``): each chunk
      runs under a non-reentrant ``torch.utils.checkpoint``, keeping only its rows and outputs; backward recomputes
      its logits and differentiates them (`_SelectedLogSoftmax`). One more head projection per chunk.

    Without gradients the chunks are simply evaluated one after the other.

    This is the token-dimension chunking of Liger's fused linear cross-entropy. Unlike Liger and TRL's fused LM
    head, which read ``lm_head.weight`` directly, the head here is called as a module, so a LoRA/DoRA-wrapped or
    trainable head and tied embeddings get their gradients by autograd, and per-token outputs (DPO sums, GRPO
    ratios) take any upstream gradient, not only a mean's. Not twice differentiable.

    Args:
        hidden: (B, T, H) the head's input: the final hidden states, after the model's final norm.
        head: a module (or callable) mapping (n, H) → (n, V) scores row by row, e.g. the model's ``lm_head``.
        labels: (B, T) token ids, ``ignore_index`` on prompt and padding positions; ``hidden[:, t]`` scores
            ``labels[:, t + 1]``, as in `token_logprobs`.
        chunk_size: positions per chunk (≥ 1); need not divide N.
        temperature: the scores are divided by it before the softmax (GRPO's sampling temperature).
        with_entropy: also return the entropy of each scored next-token distribution.
        ignore_index: label value that marks positions to skip.

    Returns:
        logps: (B, T-1) float32 (float64 for a float64 head), log p(labels[:, t+1] | tokens ≤ t); 0 where masked.
        mask: (B, T-1) bool, ``labels[:, 1:] != ignore_index``.
        entropy: (B, T-1) float32, detached, ``next_token_entropy`` of the temperature-scaled scores; 0 where
            masked. None unless ``with_entropy``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != ignore_index  # (B, T-1)
    rows = hidden[:, :-1][mask]  # (N, H)
    picked = targets[mask]  # (N,)
    trainable_head = _has_trainable_parameters(head)

    if torch.is_grad_enabled() and rows.requires_grad and not trainable_head:
        selected_logps, selected_entropy = _FrozenHeadLogProbs.apply(rows, head, picked, chunk_size, temperature,
                                                                     with_entropy)  # (N,), (N,) or (0,)
    else:
        recompute = torch.is_grad_enabled() and (rows.requires_grad or trainable_head)
        logps_parts, entropy_parts = [], []
        # an empty batch still runs one (empty) chunk: the outputs stay connected to `hidden` and to the head's
        # parameters, so backward (and DDP's gradient hooks) reaches every parameter as usual
        for start in range(0, max(len(rows), 1), chunk_size):
            chunk = (head, rows[start:start + chunk_size], picked[start:start + chunk_size], temperature, with_entropy)
            if recompute:
                chunk_logps, chunk_entropy = checkpoint(_recomputed_chunk, *chunk, use_reentrant=False)
            else:
                chunk_logps, chunk_entropy = _recomputed_chunk(*chunk)
            logps_parts.append(chunk_logps)
            entropy_parts.append(chunk_entropy)
        selected_logps = torch.cat(logps_parts)  # (N,)
        selected_entropy = torch.cat(entropy_parts) if with_entropy else None  # (N,)

    logps = selected_logps.new_zeros(mask.shape).masked_scatter(mask, selected_logps)  # (B, T-1)
    entropy = None
    if with_entropy:
        entropy = selected_entropy.new_zeros(mask.shape).masked_scatter(mask, selected_entropy.detach())  # (B, T-1)
    return logps, mask, entropy


# One logits slab of at most 64 MiB: at a 152k vocabulary, chunks of ~110 positions. The slab only has to be small
# next to one decoder layer's recomputed activations (the step's peak is in the backward, not in the head); a
# larger one raises that peak, and more, smaller chunks cost little (each is still a matmul of ~110 × H × V).
DEFAULT_LOGITS_BUDGET_BYTES = 64 * 2**20


def auto_chunk_size(vocab_size: int, num_positions: int, budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES) -> int | None:
    """The chunk size for `chunked_token_logprobs`, or None where the plain full-logits path should be used.

    The rule, in float32 logits rows of ``4 · vocab_size`` bytes:

    * None when all ``num_positions`` rows fit in ``budget_bytes`` (num_positions · 4 · V ≤ budget): small
      vocabularies and short batches keep the one-matmul plain path and its speed;
    * otherwise the fewest chunks of at most ``budget_bytes // (4 · V)`` rows (at least 1), balanced so that they
      differ in size by at most one row.

    The budget bounds one logits slab. The plain path holds several copies of its slab at its peak (logits, the
    log-softmax's temporaries, their gradient); the chunked path about two (a chunk and its gradient).
    Pass the number of positions the plain path would project (B · T, or B · logits_to_keep); the chunked path
    projects only the labelled ones, so its chunks are at most this size.

    Args:
        vocab_size: V, the head's output width.
        num_positions: positions whose logits the plain path would hold.
        budget_bytes: the most bytes one logits slab may take.

    Returns:
        None, or a chunk size ≥ 1.
    """
    row_bytes = 4 * vocab_size
    if num_positions * row_bytes <= budget_bytes:
        return None
    max_rows = max(1, budget_bytes // row_bytes)
    num_chunks = -(-num_positions // max_rows)
    return -(-num_positions // num_chunks)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed log-probability of the label tokens of each sequence: log π(y|x) = Σ_t log π(y_t | x, y_<t).

    This is the quantity the DPO loss is written in (Rafailov et al. 2023, Eq. 7): a SUM over completion tokens,
    not a mean.

    Args:
        logits: (B, T, V).
        labels: (B, T), prompt/padding = ``ignore_index``.

    Returns:
        (B,) float32 (float64 for float64 logits).
    """
    logps, _ = token_logprobs(logits, labels, ignore_index)  # (B, T-1)
    return logps.sum(dim=-1)  # (B,)


def packed_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """Summed label log-probs of each sequence of a packed row (the packed form of `sequence_logps`).

    Args:
        logits: (1, T, V) of a row of S sequences back to back.
        labels: (1, T), IGNORE on prompts, padding and each sequence's first token (never predicted across).
        cu_seq_lens: (S + 1,) start offsets of the sequences, then T.

    Returns:
        (S,) float32.
    """
    token_logps, _ = token_logprobs(logits, labels)  # (1, T-1): position t scores label t + 1
    return packed_sequence_sums(token_logps, cu_seq_lens)  # (S,)


def packed_sequence_sums(token_logps: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of a packed row's per-token log-probs (`packed_sequence_logps` after the head).

    Args:
        token_logps: (1, T-1) as `token_logprobs` or `chunked_token_logprobs` return them: position t scores
            label t + 1, 0 where masked.
        cu_seq_lens: (S + 1,) start offsets of the sequences, then T.

    Returns:
        (S,) same dtype as ``token_logps``.
    """
    lengths = cu_seq_lens.diff().long()  # (S,)
    sequence_of = torch.repeat_interleave(torch.arange(len(lengths), device=token_logps.device), lengths)  # (T,)
    sums = torch.zeros(len(lengths), dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, sequence_of[1:], token_logps[0])  # (S,)


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy averaged over all label tokens of the batch (maximum likelihood).

    L = -(1/N) Σ_{b,t: label} log π(y_{b,t} | y_{b,<t}), N = number of label tokens after the shift. Equal to
    ``F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=ignore_index)``.

    Args:
        logits: (B, T, V).
        labels: (B, T), prompt/padding = ``ignore_index``.

    Returns:
        loss: () float32 scalar; 0.0 (with a gradient path) when the batch has no label token.
        num_tokens: () int64, N — for token-weighted averaging across micro-batches or ranks.
    """
    logps, mask = token_logprobs(logits, labels, ignore_index)  # (B, T-1), (B, T-1)
    return sft_loss_from_logps(logps, mask)


def sft_loss_from_logps(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sft_loss` from per-token log-probs (e.g. those of `chunked_token_logprobs`): −Σ logps / N.

    Args:
        logps: (B, T-1) label log-probs, 0 where masked.
        mask: (B, T-1) bool, the label positions.

    Returns:
        loss: () scalar; 0.0 (with a gradient path) when the mask is empty.
        num_tokens: () int64, N.
    """
    num_tokens = mask.sum()  # ()
    loss = -logps.sum() / num_tokens.clamp(min=1)  # ()
    return loss, num_tokens


# ----------------------------------------------------------------------------------------------------------------------
# Preference losses
# ----------------------------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    margin: torch.Tensor | None = None,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss per preference pair.

    With the log-ratio difference

        h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]

    the loss types are

    * ``sigmoid`` — DPO, Rafailov et al. 2023, Eq. 7: ``-log σ(βh)``. With ``label_smoothing = ε > 0`` this is
      conservative DPO (cDPO, Mitchell 2023), the expected DPO loss when each label is flipped with probability ε:
      ``-(1-ε) log σ(βh) − ε log σ(−βh)``. (TRL 1.16's ``sigmoid`` ignores ``label_smoothing``; its ``aot`` loss
      with one pair per batch is this cDPO form — that is what the tests compare against.)
    * ``ipo`` — IPO, Azar et al. 2023, Eq. 17: ``(h − 1/(2β))²``, β playing the role of τ. TRL 1.16 divides each
      log-ratio by its completion's token count (a per-token average, confirmed by the IPO authors according to
      TRL's comments). Pass ``chosen_lengths``/``rejected_lengths`` to get exactly TRL's form:
      ``h = (c_w − c_w^ref)/|y_w| − (c_l − c_l^ref)/|y_l|``; leave them None for the unnormalized Eq. 17.
    * ``hinge`` — SLiC-style hinge (Zhao et al. 2023, Eq. 4 with the DPO log-ratio): ``relu(1 − βh)``.

    ``margin`` (SafeDPO, Kim et al. 2025): a per-pair offset Δ ≥ 0 subtracted from the SCALED logit, i.e.
    z = βh − Δ, so that ``sigmoid`` gives ``-log σ(βh − Δ)`` (cDPO: ``-(1-ε) log σ(z) − ε log σ(−z)``) and
    ``hinge`` gives ``relu(1 − (βh − Δ))``. Δ is in reward units (it is not multiplied by β). Not defined for
    ``ipo`` (raises).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed completion log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference (no gradient needed).
        beta: float, or (B,) tensor for a per-pair β (e.g. reward-scaled β).
        loss_type: "sigmoid" | "ipo" | "hinge".
        label_smoothing: ε in [0, 0.5); sigmoid only.
        margin: None or (B,) SafeDPO margin Δ; sigmoid and hinge only.
        chosen_lengths, rejected_lengths: (B,) completion token counts; IPO only (TRL normalization), clamped ≥ 1.

    Returns:
        losses: (B,) per-pair loss (take ``.mean()`` for the batch loss, as TRL does).
        chosen_rewards: (B,) detached implicit rewards β(log π(y_w) − log π_ref(y_w)) (unnormalized, as in TRL).
        rejected_rewards: (B,) detached, the same for y_l.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if loss_type != "sigmoid" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing is only defined for loss_type='sigmoid', got loss_type={loss_type!r}")
    if loss_type != "ipo" and (chosen_lengths is not None or rejected_lengths is not None):
        raise ValueError("chosen_lengths/rejected_lengths are only used by loss_type='ipo'")

    if loss_type == "sigmoid":
        logits = beta * (chosen_logratios - rejected_logratios)  # (B,)  βh
        if margin is not None:
            logits = logits - margin  # (B,)  βh − Δ
        losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)  # (B,)
        if label_smoothing > 0.0:
            losses = losses - label_smoothing * F.logsigmoid(-logits)  # (B,)
    elif loss_type == "hinge":
        logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
        if margin is not None:
            logits = logits - margin  # (B,)
        losses = torch.relu(1.0 - logits)  # (B,)
    elif loss_type == "ipo":
        if margin is not None:
            raise ValueError("margin is not defined for loss_type='ipo'")
        chosen_h, rejected_h = chosen_logratios, rejected_logratios  # (B,), (B,)
        if chosen_lengths is not None or rejected_lengths is not None:
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
            chosen_h = chosen_h / chosen_lengths.to(chosen_h.dtype).clamp(min=1.0)  # (B,)
            rejected_h = rejected_h / rejected_lengths.to(rejected_h.dtype).clamp(min=1.0)  # (B,)
        losses = (chosen_h - rejected_h - 1.0 / (2.0 * beta)) ** 2  # (B,)
    else:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; expected 'sigmoid', 'ipo' or 'hinge'")

    chosen_rewards = (beta * chosen_logratios).detach()  # (B,)
    rejected_rewards = (beta * rejected_logratios).detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The RPO term (the DPO+NLL loss of Pang et al. 2024, "Iterative Reasoning Preference Optimization"): the
    negative log-likelihood of the chosen answers, averaged over all their tokens in the batch (TRL's ``rpo_alpha``
    term: cross-entropy on the chosen half). Added as ``dpo + α·nll`` it keeps DPO from lowering the chosen answers'
    own likelihood while it widens the margin.

    Args:
        policy_chosen_logps: (B,) summed completion log-probs of the chosen answers.
        chosen_lengths: (B,) their completion token counts.

    Returns:
        scalar: −Σ_b log π(y_w|x) / Σ_b |y_w|.
    """
    return -policy_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1).to(policy_chosen_logps.dtype)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Pairwise reward-model loss: ``-mean log σ(r(x, y_c) − r(x, y_r))``.

    Bradley–Terry preference model as used for InstructGPT's reward model (Ouyang et al. 2022, Eq. 1, with K = 2).

    Args:
        chosen_scores: (B,) scalar rewards of the preferred answers.
        rejected_scores: (B,) scalar rewards of the other answers.

    Returns:
        () scalar.
    """
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()  # ()


def cost_loss(
    costs_0: torch.Tensor,
    costs_1: torch.Tensor,
    safer_id: torch.Tensor,
    is_0_safe: torch.Tensor,
    is_1_safe: torch.Tensor,
) -> torch.Tensor:
    """Safe RLHF cost-model loss (Dai et al. 2023, Eq. 6), sequence-wise form of safe-rlhf's ``CostModelTrainer.loss``.

    The less safe answer must get the higher cost (a Bradley–Terry term), and the sign of each cost must say
    whether the answer is safe (cost < 0) or unsafe (cost > 0)::

        L = mean_b [ −log σ(c_u − c_s) − log σ(s_s · c_s) − log σ(s_u · c_u) ]

    with c_s, c_u the costs of the safer / less safe answer and the cost sign s = −1 for a safe answer, +1 for an
    unsafe one (safe-rlhf: ``lower_cost_sign = -safer_safety_sign``). All three terms share one mean over the batch,
    as in safe-rlhf's ``loss_type='sequence-wise'`` (PKU-Alignment/safe-rlhf, safe_rlhf/values/cost/trainer.py).
    safe-rlhf's optional ``regularization`` term (an L2 penalty on the costs) is not part of this function.

    Args:
        costs_0, costs_1: (B,) end-of-sequence costs of answer 0 and answer 1 (PKU-SafeRLHF ``response_0/1``).
        safer_id: (B,) long in {0, 1}, index of the safer answer (PKU-SafeRLHF ``safer_response_id``).
        is_0_safe, is_1_safe: (B,) bool, PKU-SafeRLHF ``is_response_0_safe`` / ``is_response_1_safe``.

    Returns:
        () scalar.
    """
    zero_is_safer = safer_id == 0  # (B,) bool
    lower_cost = torch.where(zero_is_safer, costs_0, costs_1)  # (B,) cost of the safer answer
    higher_cost = torch.where(zero_is_safer, costs_1, costs_0)  # (B,) cost of the less safe answer
    lower_safe = torch.where(zero_is_safer, is_0_safe, is_1_safe)  # (B,) bool
    higher_safe = torch.where(zero_is_safer, is_1_safe, is_0_safe)  # (B,) bool
    # cost sign: -1 for a safe answer (push its cost below 0), +1 for an unsafe one (push it above 0)
    lower_sign = 1.0 - 2.0 * lower_safe.to(lower_cost.dtype)  # (B,)
    higher_sign = 1.0 - 2.0 * higher_safe.to(higher_cost.dtype)  # (B,)
    losses = (
        -F.logsigmoid(higher_cost - lower_cost)
        - F.logsigmoid(lower_sign * lower_cost)
        - F.logsigmoid(higher_sign * higher_cost)
    )  # (B,)
    return losses.mean()  # ()


# ----------------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision).

    ``rewards`` holds ``num_generations`` consecutive completions per prompt (TRL's layout). With μ_g and σ_g the
    mean and unbiased (Bessel) std of the group of each completion, and σ_B the unbiased std of the whole batch:

    * ``"group"``: A = (r − μ_g) / (σ_g + eps)   (the paper; TRL 1.16's default)
    * ``"batch"``: A = (r − μ_g) / (σ_B + eps)   (group-centred, batch-scaled; Hu et al. 2025 REINFORCE++ style)
    * ``"none"``:  A = r − μ_g                    (Dr. GRPO, Liu et al. 2025: no std scaling)

    This matches TRL 1.16 ``GRPOTrainer._generate_and_score_completions`` (``multi_objective_aggregation=
    "sum_then_normalize"``), including eps = 1e-4 added to the std and σ = 0 when a group has one completion.
    Note: compute this over the FULL generation batch (all ranks gathered), as TRL does, before slicing.

    Args:
        rewards: (B,) float, B a multiple of ``num_generations``.
        num_generations: G, completions per prompt.
        scale_rewards: "group" | "batch" | "none".
        eps: added to the std before dividing.

    Returns:
        advantages: (B,) same dtype as ``rewards``.
        zero_std_mask: (B,) bool, True where the completion's GROUP has (numerically) zero reward std, i.e. the
            group carries no learning signal. Always per group, in every mode (TRL's "frac_reward_zero_std"
            metric uses the batch std in "batch" mode instead).
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(f"rewards must be (B,) with B a multiple of num_generations={num_generations}")
    grouped = rewards.view(-1, num_generations)  # (B/G, G)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)  # (B,)
    if num_generations > 1:
        group_std = grouped.std(dim=1).repeat_interleave(num_generations)  # (B,) unbiased
    else:
        group_std = torch.zeros_like(rewards)  # (B,)

    if scale_rewards == "group":
        std = group_std  # (B,)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)  # (B,)
    elif scale_rewards == "none":
        std = None
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")

    advantages = rewards - mean  # (B,)
    if std is not None:
        advantages = advantages / (std + eps)  # (B,)
    zero_std_mask = torch.isclose(group_std, torch.zeros_like(group_std))  # (B,) bool
    return advantages, zero_std_mask


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when the mask is empty). x, mask: (B, C) → ()."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped surrogate with a k3 KL penalty, aggregated as in TRL 1.16 ``GRPOTrainer._compute_loss``.

    Per completion token (Shao et al. 2024, DeepSeekMath Eq. 3; PPO clipping, Schulman et al. 2017 Eq. 7)::

        ρ_t   = exp(log π_θ − log π_old)
        ℓ_t   = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β · KL_t
        KL_t  = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1     (k3 estimator, DeepSeekMath Eq. 4)

    ε_high > ε_low is DAPO's clip-higher (Yu et al. 2025). With one gradient step per generation batch
    (μ = 1), pass ``old_logps = logps.detach()``: ρ = 1 in value but its gradient is ∇log π_θ (TRL does exactly this).
    With μ > 1, ``old_logps`` are the log-probs recorded when the completions were generated.

    Aggregation (``loss_type``), with M the completion mask:

    * ``grpo``: per-sequence mean Σ_t ℓ M / max(Σ_t M, 1), then mean over sequences (DeepSeekMath Eq. 3).
    * ``bnpo``: Σ ℓ M / max(Σ M, 1) over the local batch.
    * ``dr_grpo``: Σ ℓ M / (B · max_completion_length)  (Dr. GRPO, Liu et al. 2025); needs ``max_completion_length``.
    * ``dapo``: Σ ℓ M / max(num_items_in_batch, 1) (DAPO, Yu et al. 2025, Eq. 8: token-level mean over the whole
      generation batch). TRL's ``num_items_in_batch`` counts the completion tokens of the generation batch gathered
      over all ranks and normalizes by ``num_items_in_batch / num_processes * grad_accum / steps_per_generation``:
      pass that per-rank count of the tokens in the whole accumulation window so the micro-batch losses SUM to the
      token mean. None uses the local ``Σ M`` (then dapo equals bnpo).

    TRL divides grpo/bnpo/dr_grpo (but not dapo) by the number of gradient-accumulation steps; that scaling is the
    training loop's job and is not done here.

    Args:
        logps: (B, C) log π_θ of the completion tokens (with grad).
        old_logps: (B, C) log π_old (no grad).
        advantages: (B,) per-completion advantages (see ``group_advantages``).
        mask: (B, C) completion mask (bool or 0/1).
        ref_logps: (B, C) log π_ref, required when ``beta != 0``.
        beta: KL coefficient β.
        epsilon: lower clip ε_low.
        epsilon_high: upper clip ε_high (None: = epsilon).
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo".
        max_completion_length: dr_grpo's constant normalizer.
        num_items_in_batch: dapo's normalizer (see above).

    Returns:
        loss: () scalar.
        stats: detached () tensors: ``kl`` (masked token mean of KL_t; only when ``ref_logps`` is given),
            ``clip_ratio/low`` (fraction of tokens with ρ < 1−ε_low and A < 0), ``clip_ratio/high`` (ρ > 1+ε_high and
            A > 0), ``clip_ratio/region`` (either), ``ratio_mean`` (masked mean ρ), ``num_tokens`` (Σ M).
    """
    if epsilon_high is None:
        epsilon_high = epsilon
    mask = mask.to(logps.dtype)  # (B, C)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1)

    ratio = torch.exp(logps - old_logps)  # (B, C)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)  # (B, C)
    per_token_loss = -torch.min(ratio * adv, clipped_ratio * adv)  # (B, C)

    per_token_kl = None
    if ref_logps is not None:
        diff = ref_logps - logps  # (B, C)
        per_token_kl = torch.exp(diff) - diff - 1.0  # (B, C)  k3, ≥ 0
    if beta != 0.0:
        if per_token_kl is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logps")
        per_token_loss = per_token_loss + beta * per_token_kl  # (B, C)

    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()  # ()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # ()
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("grpo_loss: loss_type='dr_grpo' needs max_completion_length")
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)  # ()
    elif loss_type == "dapo":
        if num_items_in_batch is None:
            normalizer = mask.sum()
        else:
            normalizer = torch.as_tensor(num_items_in_batch, dtype=logps.dtype, device=logps.device)
        loss = (per_token_loss * mask).sum() / normalizer.clamp(min=1.0)  # ()
    else:
        raise ValueError(f"Unknown GRPO loss_type {loss_type!r}; expected 'grpo', 'bnpo', 'dr_grpo' or 'dapo'")

    with torch.no_grad():
        is_low = ((ratio < 1.0 - epsilon) & (adv < 0)).to(mask.dtype)  # (B, C)
        is_high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).to(mask.dtype)  # (B, C)
        stats = {
            "clip_ratio/low": _masked_mean(is_low, mask),
            "clip_ratio/high": _masked_mean(is_high, mask),
            "clip_ratio/region": _masked_mean(torch.maximum(is_low, is_high), mask),
            "ratio_mean": _masked_mean(ratio.detach(), mask),
            "num_tokens": mask.sum(),
        }
        if per_token_kl is not None:
            stats["kl"] = _masked_mean(per_token_kl.detach(), mask)
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------------
# Lagrange multiplier (Safe RLHF)
# ----------------------------------------------------------------------------------------------------------------------


def lagrange_step(
    log_lambda: float | torch.Tensor,
    cost_mean: float | torch.Tensor,
    threshold: float,
    lambda_lr: float,
    lambda_max: float | None,
) -> float:
    """One projected dual-ascent step on the Lagrange multiplier, kept in log space so that λ > 0.

    Safe RLHF (Dai et al. 2023, Eq. 10 and Algorithm 1) maximizes the Lagrangian over λ ≥ 0. safe-rlhf
    (safe_rlhf/algorithms/ppo_lag/trainer.py) stores log λ, minimizes ``−(J_C − d)·exp(log λ)`` with plain SGD of
    learning rate α and clamps at log λ_max; one such step is exactly::

        log λ ← min(log λ + α · λ · (J_C − d), log λ_max)

    so λ grows while the expected cost J_C exceeds the threshold d and shrinks otherwise.

    Args:
        log_lambda: current log λ (Python float or 0-dim tensor; a tensor is read with ``float()``).
        cost_mean: J_C, the (windowed) mean episode cost (float or 0-dim tensor).
        threshold: d.
        lambda_lr: α.
        lambda_max: upper bound on λ; None for no bound (as in safe-rlhf).

    Returns:
        The new log λ as a Python float (store it, checkpoint it, log ``math.exp`` of it).
    """
    log_lambda = float(log_lambda)
    new_log_lambda = log_lambda + lambda_lr * math.exp(log_lambda) * (float(cost_mean) - threshold)
    if lambda_max is not None:
        new_log_lambda = min(new_log_lambda, math.log(lambda_max))
    return new_log_lambda
