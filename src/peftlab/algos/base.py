"""What the training loop asks of an algorithm.

An algorithm turns canonical data rows into training examples, hands the loop each step's micro-batches, and
computes a loss from the policy. It declares what else it needs (`needs_reference`, `head`, `data_kind`,
`generates`), and the builder (peftlab.build) provides it; it keeps any extra state (a Lagrange multiplier, buffered
rollouts) in `state_dict()` so that checkpoints resume it exactly.

Constructors take keyword-only arguments with no defaults: the values come from conf/algo/<name>.yaml, the one
source of defaults, plus what the builder injects (`tokenizer`, `max_length`, `policy`: the policy's identity, and
`logits_chunk_size`: trainer.logits_chunk_size, for `peftlab.logprobs.token_logps`).
"""

from __future__ import annotations

import torch

from peftlab.models import PolicyIdentity


def trained_tokens(batch: dict) -> int:
    """Tokens a training forward reads: every token of a packed row, the unmasked ones of a padded batch."""
    if "cu_seq_lens" in batch:
        return int(batch["input_ids"].numel())
    return int(batch["attention_mask"].sum())


class Algorithm:
    data_kind: str = "sft"          # canonical columns it consumes (peftlab.data.schemas)
    needs_reference: bool = False   # the builder passes a `peftlab.models.Reference` to setup() when True
    head: str = "causal_lm"         # causal_lm (a policy) | score (a scalar-head sequence classifier: reward/cost)
    generates: bool = True          # whether the generation tasks of the `eval` group apply to the trained model
    sequences_per_example: int = 1  # sequences one example puts in a micro-batch (pairs: 2), for memory estimates

    def __init__(self, *, tokenizer, max_length: int, policy: PolicyIdentity, logits_chunk_size, start_from: str):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.policy_identity = policy
        self.logits_chunk_size = logits_chunk_size  # trainer.logits_chunk_size: how the LM head meets the loss
        self.start_from = start_from  # the builder reads it (through the policy identity) to pick the start model

    def setup(self, policy, *, reference, device, train_examples, eval_examples) -> None:
        """Called once the policy and the examples exist, before the first step.

        Algorithms load what else they need here (scorers) or precompute (reference log-probs into the examples).
        """
        self.reference = reference
        self.device = device

    def build_examples(self, rows: list[dict]) -> list[dict]:
        """Canonical rows → tokenized examples (done once, before training)."""
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step_batches(self, model, step: int, micro_examples: list[list[dict]]) -> list[dict]:
        """The micro-batches of optimizer step `step` (0-based), one per entry of `micro_examples` (the examples
        the data order assigns them). Called once per step, before any loss of the step, so batches that depend
        on the model (rollouts) all come from the same weights. Default: collate each."""
        return [self.collate(examples) for examples in micro_examples]

    def num_items(self, batch: dict) -> int:
        """How many units the loss averages over in this micro-batch (tokens, pairs...), for exact accumulation."""
        raise NotImplementedError

    def num_tokens(self, batch: dict) -> int:
        """Tokens this micro-batch trains on (for tokens/s): what its training forward reads."""
        return trained_tokens(batch)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean loss over this micro-batch's items and detached metrics (namespaced keys, e.g. `train/...`)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model, examples: list[dict], batch_size: int) -> dict[str, float]:
        """Held-out metrics computed from `examples` (e.g. `eval/loss`); the model is in eval mode."""
        return {}

    def score_samples(self, rows: list[dict], answers: list[str]) -> dict[str, list[float]]:
        """Per-answer scores of greedy answers to held-out `rows` (their canonical columns), shown beside the
        samples (e.g. GRPO's rewards); {} when the algorithm has none."""
        return {}

    def on_step_end(self, model, step: int) -> dict[str, float]:
        """After each optimizer step (e.g. a dual update); `step` counts the steps done. Returns metrics to log."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def hparams(self) -> dict:
        """Hyper-parameters recorded in summary.json."""
        return {"start_from": self.start_from}
