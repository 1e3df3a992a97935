"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO / hinge / conservative variants.

One step, for B preference pairs (x, y_w, y_l):

    input_ids (2B, L) = [chosen_1 .. chosen_B, rejected_1 .. rejected_B]   one concatenated forward
    log π(y|x)  (2B,)  = Σ over completion tokens only (labels = -100 on the prompt and padding)
    log π_ref(y|x)     = the same with the adapter disabled (no second copy; a frozen copy only for peft=none),
                         or precomputed once before training (algo.precompute_ref=true)
    loss               = mean_b peftlab.losses.dpo_loss(...)   (Eq. 7 for sigmoid)
                         + rpo_alpha · peftlab.losses.chosen_nll(...)   (RPO, when algo.rpo_alpha > 0)

With algo.packing=true the 2B answers go in as ONE padding-free row (1, T) instead of (2B, L), each sequence
attending only to itself (see peftlab.packing), and log π(y|x) is summed per sequence: the same numbers, no
compute spent on padding.

When the run starts from an SFT adapter (algo.start_from=sft or model.adapter=<dir>), that adapter is merged into
the base before the fresh adapter is added, so the reference is the SFT model.

`PairMixin` holds what DPO and safe_dpo share: tokenizing answers, the concatenated forward, reference log-probs.
"""

from __future__ import annotations

import torch

from peftlab import losses
from peftlab.algos.base import Algorithm
from peftlab.data.format import IGNORE, collate_lm, collate_packed, encode_prompt_completion
from peftlab.models import unwrap
from peftlab.packing import enable_packed_sdpa, lm_logits
from peftlab.validate import ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def completion_length(encoded: dict) -> int:
    """Number of completion (label) tokens of an encoded prompt+completion."""
    return sum(1 for t in encoded["labels"] if t != IGNORE)


class PairMixin:
    """Answers to the same prompt, scored by the policy and the reference in one concatenated forward.

    An example holds `answers`: a list of K encoded prompt+answer sequences (K = 2: chosen/rejected for DPO,
    response_0/response_1 for safe_dpo), and after `precompute_reference`, `ref_logps`: K floats.
    """

    tokenizer = None
    max_length: int = 0
    reference = None
    packing: bool = False  # answers as one padding-free row (set by the algorithm)

    def encode_answers(self, prompt: list[dict], answers: list[str]) -> list[dict]:
        return [encode_prompt_completion(self.tokenizer, prompt, a, self.max_length) for a in answers]

    def collate_answers(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """K answers per example → answer-major rows: row k·B + b is answer k of example b.

        Returns input_ids/attention_mask/labels (K·B, L), `lengths` (K·B,) completion token counts and, when
        precomputed, `ref_logps` (K·B,).
        """
        k = len(examples[0]["answers"])
        encoded = [e["answers"][i] for i in range(k) for e in examples]
        batch = collate_packed(encoded) if self.packing else collate_lm(encoded, self.tokenizer.pad_token_id)
        batch["lengths"] = torch.tensor([completion_length(x) for x in encoded], dtype=torch.long)
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_logps"][i] for i in range(k) for e in examples],
                                              dtype=torch.float32)
        return batch

    @staticmethod
    def answer_logps(model, batch: dict) -> torch.Tensor:
        """(K·B,) summed completion log-probs under `model` (float32), from a padded or a packed batch."""
        logits = lm_logits(model, batch)  # (K·B, L, V), or (1, T, V) packed
        if "cu_seq_lens" in batch:
            return losses.packed_sequence_logps(logits, batch["labels"], batch["cu_seq_lens"]).float()  # (K·B,)
        return losses.sequence_logps(logits, batch["labels"]).float()  # (K·B,)

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(K·B,) log π_ref: precomputed when available, else one no-grad forward with the adapter disabled."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with self.reference.model() as ref_model:
            return self.answer_logps(ref_model, batch)

    @torch.no_grad()
    def precompute_reference(self, examples: list[dict], batch_size: int, device) -> None:
        """Write `ref_logps` (K floats) into each example, so training needs no reference forward."""
        with self.reference.model() as ref_model:
            was_training = ref_model.training
            ref_model.eval()
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.collate_answers(chunk).items()}
                logps = self.answer_logps(ref_model, batch).view(-1, len(chunk))  # (K, B)
                for b, example in enumerate(chunk):
                    example["ref_logps"] = logps[:, b].tolist()
            ref_model.train(was_training)

    def iterate(self, examples: list[dict], batch_size: int, device):
        """Collated batches of `examples` (the algorithm's own `collate`) on `device`, for evaluation."""
        for start in range(0, len(examples), batch_size):
            batch = self.collate(examples[start:start + batch_size])
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def check_loss_options(beta: float, loss_type: str, label_smoothing: float, rpo_alpha: float = 0.0) -> None:
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


class DPO(PairMixin, Algorithm):
    data_kind = "preference"
    needs_reference = True

    def __init__(self, tokenizer, max_length: int, start_from: str = "sft", beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, precompute_ref: bool = False,
                 ref_batch_size: int = 32, packing: bool = False, rpo_alpha: float = 0.0):
        super().__init__(tokenizer, max_length, start_from)
        check_loss_options(beta, loss_type, label_smoothing, rpo_alpha)
        self.rpo_alpha = float(rpo_alpha)
        self.beta, self.loss_type, self.label_smoothing = float(beta), loss_type, float(label_smoothing)
        self.precompute_ref, self.ref_batch_size = bool(precompute_ref), int(ref_batch_size)
        self.packing = bool(packing)

    def hparams(self):
        return {"beta": self.beta, "loss_type": self.loss_type, "label_smoothing": self.label_smoothing,
                "precompute_ref": self.precompute_ref, "packing": self.packing, "rpo_alpha": self.rpo_alpha}

    def setup(self, policy, reference=None, device=None, train_examples=(), eval_examples=()):
        super().setup(policy, reference, device, train_examples, eval_examples)
        if self.packing:  # the policy, and the frozen copy that is the reference of a full fine-tune
            for model in (unwrap(policy), getattr(reference, "copy", None)):
                if model is not None:
                    enable_packed_sdpa(model)
        if self.precompute_ref:
            self.precompute_reference(list(train_examples) + list(eval_examples), self.ref_batch_size, device)

    def build_examples(self, rows):
        return [{"answers": self.encode_answers(r["prompt"], [r["chosen"], r["rejected"]])} for r in rows]

    def collate(self, examples):
        return self.collate_answers(examples)

    def num_items(self, batch):
        return batch["lengths"].shape[0] // 2  # pairs (a packed batch is one row)

    def pair_losses(self, policy_logps: torch.Tensor, ref_logps: torch.Tensor, lengths: torch.Tensor):
        """(2B,) log-probs → per-pair losses (B,) and implicit rewards (B,), (B,)."""
        chosen, rejected = policy_logps.chunk(2)  # (B,), (B,)
        ref_chosen, ref_rejected = ref_logps.chunk(2)  # (B,), (B,)
        ipo_lengths = {}
        if self.loss_type == "ipo":  # TRL's IPO averages each log-ratio over its completion tokens
            chosen_lengths, rejected_lengths = lengths.chunk(2)
            ipo_lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
        return losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type,
                               self.label_smoothing, **ipo_lengths)

    def loss(self, model, batch):
        policy_logps = self.answer_logps(model, batch)  # (2B,)
        ref_logps = self.reference_logps(batch)  # (2B,)
        pair_losses, chosen_rewards, rejected_rewards = self.pair_losses(policy_logps, ref_logps, batch["lengths"])
        loss = pair_losses.mean()
        stats = {}
        if self.rpo_alpha:
            nll = losses.chosen_nll(policy_logps.chunk(2)[0], batch["lengths"].chunk(2)[0])
            loss = loss + self.rpo_alpha * nll
            stats["loss/nll"] = nll.item()
        chosen_logps, rejected_logps = policy_logps.detach().chunk(2)
        margins = chosen_rewards - rejected_rewards  # (B,)
        return loss, stats | {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": margins.mean().item(),
            "rewards/accuracies": (margins > 0).float().mean().item(),
            "logps/chosen": chosen_logps.mean().item(),
            "logps/rejected": rejected_logps.mean().item(),
        }

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size):
        """eval/pref_accuracy: share of held-out pairs whose implicit reward prefers the chosen answer
        (β·log-ratio margin > 0, as TRL's rewards/accuracies; 0 before training, when policy = reference);
        eval/logp_accuracy: share where the policy itself gives the chosen answer the higher log-prob."""
        totals = {"loss": 0.0, "pref_accuracy": 0.0, "margin": 0.0, "logp_accuracy": 0.0}
        for batch in self.iterate(examples, batch_size, unwrap(model).device):
            policy_logps = self.answer_logps(model, batch)
            pair_losses, chosen_rewards, rejected_rewards = self.pair_losses(
                policy_logps, self.reference_logps(batch), batch["lengths"])
            chosen, rejected = policy_logps.chunk(2)
            totals["loss"] += pair_losses.sum().item()
            totals["pref_accuracy"] += (chosen_rewards > rejected_rewards).sum().item()
            totals["margin"] += (chosen_rewards - rejected_rewards).sum().item()
            totals["logp_accuracy"] += (chosen > rejected).sum().item()
        return {f"eval/{k}": v / max(len(examples), 1) for k, v in totals.items()}
