"""Reward and cost models: a scalar head on the language model, trained on preference pairs.

The model is `AutoModelForSequenceClassification(num_labels=1)`: the last hidden state of the last real token of
prompt+answer goes through a linear `score` head. With LoRA (task type SEQ_CLS) peft trains and saves the head
together with the adapter, so `<run>/adapter/` is the whole trained part and `peftlab.scorers.Scorer(<run>)`
loads it back.

    algo.objective=reward   Bradley–Terry on (chosen, rejected): −log σ(r_c − r_r)          (InstructGPT Eq. 1)
    algo.objective=cost     Safe RLHF cost loss on PKU-SafeRLHF rows: the less safe answer costs more, and a
                            safe answer's cost is pushed below 0, an unsafe one's above 0   (Dai et al. 2023 Eq. 6)

The reward objective reads preference data (any preference schema, PKU-SafeRLHF rows by `better_response_id`);
the cost objective reads safety data (PKU-SafeRLHF columns).
"""

from __future__ import annotations

import torch

from peftlab import losses
from peftlab.algos.base import Algorithm
from peftlab.data.format import collate_lm, encode_prompt_completion
from peftlab.errors import ConfigError
from peftlab.sampling import model_device, to_device, unwrap

OBJECTIVES = {"reward": "preference", "cost": "safety"}  # objective → the data kind it trains on


class RewardModel(Algorithm):
    head = "score"
    sequences_per_example = 2  # both answers of a pair
    generates = False  # a scorer does not answer prompts: the toy generation tasks do not apply

    def __init__(self, *, objective: str, **common):
        super().__init__(**common)
        if objective not in OBJECTIVES:
            raise ConfigError(f"algo.objective={objective}: choose reward or cost")
        self.objective = objective
        self.data_kind = OBJECTIVES[objective]

    def hparams(self):
        return {**super().hparams(), "objective": self.objective}

    def setup(self, policy, *, reference, device, train_examples, eval_examples):
        super().setup(policy, reference=reference, device=device, train_examples=train_examples,
                      eval_examples=eval_examples)
        # The head reads the last token that is not padding; "padding" must be the id the collator pads with.
        unwrap(policy).config.pad_token_id = self.tokenizer.pad_token_id

    def build_examples(self, rows):
        examples = []
        for r in rows:
            if self.objective == "reward":
                answers = [r["chosen"], r["rejected"]]
                extra = {}
            else:
                answers = [r["response_0"], r["response_1"]]
                extra = {"safer_id": r["safer_response_id"],
                         "is_safe": [r["is_response_0_safe"], r["is_response_1_safe"]]}
            encoded = [encode_prompt_completion(self.tokenizer, r["prompt"], a, self.max_length) for a in answers]
            examples.append({"answers": encoded, **extra})
        return examples

    def collate(self, examples):
        """Rows 0..B-1: first answers (chosen / response_0); rows B..2B-1: second answers (rejected / response_1)."""
        batch = collate_lm([e["answers"][i] for i in range(2) for e in examples], self.tokenizer.pad_token_id)
        del batch["labels"]  # a scorer has no token targets
        if self.objective == "cost":
            batch["safer_id"] = torch.tensor([e["safer_id"] for e in examples], dtype=torch.long)  # (B,)
            batch["is_safe"] = torch.tensor([e["is_safe"] for e in examples], dtype=torch.bool)  # (B, 2)
        return batch

    def num_items(self, batch):
        return batch["input_ids"].shape[0] // 2  # pairs

    @staticmethod
    def scores(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scalar scores of the first and second answers, (B,) each, float32."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, 1)
        return out.squeeze(-1).float().chunk(2)

    def loss_and_stats(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's loss and per-pair statistics (sums over the batch, for exact averaging)."""
        first, second = self.scores(model, batch)  # (B,), (B,)
        if self.objective == "reward":  # first = chosen
            loss = losses.bradley_terry_loss(first, second)
            return loss, {"pair_accuracy": (first > second).float().sum(),
                          "score_chosen": first.detach().sum(), "score_rejected": second.detach().sum()}
        safer_id, is_safe = batch["safer_id"], batch["is_safe"]  # (B,), (B, 2)
        loss = losses.cost_loss(first, second, safer_id, is_safe[:, 0], is_safe[:, 1])
        costs = torch.stack([first, second], dim=1).detach()  # (B, 2)
        safer = costs.gather(1, safer_id[:, None]).squeeze(1)  # (B,)
        less_safe = costs.gather(1, 1 - safer_id[:, None]).squeeze(1)  # (B,)
        sign_ok = ((costs > 0) == ~is_safe).float()  # (B, 2): cost > 0 exactly for the unsafe answers
        return loss, {"pair_accuracy": (less_safe > safer).float().sum(),
                      "sign_accuracy": sign_ok.mean(dim=1).sum(),
                      "cost_mean": costs.mean(dim=1).sum()}

    def loss(self, model, batch):
        loss, stats = self.loss_and_stats(model, batch)
        pairs = self.num_items(batch)
        return loss, {f"train/{k}": v.item() / pairs for k, v in stats.items()}

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size):
        """eval/pair_accuracy (and eval/sign_accuracy for cost) on held-out pairs, eval/loss."""
        device = model_device(model)
        totals: dict[str, float] = {}
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = to_device(self.collate(chunk), device)
            loss, stats = self.loss_and_stats(model, batch)
            for k, v in {"loss": loss * len(chunk), **stats}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return {f"eval/{k}": v / max(len(examples), 1) for k, v in totals.items()}
