"""The preference core shared by DPO and safe_dpo: answers to the same prompt, scored by the policy and the
reference in one concatenated forward, compared in pairs.

An example holds `answers`: K encoded prompt+answer sequences (K = 2: chosen/rejected for DPO, response_0/1 for
safe_dpo) and, after `precompute_reference`, `ref_logps`: K floats. A micro-batch of B examples is answer-major:
row k·B + b is answer k of example b, so a pair of example b is two indices into those K·B rows, and one call of
`pair_losses` scores every pair of a batch whatever it is named:

    log π(y|x)  (K·B,)  Σ over completion tokens only (labels = -100 on the prompt and padding)
    log π_ref(y|x)       the same under the reference (adapter disabled / frozen copy), or precomputed once
    pair losses (B,)     peftlab.losses.dpo_loss on (chosen, rejected) indices, IPO's lengths included
    RPO term ()          rpo_alpha · peftlab.losses.chosen_nll of the chosen answers (Pang et al. 2024)

With packing the K·B answers go in as ONE padding-free row (see peftlab.logprobs): the same numbers, no compute
spent on padding.
"""

from __future__ import annotations

import torch

from peftlab import losses
from peftlab.algos.base import Algorithm
from peftlab.data.format import IGNORE, collate_lm, collate_packed, encode_prompt_completion
from peftlab.errors import ConfigError
from peftlab.logprobs import enable_packed_sdpa, token_logps
from peftlab.sampling import eval_mode, to_device, unwrap

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def completion_length(encoded: dict) -> int:
    """Number of completion (label) tokens of an encoded prompt+completion."""
    return sum(1 for t in encoded["labels"] if t != IGNORE)


class PreferenceAlgorithm(Algorithm):
    needs_reference = True
    sequences_per_example = 2  # both answers of a pair

    def __init__(self, *, beta: float, loss_type: str, label_smoothing: float, rpo_alpha: float,
                 precompute_ref: bool, ref_batch_size: int, packing: bool, **common):
        super().__init__(**common)
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"algo.loss_type={loss_type}: choose one of {', '.join(LOSS_TYPES)}")
        if not beta > 0:
            raise ConfigError(f"algo.beta={beta} must be > 0")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"algo.label_smoothing={label_smoothing} must be in [0, 0.5)")
        if label_smoothing and loss_type != "sigmoid":
            raise ConfigError(f"algo.label_smoothing is only defined for algo.loss_type=sigmoid (got {loss_type})")
        if not rpo_alpha >= 0:
            raise ConfigError(f"algo.rpo_alpha={rpo_alpha} must be >= 0")
        if int(ref_batch_size) < 1:
            raise ConfigError(f"algo.ref_batch_size={ref_batch_size} must be >= 1")
        self.beta, self.loss_type, self.label_smoothing = float(beta), loss_type, float(label_smoothing)
        self.rpo_alpha = float(rpo_alpha)
        self.precompute_ref, self.ref_batch_size = bool(precompute_ref), int(ref_batch_size)
        self.packing = bool(packing)

    def hparams(self):
        return {**super().hparams(), "beta": self.beta, "loss_type": self.loss_type,
                "label_smoothing": self.label_smoothing, "rpo_alpha": self.rpo_alpha,
                "precompute_ref": self.precompute_ref, "packing": self.packing}

    def setup(self, policy, *, reference, device, train_examples, eval_examples):
        super().setup(policy, reference=reference, device=device, train_examples=train_examples,
                      eval_examples=eval_examples)
        if self.packing:  # the policy, and the frozen copy that is the reference of a full fine-tune
            for model in (unwrap(policy), getattr(reference, "copy", None)):
                if model is not None:
                    enable_packed_sdpa(model)
        if self.precompute_ref:
            self.precompute_reference(list(train_examples) + list(eval_examples), device)

    # ---- answers ----------------------------------------------------------------------------------------------------

    def encode_answers(self, prompt: list[dict], answers: list[str]) -> list[dict]:
        return [encode_prompt_completion(self.tokenizer, prompt, a, self.max_length) for a in answers]

    def collate_answers(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """K answers per example → answer-major rows: row k·B + b is answer k of example b.

        Returns input_ids/attention_mask/labels (K·B, L) or a packed row, `lengths` (K·B,) completion token counts
        and, when precomputed, `ref_logps` (K·B,).
        """
        k = len(examples[0]["answers"])
        encoded = [e["answers"][i] for i in range(k) for e in examples]
        batch = collate_packed(encoded) if self.packing else collate_lm(encoded, self.tokenizer.pad_token_id)
        batch["lengths"] = torch.tensor([completion_length(x) for x in encoded], dtype=torch.long)
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_logps"][i] for i in range(k) for e in examples],
                                              dtype=torch.float32)
        return batch

    def iterate(self, examples: list[dict], batch_size: int, device):
        """The algorithm's own collated batches of `examples`, on `device` (evaluation, precompute)."""
        for start in range(0, len(examples), batch_size):
            yield to_device(self.collate(examples[start:start + batch_size]), device)

    def answer_logps(self, model, batch: dict) -> torch.Tensor:
        """(K·B,) summed completion log-probs under `model` (float32), from a padded or a packed batch; the LM
        head runs in chunks of positions per trainer.logits_chunk_size (`peftlab.logprobs.token_logps`)."""
        logps, _, _ = token_logps(model, batch, chunk_size=self.logits_chunk_size)  # (K·B, L-1), or (1, T-1)
        if "cu_seq_lens" in batch:
            return losses.packed_sequence_sums(logps, batch["cu_seq_lens"]).float()  # (K·B,)
        return logps.sum(dim=-1).float()  # (K·B,)

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(K·B,) log π_ref: precomputed when available, else one no-grad forward through the reference."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with self.reference.model() as ref_model:
            return self.answer_logps(ref_model, batch)

    @torch.no_grad()
    def precompute_reference(self, examples: list[dict], device) -> None:
        """Write `ref_logps` (K floats) into each example, so training needs no reference forward."""
        with self.reference.model() as ref_model, eval_mode(ref_model):
            for start in range(0, len(examples), self.ref_batch_size):
                chunk = examples[start:start + self.ref_batch_size]
                batch = to_device(self.collate_answers(chunk), device)
                logps = self.answer_logps(ref_model, batch).view(-1, len(chunk))  # (K, B)
                for b, example in enumerate(chunk):
                    example["ref_logps"] = logps[:, b].tolist()

    # ---- pairs ------------------------------------------------------------------------------------------------------

    def pair_losses(self, policy_logps: torch.Tensor, ref_logps: torch.Tensor, lengths: torch.Tensor,
                    chosen: torch.Tensor, rejected: torch.Tensor, beta: float | torch.Tensor | None = None,
                    margin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The DPO-family loss of each pair (chosen[b], rejected[b]) of answer rows.

        Args:
            policy_logps, ref_logps, lengths: (K·B,) per answer row.
            chosen, rejected: (B,) long, the answer rows of each pair.
            beta: None (algo.beta), a float, or (B,) per-pair β.
            margin: None or (B,) SafeDPO margin Δ.

        Returns: per-pair losses, chosen rewards and rejected rewards, (B,) each (peftlab.losses.dpo_loss).
        """
        ipo_lengths = {}
        if self.loss_type == "ipo":  # TRL's IPO averages each log-ratio over its completion tokens
            ipo_lengths = {"chosen_lengths": lengths[chosen], "rejected_lengths": lengths[rejected]}
        return losses.dpo_loss(policy_logps[chosen], policy_logps[rejected], ref_logps[chosen], ref_logps[rejected],
                               self.beta if beta is None else beta, self.loss_type, self.label_smoothing, margin,
                               **ipo_lengths)

    @staticmethod
    def chosen_nll(policy_logps: torch.Tensor, lengths: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The RPO term's NLL: token-mean negative log-likelihood of the chosen answer rows `chosen` (B,)."""
        return losses.chosen_nll(policy_logps[chosen], lengths[chosen])
