"""Chat formatting and tokenization: the one place text becomes token ids.

Prompts are rendered with the tokenizer's chat template (generation prompt appended); a completion is the text the
template puts after that, so training targets are exactly what generation produces, end-of-turn token included.
"""

from __future__ import annotations

import torch

from peftlab.data.schemas import as_messages

IGNORE = -100  # label of positions that carry no loss (prompt, padding)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """Prompt messages → text that ends where the assistant's answer begins."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def render_completion(tokenizer, messages: list[dict], completion: str) -> str:
    """The text the chat template writes after the generation prompt for this answer (end-of-turn included)."""
    if not tokenizer.chat_template:
        return completion + tokenizer.eos_token
    prompt = render_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": completion}], tokenize=False
    )
    if not full.startswith(prompt):  # templates that rewrite earlier turns (rare): fall back to answer + eos
        return completion + tokenizer.eos_token
    return full[len(prompt):]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt) -> list[int]:
    """The token ids generation starts from: the prompt (text or messages) rendered with the chat template."""
    return encode(tokenizer, render_prompt(tokenizer, as_messages(prompt)))


def encode_prompt_completion(tokenizer, messages, completion: str, max_length: int) -> dict:
    """Token ids of prompt + completion, labels that mask the prompt, and whether the row had to be cut.

    Too long: the prompt is cut from the left (its end, next to the answer, matters most), then the completion
    from the right. `truncated` is counted and reported by the builder (data/truncated_rows in summary.json).
    """
    prompt_ids = encode(tokenizer, render_prompt(tokenizer, messages))
    completion_ids = encode(tokenizer, render_completion(tokenizer, messages, completion))
    full = len(prompt_ids) + len(completion_ids)
    completion_ids = completion_ids[:max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(completion_ids)):]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE] * len(prompt_ids) + completion_ids,
        "truncated": full > max_length,
    }


def pad(sequences: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """Lists of ids → a (B, L) tensor padded to the longest."""
    length = max(len(s) for s in sequences)
    rows = [([value] * (length - len(s)) + s) if side == "left" else (s + [value] * (length - len(s))) for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def collate_lm(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples with input_ids/labels → right-padded input_ids, attention_mask, labels (each (B, L))."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "labels": pad([e["labels"] for e in examples], IGNORE),
    }


def collate_packed(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Examples with input_ids/labels → ONE row holding every sequence back to back (padding-free packing).

    Position ids restart at 0 for every sequence. With `attention_mask=None` and no KV cache, transformers reads
    the sequence boundaries from them (masking_utils.find_packed_sequence_indices: a block-diagonal causal mask for
    sdpa/eager; flash attention takes `cu_seq_lens` directly), so no token attends across sequences and the loss
    equals the padded batch's. The first label of each sequence is IGNORE: it would otherwise be predicted from the
    previous sequence's last token (a padded batch never predicts position 0 either).

    Returns input_ids, labels and position_ids, each (1, T) with T = the batch's real tokens (no attention mask:
    a 2-D mask turns the packed detection off); cu_seq_lens (S + 1,) int32 sequence start offsets then T, and
    max_length (the longest sequence), as transformers' varlen attention kwargs expect them.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return {
        "input_ids": torch.tensor([[t for e in examples for t in e["input_ids"]]], dtype=torch.long),
        "labels": torch.tensor([[IGNORE if p == 0 else t for e in examples for p, t in enumerate(e["labels"])]],
                               dtype=torch.long),
        "position_ids": torch.tensor([[p for n in lengths for p in range(n)]], dtype=torch.long),
        "cu_seq_lens": torch.tensor(starts, dtype=torch.int32),
        "max_length": max(lengths),
    }
