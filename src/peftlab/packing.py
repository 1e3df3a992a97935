"""Padding-free packing shared by SFT and DPO: a micro-batch is ONE row of sequences back to back
(`peftlab.data.format.collate_packed`), and attention must stay within each sequence.

Under sdpa, transformers' own packed path builds a (T, T) block-diagonal mask and attends over the whole row; here
each sequence's attention is its own causal sdpa call instead (`packed_sdpa`), and no row-sized mask is built.
"""

from __future__ import annotations

import torch

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
    """(B, L, V) logits of a padded batch, or (1, T, V) of a packed row (`collate_packed`).

    A packed row goes in with position ids, sequence offsets and no attention mask or KV cache: that is when
    transformers keeps attention within each sequence.
    """
    if "cu_seq_lens" not in batch:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    starts, longest = batch["cu_seq_lens"], batch["max_length"]
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                 cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=longest, max_length_k=longest).logits
