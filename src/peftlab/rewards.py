"""GRPO reward functions: resolving the configured list, combining it, and the rewards we ship.

A reward function has TRL's signature, so functions written for TRL's GRPOTrainer work unchanged::

    f(prompts, completions, **kwargs) -> list[float | None]

* ``prompts``: one entry per completion (a prompt repeats ``num_generations`` times, consecutively), each a message
  list ``[{"role": ..., "content": ...}]`` (our canonical prompts are conversational).
* ``completions``: TRL's conversational form, ``[{"role": "assistant", "content": text}]`` per completion;
  :func:`completion_text` turns either form into text.
* ``kwargs``: every other column of the data row, repeated like the prompts (``answer=[...]`` for grpo data), plus
  ``completion_ids`` (the generated token ids, a list of int lists). Always accept ``**kwargs``.
* ``None`` means "this function does not apply to this sample": it is left out of the weighted sum (NaN-sum, as TRL).

In the config (``algo.rewards``) each entry names a function by import path, with a weight::

    rewards:
      - function: peftlab.toyworld.judge.correctness_reward
        weight: 1.0
      - function: peftlab.rewards.reward_model   # with `kwargs`, `function` is a factory called with them
        kwargs: {path: outputs/2026-01-01/12-00-00}
        weight: 0.5
        name: rm                                  # metric name (default: the function's last path component)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

RewardFunction = Callable[..., list]


@dataclass
class WeightedReward:
    """One configured reward: its metric name, the callable, and its weight in the total reward."""

    name: str
    function: RewardFunction
    weight: float


def import_object(path: str):
    """`package.module.attribute` → the attribute (a clear error naming the path when it cannot be imported)."""
    import importlib

    module_name, _, attribute = str(path).rpartition(".")
    if not module_name:
        raise ValueError(f"reward function {path!r} is not an import path such as `package.module.function`")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward function {path!r} cannot be imported: {err}") from err


def resolve_rewards(specs: list) -> list[WeightedReward]:
    """The config's `algo.rewards` list → WeightedRewards.

    An entry is an import path (weight 1.0) or a dict with `function` (import path), optional `weight` (1.0),
    `kwargs` (when present, `function` is a factory called with them to build the reward callable) and `name`.
    Names must be unique: they key the per-function metrics.
    """
    if not specs:
        raise ValueError("algo.rewards is empty: name at least one reward function (import path + weight)")
    resolved = []
    for spec in specs:
        spec = {"function": spec} if isinstance(spec, str) else dict(spec)
        unknown = set(spec) - {"function", "weight", "kwargs", "name"}
        if "function" not in spec or unknown:
            raise ValueError(f"algo.rewards entry {spec}: expected keys function, weight, kwargs, name")
        path = str(spec["function"])
        target = import_object(path)
        function = target(**spec["kwargs"]) if spec.get("kwargs") is not None else target
        if not callable(function):
            raise ValueError(f"reward function {path!r} is not callable")
        name = str(spec.get("name") or path.rsplit(".", 1)[-1])
        resolved.append(WeightedReward(name, function, float(spec.get("weight", 1.0))))
    names = [r.name for r in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"algo.rewards: metric names {names} repeat; give the entries distinct `name`s")
    return resolved


def compute_rewards(rewards: list[WeightedReward], prompts: list, completions: list, **columns):
    """Run every reward function on the N completions and combine them.

    Returns:
        total: (N,) float32, Σ_f w_f r_f over the functions that returned a number (TRL's NaN-sum: a sample where
            every function returned None gets 0).
        per_function: (N, F) float32, NaN where a function returned None.
    """
    columns_out = []
    for reward in rewards:
        values = reward.function(prompts=prompts, completions=completions, **columns)
        if len(values) != len(completions):
            raise ValueError(f"reward function {reward.name} returned {len(values)} values for "
                             f"{len(completions)} completions")
        columns_out.append([math.nan if v is None else float(v) for v in values])
    per_function = torch.tensor(columns_out, dtype=torch.float32).T.reshape(len(completions), len(rewards))  # (N, F)
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)  # (F,)
    total = (per_function * weights).nansum(dim=1)  # (N,)
    return total, per_function


def completion_text(completion) -> str:
    """A completion as text: a plain string, or TRL's conversational form (a list of message dicts)."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return str(completion)


# ----------------------------------------------------------------------------------------------------------------------
# GSM8K
# ----------------------------------------------------------------------------------------------------------------------

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_GSM8K_MARKED = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(" + _NUMBER + ")", re.I)
_ANY_NUMBER = re.compile(_NUMBER)


def parse_number(text: str) -> float | None:
    """`"1,234"`, `"$5"`, `"-3.50"` → float; None when it is not a number."""
    try:
        return float(str(text).replace(",", "").replace("$", "").strip().rstrip("."))
    except ValueError:
        return None


def extract_gsm8k_answer(text: str) -> float | None:
    """The final number of a GSM8K-style answer: after the last `####`, else after "the answer is", else the last
    number in the text; None when there is no number."""
    for pattern in (_GSM8K_MARKED, _ANSWER_IS, _ANY_NUMBER):
        found = pattern.findall(text)
        if found:
            return parse_number(found[-1])
    return None


def gsm8k_correctness_reward(prompts: list, completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the completion's final number (see :func:`extract_gsm8k_answer`) equals the reference `answer`
    (GSM8K's number after `####`, as the grpo schema stores it), else 0.0. Numbers compare as values (1e-6)."""
    scores = []
    for completion, reference in zip(completions, answer):
        predicted, expected = extract_gsm8k_answer(completion_text(completion)), parse_number(reference)
        scores.append(float(predicted is not None and expected is not None and abs(predicted - expected) < 1e-6))
    return scores


def gsm8k_format_reward(prompts: list, completions: list, **kwargs) -> list[float | None]:
    """1.0 when the completion ends with the GSM8K answer line `#### <number>`, else 0.0."""
    return [float(re.search(r"####\s*" + _NUMBER + r"\s*$", completion_text(c).strip()) is not None)
            for c in completions]


# ----------------------------------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------------------------------


class RewardModelReward:
    """A reward function that scores each (prompt, completion) with a trained reward model.

    The model is a run directory saved by `algo=rm`, a local sequence-classification model, or a hub id
    (see `peftlab.scorers`). It is loaded on first use, frozen, on `device` (the algorithm calls `setup` with the
    policy's device before training). Scores are raw model outputs; GRPO's group normalization makes their scale
    matter only through `weight` relative to the other rewards.
    """

    def __init__(self, path: str, batch_size: int = 32, max_length: int = 512, device: str | None = None):
        self.path, self.batch_size, self.max_length = str(path), int(batch_size), int(max_length)
        self.device = device
        self.scorer = None

    def setup(self, device=None) -> None:
        if self.device is None and device is not None:
            self.device = str(device)

    def _load(self):
        from peftlab.scorers import Scorer  # imported late: only runs that use a reward model pay for it

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return Scorer(self.path, device=device, max_length=self.max_length, batch_size=self.batch_size)

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float | None]:
        if self.scorer is None:
            self.scorer = self._load()
        scores = self.scorer.score(list(prompts), [completion_text(c) for c in completions])  # (N,)
        return [float(s) for s in scores]


def reward_model(path: str, batch_size: int = 32, max_length: int = 512, device: str | None = None) -> RewardModelReward:
    """Factory for the config: `{function: peftlab.rewards.reward_model, kwargs: {path: <rm run dir | hub id>}}`."""
    return RewardModelReward(path, batch_size=batch_size, max_length=max_length, device=device)
