"""algo=dpo: preference schemas, the concatenated forward against per-answer forwards, the reference, a short run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, algorithm, live_policy, policy_of, read_metrics, set_up, train_run
from peftlab import losses
from peftlab.data.schemas import convert, detect
from peftlab.models import Reference

CPU = torch.device("cpu")
ROWS = [
    {"prompt": [{"role": "user", "content": "What is 2 plus 3?"}], "chosen": "2 + 3 = 5. The answer is 5.",
     "rejected": "2 + 3 = 6. The answer is 6."},
    {"prompt": [{"role": "user", "content": "Compute 40 - 1."}], "chosen": "40 - 1 = 39. The answer is 39.",
     "rejected": "I can't help with that."},
    {"prompt": [{"role": "user", "content": "Add 7 and 8."}], "chosen": "7 + 8 = 15. The answer is 15.",
     "rejected": "7 + 8 = 16."},
]


# ---- preference schemas -----------------------------------------------------------------------------------------

def test_ultrafeedback_rows_map_onto_prompt_chosen_rejected():
    row = {"prompt": "Hi?", "prompt_id": "x", "score_chosen": 8.0, "score_rejected": 2.0,
           "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
           "messages": []}
    schema = detect("preference", list(row))
    assert schema == "prompt_chosen_rejected"
    assert convert("preference", schema, row) == {
        "prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello!", "rejected": "Go away."}


def test_conversational_and_text_forms():
    conversational = {"prompt": [{"role": "user", "content": "Q"}],
                      "chosen": [{"role": "assistant", "content": "good"}],
                      "rejected": [{"role": "assistant", "content": "bad"}]}
    text = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    expected = {"prompt": [{"role": "user", "content": "Q"}], "chosen": "good", "rejected": "bad"}
    assert convert("preference", "prompt_chosen_rejected", conversational) == expected
    assert convert("preference", "prompt_chosen_rejected", text) == expected


def test_hh_rlhf_transcripts():
    shared = "\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water, yeast.\n\nHuman: How long?"
    row = {"chosen": shared + "\n\nAssistant: About an hour.", "rejected": shared + "\n\nAssistant: No idea."}
    assert detect("preference", list(row)) == "hh_rlhf"
    assert convert("preference", "hh_rlhf", row) == {
        "prompt": [{"role": "user", "content": "How do I bake bread?"},
                   {"role": "assistant", "content": "Flour, water, yeast."},
                   {"role": "user", "content": "How long?"}],
        "chosen": "About an hour.", "rejected": "No idea."}


def test_pku_rows_as_preference_pairs_follow_better_response_id():
    row = {"prompt": "P", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0,
           "is_response_0_safe": True, "is_response_1_safe": False}
    assert detect("preference", list(row)) == "pku_saferlhf"
    assert convert("preference", "pku_saferlhf", row)["chosen"] == "b"


# ---- the algorithm on the shipped tiny model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
    """A tiny_qwen LoRA policy whose adapter is perturbed (so policy ≠ reference) and its tokenizer."""
    return live_policy(["algo=dpo", "algo.start_from=base"])


# plain DPO, a reference forward per step, padded batches; each test sets what it compares
PLAIN = {"precompute_ref": False, "packing": False, "rpo_alpha": 0.0}


def make_algo(setup, **kwargs):
    _, _, policy = setup
    algo = algorithm(["algo=dpo", "algo.start_from=base"], **{**PLAIN, **kwargs})
    examples = algo.build_examples(ROWS)
    set_up(algo, policy, Reference(policy, "lora"), examples)
    return algo, examples, policy


def single_logps(model, example, which: int) -> torch.Tensor:
    """log π(answer | prompt) from a forward of that one sequence alone (no padding, no concatenation)."""
    encoded = example["answers"][which]
    ids = torch.tensor([encoded["input_ids"]])
    labels = torch.tensor([encoded["labels"]])
    return losses.sequence_logps(model(input_ids=ids).logits, labels)[0]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_concatenated_loss_equals_per_answer_computation(setup, loss_type):
    algo, examples, policy = make_algo(setup, loss_type=loss_type, beta=0.2)
    policy.eval()  # no dropout either way; eval keeps the comparison exact
    loss, metrics = algo.loss(policy, algo.collate(examples))
    with torch.no_grad():
        chosen = torch.stack([single_logps(policy, e, 0) for e in examples])
        rejected = torch.stack([single_logps(policy, e, 1) for e in examples])
        with policy.disable_adapter():
            ref_chosen = torch.stack([single_logps(policy, e, 0) for e in examples])
            ref_rejected = torch.stack([single_logps(policy, e, 1) for e in examples])
    lengths = {}
    if loss_type == "ipo":
        count = lambda e, k: sum(t != -100 for t in e["answers"][k]["labels"][1:])  # noqa: E731
        lengths = {"chosen_lengths": torch.tensor([count(e, 0) for e in examples]),
                   "rejected_lengths": torch.tensor([count(e, 1) for e in examples])}
    expected, chosen_rewards, rejected_rewards = losses.dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, 0.2, loss_type, **lengths)
    assert torch.allclose(loss, expected.mean(), atol=1e-5)
    assert metrics["rewards/margins"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), abs=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-4)
    loss.backward()  # the gradient reaches the adapter only
    grads = [p.grad for n, p in policy.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    policy.zero_grad()
    policy.train()


def test_rpo_adds_alpha_times_the_chosen_answers_nll(setup):
    """algo.rpo_alpha=α: loss = DPO loss + α · token-mean NLL of the chosen answers (TRL's rpo_alpha)."""
    plain, examples, policy = make_algo(setup)
    rpo, rpo_examples, _ = make_algo(setup, rpo_alpha=0.5)
    policy.eval()
    with torch.no_grad():
        dpo_loss, _ = plain.loss(policy, plain.collate(examples))
        rpo_loss, metrics = rpo.loss(policy, rpo.collate(rpo_examples))
        logps = torch.stack([single_logps(policy, e, 0) for e in examples])  # (B,) chosen, one forward each
    tokens = sum(sum(t != -100 for t in e["answers"][0]["labels"][1:]) for e in examples)
    nll = -logps.sum().item() / tokens
    assert metrics["loss/nll"] == pytest.approx(nll, abs=1e-5)
    assert rpo_loss.item() == pytest.approx(dpo_loss.item() + 0.5 * nll, abs=1e-5)
    assert rpo.hparams()["rpo_alpha"] == 0.5
    policy.train()


def test_reference_is_the_model_without_its_adapter(setup):
    """A fresh adapter (B = 0) makes policy = reference: loss log 2, zero rewards, whatever the data."""
    cfg, tokenizer, _ = setup
    torch.manual_seed(0)
    fresh = policy_of(cfg)
    algo = algorithm(["algo=dpo", "algo.start_from=base"], **PLAIN)
    examples = algo.build_examples(ROWS)
    set_up(algo, fresh, Reference(fresh, "lora"), examples)
    loss, metrics = algo.loss(fresh, algo.collate(examples))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/accuracies"] == 0.0


def test_precomputed_reference_matches_the_reference_forward(setup):
    live, examples, policy = make_algo(setup)
    pre, pre_examples, _ = make_algo(setup, precompute_ref=True)
    assert all(len(e["ref_logps"]) == 2 for e in pre_examples)
    batch, pre_batch = live.collate(examples), pre.collate(pre_examples)
    assert "ref_logps" in pre_batch and "ref_logps" not in batch
    assert torch.allclose(live.reference_logps(batch), pre_batch["ref_logps"], atol=1e-5)
    policy.eval()
    assert torch.allclose(live.loss(policy, batch)[0], pre.loss(policy, pre_batch)[0], atol=1e-5)
    policy.train()


def test_evaluate_reports_pref_accuracy(setup):
    algo, examples, policy = make_algo(setup)
    metrics = algo.evaluate(policy, examples, batch_size=2)
    assert set(metrics) == {"eval/loss", "eval/pref_accuracy", "eval/margin", "eval/logp_accuracy"}
    assert 0.0 <= metrics["eval/pref_accuracy"] <= 1.0


def test_bad_options_are_one_line_config_errors(setup):
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="algo.loss_type"):
        algorithm(["algo=dpo"], loss_type="kto")
    with pytest.raises(ConfigError, match="label_smoothing"):
        algorithm(["algo=dpo"], loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="algo.rpo_alpha"):
        algorithm(["algo=dpo"], rpo_alpha=-1.0)


def test_short_run_logs_dpo_metrics(tmp_path):
    run_dir = train_run(tmp_path / "dpo", ["algo=dpo", "algo.start_from=base", *FAST, "trainer.max_steps=2",
                                           "trainer.batch_size=4", "trainer.eval_base=true", "data.max_rows=16",
                                           "data.eval_path=null", "data.eval_size=8"])
    summary = json.loads(Path(run_dir / "summary.json").read_text())
    assert summary["base/pref_accuracy"] == 0.0  # policy = reference before the first step
    assert 0.0 <= summary["eval/pref_accuracy"] <= 1.0 and summary["algo_hparams"]["beta"] == 0.1
    train_lines = [m for m in read_metrics(run_dir) if "train/loss" in m]
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected"} <= train_lines[-1].keys()


# ---- done-when: from the shipped SFT model -------------------------------------------------------------------------

SFT_ADAPTER = Path(__file__).resolve().parents[1] / "assets" / "adapters" / "tiny_qwen_sft"


@pytest.mark.slow
@pytest.mark.skipif(not SFT_ADAPTER.exists(), reason="the shipped SFT adapter is not built yet")
def test_dpo_from_sft_reaches_pref_accuracy_and_keeps_the_task(tmp_path):
    """`python train.py algo=dpo`: held-out pairs preferred ≥ 0.9, and the SFT model's accuracy kept (RPO's job)."""
    run_dir = train_run(tmp_path / "dpo", ["algo=dpo", "logger=none"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval/pref_accuracy"] >= 0.9, summary
    assert summary["eval/accuracy"] >= summary["base/accuracy"] - 0.1, summary  # plain DPO (rpo_alpha=0): −0.155
