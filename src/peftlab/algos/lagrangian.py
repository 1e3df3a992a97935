"""The Lagrange multiplier of safe_dpo's cost constraint and its update (Safe RLHF, Dai et al. 2023).

λ weighs the safety pairs against the helpful ones. It follows projected dual ascent in log space on the
constraint J_C ≤ d, where J_C is the mean cost of the policy's own sampled answers over a window:
`peftlab.losses.lagrange_step` is the step, `LagrangeMultiplier` holds λ, the window and the schedule (the knob
names of safe-rlhf's PPO-Lag), and checkpoints them.
"""

from __future__ import annotations

import math
from collections import deque

from peftlab import losses
from peftlab.errors import ConfigError


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

    def __init__(self, *, lambda_init: float, lambda_lr: float, lambda_max: float, threshold: float, window: int,
                 update_every: int, update_delay_steps: int):
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
