"""algo=safe_dpo: the λ schedule, the primal loss, reward/cost models shared as adapters, a short run, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, algorithm, compose, live_policy, policy_of, read_metrics, set_up, train_run
from peftlab import losses
from peftlab.algos.safe_dpo import scaled_beta
from peftlab.data.schemas import convert
from peftlab.errors import ConfigError
from peftlab.models import PolicyIdentity, Reference, load_tokenizer
from peftlab.data.format import prompt_ids
from peftlab.sampling import sample
from peftlab.scorers import Scorer, inspect_source

CPU = torch.device("cpu")
TOY_ROWS = [
    {"prompt": "How do I rob my boss?", "response_0": "Sure. Step 1: wait. Step 2: rob my boss.",
     "response_1": "I can't help with that. Robbing my boss is harmful.",
     "better_response_id": 0, "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True},
    {"prompt": "Add 2 and 2.", "response_0": "2 + 2 = 5. The answer is 5.", "response_1": "2 + 2 = 4. The answer is 4.",
     "better_response_id": 1, "safer_response_id": 1, "is_response_0_safe": True, "is_response_1_safe": True},
    {"prompt": "How do I scam a stranger?", "response_0": "I can't help with that.",
     "response_1": "Sure. Step 1: find a stranger. Step 2: scam a stranger.",
     "better_response_id": 1, "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": False},
]
ROWS = [convert("safety", "pku_saferlhf", r) for r in TOY_ROWS]


LAGRANGIAN = dict(lambda_init=1.0, lambda_lr=0.1, lambda_max=10.0, threshold=0.0, window=128, update_every=10,
                  update_delay_steps=0)


def safe_dpo(overrides: list[str] = (), lagrangian: dict | None = None, **options):
    """SafeDPO built from conf/algo/safe_dpo.yaml as train.py builds it; `lagrangian` entries override its own."""
    if lagrangian is not None:
        options["lagrangian"] = {**LAGRANGIAN, **lagrangian}
    return algorithm(["algo=safe_dpo", *overrides], **options)


def make_from_config(overrides: list[str]):
    return safe_dpo(overrides)


# ---- the Lagrange multiplier ---------------------------------------------------------------------------------------

def test_lambda_rises_over_budget_falls_under_it_stays_bounded_and_waits_for_the_delay(monkeypatch):
    """Drive SafeDPO.on_step_end with scripted sampled costs (d = 0.5, λ_max = 4, delay 20, updates every 5 steps).

    Steps 1-20 (delay): costs 3 > d are recorded but λ stays 1. Steps 21-60: costs 3 > d, λ rises (and reaches
    λ_max, where it stays). Steps 61-150: costs −2 < d; once the window holds only these, λ falls every update.
    """
    algo = safe_dpo(lagrangian=dict(lambda_init=1.0, lambda_lr=0.05, lambda_max=4.0, threshold=0.5, window=8,
                                    update_every=5, update_delay_steps=20))
    algo.scorers["cost"] = None  # the cost model's scores come from the script below
    sampled_at = []

    def scripted(model, step):
        sampled_at.append(step)
        cost = 3.0 if step <= 60 else -2.0
        return {"cost": [cost] * 4, "reward": [1.0] * 4, "kl": [0.1] * 4}

    monkeypatch.setattr(algo, "sample_and_score", scripted)
    lambdas = {}
    for step in range(1, 151):
        metrics = algo.on_step_end(None, step)
        lambdas[step] = metrics["safe/lambda"]
        assert 0.0 < lambdas[step] <= 4.0 + 1e-12
    assert sampled_at == list(range(5, 151, 5))
    assert all(lambdas[s] == 1.0 for s in range(1, 21)), "λ moved before update_delay_steps"
    rising = [lambdas[s] for s in range(25, 61, 5)]
    assert all(b > a or b == pytest.approx(4.0) for a, b in zip([1.0] + rising, rising))
    assert lambdas[25] == pytest.approx(math.exp(0.05 * 1.0 * (3.0 - 0.5)))  # one lagrange_step from λ = 1
    assert lambdas[60] == pytest.approx(4.0)  # clamped at λ_max
    falling = [lambdas[s] for s in range(70, 151, 5)]  # window all −2 from step 70 on (8 costs = 2 updates)
    assert all(b < a for a, b in zip(falling, falling[1:]))
    assert lambdas[150] < 1.0
    assert metrics["safe/cost"] == -2.0 and metrics["safe/reward"] == 1.0 and metrics["train/kl"] == 0.1


def test_lambda_state_round_trips_for_exact_resume():
    algo = safe_dpo(lagrangian=dict(window=3))
    algo.lagrangian.record([1.0, 2.0, 3.0, 4.0], [0.5] * 4)
    algo.lagrangian.update(10)
    state = json.loads(json.dumps(algo.state_dict()))  # plain data: goes into the checkpoint as is
    other = safe_dpo(lagrangian=dict(window=3))
    other.load_state_dict(state)
    assert other.lagrangian.value == algo.lagrangian.value and list(other.lagrangian.costs) == [2.0, 3.0, 4.0]
    assert other.lagrangian.cost_mean == 3.0


def test_bad_lagrangian_and_margin_options():
    with pytest.raises(ConfigError, match="lambda_init"):
        safe_dpo(lagrangian=dict(lambda_init=20.0, lambda_max=10.0))
    with pytest.raises(ConfigError, match="safety_margin"):
        safe_dpo(loss_type="ipo", safety_margin=1.0)
    with pytest.raises(ConfigError, match="beta_scaling"):
        safe_dpo(beta_scaling=dict(weight=1.0, rate=1.0))
    with pytest.raises(ConfigError, match="algo.rpo_alpha"):
        safe_dpo(rpo_alpha=-0.5)


# ---- the primal loss ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy_setup():
    """A tiny_qwen LoRA policy whose adapter is perturbed (so policy ≠ reference) and its tokenizer."""
    return live_policy(["algo=safe_dpo", "algo.start_from=base"])


def test_primal_loss_is_the_normalized_lagrangian(policy_setup):
    """(L_H + λ L_S)/(1 + λ) with L_H, L_S DPO losses on the better / safer pairs, Δ on clear-cut safety pairs,
    and reward-scaled β from the scorers' margins."""
    cfg, tokenizer, policy = policy_setup
    algo = safe_dpo(["algo.start_from=base"], beta=0.2, safety_margin=0.7, lagrangian=dict(lambda_init=2.5),
                    rpo_alpha=0.0)
    examples = algo.build_examples(ROWS)
    set_up(algo, policy, Reference(policy, "lora"), examples)
    # scorer margins written in by hand (setup() would score the answers with the reward and cost models)
    algo.scaling_weight, algo.scaling_rate = 1.5, 0.8
    rewards = ([1.0, -1.0], [0.0, 2.0], [-0.5, 0.5])
    costs = ([3.0, -3.0], [-1.0, -2.0], [-3.0, 3.0])
    for e, reward, cost in zip(examples, rewards, costs):
        e["reward"], e["cost"] = reward, cost
    policy.eval()
    batch = algo.collate(examples)
    loss, metrics = algo.loss(policy, batch)

    with torch.no_grad():
        logps = algo.answer_logps(policy, batch).view(2, -1)
        with policy.disable_adapter():
            ref = algo.answer_logps(policy, batch).view(2, -1)
    helpful, safety = [], []
    for b, row in enumerate(ROWS):
        e = examples[b]
        w, l = row["better_response_id"], 1 - row["better_response_id"]
        beta_h = scaled_beta(0.2, torch.tensor([e["reward"][w] - e["reward"][l]]), 1.5, 0.8)
        helpful.append(losses.dpo_loss(logps[w, b:b + 1], logps[l, b:b + 1], ref[w, b:b + 1], ref[l, b:b + 1],
                                       beta_h)[0])
        s, u = row["safer_response_id"], 1 - row["safer_response_id"]
        beta_s = scaled_beta(0.2, torch.tensor([e["cost"][u] - e["cost"][s]]), 1.5, 0.8)
        clear_cut = row[f"is_response_{s}_safe"] and not row[f"is_response_{u}_safe"]
        safety.append(losses.dpo_loss(logps[s, b:b + 1], logps[u, b:b + 1], ref[s, b:b + 1], ref[u, b:b + 1],
                                      beta_s, margin=torch.tensor([0.7 if clear_cut else 0.0]))[0])
    helpful, safety = torch.cat(helpful), torch.cat(safety)
    expected = ((helpful + 2.5 * safety) / 3.5).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert metrics["loss/helpful"] == pytest.approx(helpful.mean().item(), abs=1e-5)
    assert metrics["loss/safety"] == pytest.approx(safety.mean().item(), abs=1e-5)
    assert metrics["safe/lambda"] == pytest.approx(2.5)
    policy.train()


def test_rpo_term_weighs_each_pairs_chosen_nll_like_its_pair_loss(policy_setup):
    """rpo_alpha=α adds α·(NLL of the better answers + λ·NLL of the safer answers)/(1 + λ), token means over the batch."""
    cfg, tokenizer, policy = policy_setup
    plain = safe_dpo(["algo.start_from=base"], lagrangian=dict(lambda_init=2.5), rpo_alpha=0.0)
    rpo = safe_dpo(["algo.start_from=base"], lagrangian=dict(lambda_init=2.5), rpo_alpha=0.5)
    policy.eval()
    with torch.no_grad():
        for algo in (plain, rpo):
            set_up(algo, policy, Reference(policy, "lora"), algo.build_examples(ROWS))
        batch = plain.collate(plain.build_examples(ROWS))
        plain_loss, _ = plain.loss(policy, batch)
        rpo_loss, metrics = rpo.loss(policy, batch)
        logps = plain.answer_logps(policy, batch).view(2, -1)  # (2, B)
    lengths = batch["lengths"].view(2, -1)
    nll = {}
    for pair, column in (("helpful", "better_response_id"), ("safety", "safer_response_id")):
        chosen = [row[column] for row in ROWS]
        nll[pair] = -sum(logps[k, b] for b, k in enumerate(chosen)).item() / sum(
            lengths[k, b] for b, k in enumerate(chosen)).item()
        assert metrics[f"loss/nll_{pair}"] == pytest.approx(nll[pair], abs=1e-5)
    assert rpo_loss.item() == pytest.approx(plain_loss.item() + 0.5 * (nll["helpful"] + 2.5 * nll["safety"]) / 3.5,
                                            abs=1e-5)
    policy.train()


def test_sampled_answers_are_scored_on_their_exact_tokens(policy_setup):
    """The KL estimate reads the sampled tokens themselves: a left-padded batch gives each answer the log-prob it
    gets alone, and a policy equal to its reference has KL 0."""
    cfg, tokenizer, policy = policy_setup
    algo = safe_dpo(["algo.start_from=base", "algo.sampling.max_new_tokens=12"])
    examples = algo.build_examples(ROWS)
    set_up(algo, policy, Reference(policy, "lora"), examples, examples)
    policy.eval()
    torch.manual_seed(0)
    samples = sample(policy, tokenizer, [prompt_ids(tokenizer, r["prompt"]) for r in ROWS], 12, do_sample=True)
    texts, batch = samples.texts, samples.tensors()
    assert len(texts) == 3
    kl = algo.sample_kl(policy, batch)
    prompt_length = batch["input_ids"].shape[1] - batch["completion_ids"].shape[1]
    with torch.no_grad():
        for b in range(3):
            keep = batch["attention_mask"][b].bool()
            labels = torch.cat([torch.full((prompt_length,), -100), batch["completion_ids"][b].masked_fill(
                ~batch["completion_mask"][b], -100)])
            ids, labels = batch["input_ids"][b][keep][None], labels[keep][None]
            alone = losses.sequence_logps(policy(input_ids=ids).logits, labels)
            with policy.disable_adapter():
                alone_ref = losses.sequence_logps(policy(input_ids=ids).logits, labels)
            assert (alone - alone_ref).item() == pytest.approx(kl[b], abs=1e-4)
            assert tokenizer.decode(labels[labels != -100], skip_special_tokens=True) == texts[b]
        with policy.disable_adapter():  # the policy is its own reference: KL 0 on any sample
            assert all(abs(k) < 1e-5 for k in algo.sample_kl(policy, batch))
    policy.train()


# ---- reward and cost models as adapters on the policy's base -------------------------------------------------------

def fake_rm_run(run_dir: Path, seed: int, tokenizer_dir: Path | None = None) -> Path:
    """A run directory as algo=rm (start_from=base) leaves it, with random adapter and head weights (no training)."""
    cfg, _ = compose(["algo=rm", "algo.start_from=base"])
    torch.manual_seed(seed)
    model = policy_of(cfg, head="score")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(run_dir / "adapter")
    load_tokenizer(cfg.model).save_pretrained(run_dir / "adapter")
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.fixture(scope="module")
def rm_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    return fake_rm_run(root / "reward", seed=1), fake_rm_run(root / "cost", seed=2)


def test_shared_scorers_equal_separate_ones_and_leave_the_policy_alone(rm_runs):
    reward_dir, cost_dir = rm_runs
    overrides = ["algo.start_from=base", f"algo.reward_model={reward_dir}", f"algo.cost_model={cost_dir}"]
    algo = make_from_config(overrides)
    cfg, _ = compose(["algo=safe_dpo", *overrides])
    tokenizer = algo.tokenizer
    assert {role: plan.shared for role, plan in algo.plans.items()} == {"reward": True, "cost": True}
    torch.manual_seed(0)
    policy = policy_of(cfg)
    trainable_before = {n for n, p in policy.named_parameters() if p.requires_grad}
    probe = tokenizer(["How do I rob my boss?"], return_tensors="pt")
    policy.eval()
    with torch.no_grad():
        logits_before = policy(**probe).logits
    set_up(algo, policy, Reference(policy, "lora"), algo.build_examples(ROWS), algo.build_examples(ROWS))

    prompts = [r["prompt"] for r in ROWS] * 2
    answers = [r["response_0"] for r in ROWS] + [r["response_1"] for r in ROWS]
    for role, run_dir in (("reward", reward_dir), ("cost", cost_dir)):
        shared = algo.scorers[role].score(prompts, answers)
        separate = Scorer(run_dir).score(prompts, answers)
        assert torch.allclose(shared, separate, atol=1e-5), (role, shared, separate)
        assert shared.abs().max() > 1e-3  # a real signal, not zeros
    assert algo.scorers["reward"].score(prompts, answers).ne(algo.scorers["cost"].score(prompts, answers)).any()

    assert set(policy.peft_config) == {"default", "reward", "cost"} and policy.active_adapter == "default"
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable_before
    with torch.no_grad():
        assert torch.equal(policy(**probe).logits, logits_before)  # scoring left the policy as it was
    policy.train()


def test_scorers_on_another_base_load_separately(rm_runs):
    """Scorers trained on the full-precision checkpoint share the base of a policy on it, whatever adapter the
    policy starts from (a start adapter initialises the trained one, the base stays the checkpoint); a policy on
    the 4-bit base (qlora) has another base, and gets them loaded separately."""
    reward_dir, _ = rm_runs
    from peftlab.scorers import plan_scorers

    same = inspect_source(reward_dir).identity
    from_sft = PolicyIdentity(base=same.base, start_adapter=str(reward_dir / "adapter"), quantize=None,
                              peft_method="lora")
    quantized = PolicyIdentity(base=same.base, start_adapter=None, quantize="nf4", peft_method="qlora")
    tokenizer = load_tokenizer(compose(["algo=safe_dpo"])[0].model)
    for policy, shared in ((same, True), (from_sft, True), (quantized, False)):
        plans = plan_scorers({"reward": str(reward_dir)}, policy, share_base=True, tokenizer=tokenizer)
        assert plans["reward"].shared == shared, policy


def test_scorer_with_another_tokenizer_is_a_one_line_error(rm_runs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    reward_dir, cost_dir = rm_runs
    odd = tmp_path / "odd_reward"
    shutil.copytree(reward_dir, odd)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["a different world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"]))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (odd / "adapter" / name).unlink()
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>").save_pretrained(odd / "adapter")

    with pytest.raises(ConfigError) as err:
        make_from_config(["algo.start_from=base", f"algo.reward_model={odd}", f"algo.cost_model={cost_dir}"])
    assert str(err.value).startswith(f"algo.reward_model={odd}: its tokenizer") and "\n" not in str(err.value)


@pytest.mark.parametrize("override, pattern", [
    ("algo.cost_model=/nonexistent/cost_run", "algo.cost_model=/nonexistent/cost_run: not a run directory"),
    ("algo.reward_model=someone/no-such-model-here", "algo.reward_model=someone/no-such-model-here: not a local"),
    ("algo.lagrangian.lambda_lr=-1", "lambda_lr=-1"),
])
def test_bad_scorer_options_are_one_line_errors(override, pattern):
    with pytest.raises(ConfigError) as err:
        make_from_config([override])
    assert pattern in str(err.value) and "\n" not in str(err.value)


# ---- a short run -----------------------------------------------------------------------------------------------------

def test_short_run_updates_lambda_from_sampled_costs(tmp_path, rm_runs):
    reward_dir, cost_dir = rm_runs
    run_dir = train_run(tmp_path / "safe_dpo", [
        "algo=safe_dpo", "algo.start_from=base", f"algo.reward_model={reward_dir}", f"algo.cost_model={cost_dir}",
        "algo.lagrangian.update_every=1", "algo.sampling.num_prompts=4", "algo.sampling.max_new_tokens=8",
        "algo.safety_margin=0.5", *FAST, "trainer.max_steps=2", "trainer.batch_size=4", "data.max_rows=16",
        "data.eval_path=null", "data.eval_size=8"])
    lines = [m for m in read_metrics(run_dir) if "train/loss" in m]
    assert {"loss/helpful", "loss/safety", "safe/lambda", "safe/cost", "safe/reward", "train/kl",
            "rewards/helpful_accuracies", "rewards/safety_accuracies"} <= lines[-1].keys()
    assert lines[-1]["safe/lambda"] != 1.0  # the dual step ran
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo_hparams"]["scorers_share_base"] == {"reward": True, "cost": True}
    assert {"eval/helpful_accuracy", "eval/safety_accuracy"} <= summary.keys()
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_shared_and_separate_scorers_train_identically(tmp_path, rm_runs):
    """Holding the scorers as adapters on the policy's base changes memory, not results: same λ, same losses."""
    reward_dir, cost_dir = rm_runs
    common = ["algo=safe_dpo", "algo.start_from=base", f"algo.reward_model={reward_dir}",
              f"algo.cost_model={cost_dir}", "algo.lagrangian.update_every=1", "algo.lagrangian.lambda_lr=1.0", "algo.sampling.num_prompts=4",
              "algo.sampling.max_new_tokens=8", *FAST, "trainer.max_steps=3", "trainer.batch_size=4",
              "data.max_rows=16", "data.eval_path=null", "data.eval_size=8"]
    runs = [train_run(tmp_path / "shared", common), train_run(tmp_path / "separate", [*common, "algo.share_base=false"])]
    shared, separate = ([m for m in read_metrics(r) if "train/loss" in m] for r in runs)
    assert json.loads((runs[1] / "summary.json").read_text())["algo_hparams"]["scorers_share_base"] == {
        "reward": False, "cost": False}
    for a, b in zip(shared, separate):
        for key in ("train/loss", "safe/lambda", "safe/cost", "safe/reward", "train/kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a[key], b[key])
    assert shared[-1]["safe/lambda"] != 1.0
