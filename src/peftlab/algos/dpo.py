"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO / hinge / conservative variants.

One step, for B preference pairs (x, y_w, y_l):

    input_ids (2B, L) = [chosen_1 .. chosen_B, rejected_1 .. rejected_B]   one concatenated forward (or packed row)
    log π(y|x)  (2B,)  = Σ over completion tokens only
    log π_ref(y|x)     = the same under the reference, or precomputed once before training (algo.precompute_ref)
    loss               = mean_b peftlab.losses.dpo_loss(...)   (Eq. 7 for sigmoid)
                         + rpo_alpha · peftlab.losses.chosen_nll(...)   (RPO, when algo.rpo_alpha > 0)

The reference is the start model: the base with the adapter disabled, or the SFT model when the run starts from an
SFT adapter (algo.start_from=sft or model.adapter=<dir>). The shared machinery is `PreferenceAlgorithm`.
"""

from __future__ import annotations

import torch

from peftlab.algos.preference import PreferenceAlgorithm
from peftlab.sampling import model_device


class DPO(PreferenceAlgorithm):
    data_kind = "preference"

    def build_examples(self, rows):
        return [{"answers": self.encode_answers(r["prompt"], [r["chosen"], r["rejected"]])} for r in rows]

    def collate(self, examples):
        return self.collate_answers(examples)

    def num_items(self, batch):
        return batch["lengths"].shape[0] // 2  # pairs (a packed batch is one row)

    @staticmethod
    def pairs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) chosen and (B,) rejected answer rows: the first and second half of the batch."""
        pairs = batch["lengths"].shape[0] // 2
        chosen = torch.arange(pairs, device=batch["lengths"].device)
        return chosen, chosen + pairs

    def loss(self, model, batch):
        policy_logps = self.answer_logps(model, batch)  # (2B,)
        chosen, rejected = self.pairs(batch)
        pair_losses, chosen_rewards, rejected_rewards = self.pair_losses(
            policy_logps, self.reference_logps(batch), batch["lengths"], chosen, rejected)
        loss = pair_losses.mean()
        stats = {}
        if self.rpo_alpha:
            nll = self.chosen_nll(policy_logps, batch["lengths"], chosen)
            loss = loss + self.rpo_alpha * nll
            stats["loss/nll"] = nll.item()
        margins = chosen_rewards - rejected_rewards  # (B,)
        return loss, stats | {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": margins.mean().item(),
            "rewards/accuracies": (margins > 0).float().mean().item(),
            "logps/chosen": policy_logps[chosen].detach().mean().item(),
            "logps/rejected": policy_logps[rejected].detach().mean().item(),
        }

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size):
        """eval/pref_accuracy: share of held-out pairs whose implicit reward prefers the chosen answer
        (β·log-ratio margin > 0, as TRL's rewards/accuracies; 0 before training, when policy = reference);
        eval/logp_accuracy: share where the policy itself gives the chosen answer the higher log-prob."""
        totals = {"loss": 0.0, "pref_accuracy": 0.0, "margin": 0.0, "logp_accuracy": 0.0}
        for batch in self.iterate(examples, batch_size, model_device(model)):
            policy_logps = self.answer_logps(model, batch)
            chosen, rejected = self.pairs(batch)
            pair_losses, chosen_rewards, rejected_rewards = self.pair_losses(
                policy_logps, self.reference_logps(batch), batch["lengths"], chosen, rejected)
            totals["loss"] += pair_losses.sum().item()
            totals["pref_accuracy"] += (chosen_rewards > rejected_rewards).sum().item()
            totals["margin"] += (chosen_rewards - rejected_rewards).sum().item()
            totals["logp_accuracy"] += (policy_logps[chosen] > policy_logps[rejected]).sum().item()
        return {f"eval/{k}": v / max(len(examples), 1) for k, v in totals.items()}
