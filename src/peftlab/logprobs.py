"""Log-probabilities of batches under the model: the one place a training or scoring forward happens.

`token_logps(model, batch)`: per-token label log-probs of a padded batch or a packed row, with the LM head plain or
in chunks of positions (never the full tokens × vocabulary logits); `completion_logps` / `sequence_logps`: the
same for sampled completions (`peftlab.sampling.Samples`), as GRPO's loss and safe_dpo's KL read them.

Padding-free packing shared by SFT and DPO: a micro-batch is ONE row of sequences back to back
(`peftlab.data.format.collate_packed`), and attention must stay within each sequence.

Under sdpa, transformers' own packed path builds a (T, T) block-diagonal mask and attends over the whole row; here
each sequence's attention is its own causal sdpa call instead (`packed_sdpa`), and no row-sized mask is built.
"""

from __future__ import annotations

import torch

from peftlab.data.format import IGNORE
from peftlab.sampling import unwrap

PACKED_SDPA = "sdpa_packed"  # the attention implementation name `enable_packed_sdpa` registers


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, except for a packed row (`cu_seq_lens_q` given): one causal sdpa per sequence.

    A packed row's block-diagonal mask would make sdpa compute (and mask away) attention between every pair of
    sequences, T² instead of Σ L_i²; slicing runs the unmasked causal kernel on each sequence alone.

    query (1, H, T, D), key/value (1, H_kv, T, D) → (1, T, H, D), as sdpa_attention_forward returns.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = starts.tolist()
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                               scaling=scaling, is_causal=True)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=1), None


def packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """sdpa's mask for a batch with a 2-D attention mask (padding); none without one.

    A packed row (no 2-D mask) would otherwise get a (T, T) block-diagonal mask that `packed_sdpa` never reads:
    gigabytes for a long row. Without padding and without packing, no mask is what sdpa uses anyway (is_causal).
    """
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def enable_packed_sdpa(model) -> None:
    """Switch a model that uses sdpa to `packed_sdpa` (identical on ordinary batches). flash_attention_2 handles
    packed rows natively and eager through its mask, so they stay as they are.

    After the switch, a packed row must come with its `cu_seq_lens_q` (as `lm_logits` passes them): position ids
    alone no longer keep the sequences apart.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation == "sdpa":
        base.set_attn_implementation(PACKED_SDPA)


def lm_logits(model, batch: dict) -> torch.Tensor:
    """(B, L, V) logits of a padded batch, or (1, T, V) of a packed row (`collate_packed`): the full logits that
    `token_logps` avoids (tests compare against them)."""
    return model(**model_inputs(batch)).logits


def token_logps(
    model,
    batch: dict,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | str | None = None,
    logits_to_keep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token label log-probs of a batch under ``model``: one forward, then the LM head, plain or chunked.

    The batch is a padded one (input_ids, attention_mask, and position_ids where given, e.g. GRPO's left-padded
    rollouts) or a packed row (`collate_packed`: position_ids and cu_seq_lens/max_length, no attention mask).
    ``model`` is what the loop holds: a transformers causal LM, a PeftModel (LoRA, DoRA, 4-bit QLoRA), or either
    one wrapped by DDP or a DeepSpeed engine.

    ``chunk_size=None`` is today's path: the model's own logits (B, T, V), then `losses.token_logprobs`.
    An int (or ``"auto"``: `losses.auto_chunk_size` of the positions the plain path would project, None where
    those logits are small) runs the model WITHOUT its full logits and projects only the labelled positions,
    chunk by chunk (`losses.chunked_token_logprobs`). How the forward avoids the logits: a forward pre-hook on the
    unwrapped model's output embeddings (the ``lm_head`` module the model itself calls) keeps the head's input and
    hands the head an empty (B, 0, H) slice instead, so the model returns (B, 0, V) logits. Why this way:

    * the forward still goes through the wrapper's ``__call__`` (DDP's gradient-sync set-up, a DeepSpeed engine,
      accelerate's autocast, PEFT's adapter switching), never into an inner submodule;
    * the head's input is by definition what the model feeds its head (after the final norm, after
      ``logits_to_keep``), whatever the architecture; ``output_hidden_states`` would also keep every layer's
      states in no-grad forwards and depends on the model tying its last entry to the normed output;
    * the head still runs inside the forward (on zero rows), so its parameters stay in the graph of the model's
      outputs: DDP's unused-parameter search finds them, and the chunks then call the same module (so ZeRO-3's
      gather hooks on it fire and a LoRA-wrapped, trainable or tied head gets its gradient by autograd).

    The chunks run under the autocast state the model's forward ran under, as the head would have. Refused on the
    chunked path: models whose forward transforms the logits after the head (final-logit soft-capping, logit
    scaling; the head's output alone is not their distribution), and an adapter on ``lm_head`` under ZeRO-3 (see
    `refuse_partitioned_adapter_head`). The head must not change between forward and backward (e.g. an adapter
    switched in between), as with any recomputation.

    Args:
        batch: see above.
        labels: (B, T) label ids, -100 where no loss (default ``batch["labels"]``); with ``logits_to_keep = k``
            either (B, T) or the (B, k) labels of the last k positions.
        temperature: logits are divided by it (GRPO's sampling temperature).
        with_entropy: also the per-token entropy (detached).
        chunk_size: None (plain), an int, or "auto".
        logits_to_keep: k: only the last k positions reach the head (GRPO keeps C + 1). The outputs then cover those
            positions; on the chunked path unlabelled positions cost nothing anyway, so k only sets the alignment.

    Returns:
        logps: (B, T-1), or (B, k-1) with logits_to_keep; float32 for a float32 or half-precision head; 0 where
            masked. Position t scores label t + 1.
        mask: the same shape, bool: where a label is scored.
        entropy: the same shape, float32, detached, 0 where masked; None unless ``with_entropy``.
    """
    from peftlab import losses

    labels = batch["labels"] if labels is None else labels
    inputs = model_inputs(batch)
    if logits_to_keep is not None:
        inputs["logits_to_keep"] = logits_to_keep
        labels = labels[:, -logits_to_keep:]
    unwrapped = unwrap(model)
    config = unwrapped.config.get_text_config()
    if chunk_size == "auto":
        chunk_size = losses.auto_chunk_size(config.vocab_size, labels.numel())

    if chunk_size is None:
        logits = model(**inputs).logits  # (B, T, V)
        if temperature != 1.0:
            logits = logits / temperature
        logps, mask = losses.token_logprobs(logits, labels)  # (B, T-1)
        entropy = None
        if with_entropy:  # one sequence at a time: one (T, V) float32 slab beside the logits
            entropy = torch.stack([losses.next_token_entropy(row[:-1]) for row in logits]).float()  # (B, T-1)
            entropy = entropy.masked_fill(~mask, 0.0)
        return logps, mask, entropy

    refuse_transformed_logits(config)
    head = unwrapped.get_output_embeddings()
    refuse_partitioned_adapter_head(head)
    hidden, autocast = _forward_to_head_input(model, head, inputs)  # (B, T, H)
    with autocast:
        return losses.chunked_token_logprobs(hidden, head, labels, chunk_size=chunk_size, temperature=temperature,
                                             with_entropy=with_entropy)


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments for a padded batch or a packed row, with no KV cache (log-probs need none).

    A packed row goes in with position ids, sequence offsets and no attention mask, as in `lm_logits`.
    """
    if "cu_seq_lens" in batch:
        starts, longest = batch["cu_seq_lens"], batch["max_length"]
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
                "cu_seq_lens_q": starts, "cu_seq_lens_k": starts, "max_length_q": longest, "max_length_k": longest}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if batch.get("position_ids") is not None:
        inputs["position_ids"] = batch["position_ids"]
    return inputs


# config attributes of architectures whose forward changes the logits after the head (Gemma 2/3 soft-capping,
# Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, ...)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                    "output_multiplier")


def refuse_transformed_logits(config) -> None:
    """Raise where the model's logits are not its head's output, which the chunked path would silently get wrong."""
    found = {k: getattr(config, k) for k in LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1.0)}
    if found:
        raise ValueError(f"chunked log-probs need logits equal to the head's output; this model transforms them "
                         f"({found}): use chunk_size=None")


def refuse_partitioned_adapter_head(head) -> None:
    """Raise for an adapter-wrapped head (LoRA/DoRA on ``lm_head``) whose parameters ZeRO-3 partitions.

    Such a head mixes a frozen base weight with trainable adapter weights, so its chunks are recomputed in backward,
    and DeepSpeed (0.19) does not gather frozen parameters during a non-reentrant checkpoint's recomputation
    (deepspeedai/DeepSpeed#8148): backward would fail with a CheckpointError. Frozen heads and wholly trainable
    ones (tied embeddings, ``modules_to_save``) are unaffected.
    """
    params = list(head.parameters())
    partitioned = any(hasattr(p, "ds_status") for p in params)
    if partitioned and hasattr(head, "base_layer") and any(p.requires_grad for p in params):
        raise ValueError("an adapter on lm_head under DeepSpeed ZeRO-3 cannot use chunked log-probs (DeepSpeed does "
                         "not gather its frozen base weight when the chunk is recomputed): use chunk_size=None")


def _forward_to_head_input(model, head, inputs: dict):
    """Run ``model(**inputs)`` with its head given zero rows; return the head's real input and the autocast
    context the head ran under (see `token_logps`)."""
    seen = {}

    def keep_input_give_empty(module, args):
        hidden = args[0]
        device_type = hidden.device.type
        seen["hidden"] = hidden
        seen["autocast"] = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        return (hidden[..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(keep_input_give_empty)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise RuntimeError("the model's forward never called its output embeddings (get_output_embeddings())")
    device_type, enabled, dtype = seen["autocast"]
    return seen["hidden"], torch.autocast(device_type, dtype=dtype, enabled=enabled)


def completion_logps(model, batch: dict, temperature: float = 1.0,
                     chunk_size: int | str | None = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """log π(completion token | prefix) at every completion position of a `Samples` batch, and the entropy.

    One forward over prompt + completion; only the last C + 1 positions reach the head (`logits_to_keep`), since the
    prompt's own tokens carry no loss, and with `chunk_size` the head runs in chunks of completion positions
    (`peftlab.logprobs.token_logps`). Logits are divided by the sampling temperature (as TRL does), so the ratio and
    the KL are those of the distribution the completions were sampled from. Gradients flow when enabled.

    Args:
        batch: input_ids, attention_mask, position_ids (N, P + C), completion_ids and completion_mask (N, C).

    Returns:
        logps: (N, C) float32, 0 where the completion mask is 0.
        entropy: (N, C) float32, detached, 0 where the completion mask is 0.
    """
    completion_ids, mask = batch["completion_ids"], batch["completion_mask"]  # (N, C)
    labels = completion_ids.masked_fill(~mask.bool(), IGNORE)  # (N, C)
    labels = torch.cat([torch.full_like(labels[:, :1], IGNORE), labels], dim=1)  # (N, C + 1): row t predicts t + 1
    logps, _, entropy = token_logps(model, batch, labels, temperature=temperature, with_entropy=True,
                                    chunk_size=chunk_size, logits_to_keep=completion_ids.shape[1] + 1)  # (N, C)
    return logps.float(), entropy


def sequence_logps(model, batch: dict, chunk_size: int | str | None = "auto") -> torch.Tensor:
    """(N,) summed log-probs of each sampled answer (its completion tokens) under `model`."""
    logps, _ = completion_logps(model, batch, chunk_size=chunk_size)  # (N, C)
    return logps.sum(dim=1)
