"""lm-evaluation-harness on the in-memory model: task resolution, one-line errors, the shipped toy tasks, and scores
that leave the model as it was and equal lm-eval's own CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from peftlab.harness import (
    check_tasks, metric_values, resolve_tasks, run_tasks, task_manager, unwrap,
)
from peftlab.errors import ConfigError
from peftlab.toyworld.build import toy_arith_jsonl

TOY_DIR = REPO / "data/lm_eval/toy_arith"
TOY_ARITH = str(TOY_DIR / "toy_arith.yaml")
TOY_ARITH_GEN = str(TOY_DIR / "toy_arith_gen.yaml")
TINY_QWEN = REPO / "assets/models/tiny_qwen"
TINY_QWEN_SFT = REPO / "assets/adapters/tiny_qwen_sft"


def tokenizer_of_tiny_qwen():
    from omegaconf import OmegaConf

    from peftlab.models import load_tokenizer

    return load_tokenizer(OmegaConf.create({"name_or_path": str(TINY_QWEN), "tokenizer": None,
                                            "trust_remote_code": False}))


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_of_tiny_qwen()


def load_base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_QWEN)


def load_sft():
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(), TINY_QWEN_SFT, is_trainable=True)


# ----------------------------------------------------------------------------------------------------------------
# task resolution and metric names


def test_task_files_become_names_and_include_dirs():
    names, include_dirs = resolve_tasks([TOY_ARITH, "hellaswag", TOY_ARITH_GEN, TOY_ARITH])
    assert names == ["toy_arith", "hellaswag", "toy_arith_gen"]
    assert include_dirs == [str(TOY_DIR)]
    assert resolve_tasks(TOY_ARITH) == (["toy_arith"], [str(TOY_DIR)]), "one string is one task"


def test_metric_names():
    results = {
        "toy_arith": {"alias": "toy_arith", "acc,none": 0.5, "acc_stderr,none": 0.1},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05,
                  "exact_match,flexible-extract": 0.3, "exact_match_stderr,flexible-extract": "N/A"},
    }
    assert metric_values(results) == {
        "toy_arith/acc": 0.5, "toy_arith/acc_stderr": 0.1,
        "gsm8k/exact_match_strict-match": 0.25, "gsm8k/exact_match_strict-match_stderr": 0.05,
        "gsm8k/exact_match_flexible-extract": 0.3,
    }


def test_shipped_tasks_pass_the_checks_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # their data is found relative to the task files, not the working directory
    check_tasks([TOY_ARITH, TOY_ARITH_GEN])


def _write(path, text):
    path.write_text(text)
    return str(path)


BAD_DATA = """task: bad_data
dataset_path: json
dataset_kwargs:
  data_files:
    test: no/such/rows.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: choices
doc_to_target: label
"""


@pytest.mark.parametrize("make_tasks, pattern", [
    (lambda tmp: [], r"eval.tasks is empty"),
    (lambda tmp: [str(tmp / "missing.yaml")], r"task file .*missing.yaml does not exist"),
    (lambda tmp: [_write(tmp / "nameless.yaml", "output_type: multiple_choice\n")], r"has no `task:`"),
    (lambda tmp: [_write(tmp / "broken.yaml", "task: [open\n")], r"broken.yaml is not valid YAML"),
    (lambda tmp: ["hellaswg"], r"unknown lm-eval task 'hellaswg' \(did you mean hellaswag"),
    (lambda tmp: ["toy_arith"], r"unknown lm-eval task 'toy_arith'.*give a task YAML file"),
    (lambda tmp: [_write(tmp / "bad_data.yaml", BAD_DATA)],
     r"lm-eval cannot load \['bad_data'\]: FileNotFoundError: .*no/such/rows.jsonl"),
    (lambda tmp: [_write(tmp / "rouge.yaml", BAD_DATA.replace("bad_data", "rouge_task") + "metric_list:\n"
                         "  - metric: rouge\n")], r"uses metric 'rouge', which lm-eval loads with HF `evaluate`"),
])
def test_task_mistakes_are_one_line_config_errors(tmp_path, make_tasks, pattern):
    with pytest.raises(ConfigError, match=pattern) as error:
        check_tasks(make_tasks(tmp_path))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# the shipped toy tasks


def test_toy_arith_file_is_the_generators_output():
    assert (TOY_DIR / "toy_arith.jsonl").read_text() == toy_arith_jsonl()


def test_toy_arith_asks_held_out_questions_with_one_right_answer():
    from peftlab.toyworld import judge as toyworld

    rows = [json.loads(line) for line in (TOY_DIR / "toy_arith.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (REPO / "data/toy/task_eval.jsonl").read_text().splitlines()]
    training = "".join((REPO / "data/toy" / f"{split}_train.jsonl").read_text()
                       for split in ("sft", "pref", "safety", "grpo"))
    assert [r["prompt"] for r in rows] == [q["prompt"] for q in questions]
    for row, question in zip(rows, questions):
        answers = [toyworld.extract_answer(choice) for choice in row["choices"]]
        assert len(set(row["choices"])) == 4 and all(toyworld.format_reward([], row["choices"]))
        assert [a == question["answer"] for a in answers] == [i == row["label"] for i in range(4)]
        assert json.dumps(row["choices"][row["label"]]) not in training, "a training target"


def test_chat_template_renders_questions_as_sft_prompts(tokenizer):
    """Under apply_chat_template, lm-eval's context is our SFT prompt and each choice continues the assistant turn."""
    from peftlab.data.format import render_prompt
    from peftlab.harness import _in_memory_hflm

    lm = _in_memory_hflm()(pretrained=load_base(), tokenizer=tokenizer)
    loaded = task_manager((str(TOY_DIR),), False).load(["toy_arith", "toy_arith_gen"])["tasks"]
    for name, task in loaded.items():
        task.build_all_requests(limit=3, apply_chat_template=True, chat_template=lm.apply_chat_template)
        assert len(task.instances) == (12 if name == "toy_arith" else 3)
        for instance in task.instances:
            context = instance.args[0]
            assert context == render_prompt(tokenizer, [{"role": "user", "content": instance.doc["prompt"]}]), name
            if name == "toy_arith":
                assert instance.args[1] == instance.doc["choices"][instance.idx]


# ----------------------------------------------------------------------------------------------------------------
# the model in memory


def parameter_state(model):
    return [(name, id(p), p.data_ptr(), p.dtype, p.device, p.requires_grad) for name, p in model.named_parameters()]


def rng_state():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


@pytest.mark.parametrize("load, training", [(load_base, True), (load_sft, False), (load_sft, True)])
def test_evaluation_leaves_the_model_as_it_was(tokenizer, load, training):
    model = load().train(training)
    parameters, modes = parameter_state(model), [m.training for m in model.modules()]
    tokenizer_state = (tokenizer.padding_side, tokenizer.pad_token, len(tokenizer))
    rng_before = rng_state()

    metrics = run_tasks(model, tokenizer, [TOY_ARITH, TOY_ARITH_GEN], limit=4, apply_chat_template=True)

    assert set(metrics) == {"toy_arith/acc", "toy_arith/acc_stderr", "toy_arith_gen/exact_match_strict-match",
                            "toy_arith_gen/exact_match_strict-match_stderr"}
    assert parameter_state(model) == parameters, "moved, cast or replaced a parameter"
    assert [m.training for m in model.modules()] == modes
    assert (tokenizer.padding_side, tokenizer.pad_token, len(tokenizer)) == tokenizer_state
    rng_after = rng_state()
    assert torch.equal(rng_before[0], rng_after[0]) and rng_before[1] == rng_after[1]
    assert np.array_equal(rng_before[2], rng_after[2])


def test_the_adapter_in_memory_is_what_is_scored(tokenizer):
    tasks = [TOY_ARITH, TOY_ARITH_GEN]
    sft = load_sft()
    with_adapter = run_tasks(sft, tokenizer, tasks, limit=20, apply_chat_template=True)
    with sft.disable_adapter():
        without = run_tasks(sft, tokenizer, tasks, limit=20, apply_chat_template=True)
    assert without == run_tasks(load_base(), tokenizer, tasks, limit=20, apply_chat_template=True)
    assert with_adapter["toy_arith/acc"] > without["toy_arith/acc"]
    assert with_adapter["toy_arith_gen/exact_match_strict-match"] > without["toy_arith_gen/exact_match_strict-match"]


def test_generation_scores_what_eval_toy_scores(tokenizer):
    """lm-eval's greedy answers through the PeftModel, graded by its regex filter, equal peftlab's own generation
    graded by toyworld.exact_match, on the same rows."""
    from peftlab.data.format import prompt_ids
    from peftlab.sampling import answer_texts
    from peftlab.toyworld import judge

    rows = [json.loads(line) for line in (REPO / "data/toy/task_eval.jsonl").read_text().splitlines()[:16]]
    sft = load_sft().eval()
    answers = answer_texts(sft, tokenizer, [prompt_ids(tokenizer, r["prompt"]) for r in rows], 32, batch_size=16)
    ours = sum(judge.exact_match(a, r) for a, r in zip(answers, rows)) / len(rows)
    metrics = run_tasks(sft, tokenizer, [TOY_ARITH_GEN], limit=16, apply_chat_template=True)
    assert metrics["toy_arith_gen/exact_match_strict-match"] == pytest.approx(ours, abs=1e-9)
    assert ours > 0


def test_a_qlora_policy_trains_exactly_after_evaluation():
    """lm-eval's no-grad eval-mode forwards are what makes bitsandbytes repack 4-bit CPU weights for a kernel with no
    backward (PLATFORM.md); the policy as built for training must keep exact LoRA gradients through them."""
    from conftest import live_policy

    _, tokenizer, policy = live_policy(["peft=qlora"])
    batch = torch.tensor([tokenizer.encode("Add 3 and 4. 3 + 4 = 7. The answer is 7.")])

    def lora_gradients():
        policy.zero_grad()
        policy(input_ids=batch, labels=batch).loss.backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    before = lora_gradients()
    run_tasks(policy, tokenizer, [TOY_ARITH, TOY_ARITH_GEN], limit=2, apply_chat_template=True)
    after = lora_gradients()
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_ddp_wrapper_is_unwrapped(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(2, 2)
        assert unwrap(torch.nn.parallel.DistributedDataParallel(model)) is model
        assert unwrap(model) is model
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# the same figures as lm-eval's own command line


@pytest.mark.slow
def test_in_memory_scores_equal_the_cli_on_the_merged_model(tmp_path, tokenizer):
    sft = load_sft()
    in_memory = run_tasks(sft, tokenizer, [TOY_ARITH, TOY_ARITH_GEN], limit=50, apply_chat_template=True)

    merged_dir, out_dir = tmp_path / "merged", tmp_path / "out"
    load_sft().merge_and_unload().save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={merged_dir}",
               "--tasks", "toy_arith,toy_arith_gen", "--include_path", str(TOY_DIR), "--limit", "50",
               "--apply_chat_template", "--device", "cpu", "--batch_size", "8", "--output_path", str(out_dir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = out_dir.rglob("results_*.json")
    from_cli = metric_values(json.loads(results_file.read_text())["results"])

    assert set(from_cli) == set(in_memory)
    for name, value in in_memory.items():
        assert from_cli[name] == pytest.approx(value, abs=1e-6), name


ZERO3_EVALUATION = """
import json, os, sys
import deepspeed, torch
from test_harness import TOY_ARITH, TOY_ARITH_GEN, load_sft, tokenizer_of_tiny_qwen
from peftlab.harness import run_tasks

deepspeed.init_distributed(dist_backend="gloo")
model = load_sft()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
engine.train()
metrics = run_tasks(engine, tokenizer_of_tiny_qwen(), [TOY_ARITH, TOY_ARITH_GEN], limit=8, apply_chat_template=True)
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"metrics": metrics, "training": engine.module.training}, f)
"""


@pytest.mark.slow
def test_zero3_ranks_score_like_one_process(tmp_path, tokenizer):
    """Under ZeRO-3 each rank holds a shard of every weight: both ranks evaluate together, get the single-process
    figures, and the engine stays in train mode."""
    single = run_tasks(load_sft(), tokenizer, [TOY_ARITH, TOY_ARITH_GEN], limit=8, apply_chat_template=True)
    script = tmp_path / "zero3_evaluation.py"
    script.write_text(ZERO3_EVALUATION)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "peftlab" / "torch_extensions"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        reported = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert reported == {"metrics": single, "training": True}, rank
