"""The one generation routine, and the small helpers every model-calling part shares.

    samples = sample(model, tokenizer, prompt_ids, max_new_tokens, do_sample=True, temperature=1.0)

`sample` runs ONE batched `model.generate` over left-padded prompts (KV cache, eval mode, no gradient) and returns
`Samples`: the token batch (prompt + completion) with its attention mask and position ids, the completion ids and
mask, truncation flags and the decoded texts. Evaluation answers, GRPO's rollouts and safe_dpo's dual-step samples
all come from it, so an answer ends in one place (`completion_mask`: up to and including the first end token) and
position ids are built in one place (`positions_from_mask`), which is what KL and reward computations rely on.
`completion_logps` scores those exact tokens under a model (with a gradient when the loss needs one).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from peftlab.data.format import pad

EVAL_SEED = 0  # seed of evaluation-time sampling (a forked RNG: training randomness is untouched)


def unwrap(model):
    """The transformers model or PeftModel under DDP / DeepSpeed (`.module`) and torch.compile (`_orig_mod`):
    generate, adapter switching and the output embeddings are methods of the inner model."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def to_device(batch: dict, device) -> dict:
    """Every tensor of a batch on `device`; other entries (ints, lists) as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model) -> torch.device:
    return next(unwrap(model).parameters()).device


@contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout) for the duration, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def forked_rng(seed: int, device: torch.device):
    """Draw random numbers from `seed` without touching the run's RNG streams (exact resume, repeatable eval)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which generated positions belong to each completion: up to and including its first end token.

    Args:
        completion_ids: (N, C) generated ids (padding after the end token, as `generate` leaves them).
        eos_token_id: the end-of-turn id generation stops at.

    Returns:
        mask: (N, C) bool.
        truncated: (N,) bool, True where no end token was generated (the completion hit max_new_tokens).
    """
    is_end = completion_ids == eos_token_id  # (N, C)
    truncated = ~is_end.any(dim=1)  # (N,)
    first_end = torch.where(truncated, completion_ids.shape[1], is_end.int().argmax(dim=1))  # (N,)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)  # (C,)
    return positions.unsqueeze(0) <= first_end.unsqueeze(1), truncated


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, L) 0/1 mask with left padding → (N, L) position ids counting real tokens from 0, as `generate` does."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@dataclass
class Samples:
    """N sampled (or greedy) completions of left-padded prompts, as one token batch.

    input_ids, attention_mask, position_ids: (N, P + C) prompt then completion; the mask is 0 on the prompt's left
        padding and on completion positions after the end token.
    completion_ids, completion_mask: (N, C) the generated ids and which belong to each answer (bool).
    truncated: (N,) bool, no end token within max_new_tokens.
    texts: the N answers decoded without special tokens (nothing after the end token).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The token batch as a dict (what GRPO's loss consumes and checkpoints)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "completion_ids": self.completion_ids,
                "completion_mask": self.completion_mask}

    def completion_tokens(self) -> list[list[int]]:
        """Each answer's token ids (up to and including its end token)."""
        ids, mask = self.completion_ids.cpu(), self.completion_mask.cpu()
        return [row[m].tolist() for row, m in zip(ids, mask)]


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, *, do_sample: bool = False,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> Samples:
    """ONE batched `generate` over `prompt_ids` (token lists, already repeated when several answers per prompt are
    wanted), greedy unless `do_sample`.

    Runs on the model under any DDP/DeepSpeed wrapper (generate is not a wrapper method; under ZeRO-3
    transformers keeps the ranks in step), in eval mode (no dropout: samples come from the policy itself) with the
    adapter as it is, and leaves the model in the mode it was in. top_k=0 turns transformers' default top-k 50 off.
    """
    model = unwrap(model)
    device = model_device(model)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_input_ids = pad(prompt_ids, pad_id, side="left").to(device)  # (N, P)
    prompt_mask = pad([[1] * len(p) for p in prompt_ids], 0, side="left").to(device)  # (N, P)
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else \
        {"do_sample": False}
    with eval_mode(model):
        sequences = model.generate(input_ids=prompt_input_ids, attention_mask=prompt_mask,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                                   use_cache=True, **options)  # (N, P + C)
    completion_ids = sequences[:, prompt_input_ids.shape[1]:]  # (N, C)
    mask, truncated = completion_mask(completion_ids, eos_id)  # (N, C), (N,)
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)  # (N, P + C)
    texts = tokenizer.batch_decode(completion_ids.masked_fill(~mask, pad_id), skip_special_tokens=True)
    return Samples(input_ids=sequences, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
                   completion_ids=completion_ids, completion_mask=mask, truncated=truncated, texts=texts)


def answer_texts(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
                 **options) -> list[str]:
    """`sample` over `prompt_ids` in batches of `batch_size`; the answers' texts in prompt order."""
    texts = []
    for start in range(0, len(prompt_ids), batch_size):
        texts += sample(model, tokenizer, prompt_ids[start:start + batch_size], max_new_tokens, **options).texts
    return texts
