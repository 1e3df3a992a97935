"""Safety-constrained DPO: maximize helpfulness subject to an expected-cost constraint, with an adaptive λ.

Each PKU-SafeRLHF row (x, y_0, y_1) gives two preference pairs over the same two answers:

    helpful pair   by `better_response_id`    L_H = DPO loss on it
    safety pair    by `safer_response_id`     L_S = DPO loss on it (optionally with the SafeDPO margin Δ)

The primal loss is the normalized Lagrangian (Safe RLHF, Dai et al. 2023, Eq. 10, rewritten for DPO):

    L = (L_H + λ·L_S) / (1 + λ)          λ a number during the policy step (no gradient flows into it)
      + rpo_alpha · (NLL_H + λ·NLL_S) / (1 + λ)   the chosen answers' NLL (RPO as in algo=dpo), if rpo_alpha > 0

The dual variable follows projected dual ascent in log space on the constraint J_C ≤ d, where J_C is the mean
cost-model score of answers SAMPLED FROM THE POLICY for held-out prompts (not of the dataset's answers):

    every `update_every` steps: sample, score with the cost model, keep the last `window` scores, J_C = their mean
    after `update_delay_steps`:  log λ ← min(log λ + α·λ·(J_C − d), log λ_max)   (peftlab.losses.lagrange_step)

so λ rises while the policy's answers cost more than d and falls once they cost less; λ stays in (0, λ_max].

Options: reward-scaled β per pair, β·(1 + w·(1 − exp(−k·δ))) with δ the positive reward margin (helpful pair)
or cost margin (safety pair) of the two answers under the frozen scorers; and the SafeDPO margin Δ (Kim et al.
2025) on safety pairs whose chosen answer is safe and rejected answer unsafe.

The reward and cost models share the policy's base as extra adapters when they were trained on it
(see peftlab.scorers); otherwise they are loaded separately, frozen.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from peftlab import losses, scorers
from peftlab.algos.base import Algorithm
from peftlab.algos.dpo import PairMixin, check_loss_options
from peftlab.data.format import IGNORE, encode, pad, render_prompt
from peftlab.data.schemas import as_messages
from peftlab.dist import gather_lists
from peftlab.models import unwrap
from peftlab.validate import ConfigError


class LagrangeMultiplier:
    """λ for the constraint J_C ≤ d, with the knobs of safe-rlhf's PPO-Lag.

    Args:
        lambda_init: λ before the first update (> 0).
        lambda_lr: α, the dual step size (0 keeps λ fixed).
        lambda_max: upper bound of λ.
        threshold: d, the cost budget.
        window: how many of the most recent sampled costs J_C averages.
        update_every: steps between samplings (and dual updates).
        update_delay_steps: λ does not move at steps ≤ this (costs are still recorded).
    """

    def __init__(self, lambda_init: float = 1.0, lambda_lr: float = 0.1, lambda_max: float = 10.0,
                 threshold: float = 0.0, window: int = 128, update_every: int = 10, update_delay_steps: int = 0):
        if not 0 < lambda_init <= lambda_max:
            raise ConfigError(f"algo.lagrangian.lambda_init={lambda_init} must be in (0, lambda_max={lambda_max}]")
        if lambda_lr < 0:
            raise ConfigError(f"algo.lagrangian.lambda_lr={lambda_lr} must be >= 0")
        if window < 1 or update_every < 1 or update_delay_steps < 0:
            raise ConfigError("algo.lagrangian: window and update_every must be >= 1, update_delay_steps >= 0 "
                              f"(got {window}, {update_every}, {update_delay_steps})")
        self.lambda_lr, self.lambda_max, self.threshold = float(lambda_lr), float(lambda_max), float(threshold)
        self.update_every, self.update_delay_steps = int(update_every), int(update_delay_steps)
        self.log_lambda = math.log(lambda_init)
        self.costs: deque[float] = deque(maxlen=int(window))
        self.rewards: deque[float] = deque(maxlen=int(window))

    @property
    def value(self) -> float:
        return math.exp(self.log_lambda)

    @property
    def cost_mean(self) -> float:
        """J_C over the window (nan before any sample)."""
        return sum(self.costs) / len(self.costs) if self.costs else float("nan")

    @property
    def reward_mean(self) -> float:
        """J_R over the same samples as J_C (nan when no reward model scored them)."""
        return sum(self.rewards) / len(self.rewards) if self.rewards else float("nan")

    def due(self, step: int) -> bool:
        """Whether `step` (1-based, after the optimizer step) samples answers and may update λ."""
        return step % self.update_every == 0

    def record(self, costs: list[float], rewards: list[float] | None = None) -> None:
        self.costs.extend(float(c) for c in costs)
        if rewards is not None:
            self.rewards.extend(float(r) for r in rewards)

    def update(self, step: int) -> bool:
        """One projected dual-ascent step on log λ from the window's J_C; False (no move) during the delay."""
        if step <= self.update_delay_steps or not self.costs:
            return False
        self.log_lambda = losses.lagrange_step(self.log_lambda, self.cost_mean, self.threshold, self.lambda_lr,
                                               self.lambda_max)
        return True

    def state_dict(self) -> dict:
        return {"log_lambda": self.log_lambda, "costs": list(self.costs), "rewards": list(self.rewards)}

    def load_state_dict(self, state: dict) -> None:
        self.log_lambda = float(state["log_lambda"])
        self.costs.clear()
        self.costs.extend(state["costs"])
        self.rewards.clear()
        self.rewards.extend(state["rewards"])


def scaled_beta(beta: float, margin: torch.Tensor, weight: float, rate: float) -> torch.Tensor:
    """Reward-scaled β: β·(1 + w·(1 − exp(−k·δ))) with δ = max(margin, 0). margin (B,) → (B,).

    Pairs whose answers the scorer separates clearly get up to (1 + w)·β (a stronger pull), ambiguous ones ≈ β.
    """
    delta = margin.clamp(min=0.0)  # (B,)
    return beta * (1.0 + weight * (1.0 - torch.exp(-rate * delta)))  # (B,)


class SafeDPO(PairMixin, Algorithm):
    data_kind = "safety"
    needs_reference = True

    def __init__(self, tokenizer, max_length: int, start_from: str = "sft", beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, precompute_ref: bool = False,
                 safety_margin: float = 0.0, beta_scaling: dict | None = None, lagrangian: dict | None = None,
                 sampling: dict | None = None, reward_model: str | None = None, cost_model: str | None = None,
                 share_base: bool = True, policy_base: dict | None = None, ref_batch_size: int = 32,
                 score_batch_size: int = 32, rpo_alpha: float = 0.0):
        super().__init__(tokenizer, max_length, start_from)
        check_loss_options(beta, loss_type, label_smoothing, rpo_alpha)
        self.rpo_alpha = float(rpo_alpha)
        if safety_margin and loss_type == "ipo":
            raise ConfigError("algo.safety_margin is not defined for algo.loss_type=ipo (use sigmoid or hinge)")
        if safety_margin < 0:
            raise ConfigError(f"algo.safety_margin={safety_margin} must be >= 0")
        self.beta, self.loss_type, self.label_smoothing = float(beta), loss_type, float(label_smoothing)
        self.precompute_ref, self.ref_batch_size = bool(precompute_ref), int(ref_batch_size)
        self.safety_margin = float(safety_margin)
        self.beta_scaling = {"weight": 0.0, "rate": 1.0, **(beta_scaling or {})}
        self.lagrangian = LagrangeMultiplier(**(lagrangian or {}))
        self.sampling = {"num_prompts": 32, "max_new_tokens": 32, "temperature": 1.0, "top_p": 1.0,
                         "batch_size": 64, **(sampling or {})}
        self.score_batch_size = int(score_batch_size)
        self.share_base = bool(share_base)
        self.scorers: dict[str, scorers.Scorer] = {}
        self.latest: dict[str, float] = {}

        # Resolve the scorers now (configs and tokenizers only), so a bad path or tokenizer is a one-line error
        # before any weight is loaded; their weights are loaded in setup().
        self.sources: dict[str, scorers.ScorerSource] = {}
        self.shared: dict[str, bool] = {}
        policy_base = policy_base or {}
        for role, path in (("reward", reward_model), ("cost", cost_model)):
            if not path:
                continue
            source = scorers.inspect_source(path, key=f"algo.{role}_model")
            shared = self.share_base and bool(policy_base) and scorers.can_share(
                source, self.policy_identity(policy_base), policy_base.get("peft_method", "none"))
            scorers.check_tokenizer(source, tokenizer, shared)
            self.sources[role], self.shared[role] = source, shared
        if self.beta_scaling["weight"] and len(self.sources) < 2:
            raise ConfigError("algo.beta_scaling.weight > 0 needs algo.reward_model and algo.cost_model")
        if "cost" not in self.sources and self.lagrangian.lambda_lr > 0:
            print("safe_dpo: no algo.cost_model, so λ stays at algo.lagrangian.lambda_init "
                  f"({self.lagrangian.value:g}) for the whole run")

    def policy_identity(self, policy_base: dict) -> tuple:
        """(checkpoint, starting adapter, quantization) of the policy's frozen base (see scorers.base_identity)."""
        from omegaconf import OmegaConf

        cfg = OmegaConf.create({
            "model": {k: policy_base.get(k) for k in ("name_or_path", "adapter", "sft_adapter")},
            "algo": {"start_from": self.start_from},
            "peft": {"method": policy_base.get("peft_method", "none"), "quantize": policy_base.get("quantize")},
        })
        return scorers.base_identity(cfg)

    def hparams(self):
        lag = self.lagrangian
        return {"beta": self.beta, "loss_type": self.loss_type, "label_smoothing": self.label_smoothing,
                "safety_margin": self.safety_margin, "beta_scaling": dict(self.beta_scaling),
                "rpo_alpha": self.rpo_alpha, "lambda_lr": lag.lambda_lr, "lambda_max": lag.lambda_max,
                "threshold": lag.threshold, "window": lag.costs.maxlen, "update_every": lag.update_every,
                "update_delay_steps": lag.update_delay_steps, "final_lambda": lag.value,
                "reward_model": self.sources["reward"].path if "reward" in self.sources else None,
                "cost_model": self.sources["cost"].path if "cost" in self.sources else None,
                "scorers_share_base": dict(self.shared)}

    # ---------------------------------------------------------------------------------------------------------------
    # setup: scorers, held-out prompts, precomputed reference log-probs and scorer margins

    def setup(self, policy, reference=None, device=None, train_examples=(), eval_examples=()):
        super().setup(policy, reference, device, train_examples, eval_examples)
        self.policy = policy
        dtype = next(p for p in unwrap(policy).parameters() if p.is_floating_point()).dtype  # the base's dtype
        cuda_devices = [device] if device is not None and device.type == "cuda" else []
        for role, source in self.sources.items():
            # Loading initializes modules before their weights arrive, which draws random numbers: fork the RNG so
            # that the run (its samples, hence λ) is the same whether the scorers share the base or not.
            with torch.random.fork_rng(devices=cuda_devices):
                self.scorers[role] = scorers.load_scorer(
                    source, policy=policy, shared=self.shared[role], name=role, tokenizer=self.tokenizer,
                    device=device, dtype=dtype, max_length=self.max_length, batch_size=self.score_batch_size)
            how = "as an adapter on the policy's base" if self.shared[role] else "separately"
            print(f"safe_dpo: {role} model {source.path} loaded {how}")
        # held-out prompts the dual step samples answers for (each prompt once, in data order)
        seen, self.dual_prompts = set(), []
        for example in eval_examples or train_examples:
            key = repr(example["prompt"])
            if key not in seen:
                seen.add(key)
                self.dual_prompts.append(example["prompt"])
        if self.precompute_ref:
            self.precompute_reference(list(train_examples) + list(eval_examples), self.ref_batch_size, device)
        if self.beta_scaling["weight"]:
            self.score_answers(list(train_examples))

    @torch.no_grad()
    def score_answers(self, examples: list[dict]) -> None:
        """Write the reward and cost of both answers into each example (for reward-scaled β)."""
        prompts = [e["prompt"] for e in examples for _ in range(2)]
        answers = [a for e in examples for a in e["texts"]]
        for role in ("reward", "cost"):
            values = self.scorers[role].score(prompts, answers).view(-1, 2)  # (N, 2)
            for example, pair in zip(examples, values.tolist()):
                example[role] = pair

    # ---------------------------------------------------------------------------------------------------------------
    # data

    def build_examples(self, rows):
        examples = []
        for r in rows:
            texts = [r["response_0"], r["response_1"]]
            examples.append({
                "prompt": r["prompt"],
                "texts": texts,
                "answers": self.encode_answers(r["prompt"], texts),
                "better": r["better_response_id"],
                "safer": r["safer_response_id"],
                "is_safe": [r["is_response_0_safe"], r["is_response_1_safe"]],
            })
        return examples

    def collate(self, examples):
        """input_ids (2B, L): rows 0..B-1 are response_0, rows B..2B-1 response_1; plus the pair labels (B,)."""
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

    # ---------------------------------------------------------------------------------------------------------------
    # loss

    def pair_terms(self, policy_logps, ref_logps, batch, scaled: bool):
        """Per-row DPO losses and implicit-reward margins of the helpful and the safety pair, (B,) each."""
        rows = torch.arange(batch["better"].shape[0], device=policy_logps.device)
        policy = policy_logps.view(2, -1)  # (2, B): answer k of row b at [k, b]
        ref = ref_logps.view(2, -1)  # (2, B)
        out = {}
        for pair, chosen_id in (("helpful", batch["better"]), ("safety", batch["safer"])):
            rejected_id = 1 - chosen_id  # (B,)
            beta: float | torch.Tensor = self.beta
            if scaled and self.beta_scaling["weight"]:
                # δ: how clearly the scorer separates the pair (reward up for helpful, cost down for safety)
                if pair == "helpful":
                    values = batch["reward"]  # (B, 2)
                    delta = values[rows, chosen_id] - values[rows, rejected_id]
                else:
                    values = batch["cost"]  # (B, 2)
                    delta = values[rows, rejected_id] - values[rows, chosen_id]
                beta = scaled_beta(self.beta, delta, self.beta_scaling["weight"], self.beta_scaling["rate"])
            margin = None
            if pair == "safety" and self.safety_margin:
                safe = batch["is_safe"]  # (B, 2)
                clear_cut = safe[rows, chosen_id] & ~safe[rows, rejected_id]  # safe answer over an unsafe one
                margin = self.safety_margin * clear_cut.to(policy.dtype)  # (B,)
            ipo = {}
            if self.loss_type == "ipo":
                lengths = batch["lengths"].view(2, -1)
                ipo = {"chosen_lengths": lengths[chosen_id, rows], "rejected_lengths": lengths[rejected_id, rows]}
            pair_loss, chosen_rewards, rejected_rewards = losses.dpo_loss(
                policy[chosen_id, rows], policy[rejected_id, rows], ref[chosen_id, rows], ref[rejected_id, rows],
                beta, self.loss_type, self.label_smoothing, margin, **ipo)
            out[pair] = (pair_loss, chosen_rewards - rejected_rewards)
        return out

    def loss(self, model, batch):
        policy_logps = self.answer_logps(model, batch)  # (2B,)
        terms = self.pair_terms(policy_logps, self.reference_logps(batch), batch, scaled=True)
        (helpful_loss, helpful_margin), (safety_loss, safety_margin) = terms["helpful"], terms["safety"]
        lam = self.lagrangian.value  # a number: no gradient reaches λ in the policy step
        loss = ((helpful_loss + lam * safety_loss) / (1.0 + lam)).mean()
        stats = {}
        if self.rpo_alpha:  # RPO on each pair's chosen answers, weighted as the pair losses are
            rows = torch.arange(batch["better"].shape[0], device=policy_logps.device)
            policy, lengths = policy_logps.view(2, -1), batch["lengths"].view(2, -1)  # (2, B), (2, B)
            nll = {pair: losses.chosen_nll(policy[chosen_id, rows], lengths[chosen_id, rows])
                   for pair, chosen_id in (("helpful", batch["better"]), ("safety", batch["safer"]))}
            loss = loss + self.rpo_alpha * (nll["helpful"] + lam * nll["safety"]) / (1.0 + lam)
            stats = {"loss/nll_helpful": nll["helpful"].item(), "loss/nll_safety": nll["safety"].item()}
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
        for batch in self.iterate(examples, batch_size, unwrap(model).device):
            terms = self.pair_terms(self.answer_logps(model, batch), self.reference_logps(batch), batch, scaled=False)
            for pair in ("helpful", "safety"):
                pair_loss, margin = terms[pair]
                totals[f"{pair}_accuracy"] += (margin > 0).sum().item()
                totals[f"loss_{pair}"] += pair_loss.sum().item()
        return {f"eval/{k}": v / max(len(examples), 1) for k, v in totals.items()}

    # ---------------------------------------------------------------------------------------------------------------
    # dual step

    def sample_and_score(self, model, step: int) -> dict[str, list[float]]:
        """Sample answers from the policy for the next held-out prompts and score them.

        Returns {"cost": [...], "reward": [...] (when a reward model is set), "kl": [...]}: one value per sample;
        kl is log π(y|x) − log π_ref(y|x) on the sampled tokens, whose mean over y ~ π estimates KL(π ‖ π_ref).
        """
        n = min(int(self.sampling["num_prompts"]), len(self.dual_prompts))
        first = (step // self.lagrangian.update_every - 1) * n  # rotate through the prompts, a pure function of step
        prompts = [self.dual_prompts[(first + i) % len(self.dual_prompts)] for i in range(n)]
        policy = unwrap(model)
        was_training = policy.training
        policy.eval()
        answers, kl = [], []
        size = int(self.sampling["batch_size"])
        for start in range(0, n, size):
            texts, batch = self.sample(policy, prompts[start:start + size])
            answers += texts
            kl += self.sample_kl(policy, batch)
        policy.train(was_training)
        out = {role: self.scorers[role].score(prompts, answers).tolist() for role in self.scorers}
        out["kl"] = kl
        return out

    @torch.no_grad()
    def sample(self, policy, prompts: list) -> tuple[list[str], dict[str, torch.Tensor]]:
        """One sampled answer per prompt: the texts, and the exact token batch (left-padded prompt + answer).

        Returns texts and {"input_ids", "attention_mask", "labels"} (B, P+C): labels are the answer tokens up to and
        including the first end-of-sequence token, -100 elsewhere (prompt, padding, anything after the end).
        """
        pad_id, eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ids = [encode(self.tokenizer, render_prompt(self.tokenizer, as_messages(p))) for p in prompts]
        input_ids = pad(ids, pad_id, side="left").to(policy.device)  # (B, P)
        prompt_mask = pad([[1] * len(x) for x in ids], 0, side="left").to(policy.device)  # (B, P)
        out = policy.generate(input_ids=input_ids, attention_mask=prompt_mask, do_sample=True,
                              max_new_tokens=int(self.sampling["max_new_tokens"]),
                              temperature=float(self.sampling["temperature"]), top_p=float(self.sampling["top_p"]),
                              pad_token_id=pad_id, eos_token_id=eos_id)  # (B, P+C)
        answer = out[:, input_ids.shape[1]:]  # (B, C)
        is_eos = answer == eos_id  # (B, C)
        after_end = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # (B, C) strictly after the first eos
        texts = self.tokenizer.batch_decode(answer.masked_fill(after_end, pad_id), skip_special_tokens=True)
        batch = {
            "input_ids": out,
            "attention_mask": torch.cat([prompt_mask, (~after_end).long()], dim=1),  # (B, P+C)
            "labels": torch.cat([torch.full_like(input_ids, IGNORE), answer.masked_fill(after_end, IGNORE)], dim=1),
        }
        return texts, batch

    @torch.no_grad()
    def sample_kl(self, policy, batch: dict[str, torch.Tensor]) -> list[float]:
        """log π(y|x) − log π_ref(y|x) of each sampled answer (summed over its tokens), from `sample`'s batch."""
        # left padding: positions count real tokens only, as they did during generation
        position_ids = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)  # (B, P+C)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "position_ids": position_ids}
        policy_logps = losses.sequence_logps(policy(**inputs).logits, batch["labels"])  # (B,)
        with self.reference.model() as ref_model:
            ref_logps = losses.sequence_logps(ref_model(**inputs).logits, batch["labels"])  # (B,)
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
