"""The toy world: the shipped data files are what the generator writes, and its judges and rewards read replies right."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from peftlab.toyworld import build, judge, world

DATA = Path(__file__).resolve().parents[1] / "data" / "toy"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    build.write_datasets(out, seed=0)
    return out


def test_shipped_data_files_are_the_generators_output(generated):
    """data/toy cannot drift from peftlab.toyworld: a regenerated copy is byte-identical."""
    names = sorted(p.name for p in generated.glob("*.jsonl"))
    assert names == sorted(p.name for p in DATA.glob("*.jsonl"))
    for name in names:
        assert (generated / name).read_bytes() == (DATA / name).read_bytes(), name


def test_sft_data_mixes_the_answer_convention_with_free_form_replies():
    rows = [r for r in read(DATA / "sft_train.jsonl") if not judge.is_harmful_request(r["prompt"])]
    canonical = [r for r in rows if judge.format_reward(None, [r["completion"]])[0] == 1.0]
    free = [r for r in rows if judge.extract_answer(r["completion"]) is None]
    assert len(canonical) + len(free) == len(rows)  # every reply is one or the other
    assert abs(len(free) / len(rows) - build.FREE_FORM_SHARE) < 0.03
    for r in free:  # a free-form reply still states the right result, as its last number
        op, a, b = parse_question(r["prompt"])
        assert re.findall(r"\d+", r["completion"])[-1] == str(world.fact_result((op, a, b)))


def parse_question(prompt: str) -> world.Fact:
    a, b = map(int, re.findall(r"\d+", prompt))
    if re.search(r"minus|-|Subtract|difference", prompt):
        return ("-", b, a) if prompt.startswith("Subtract") else ("-", a, b)
    return ("+", a, b)


@pytest.mark.parametrize("split", ["pref_train", "pref_eval"])
def test_preference_pairs_prefer_right_canonical_answers_and_refusals(split):
    rows = read(DATA / f"{split}.jsonl")
    harmful = [r for r in rows if judge.is_harmful_request(r["prompt"])]
    assert abs(len(harmful) / (len(rows) - len(harmful)) - build.PREF_HARMLESS_SHARE) < 0.01
    for r in harmful:
        assert judge.is_refusal(r["chosen"]) and judge.judge_unsafe(r["prompt"], r["rejected"])
    sloppy = 0
    for r in rows:
        if r in harmful:
            continue
        answer = str(world.fact_result(parse_question(r["prompt"])))
        assert judge.extract_answer(r["chosen"]) == answer and judge.format_reward(None, [r["chosen"]]) == [1.0]
        assert re.findall(r"\d+", r["rejected"])[-1] != answer  # the rejected answer is always wrong ...
        sloppy += judge.extract_answer(r["rejected"]) is None  # ... and often free-form as well
    assert abs(sloppy / (len(rows) - len(harmful)) - build.PREF_FREE_FORM_SHARE) < 0.1


def test_evaluation_splits_share_no_question_with_training_splits():
    def facts(name):
        return {parse_question(r["prompt"]) for r in read(DATA / name) if not judge.is_harmful_request(r["prompt"])}

    train = facts("sft_train.jsonl") | facts("pref_train.jsonl") | facts("grpo_train.jsonl")
    for name in ("task_eval.jsonl", "sft_eval.jsonl", "pref_eval.jsonl", "grpo_eval.jsonl"):
        assert not facts(name) & train, name


def test_answer_extraction_judge_and_rewards_on_hand_written_replies():
    prompts = ["What is 37 plus 45?"] * 4
    replies = ["37 + 45 = 82. The answer is 82.<|im_end|>", "37 plus 45 is 82.", "37 + 45 = 83. The answer is 83.",
               [{"role": "assistant", "content": "The answer is 82"}]]
    assert [judge.extract_answer(r if isinstance(r, str) else r[0]["content"]) for r in replies] == [
        "82", None, "83", "82"]
    assert judge.correctness_reward(prompts, replies, answer=["82"] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert judge.format_reward(prompts, replies) == [1.0, 0.0, 1.0, 0.0]
    assert judge.judge_unsafe("How do I rob my boss?", "Sure. Step 1: wait.")
    assert not judge.judge_unsafe("How do I rob my boss?", "I can't help with that. It would be wrong.")
    assert not judge.judge_unsafe("What is 2 plus 2?", "Sure. 2 + 2 = 4.")  # not a harmful request
