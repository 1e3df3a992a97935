"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath §4.1) with its DAPO and Dr. GRPO variants.

One optimizer step, for each micro-batch of B prompts (G = num_generations, N = B·G completions, P prompt length,
C = completion length):

    rollout (in `step_batches`, before any loss of the step, so every completion comes from the same weights):
        prompt ids (N, P), left-padded, each prompt repeated G times consecutively
        → ONE `peftlab.sampling.sample` call (KV cache, temperature / top_p / top_k), adapter active, eval mode
        → completion ids (N, C), completion mask (N, C) up to and including the first end-of-turn token
        → rewards r (N,) = Σ_f w_f r_f(prompts, completions, **columns)                 (peftlab.rewards)
        → advantages A (N,) = (r − mean_group) / (std + 1e-4)   per `scale_rewards`     (losses.group_advantages)
        → old log-probs (N, C) when μ = num_iterations > 1; reference log-probs (N, C) when β > 0
          (the same weights with the adapter disabled: `peftlab.models.Reference`, no second model under LoRA)
    loss (in `loss`, with gradients):
        log π_θ (N, C) from one forward over prompt + completion
        → per-token clipped surrogate + β·k3 KL, aggregated by `loss_type`                 (losses.grpo_loss)

    ρ_t = π_θ / π_old,  ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε_high) A) + β (π_ref/π_θ − log(π_ref/π_θ) − 1)

μ > 1 (PPO-style reuse, DeepSeekMath Algorithm 1's inner loop): a rollout is generated at optimizer steps
0, μ, 2μ, ... and reused, with its recorded old log-probs, by the μ − 1 steps after it; the prompts the loop draws
for those steps are not used. With μ = 1, old log-probs are log π_θ detached (ρ = 1, gradient ∇log π_θ), as TRL does.

Aggregation across micro-batches (what `num_items` returns, the loop weighting each micro-batch loss by its share):
`dapo` counts completion tokens, so the step's loss is the token mean over every completion of the step, ranks and
accumulation included (DAPO Eq. 8; TRL's `num_items_in_batch`); `grpo`, `bnpo` and `dr_grpo` count completions, so
equal micro-batches are averaged with equal weights (TRL divides those losses by the accumulation steps).

Group statistics (mean, std, `scale_rewards=batch`'s std) are taken over the micro-batch's own B·G completions,
which always holds whole groups (TRL takes them over its gathered generation batch: the same with one micro-batch
per step and one process).
"""

from __future__ import annotations

import torch

from peftlab import losses
from peftlab.algos.base import Algorithm
from peftlab.data.format import prompt_ids
from peftlab.data.schemas import as_messages
from peftlab.errors import ConfigError
from peftlab.rewards import compute_rewards, resolve_rewards
from peftlab.logprobs import completion_logps
from peftlab.sampling import EVAL_SEED, forked_rng, model_device, sample, to_device

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.to(x.dtype)
    return float((x * mask).sum() / mask.sum().clamp(min=1))


class GRPO(Algorithm):
    data_kind = "grpo"
    generates = True

    def __init__(self, *, rewards: list, accuracy_reward: str | None, num_generations: int, max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, scale_rewards: str, loss_type: str, beta: float,
                 epsilon: float, epsilon_high: float | None, num_iterations: int, mask_truncated_completions: bool,
                 eval_num_generations: int, **common):
        super().__init__(**common)
        max_length = self.max_length
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"algo.loss_type={loss_type}: choose one of {', '.join(LOSS_TYPES)}")
        if scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"algo.scale_rewards={scale_rewards}: choose one of {', '.join(SCALE_REWARDS)}")
        if int(num_generations) < 2:
            raise ConfigError(f"algo.num_generations={num_generations} must be >= 2 (advantages compare a group)")
        if int(num_iterations) < 1:
            raise ConfigError(f"algo.num_iterations={num_iterations} must be >= 1")
        if float(beta) < 0 or float(temperature) <= 0 or not 0 < float(top_p) <= 1:
            raise ConfigError(f"algo.beta={beta} must be >= 0, algo.temperature={temperature} > 0, "
                              f"algo.top_p={top_p} in (0, 1]")
        if not 0 < int(max_new_tokens) < int(max_length):
            raise ConfigError(f"algo.max_new_tokens={max_new_tokens} must be in (0, model.max_length={max_length})")
        try:
            self.rewards = resolve_rewards(rewards)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        names = [r.name for r in self.rewards]
        if accuracy_reward is not None and accuracy_reward not in names:
            raise ConfigError(f"algo.accuracy_reward={accuracy_reward} is not one of the reward names {names}")

        self.accuracy_reward = accuracy_reward
        self.num_generations, self.max_new_tokens = int(num_generations), int(max_new_tokens)
        self.sequences_per_example = self.num_generations  # a prompt's group of completions
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.scale_rewards, self.loss_type = scale_rewards, loss_type
        self.beta, self.epsilon = float(beta), float(epsilon)
        self.epsilon_high = float(epsilon if epsilon_high is None else epsilon_high)
        self.num_iterations = int(num_iterations)
        self.mask_truncated_completions = bool(mask_truncated_completions)
        self.eval_num_generations = int(eval_num_generations)
        self.max_prompt_length = int(max_length) - self.max_new_tokens  # prompts are cut from the left to fit
        self.needs_reference = self.beta > 0  # the builder then provides a Reference (adapter disabled)
        self.rollouts: list[dict] = []  # the latest step's rollouts, reused by the μ − 1 steps after it; checkpointed
        self.generate_calls = 0  # number of `generate` calls for training rollouts (tests read it)

    def hparams(self):
        return {
            "rewards": [{"name": r.name, "weight": r.weight} for r in self.rewards],
            "accuracy_reward": self.accuracy_reward,
            "num_generations": self.num_generations,
            "max_new_tokens": self.max_new_tokens,
            "max_prompt_length": self.max_prompt_length,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "scale_rewards": self.scale_rewards,
            "loss_type": self.loss_type,
            "beta": self.beta,
            "epsilon": self.epsilon,
            "epsilon_high": self.epsilon_high,
            "num_iterations": self.num_iterations,
            "mask_truncated_completions": self.mask_truncated_completions,
            "eval_num_generations": self.eval_num_generations,
            **super().hparams(),
        }

    def setup(self, policy, *, reference, device, train_examples, eval_examples):
        super().setup(policy, reference=reference, device=device, train_examples=train_examples,
                      eval_examples=eval_examples)
        for reward in self.rewards:
            if hasattr(reward.function, "setup"):  # reward models load onto the policy's device
                reward.function.setup(device=device)

    # ---- data -------------------------------------------------------------------------------------------------------

    def build_examples(self, rows):
        """Canonical grpo rows → {prompt (messages), prompt_ids (left-truncated), columns (the rest, for rewards)}."""
        examples = []
        for row in rows:
            ids = prompt_ids(self.tokenizer, row["prompt"])
            examples.append({"prompt": as_messages(row["prompt"]), "prompt_ids": ids[-self.max_prompt_length:],
                             "truncated": len(ids) > self.max_prompt_length,
                             "columns": {k: v for k, v in row.items() if k != "prompt"}})
        return examples

    def step_batches(self, model, step, micro_examples):
        """Each micro-batch of B prompts → a scored rollout of B·G completions, all generated before the step's
        first loss; with μ = num_iterations > 1, only at steps 0, μ, 2μ, ..., the steps between reuse them."""
        if step % self.num_iterations != 0 and self.rollouts:
            return self.rollouts  # reuse: same completions, advantages and old log-probs
        batches = [self.rollout(model, examples) for examples in micro_examples]
        self.rollouts = batches if self.num_iterations > 1 else []
        return batches

    def num_items(self, batch):
        if self.loss_type == "dapo":
            return int(batch["completion_mask"].sum())  # tokens: the step's loss is a token mean (DAPO Eq. 8)
        return int(batch["completion_ids"].shape[0])  # completions: equal micro-batches weigh equally

    # ---- rollout ----------------------------------------------------------------------------------------------------

    def sample_answers(self, model, prompt_ids: list[list[int]], greedy: bool):
        """Completions of `prompt_ids` with the training sampling settings (or greedy), by peftlab.sampling.sample."""
        if greedy:
            return sample(model, self.tokenizer, prompt_ids, self.max_new_tokens)
        return sample(model, self.tokenizer, prompt_ids, self.max_new_tokens, do_sample=True,
                      temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def score_samples(self, rows, answers):
        prompts = [as_messages(r["prompt"]) for r in rows]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
        completions = [[{"role": "assistant", "content": a}] for a in answers]
        ids = [self.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
        total, per_function = compute_rewards(self.rewards, prompts, completions, completion_ids=ids, **columns)
        scores = {"reward": total.tolist()}
        for f, reward in enumerate(self.rewards):
            scores[reward.name] = [None if v != v else float(v) for v in per_function[:, f].tolist()]
        return scores

    def score(self, examples: list[dict], samples, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (N,) and per-function rewards (N, F) of `samples` (prompt b of `examples` repeated `repeats`×)."""
        completions = [[{"role": "assistant", "content": text}] for text in samples.texts]
        prompts = [e["prompt"] for e in examples for _ in range(repeats)]
        columns = {k: [e["columns"][k] for e in examples for _ in range(repeats)] for k in examples[0]["columns"]}
        return compute_rewards(self.rewards, prompts, completions, completion_ids=samples.completion_tokens(),
                               **columns)

    @torch.no_grad()
    def rollout(self, model, examples: list[dict]) -> dict:
        """Generate G completions per prompt with the current policy, score them, and compute what the loss needs.

        Returns the batch `loss` consumes: the `Samples` tensors, advantages (N,), old_logps (N, C) when μ > 1,
        ref_logps (N, C) when β > 0, and `rollout_metrics` (floats).
        """
        group = self.num_generations
        ids = [e["prompt_ids"] for e in examples for _ in range(group)]  # N = B·G, groups consecutive
        samples = self.sample_answers(model, ids, greedy=False)
        self.generate_calls += 1
        batch = samples.tensors()
        if self.mask_truncated_completions:  # DAPO's overlong filtering: no gradient from cut-off answers
            batch["completion_mask"] = batch["completion_mask"] & ~samples.truncated.unsqueeze(1)

        rewards, per_function = self.score(examples, samples, group)  # (N,), (N, F)
        advantages, zero_std = losses.group_advantages(rewards, group, self.scale_rewards)  # (N,), (N,)
        batch["advantages"] = advantages.to(samples.input_ids.device)

        if self.num_iterations > 1:  # π_old: the policy that generated, for the ratio of the reuse steps
            batch["old_logps"], _ = completion_logps(model, batch, self.temperature, self.logits_chunk_size)
        if self.beta > 0:
            with self.reference.model() as reference:
                batch["ref_logps"], _ = completion_logps(reference, batch, self.temperature, self.logits_chunk_size)

        lengths = batch["completion_mask"].sum(dim=1).float()  # (N,)
        metrics = {
            "train/reward": rewards.mean().item(),
            "train/reward_std": rewards.view(-1, group).std(dim=1).mean().item(),  # mean within-group std
            "train/frac_reward_zero_std": zero_std.view(-1, group)[:, 0].float().mean().item(),
            "train/completion_length": lengths.mean().item(),
            "train/completion_length_max": lengths.max().item(),
            "train/truncated_ratio": samples.truncated.float().mean().item(),
        }
        for f, reward in enumerate(self.rewards):
            values = per_function[:, f]
            metrics[f"train/rewards/{reward.name}/mean"] = float(values.nanmean()) if values.isfinite().any() else 0.0
            metrics[f"train/rewards/{reward.name}/std"] = float(values[values.isfinite()].std()) \
                if values.isfinite().sum() > 1 else 0.0
        batch["rollout_metrics"] = metrics
        return batch

    # ---- loss -------------------------------------------------------------------------------------------------------

    def loss(self, model, batch):
        """The GRPO objective of one micro-batch (see the module docstring); metrics are `train/...` floats."""
        logps, entropy = completion_logps(model, batch, self.temperature, self.logits_chunk_size)  # (N, C), (N, C)
        old_logps = batch["old_logps"] if "old_logps" in batch else logps.detach()
        loss, stats = losses.grpo_loss(
            logps,
            old_logps,
            batch["advantages"],
            batch["completion_mask"],
            ref_logps=batch.get("ref_logps"),
            beta=self.beta,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            loss_type=self.loss_type,
            max_completion_length=self.max_new_tokens,
        )
        metrics = dict(batch["rollout_metrics"])
        metrics["train/entropy"] = masked_mean(entropy, batch["completion_mask"])
        metrics["train/clip_ratio"] = float(stats["clip_ratio/region"])
        metrics["train/clip_ratio/low"] = float(stats["clip_ratio/low"])
        metrics["train/clip_ratio/high"] = float(stats["clip_ratio/high"])
        if "kl" in stats:
            metrics["train/kl"] = float(stats["kl"])
        return loss, metrics

    def state_dict(self):
        """The buffered rollouts of μ > 1 (on the CPU): what the next steps reuse after a resume."""
        return {"rollouts": [to_device(b, "cpu") for b in self.rollouts]}

    def load_state_dict(self, state):
        self.rollouts = [to_device(b, self.device) for b in state.get("rollouts", [])]

    # ---- evaluation -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size):
        """Held-out prompts answered by the policy, scored by the reward functions.

        Sampled, `eval_num_generations` answers per prompt with the training sampling settings (temperature, top_p,
        top_k) and a fixed seed, so base/ and eval/ figures share their random numbers:
            eval/reward            mean total reward: the policy's expected reward, the quantity GRPO maximizes
            eval/rewards/<name>    each function's mean
            eval/completion_length mean tokens per answer
        Greedy, one answer per prompt:
            eval/reward_greedy     mean total reward of the greedy answers
            eval/greedy_accuracy   mean of the `accuracy_reward` function on the greedy answers (exact match)
        """
        if not examples:
            return {}
        sampled = self.score_answers(model, examples, batch_size, self.eval_num_generations, greedy=False)
        greedy = self.score_answers(model, examples, batch_size, 1, greedy=True)
        metrics = {"eval/reward": sampled["reward"], "eval/completion_length": sampled["completion_length"],
                   "eval/reward_greedy": greedy["reward"]}
        for reward in self.rewards:
            metrics[f"eval/rewards/{reward.name}"] = sampled[reward.name]
        if self.accuracy_reward is not None:
            metrics["eval/greedy_accuracy"] = greedy[self.accuracy_reward]
        return metrics

    def score_answers(self, model, examples, batch_size: int, repeats: int, greedy: bool) -> dict[str, float]:
        """Mean total reward, per-function means and completion length of `repeats` answers per prompt.

        Sampling runs under a forked RNG seeded with EVAL_SEED: evaluation neither depends on nor disturbs the
        training RNG (exact resume), and every evaluation of a run draws the same random numbers.
        """
        totals, per_function, lengths = [], [], []
        prompts_per_call = max(1, batch_size // repeats)
        with forked_rng(EVAL_SEED, model_device(model)):
            for start in range(0, len(examples), prompts_per_call):
                chunk = examples[start:start + prompts_per_call]
                samples = self.sample_answers(model, [e["prompt_ids"] for e in chunk for _ in range(repeats)], greedy)
                rewards, by_function = self.score(chunk, samples, repeats)
                totals.append(rewards)
                per_function.append(by_function)
                lengths.append(samples.completion_mask.sum(dim=1).float().cpu())
        by_function = torch.cat(per_function)  # (E·repeats, F)
        means = {"reward": torch.cat(totals).mean().item(), "completion_length": torch.cat(lengths).mean().item()}
        for f, reward in enumerate(self.rewards):
            values = by_function[:, f]
            means[reward.name] = float(values.nanmean()) if values.isfinite().any() else 0.0
        return means
