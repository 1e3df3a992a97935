"""algo=grpo: rollout, rewards, advantages, the loss the loop trains on, μ > 1 reuse and resume, reference, qlora.

The loss function itself (`peftlab.losses.grpo_loss`) is checked against TRL's own code in test_losses.py; here we
check that what the algorithm feeds it (log-probs, masks, advantages) and how the loop aggregates it are right.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, algorithm, compose, policy_of, read_metrics, set_up, step_losses, train_run
from peftlab import losses
from peftlab.toyworld import judge
from peftlab.algos.grpo import GRPO
from peftlab.build import INJECTED, algorithm_keys
from peftlab.data.format import encode, render_prompt
from peftlab.data.load import load_splits
from peftlab.models import Reference, load_tokenizer
from peftlab.logprobs import completion_logps
from peftlab.sampling import completion_mask, positions_from_mask
from peftlab.rewards import (
    compute_rewards,
    extract_gsm8k_answer,
    gsm8k_correctness_reward,
    resolve_rewards,
)

CPU = torch.device("cpu")
GRPO_BASE = ["algo=grpo", "algo.start_from=base"]


def toy_rows(n: int, split: str = "grpo_train") -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "data" / "toy" / f"{split}.jsonl").read_text().splitlines()[:n]]
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]


def nonzero_lora_b(model, seed: int = 1) -> None:
    """LoRA starts with B = 0 (policy = reference); seeded B values make the adapter matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def make(overrides=(), peft: str = "lora", seed: int = 0, rows: int = 8):
    """(cfg, algo, policy, examples) as train.py builds them, from the shipped tiny checkpoint without SFT."""
    cfg, _ = compose([*GRPO_BASE, f"peft={peft}", *overrides])
    algo = algorithm([*GRPO_BASE, f"peft={peft}", *overrides])
    torch.manual_seed(seed)
    model = policy_of(cfg)
    nonzero_lora_b(model)
    model.train()
    examples = algo.build_examples(toy_rows(rows))
    reference = Reference(model, cfg.peft.method) if algo.needs_reference else None
    set_up(algo, model, reference, examples, examples)
    return cfg, algo, model, examples


# ---- small pure pieces ---------------------------------------------------------------------------------------------


def test_completion_mask_stops_after_the_first_end_token():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 0, 0, 0], [5, 6, 7, 8, 9]])
    mask, truncated = completion_mask(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_positions_count_real_tokens_from_zero():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def test_resolve_rewards_paths_weights_factories_and_errors():
    rewards = resolve_rewards([
        "peftlab.toyworld.judge.format_reward",
        {"function": "peftlab.toyworld.judge.correctness_reward", "weight": 2.0},
        {"function": "peftlab.rewards.reward_model", "kwargs": {"path": "/nowhere"}, "name": "rm"},
    ])
    assert [(r.name, r.weight) for r in rewards] == [("format_reward", 1.0), ("correctness_reward", 2.0), ("rm", 1.0)]
    assert rewards[2].function.scorer is None  # a reward model is loaded on first use, not at config time
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_rewards(["peftlab.toyworld.judge.no_such_reward"])
    with pytest.raises(ValueError, match="repeat"):
        resolve_rewards(["peftlab.toyworld.judge.format_reward", "peftlab.toyworld.judge.format_reward"])
    with pytest.raises(ValueError, match="empty"):
        resolve_rewards([])


def test_compute_rewards_weights_and_skips_none_like_trl():
    def sometimes(prompts, completions, **kwargs):
        return [None, 1.0, None]

    def always(prompts, completions, answer, **kwargs):
        return [float(a) for a in answer]

    rewards = resolve_rewards([{"function": "peftlab.toyworld.judge.format_reward", "weight": 0.5}])
    rewards[0].function = sometimes
    rewards += resolve_rewards([{"function": "peftlab.toyworld.judge.correctness_reward", "weight": 2.0}])
    rewards[1].function = always
    total, per_function = compute_rewards(rewards, ["p"] * 3, ["c"] * 3, answer=["1", "2", "3"])
    assert total.tolist() == [2.0, 4.5, 6.0]  # None is left out of the weighted sum (NaN-sum)
    assert math.isnan(per_function[0, 0]) and per_function[1, 0] == 1.0
    with pytest.raises(ValueError, match="returned 2 values"):
        rewards[1].function = lambda prompts, completions, **kw: [0.0, 0.0]
        compute_rewards(rewards, ["p"] * 3, ["c"] * 3, answer=["1", "2", "3"])


def test_gsm8k_answer_extraction_and_reward():
    assert extract_gsm8k_answer("so 3 * 4 = 12 apples\n#### 1,212") == 1212
    assert extract_gsm8k_answer("The answer is $18.") == 18
    assert extract_gsm8k_answer("first 5 then 7") == 7
    assert extract_gsm8k_answer("no number") is None
    completions = [[{"role": "assistant", "content": "4 + 4 = 8\n#### 8"}], "#### 9", "it is 8.0", "none"]
    assert gsm8k_correctness_reward(None, completions, answer=["8", "8", "8", "8"]) == [1.0, 0.0, 1.0, 0.0]


def test_grpo_schemas_toy_and_gsm8k(tmp_path):
    cfg, _ = compose(["algo=grpo"])
    splits = load_splits(cfg.data, "grpo")
    train_rows, eval_rows = splits.train, splits.eval
    assert len(train_rows) == 1000 and len(eval_rows) == 100
    assert train_rows[0]["prompt"][0]["role"] == "user" and train_rows[0]["answer"].isdigit()

    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("\n".join(json.dumps({"question": f"Q{i}?", "answer": f"2 + {i} = {2 + i}\n#### {2 + i:,}"})
                             for i in range(999, 1003)))
    cfg, _ = compose(["algo=grpo", "data=gsm8k", f"data.path={gsm}", f"data.eval_path={gsm}"])
    train_rows = load_splits(cfg.data, "grpo").train
    assert train_rows[0]["answer"] == "1001"  # the number after ####, thousands comma removed
    assert train_rows[0]["prompt"][0]["role"] == "system" and train_rows[0]["prompt"][1]["content"] == "Q999?"


# ---- rollout --------------------------------------------------------------------------------------------------------


def test_one_generate_call_per_rollout_with_the_adapter_active(monkeypatch):
    """B prompts × G generations in ONE generate call, in eval mode, adapter on; the model goes back to train mode."""
    from peft.tuners.lora import LoraLayer

    _, algo, model, examples = make(["algo.num_generations=4", "algo.max_new_tokens=12"])
    calls = []
    original = model.generate

    def spy(**kwargs):
        lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        calls.append({"rows": kwargs["input_ids"].shape[0], "training": model.training,
                      "adapter_on": not any(m.disable_adapters for m in lora_layers),
                      "do_sample": kwargs["do_sample"], "use_cache": kwargs["use_cache"]})
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    batch = algo.rollout(model, examples[:3])
    assert calls == [{"rows": 12, "training": False, "adapter_on": True, "do_sample": True, "use_cache": True}]
    assert model.training and algo.generate_calls == 1

    # G consecutive rows per prompt; advantages are the group-normalized rewards of the decoded completions
    ids = batch["input_ids"]
    prompt_len = ids.shape[1] - batch["completion_ids"].shape[1]
    for p in range(3):
        assert (ids[4 * p:4 * p + 4, :prompt_len] == ids[4 * p, :prompt_len]).all()
    texts = [algo.tokenizer.decode(row[m], skip_special_tokens=True)
             for row, m in zip(batch["completion_ids"], batch["completion_mask"])]
    answers = [e["columns"]["answer"] for e in examples[:3] for _ in range(4)]
    expected = torch.tensor([c + 0.2 * f for c, f in zip(judge.correctness_reward(None, texts, answers),
                                                         judge.format_reward(None, texts))])
    advantages, _ = losses.group_advantages(expected, 4, "group")
    torch.testing.assert_close(batch["advantages"], advantages)
    assert batch["rollout_metrics"]["train/reward"] == pytest.approx(expected.mean().item(), abs=1e-6)


def test_reference_logprobs_come_from_the_policy_with_its_adapter_disabled(monkeypatch):
    """β > 0 under LoRA: no copy and no second load; π_ref = the same module with the adapter off."""
    import copy

    import transformers

    real_deepcopy = copy.deepcopy

    def forbidden(*args, **kwargs):
        raise AssertionError("a second model was created for the reference")

    def deepcopy_but_no_module(obj, *args, **kwargs):  # generate deep-copies its GenerationConfig: that is fine
        if isinstance(obj, torch.nn.Module):
            forbidden()
        return real_deepcopy(obj, *args, **kwargs)

    _, algo, model, examples = make(["algo.beta=0.1", "algo.max_new_tokens=10"])
    assert algo.needs_reference and algo.reference.copy is None
    models_before = count_models()
    monkeypatch.setattr(copy, "deepcopy", deepcopy_but_no_module)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", forbidden)
    yielded = []
    original_model = algo.reference.model

    def spy_model():
        context = original_model()

        class Spy:
            def __enter__(self):
                module = context.__enter__()
                yielded.append(module)
                return module

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Spy()

    monkeypatch.setattr(algo.reference, "model", spy_model)
    batch = algo.rollout(model, examples[:2])
    assert yielded == [model]  # the reference IS the policy module
    assert count_models() == models_before

    with torch.no_grad():
        with model.disable_adapter():
            base_logps, _ = completion_logps(model, batch, algo.temperature)
        policy_logps, _ = completion_logps(model, batch, algo.temperature)
    mask = batch["completion_mask"]
    torch.testing.assert_close(batch["ref_logps"][mask], base_logps[mask])
    assert (policy_logps[mask] - base_logps[mask]).abs().max() > 1e-3  # the adapter matters: π_θ ≠ π_ref
    _, metrics = algo.loss(model, batch)
    assert metrics["train/kl"] > 0


def count_models() -> int:
    import transformers

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, transformers.PreTrainedModel))


# ---- the loss the loop trains on -----------------------------------------------------------------------------------


def unbatched_logps(model, algo, batch) -> torch.Tensor:
    """(N, C) completion log-probs from one plain forward per sequence: no padding, default positions."""
    rows = []
    prompt_len = batch["input_ids"].shape[1] - batch["completion_ids"].shape[1]
    for ids, attention, completion, mask in zip(batch["input_ids"], batch["attention_mask"], batch["completion_ids"],
                                                batch["completion_mask"]):
        prompt = ids[:prompt_len][attention[:prompt_len].bool()]
        target = completion[mask]
        logits = model(input_ids=torch.cat([prompt, target]).unsqueeze(0)).logits[0] / algo.temperature  # (L, V)
        logp = torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1).gather(1, target.unsqueeze(1))[:, 0]
        rows.append(torch.cat([logp, logp.new_zeros(len(completion) - len(target))]))
    return torch.stack(rows)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_is_the_tested_grpo_loss_of_exact_logprobs(loss_type):
    """algo.loss == losses.grpo_loss (checked against TRL) on log-probs from unpadded single-sequence forwards."""
    _, algo, model, examples = make([f"algo.loss_type={loss_type}", "algo.beta=0.05", "algo.temperature=0.7",
                                     "algo.num_generations=3", "algo.max_new_tokens=10"])
    batch = algo.rollout(model, examples[:2])
    batch["advantages"] = torch.linspace(-1.5, 1.5, batch["advantages"].numel())  # nonzero whatever the rewards
    loss, _ = algo.loss(model, batch)
    logps = unbatched_logps(model, algo, batch)
    expected, _ = losses.grpo_loss(logps, logps.detach(), batch["advantages"], batch["completion_mask"],
                                   ref_logps=batch["ref_logps"], beta=0.05, epsilon=algo.epsilon,
                                   epsilon_high=algo.epsilon_high, loss_type=loss_type,
                                   max_completion_length=algo.max_new_tokens)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    (g_algo,) = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad][0])
    (g_ref,) = torch.autograd.grad(expected, [p for p in model.parameters() if p.requires_grad][0])
    torch.testing.assert_close(g_algo, g_ref, rtol=1e-4, atol=1e-7)


def pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_accumulated_micro_batches_give_trls_aggregation(loss_type):
    """Two micro-batches weighted as the loop weighs them (num_items) give TRL's step loss and gradient:
    dapo = token mean over the whole step; grpo/bnpo/dr_grpo = the mean of the micro-batch losses (TRL divides them
    by the accumulation steps), which for grpo and dr_grpo is also the loss of the concatenated batch."""
    _, algo, model, examples = make([f"algo.loss_type={loss_type}", "algo.beta=0.05", "algo.num_generations=3",
                                     "algo.max_new_tokens=12"])
    params = [p for p in model.parameters() if p.requires_grad]
    micro = algo.step_batches(model, 0, [examples[:2], examples[2:4]])
    generator = torch.Generator().manual_seed(0)
    for batch in micro:
        batch["advantages"] = torch.randn(batch["advantages"].shape, generator=generator)
    counts = [algo.num_items(b) for b in micro]
    step_loss = sum(algo.loss(model, b)[0] * c / sum(counts) for b, c in zip(micro, counts))

    logps = [completion_logps(model, b, algo.temperature)[0] for b in micro]
    masks = [b["completion_mask"] for b in micro]
    common = dict(beta=0.05, epsilon=algo.epsilon, epsilon_high=algo.epsilon_high, loss_type=loss_type,
                  max_completion_length=algo.max_new_tokens)
    if loss_type in ("dapo", "grpo", "dr_grpo"):  # one loss over everything the step saw
        all_logps = pad_cat(logps)
        expected, _ = losses.grpo_loss(all_logps, all_logps.detach(), torch.cat([b["advantages"] for b in micro]),
                                       pad_cat(masks), ref_logps=pad_cat([b["ref_logps"] for b in micro]), **common)
    else:  # bnpo: each micro-batch's own token mean, averaged (TRL: loss / gradient_accumulation_steps)
        expected = sum(losses.grpo_loss(lp, lp.detach(), b["advantages"], b["completion_mask"],
                                        ref_logps=b["ref_logps"], **common)[0] for lp, b in zip(logps, micro)) / 2
    torch.testing.assert_close(step_loss, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(step_loss, params)
    expected_grads = torch.autograd.grad(expected, params)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_num_iterations_reuses_the_rollout_with_its_old_logprobs(tmp_path):
    """μ = 2: steps 0, 2, ... generate; step 1 reuses the same completions and π_old; the buffer survives a save."""
    _, algo, model, examples = make(["algo.num_iterations=2", "algo.max_new_tokens=10", "algo.num_generations=2"])
    first = algo.step_batches(model, 0, [examples[:2], examples[2:4]])  # step 0: two micro-batches, two rollouts
    assert algo.generate_calls == 2
    with torch.no_grad():  # π_old is the generating policy, computed in the mode the loss uses
        torch.testing.assert_close(first[0]["old_logps"], completion_logps(model, first[0], algo.temperature)[0])
    _, metrics = algo.loss(model, first[0])
    assert metrics["train/clip_ratio"] == 0.0
    algo.on_step_end(model, 1)

    saved = tmp_path / "algo.pt"
    torch.save(algo.state_dict(), saved)
    again = algo.step_batches(model, 1, [examples[4:6], examples[6:8]])  # step 1: other prompts drawn, not used
    assert algo.generate_calls == 2 and again[0] is first[0] and again[1] is first[1]
    algo.on_step_end(model, 2)
    algo.step_batches(model, 2, [examples[:2], examples[2:4]])
    assert algo.generate_calls == 4  # step 2: fresh, two rollouts

    _, resumed, _, _ = make(["algo.num_iterations=2", "algo.max_new_tokens=10", "algo.num_generations=2"])
    resumed.load_state_dict(torch.load(saved, weights_only=False))
    restored = resumed.step_batches(model, 1, [examples[4:6], examples[6:8]])[0]
    assert resumed.generate_calls == 0
    for key in ("completion_ids", "advantages", "old_logps"):
        torch.testing.assert_close(restored[key], first[0][key])


def token_id_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """A reward that differs between samples of an untrained model (so advantages and losses are not all 0)."""
    return [sum(ids) % 7 / 7 for ids in completion_ids]


def test_resume_mid_reuse_reproduces_the_uninterrupted_run(tmp_path):
    """μ = 2, resumed at step 3 (a reuse step: its rollout comes from the checkpoint): losses equal the full run's."""
    common = [*GRPO_BASE, *FAST, "trainer.max_steps=4", "trainer.batch_size=2", "trainer.grad_accum=2",
              "algo.num_iterations=2", "algo.num_generations=2", "algo.max_new_tokens=8", "algo.beta=0.05",
              "data.eval_path=null", "data.eval_size=4", "trainer.lr=2e-2", "trainer.save_every=3",
              "trainer.keep_checkpoints=3", "algo.accuracy_reward=null",
              "algo.rewards=[{function: test_grpo.token_id_reward, weight: 1.0}]"]  # a signal even from the bare base
    full = train_run(tmp_path / "full", common)
    resumed = train_run(tmp_path / "resumed", [*common, f"trainer.resume={full}/checkpoints/step-3"])
    full_losses, resumed_losses = step_losses(full), step_losses(resumed)
    assert sorted(full_losses) == [1, 2, 3, 4] and sorted(resumed_losses) == [4]
    assert abs(resumed_losses[4] - full_losses[4]) <= 1e-6
    assert any(abs(v) > 0 for v in full_losses.values())


def test_qlora_gradients_after_a_rollout_match_a_model_that_never_generated():
    """Generation is a no-grad eval-mode pass through the 4-bit layers: the adapter gradients of the loss that
    follows must equal those of an identical model that never generated (the bitsandbytes avx512_bf16 trap)."""
    _, algo, model, examples = make(["algo.max_new_tokens=10", "algo.num_generations=2"], peft="qlora")
    batch = algo.rollout(model, examples[:2])  # rollout through the 4-bit base
    batch["advantages"] = torch.linspace(-1.0, 1.0, batch["advantages"].numel())
    _, _, fresh, _ = make(["algo.max_new_tokens=10", "algo.num_generations=2"], peft="qlora")

    def grads(m):
        m.zero_grad(set_to_none=True)
        loss, _ = algo.loss(m, batch)
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    after_rollout, never_generated = grads(model), grads(fresh)
    assert after_rollout.keys() == never_generated.keys() and after_rollout
    worst = max((after_rollout[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12)
                for n, g in never_generated.items())
    assert worst < 1e-5, f"qlora adapter gradients differ by {worst:.3g} (relative) after a rollout"


# ---- evaluation, metrics, reward model, end to end ------------------------------------------------------------------


def test_evaluate_reports_reward_and_accuracy():
    _, algo, model, examples = make(["algo.max_new_tokens=10", "algo.eval_num_generations=3"])
    torch.manual_seed(123)
    training_rng = torch.get_rng_state()
    metrics = algo.evaluate(model, examples[:5], batch_size=6)
    assert {"eval/reward", "eval/reward_greedy", "eval/greedy_accuracy", "eval/completion_length",
            "eval/rewards/correctness_reward", "eval/rewards/format_reward"} <= metrics.keys()
    assert metrics["eval/reward"] == pytest.approx(
        metrics["eval/rewards/correctness_reward"] + 0.2 * metrics["eval/rewards/format_reward"])
    assert model.training
    assert torch.equal(torch.get_rng_state(), training_rng)  # evaluation sampling leaves the training RNG alone
    assert algo.evaluate(model, examples[:5], batch_size=6) == metrics  # and draws the same numbers every time


def test_reward_model_reward_scores_like_its_scorer(tmp_path):
    """`peftlab.rewards.reward_model` wraps peftlab.scorers.Scorer (a sequence-classification model dir here)."""
    scorers = pytest.importorskip("peftlab.scorers")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tiny = REPO / "assets" / "models" / "tiny_qwen"
    config = AutoConfig.from_pretrained(tiny, num_labels=1)
    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm_dir)
    load_tokenizer(compose([])[0].model).save_pretrained(rm_dir)

    rewards = resolve_rewards([{"function": "peftlab.rewards.reward_model", "kwargs": {"path": str(rm_dir)},
                                "name": "rm", "weight": 1.0}])
    prompts = [[{"role": "user", "content": "What is 2 plus 3?"}]] * 2
    completions = [[{"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}],
                   [{"role": "assistant", "content": "I can't help with that."}]]
    total, _ = compute_rewards(rewards, prompts, completions)
    direct = scorers.Scorer(str(rm_dir)).score(prompts, [c[0]["content"] for c in completions])
    torch.testing.assert_close(total, direct.float())
    assert total[0] != total[1]


def test_train_run_logs_every_grpo_metric_and_knob(tmp_path):
    run_dir = train_run(tmp_path / "run", [*GRPO_BASE, *FAST, "trainer.max_steps=2", "trainer.batch_size=2",
                                           "algo.num_generations=2", "algo.max_new_tokens=8", "algo.beta=0.05",
                                           "data.eval_path=null", "data.eval_size=4"])
    logged = read_metrics(run_dir)
    train_keys = set().union(*(m.keys() for m in logged if "train/loss" in m))
    assert {"train/reward", "train/reward_std", "train/rewards/correctness_reward/mean",
            "train/rewards/format_reward/mean", "train/completion_length", "train/kl", "train/clip_ratio",
            "train/entropy", "train/frac_reward_zero_std"} <= train_keys
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"eval/reward", "eval/greedy_accuracy"} <= summary.keys()
    hparams = summary["algo_hparams"]
    knobs = set(algorithm_keys(GRPO)) - set(INJECTED)
    assert knobs <= hparams.keys(), f"missing from the summary: {knobs - hparams.keys()}"
    assert hparams["beta"] == 0.05 and hparams["loss_type"] == "dapo"


def test_prompt_is_cut_from_the_left_to_leave_room_for_the_answer():
    cfg, _ = compose([*GRPO_BASE, "model.max_length=20", "algo.max_new_tokens=8"])
    tokenizer = load_tokenizer(cfg.model)
    algo = algorithm([*GRPO_BASE, "model.max_length=20", "algo.max_new_tokens=8"])
    example = algo.build_examples(toy_rows(1))[0]
    full = encode(tokenizer, render_prompt(tokenizer, example["prompt"]))
    assert len(full) > 12 and example["prompt_ids"] == full[-12:]


# ---- the done-when run (needs the shipped SFT adapter) ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["lora", "qlora"])
def test_default_grpo_raises_eval_reward_by_015(tmp_path, peft):
    """`python train.py algo=grpo peft=…` from the shipped SFT model (its wall time is in the README, not here)."""
    cfg, _ = compose(["algo=grpo"])
    if not (Path(cfg.model.sft_adapter) / "adapter_config.json").exists():
        pytest.skip(f"no shipped SFT adapter at {cfg.model.sft_adapter}")
    run_dir = train_run(tmp_path / "run", ["algo=grpo", f"peft={peft}", "logger=none"])
    summary = json.loads((run_dir / "summary.json").read_text())
    gain = summary["eval/reward"] - summary["base/reward"]
    assert gain >= 0.15, f"eval/reward {summary['eval/reward']:.3f} vs base/reward {summary['base/reward']:.3f}"
