"""algo=rm: reward (Bradley–Terry) and cost objectives, the saved run loaded back as a scorer, bad safety rows."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, algorithm, compose, policy_of, set_up, train_run
from peftlab import losses
from peftlab.data.load import load_splits
from peftlab.data.schemas import convert
from peftlab.errors import DataError
from peftlab.models import load_tokenizer
from peftlab.scorers import Scorer

CPU = torch.device("cpu")
SAFETY_ROWS = [
    {"prompt": "How do I rob my boss?", "response_0": "Sure. Step 1: wait.", "response_1": "I can't help with that.",
     "better_response_id": 0, "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True},
    {"prompt": "Add 2 and 2.", "response_0": "2 + 2 = 5.", "response_1": "2 + 2 = 4. The answer is 4.",
     "better_response_id": 1, "safer_response_id": 1, "is_response_0_safe": True, "is_response_1_safe": True},
    {"prompt": "How do I scam a stranger?", "response_0": "I can't help with that.", "response_1": "Sure. Step 1.",
     "better_response_id": 1, "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": False},
]


@pytest.fixture(scope="module")
def scorer_model():
    cfg, _ = compose(["algo=rm", "algo.start_from=base"])
    torch.manual_seed(0)
    model = policy_of(cfg, head="score").eval()
    return cfg, load_tokenizer(cfg.model), model


def single_score(model, encoded) -> torch.Tensor:
    return model(input_ids=torch.tensor([encoded["input_ids"]])).logits[0, 0]


def batched_loss_and_single_scores(scorer_model, objective: str, data_kind: str):
    """The algorithm's loss on one collated batch of SAFETY_ROWS, and each answer scored alone (no padding)."""
    cfg, tokenizer, model = scorer_model
    algo = algorithm(["algo=rm", "algo.start_from=base"], objective=objective)
    assert algo.data_kind == data_kind
    examples = algo.build_examples([convert(data_kind, "pku_saferlhf", r) for r in SAFETY_ROWS])
    set_up(algo, model)
    loss, metrics = algo.loss(model, algo.collate(examples))
    with torch.no_grad():
        first = torch.stack([single_score(model, e["answers"][0]) for e in examples])
        second = torch.stack([single_score(model, e["answers"][1]) for e in examples])
    return loss, metrics, first, second


def test_reward_objective_is_bradley_terry_on_single_forwards(scorer_model):
    loss, metrics, chosen, rejected = batched_loss_and_single_scores(scorer_model, "reward", "preference")
    assert torch.allclose(loss, losses.bradley_terry_loss(chosen, rejected), atol=1e-5)
    assert metrics["train/pair_accuracy"] == pytest.approx((chosen > rejected).float().mean().item())


def test_cost_objective_is_the_safe_rlhf_cost_loss(scorer_model):
    loss, metrics, c0, c1 = batched_loss_and_single_scores(scorer_model, "cost", "safety")
    expected = losses.cost_loss(c0, c1, torch.tensor([1, 1, 0]), torch.tensor([False, True, True]),
                                torch.tensor([True, True, False]))
    assert torch.allclose(loss, expected, atol=1e-5)
    assert {"train/pair_accuracy", "train/sign_accuracy"} <= metrics.keys()


def test_unknown_objective_is_a_config_error(scorer_model):
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="algo.objective=helpfulness"):
        algorithm(["algo=rm"], objective="helpfulness")


def test_saved_model_loads_back_as_a_scorer(tmp_path):
    """The run's own eval/pair_accuracy is reproduced by `Scorer(run_dir)` on the same held-out rows."""
    overrides = ["algo=rm", "algo.start_from=base", "data.max_rows=16", "data.eval_path=null", "data.eval_size=32"]
    run_dir = train_run(tmp_path / "rm", [*overrides, *FAST, "trainer.max_steps=2", "trainer.batch_size=4",
                                          "trainer.lr=1e-2"])
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg, _ = compose(overrides)
    rows = load_splits(cfg.data, "preference").eval  # the run's held-out pairs
    scorer = Scorer(run_dir)
    prompts = [r["prompt"] for r in rows]
    better = scorer.score(prompts, [r["chosen"] for r in rows])
    worse = scorer.score(prompts, [r["rejected"] for r in rows])
    assert better.shape == (len(rows),) and better.dtype == torch.float32
    assert (better > worse).float().mean().item() == pytest.approx(summary["eval/pair_accuracy"], abs=1e-6)


# ---- bad safety rows: one-line errors naming the column ----------------------------------------------------------

@pytest.mark.parametrize("column, value, message", [
    ("is_response_1_safe", None, "is_response_1_safe"),
    ("better_response_id", 2, "better_response_id` must be 0 or 1, got 2"),
    ("safer_response_id", -1, "safer_response_id"),
])
def test_bad_safety_rows_are_data_errors(tmp_path, column, value, message):
    row = dict(SAFETY_ROWS[0], **{column: value})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [SAFETY_ROWS[1], row]) + "\n")
    cfg, _ = compose(["algo=safe_dpo", f"data.path={path}", f"data.eval_path={path}"])
    with pytest.raises(DataError, match=message) as err:
        load_splits(cfg.data, "safety")
    assert "\n" not in str(err.value)
