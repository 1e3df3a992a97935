"""Supervised fine-tuning: cross-entropy on the completion tokens only.

With `packing` (conf/algo/sft.yaml), a micro-batch is one row of its sequences back to back instead of a padded
(B, L) block: no compute is spent on padding, and attention stays within each sequence (see
`peftlab.data.format.collate_packed`), so the loss is the padded batch's. Under sdpa, each sequence's attention
runs as its own causal sdpa call (`peftlab.packing`), rather than one masked attention over the whole row.
"""

from __future__ import annotations

import torch

from peftlab import losses
from peftlab.algos.base import Algorithm
from peftlab.data.format import IGNORE, collate_lm, collate_packed, encode_prompt_completion
from peftlab.packing import enable_packed_sdpa, lm_logits

class SFT(Algorithm):
    data_kind = "sft"

    def __init__(self, tokenizer, max_length: int, start_from: str = "base", packing: bool = False):
        super().__init__(tokenizer, max_length, start_from)
        self.packing = bool(packing)

    def hparams(self):
        return {"packing": self.packing}

    def setup(self, policy, reference=None, device=None, train_examples=(), eval_examples=()):
        super().setup(policy, reference, device, train_examples, eval_examples)
        if self.packing:
            from peftlab.models import unwrap

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
        logits = lm_logits(model, batch)  # (B, L, V), or (1, T, V) packed
        loss, _ = losses.sft_loss(logits, batch["labels"])
        return loss, {"train/loss": loss.item()}

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size):
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            batch = self.collate(examples[start:start + batch_size])
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, n = losses.sft_loss(lm_logits(model, batch), batch["labels"])
            total += loss.item() * int(n)
            count += int(n)
        return {"eval/loss": total / max(count, 1)}
