"""Safety-constrained DPO: maximize helpfulness subject to an expected-cost constraint, with an adaptive λ.

Each PKU-SafeRLHF row (x, y_0, y_1) gives two preference pairs over the same two answers:

    helpful pair   by `better_response_id`    L_H = DPO loss on it
    safety pair    by `safer_response_id`     L_S = DPO loss on it (optionally with the SafeDPO margin Δ)

The primal loss is the normalized Lagrangian (Safe RLHF, Dai et al. 2023, Eq. 10, rewritten for DPO):

    L = (L_H + λ·L_S) / (1 + λ)          λ a number during the policy step (no gradient flows into it)
      + rpo_alpha · (NLL_H + λ·NLL_S) / (1 + λ)   the chosen answers' NLL (RPO as in algo=dpo), if rpo_alpha > 0

The dual step: every `update_every` steps, answers SAMPLED FROM THE POLICY for held-out prompts are scored by the
cost model, and λ moves by projected dual ascent on J_C ≤ d (peftlab.algos.lagrangian). So λ rises while the
policy's answers cost more than d and falls once they cost less; λ stays in (0, λ_max].

Options: reward-scaled β per pair, β·(1 + w·(1 − exp(−k·δ))) with δ the positive reward margin (helpful pair)
or cost margin (safety pair) of the two answers under the frozen scorers; and the SafeDPO margin Δ (Kim et al.
2025) on safety pairs whose chosen answer is safe and rejected answer unsafe. The reward and cost models share the
policy's base as extra adapters when they were trained on it (peftlab.scorers); otherwise they load separately.
"""

from __future__ import annotations

import torch

from peftlab import scorers
from peftlab.algos.lagrangian import LagrangeMultiplier
from peftlab.algos.preference import PreferenceAlgorithm
from peftlab.data.format import prompt_ids
from peftlab.dist import gather_lists
from peftlab.errors import ConfigError
from peftlab.logprobs import sequence_logps
from peftlab.sampling import eval_mode, model_device, sample, unwrap

SAMPLING_KEYS = ("num_prompts", "max_new_tokens", "temperature", "top_p", "batch_size")


def scaled_beta(beta: float, margin: torch.Tensor, weight: float, rate: float) -> torch.Tensor:
    """Reward-scaled β: β·(1 + w·(1 − exp(−k·δ))) with δ = max(margin, 0). margin (B,) → (B,).

    Pairs whose answers the scorer separates clearly get up to (1 + w)·β (a stronger pull), ambiguous ones ≈ β.
    """
    delta = margin.clamp(min=0.0)  # (B,)
    return beta * (1.0 + weight * (1.0 - torch.exp(-rate * delta)))  # (B,)


class SafeDPO(PreferenceAlgorithm):
    data_kind = "safety"

    def __init__(self, *, safety_margin: float, beta_scaling: dict, lagrangian: dict, sampling: dict,
                 reward_model: str | None, cost_model: str | None, share_base: bool, score_batch_size: int,
                 **preference):
        super().__init__(**preference)
        if safety_margin and self.loss_type == "ipo":
            raise ConfigError("algo.safety_margin is not defined for algo.loss_type=ipo (use sigmoid or hinge)")
        if safety_margin < 0:
            raise ConfigError(f"algo.safety_margin={safety_margin} must be >= 0")
        if set(sampling) != set(SAMPLING_KEYS):
            raise ConfigError(f"algo.sampling needs exactly the keys {', '.join(SAMPLING_KEYS)} (got {sorted(sampling)})")
        self.safety_margin = float(safety_margin)
        self.scaling_weight, self.scaling_rate = float(beta_scaling["weight"]), float(beta_scaling["rate"])
        self.lagrangian = LagrangeMultiplier(**lagrangian)
        self.sampling = dict(sampling)
        self.score_batch_size = int(score_batch_size)
        self.scorers: dict[str, scorers.Scorer] = {}
        self.latest: dict[str, float] = {}
        # Resolved now (configs and tokenizers only), so a bad path is a one-line error before any weight loads.
        self.plans = scorers.plan_scorers({"reward": reward_model, "cost": cost_model}, self.policy_identity,
                                          share_base=bool(share_base), tokenizer=self.tokenizer)
        if self.scaling_weight and len(self.plans) < 2:
            raise ConfigError("algo.beta_scaling.weight > 0 needs algo.reward_model and algo.cost_model")
        if "cost" not in self.plans and self.lagrangian.lambda_lr > 0:
            print("safe_dpo: no algo.cost_model, so λ stays at algo.lagrangian.lambda_init "
                  f"({self.lagrangian.value:g}) for the whole run")

    def hparams(self):
        lag = self.lagrangian
        return {**super().hparams(), "safety_margin": self.safety_margin,
                "beta_scaling": {"weight": self.scaling_weight, "rate": self.scaling_rate},
                "lambda_lr": lag.lambda_lr, "lambda_max": lag.lambda_max, "threshold": lag.threshold,
                "window": lag.costs.maxlen, "update_every": lag.update_every,
                "update_delay_steps": lag.update_delay_steps, "final_lambda": lag.value,
                "reward_model": self.plans["reward"].source.path if "reward" in self.plans else None,
                "cost_model": self.plans["cost"].source.path if "cost" in self.plans else None,
                "scorers_share_base": {role: plan.shared for role, plan in self.plans.items()}}

    def setup(self, policy, *, reference, device, train_examples, eval_examples):
        self.scorers = scorers.load_scorers(self.plans, policy=policy, tokenizer=self.tokenizer, device=device,
                                            max_length=self.max_length, batch_size=self.score_batch_size)
        super().setup(policy, reference=reference, device=device, train_examples=train_examples,
                      eval_examples=eval_examples)
        # held-out prompts the dual step samples answers for (each prompt once, in data order)
        self.dual_prompts = list({repr(e["prompt"]): e["prompt"] for e in eval_examples or train_examples}.values())
        if self.scaling_weight:
            self.score_answers(list(train_examples))

    def score_samples(self, rows, answers):
        prompts = [r["prompt"] for r in rows]
        return {role: scorer.score(prompts, answers).tolist() for role, scorer in self.scorers.items()}

    @torch.no_grad()
    def score_answers(self, examples: list[dict]) -> None:
        """Write the reward and cost of both answers into each example (for reward-scaled β)."""
        prompts = [e["prompt"] for e in examples for _ in range(2)]
        answers = [a for e in examples for a in e["texts"]]
        for role in ("reward", "cost"):
            values = self.scorers[role].score(prompts, answers).view(-1, 2)  # (N, 2)
            for example, pair in zip(examples, values.tolist()):
                example[role] = pair

    # ---- data -------------------------------------------------------------------------------------------------------

    def build_examples(self, rows):
        return [{"prompt": r["prompt"], "texts": [r["response_0"], r["response_1"]],
                 "answers": self.encode_answers(r["prompt"], [r["response_0"], r["response_1"]]),
                 "better": r["better_response_id"], "safer": r["safer_response_id"],
                 "is_safe": [r["is_response_0_safe"], r["is_response_1_safe"]]} for r in rows]

    def collate(self, examples):
        """Answer rows 0..B-1 are response_0, rows B..2B-1 response_1; plus the pair labels (B,) and (B, 2)."""
        batch = self.collate_answers(examples)
        batch["better"] = torch.tensor([e["better"] for e in examples], dtype=torch.long)  # (B,)
        batch["safer"] = torch.tensor([e["safer"] for e in examples], dtype=torch.long)  # (B,)
        batch["is_safe"] = torch.tensor([e["is_safe"] for e in examples], dtype=torch.bool)  # (B, 2)
        for role in ("reward", "cost"):
            if role in examples[0]:
                batch[role] = torch.tensor([e[role] for e in examples], dtype=torch.float32)  # (B, 2)
        return batch

    def num_items(self, batch):
        return batch["better"].shape[0]  # rows (each one helpful and one safety pair)

    # ---- loss -------------------------------------------------------------------------------------------------------

    def pair_terms(self, policy_logps, ref_logps, batch, scaled: bool):
        """Losses (B,) and implicit-reward margins (B,) of the helpful and the safety pair of each row, and the
        chosen answer rows of both pairs (for the RPO term)."""
        rows = torch.arange(batch["better"].shape[0], device=policy_logps.device)  # (B,)
        count = len(rows)
        helpful_chosen, helpful_rejected = batch["better"] * count + rows, (1 - batch["better"]) * count + rows
        safe_chosen, safe_rejected = batch["safer"] * count + rows, (1 - batch["safer"]) * count + rows
        helpful_beta = safety_beta = self.beta
        if scaled and self.scaling_weight:  # δ: how clearly the scorer separates the pair, (B,) each
            reward, cost = batch["reward"], batch["cost"]  # (B, 2): answer k of row b at [b, k]
            better, safer = batch["better"], batch["safer"]
            helpful_beta = scaled_beta(self.beta, reward[rows, better] - reward[rows, 1 - better],
                                       self.scaling_weight, self.scaling_rate)
            safety_beta = scaled_beta(self.beta, cost[rows, 1 - safer] - cost[rows, safer],
                                      self.scaling_weight, self.scaling_rate)
        margin = None
        if self.safety_margin:
            safe = batch["is_safe"]  # (B, 2)
            clear_cut = safe[rows, batch["safer"]] & ~safe[rows, 1 - batch["safer"]]  # safe answer over an unsafe one
            margin = self.safety_margin * clear_cut.to(policy_logps.dtype)  # (B,)
        lengths = batch["lengths"]
        helpful = self.pair_losses(policy_logps, ref_logps, lengths, helpful_chosen, helpful_rejected, helpful_beta)
        safety = self.pair_losses(policy_logps, ref_logps, lengths, safe_chosen, safe_rejected, safety_beta, margin)
        return {"helpful": (helpful[0], helpful[1] - helpful[2]), "safety": (safety[0], safety[1] - safety[2]),
                "chosen": (helpful_chosen, safe_chosen)}

    def loss(self, model, batch):
        policy_logps = self.answer_logps(model, batch)  # (2B,)
        terms = self.pair_terms(policy_logps, self.reference_logps(batch), batch, scaled=True)
        (helpful_loss, helpful_margin), (safety_loss, safety_margin) = terms["helpful"], terms["safety"]
        lam = self.lagrangian.value  # a number: no gradient reaches λ in the policy step
        loss = ((helpful_loss + lam * safety_loss) / (1.0 + lam)).mean()
        stats = {}
        if self.rpo_alpha:  # RPO on each pair's chosen answers, weighted as the pair losses are
            helpful_nll, safety_nll = (self.chosen_nll(policy_logps, batch["lengths"], c) for c in terms["chosen"])
            loss = loss + self.rpo_alpha * (helpful_nll + lam * safety_nll) / (1.0 + lam)
            stats = {"loss/nll_helpful": helpful_nll.item(), "loss/nll_safety": safety_nll.item()}
        return loss, stats | {
            "loss/helpful": helpful_loss.mean().item(),
            "loss/safety": safety_loss.mean().item(),
            "rewards/helpful_accuracies": (helpful_margin > 0).float().mean().item(),
            "rewards/safety_accuracies": (safety_margin > 0).float().mean().item(),
            "rewards/helpful_margins": helpful_margin.mean().item(),
            "rewards/safety_margins": safety_margin.mean().item(),
            "safe/lambda": lam,
        }

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size):
        """Held-out pair accuracies (implicit reward of the chosen answer above the rejected one) and losses."""
        totals = {"helpful_accuracy": 0.0, "safety_accuracy": 0.0, "loss_helpful": 0.0, "loss_safety": 0.0}
        for batch in self.iterate(examples, batch_size, model_device(model)):
            terms = self.pair_terms(self.answer_logps(model, batch), self.reference_logps(batch), batch, scaled=False)
            for pair in ("helpful", "safety"):
                pair_loss, margin = terms[pair]
                totals[f"{pair}_accuracy"] += (margin > 0).sum().item()
                totals[f"loss_{pair}"] += pair_loss.sum().item()
        return {f"eval/{k}": v / max(len(examples), 1) for k, v in totals.items()}

    # ---- dual step --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_and_score(self, model, step: int) -> dict[str, list[float]]:
        """Sample one answer per held-out prompt (the next `num_prompts` of them) from the policy and score it.

        Returns {"cost": [...], "reward": [...] (when a reward model is set), "kl": [...]}: one value per sample;
        kl is log π(y|x) − log π_ref(y|x) on the sampled tokens, whose mean over y ~ π estimates KL(π ‖ π_ref).
        """
        n = min(int(self.sampling["num_prompts"]), len(self.dual_prompts))
        first = (step // self.lagrangian.update_every - 1) * n  # rotate through the prompts, a pure function of step
        prompts = [self.dual_prompts[(first + i) % len(self.dual_prompts)] for i in range(n)]
        policy, size = unwrap(model), int(self.sampling["batch_size"])
        answers, kl = [], []
        for start in range(0, n, size):
            ids = [prompt_ids(self.tokenizer, p) for p in prompts[start:start + size]]
            samples = sample(policy, self.tokenizer, ids, int(self.sampling["max_new_tokens"]), do_sample=True,
                             temperature=float(self.sampling["temperature"]), top_p=float(self.sampling["top_p"]))
            answers += samples.texts
            kl += self.sample_kl(policy, samples.tensors())
        out = {role: self.scorers[role].score(prompts, answers).tolist() for role in self.scorers}
        out["kl"] = kl
        return out

    @torch.no_grad()
    def sample_kl(self, policy, batch: dict[str, torch.Tensor]) -> list[float]:
        """log π(y|x) − log π_ref(y|x) of each sampled answer (summed over its tokens) of a `Samples` batch."""
        with eval_mode(policy):
            policy_logps = sequence_logps(policy, batch, self.logits_chunk_size)  # (N,)
            with self.reference.model() as ref_model:
                ref_logps = sequence_logps(ref_model, batch, self.logits_chunk_size)  # (N,)
        return (policy_logps - ref_logps).tolist()

    def on_step_end(self, model, step):
        if "cost" in self.scorers and self.lagrangian.due(step):
            # every rank's samples, so that λ (and the loss it weights) is the same on all ranks
            scored = {k: gather_lists(v) for k, v in self.sample_and_score(model, step).items()}
            self.lagrangian.record(scored["cost"], scored.get("reward"))
            self.lagrangian.update(step)
            self.latest = {"safe/cost": self.lagrangian.cost_mean, "train/kl": sum(scored["kl"]) / len(scored["kl"]),
                           "safe/sample_cost": sum(scored["cost"]) / len(scored["cost"])}
            if "reward" in scored:
                self.latest["safe/reward"] = self.lagrangian.reward_mean
        # the latest figures every step, so they appear whenever the loop logs
        return {**self.latest, "safe/lambda": self.lagrangian.value}

    def state_dict(self):
        return {"lagrangian": self.lagrangian.state_dict(), "latest": dict(self.latest)}

    def load_state_dict(self, state):
        self.lagrangian.load_state_dict(state["lagrangian"])
        self.latest = dict(state.get("latest", {}))
