"""Supervised fine-tuning: cross-entropy on the completion tokens only.

With `packing` (conf/algo/sft.yaml), a micro-batch is one row of its sequences back to back instead of a padded
(B, L) block: no compute is spent on padding, and attention stays within each sequence (see
`peftlab.data.format.collate_packed`), so the loss is the padded batch's. Under sdpa, each sequence's attention
runs as its own causal sdpa call (`peftlab.logprobs`), rather than one masked attention over the whole row.
"""

from __future__ import annotations

import torch

from peftlab import losses
from peftlab.algos.base import Algorithm
from peftlab.data.format import IGNORE, collate_lm, collate_packed, encode_prompt_completion
from peftlab.logprobs import enable_packed_sdpa, token_logps
from peftlab.sampling import model_device, to_device, unwrap


class SFT(Algorithm):
    data_kind = "sft"

    def __init__(self, *, packing: bool, **common):
        super().__init__(**common)
        self.packing = bool(packing)

    def hparams(self):
        return {**super().hparams(), "packing": self.packing}

    def setup(self, policy, *, reference, device, train_examples, eval_examples):
        super().setup(policy, reference=reference, device=device, train_examples=train_examples,
                      eval_examples=eval_examples)
        if self.packing:
            enable_packed_sdpa(unwrap(policy))

    def build_examples(self, rows):
        return [encode_prompt_completion(self.tokenizer, r["prompt"], r["completion"], self.max_length) for r in rows]

    def collate(self, examples):
        if self.packing:
            return collate_packed(examples)
        return collate_lm(examples, self.tokenizer.pad_token_id)

    def num_items(self, batch):
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model, batch):
        logps, mask, _ = token_logps(model, batch, chunk_size=self.logits_chunk_size)  # (B, L-1), or (1, T-1) packed
        loss, _ = losses.sft_loss_from_logps(logps, mask)
        return loss, {"train/loss": loss.item()}

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size):
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            batch = to_device(self.collate(examples[start:start + batch_size]), model_device(model))
            logps, mask, _ = token_logps(model, batch, chunk_size=self.logits_chunk_size)
            loss, n = losses.sft_loss_from_logps(logps, mask)
            total += loss.item() * int(n)
            count += int(n)
        return {"eval/loss": total / max(count, 1)}
