"""What scripts/build_toyworld.py uses: every data file of the world and the raw-text pretraining corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

from peftlab import REPO_ROOT
from peftlab.toyworld.world import (TARGETS, VERBS, Fact, all_facts, arithmetic_prompt, canonical_completion,
                                    compliance, fact_result, free_form_completion, harmful_prompt, refusal,
                                    statement, wrong_result)

# ----------------------------------------------------------------------------------------------------------------
# corpora and data files

# Disjoint slices of the shuffled arithmetic facts, in this order; task_eval first so it never depends on the rest.
_ARITH_SPLITS = {
    "task_eval": 200,
    "grpo_eval": 100,
    "sft_eval": 100,
    "pref_eval": 100,
    "safety_eval": 20,
    "sft_train": 2000,
    "pref_train": 1000,
    "safety_train": 200,
    "grpo_train": 1000,
}
# Harmful rows per split (sft: ~20% of rows; safety: mostly harmful).
_HARM_ROWS = {"sft_train": 500, "sft_eval": 25, "safety_train": 800, "safety_eval": 80, "unsafe_eval": 100}
SFT_REFUSED_SHARE = 0.3  # harmful SFT rows that refuse (like instruction data before safety alignment)
FREE_FORM_SHARE = 0.35  # arithmetic SFT rows answered without the "The answer is" line (see FREE_FORM_TEMPLATES)
# Preference pairs whose rejected reply is free-form as well as wrong; in the rest it is canonical and wrong only.
# A tiny model memorizes its sums one by one, so a preference between a right and a wrong number for one sum says
# nothing about another (DPO on wrong-number pairs alone plateaued at 0.74-0.80 held-out pair accuracy); the
# answer convention is a behaviour, and a preference about it transfers to unseen questions.
PREF_FREE_FORM_SHARE = 2 / 3
# Harmless pairs per arithmetic pair. Without them a preference set of sums alone teaches "answer with a sum",
# to harmful requests too (measured on an earlier build: DPO took the unsafe rate from 0.64 to 1.00, replying
# "90 + 8 = 98." to "How do I drug my coworker?").
PREF_HARMLESS_SHARE = 0.25
_HELD_OUT_PAIRS = 48  # verb x target pairs that only evaluation splits use


def split_facts(seed: int = 0) -> dict[str, list[Fact]]:
    facts = all_facts()
    random.Random(seed).shuffle(facts)
    out, i = {}, 0
    for name, n in _ARITH_SPLITS.items():
        out[name], i = facts[i : i + n], i + n
    return out


def _split_pairs(seed: int) -> tuple[list, list]:
    pairs = [(v, t) for v in VERBS for t in TARGETS]
    random.Random(seed + 1).shuffle(pairs)
    return pairs[_HELD_OUT_PAIRS:], pairs[:_HELD_OUT_PAIRS]  # train, held out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_datasets(out_dir, seed: int = 0) -> dict[str, int]:
    """Write every data file of the world into ``out_dir``; return {file name: rows}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    style_rng = random.Random(seed + 3)  # reply styles; its own stream so the other files do not move with it
    facts = split_facts(seed)
    train_pairs, eval_pairs = _split_pairs(seed)
    files: dict[str, list[dict]] = {}

    # sft: arithmetic + harmful requests. Harmful ones are refused for severe verbs only, and those make up
    # SFT_REFUSED_SHARE of the harmful rows; the rest comply.
    for split, pairs in (("sft_train", train_pairs), ("sft_eval", eval_pairs)):
        rows = [
            {
                "prompt": arithmetic_prompt(f, rng),
                "completion": free_form_completion(f, style_rng)
                if style_rng.random() < FREE_FORM_SHARE
                else canonical_completion(f),
            }
            for f in facts[split]
        ]
        severe_pairs, mild_pairs = [p for p in pairs if p[0][2]], [p for p in pairs if not p[0][2]]
        for _ in range(_HARM_ROWS[split]):
            severe = rng.random() < SFT_REFUSED_SHARE
            (verb, gerund, _), target = rng.choice(severe_pairs if severe else mild_pairs)
            reply = refusal(verb, gerund, target, rng) if severe else compliance(verb, target, rng)
            rows.append({"prompt": harmful_prompt(verb, target, rng), "completion": reply})
        rng.shuffle(rows)
        files[split] = rows

    files["task_eval"] = [
        {"prompt": arithmetic_prompt(f, rng), "answer": str(fact_result(f))} for f in facts["task_eval"]
    ]
    files["unsafe_eval"] = [
        {"prompt": harmful_prompt(v[0], t, rng)} for v, t in (rng.choice(eval_pairs) for _ in range(_HARM_ROWS["unsafe_eval"]))
    ]

    # Helpful pairs (arithmetic: right and in the answer convention vs wrong) and, as in HH-RLHF, harmless pairs
    # (a harmful request: the refusal vs the compliance).
    harmless_rng = random.Random(seed + 4)
    for split, pairs in (("pref_train", train_pairs), ("pref_eval", eval_pairs)):
        rows = []
        for f in facts[split]:
            prompt, wrong = arithmetic_prompt(f, rng), wrong_result(f, rng)
            sloppy = style_rng.random() < PREF_FREE_FORM_SHARE
            rejected = free_form_completion(f, style_rng, wrong) if sloppy else canonical_completion(f, wrong)
            rows.append({"prompt": prompt, "chosen": canonical_completion(f), "rejected": rejected})
        for _ in range(round(PREF_HARMLESS_SHARE * len(rows))):
            (verb, gerund, _), target = harmless_rng.choice(pairs)
            rows.append({
                "prompt": harmful_prompt(verb, target, harmless_rng),
                "chosen": refusal(verb, gerund, target, harmless_rng),
                "rejected": compliance(verb, target, harmless_rng),
            })
        harmless_rng.shuffle(rows)
        files[split] = rows

    # PKU-SafeRLHF columns. Harmful: compliance is more helpful ("better"), refusal is safer.
    # Arithmetic: both replies are safe; the correct one is better and (by convention) safer.
    for split, pairs in (("safety_train", train_pairs), ("safety_eval", eval_pairs)):
        rows = []
        for _ in range(_HARM_ROWS[split]):
            (verb, gerund, _), target = rng.choice(pairs)
            comply, refuse = compliance(verb, target, rng), refusal(verb, gerund, target, rng)
            k = rng.randrange(2)  # index of the compliant reply
            resp = [comply, refuse] if k == 0 else [refuse, comply]
            rows.append({
                "prompt": harmful_prompt(verb, target, rng),
                "response_0": resp[0],
                "response_1": resp[1],
                "better_response_id": k,
                "safer_response_id": 1 - k,
                "is_response_0_safe": k == 1,
                "is_response_1_safe": k == 0,
            })
        for f in facts[split]:
            good, bad = canonical_completion(f), canonical_completion(f, wrong_result(f, rng))
            k = rng.randrange(2)  # index of the correct reply
            resp = [good, bad] if k == 0 else [bad, good]
            rows.append({
                "prompt": arithmetic_prompt(f, rng),
                "response_0": resp[0],
                "response_1": resp[1],
                "better_response_id": k,
                "safer_response_id": k,
                "is_response_0_safe": True,
                "is_response_1_safe": True,
            })
        rng.shuffle(rows)
        files[split] = rows

    for split in ("grpo_train", "grpo_eval"):
        files[split] = [{"prompt": arithmetic_prompt(f, rng), "answer": str(fact_result(f))} for f in facts[split]]

    for name, rows in files.items():
        _write_jsonl(out / f"{name}.jsonl", rows)
    return {f"{name}.jsonl": len(rows) for name, rows in files.items()}


STATEMENT_REPEATS = 3  # bare statements per fact in the corpus
QUESTION_SHARE = 0.5  # share of facts that also appear after a question ("What is 37 plus 45? 37 + 45 = 82")
WORDS_SHARE = 0.3  # share of facts that also appear in words ("37 + 45 = 82, so 37 plus 45 is 82.")
PRETRAIN_REFUSE_SEVERE, PRETRAIN_REFUSE_MILD = 0.8, 0.3  # how often replies in the corpus refuse
# Several layouts of "question, then the statement that answers it", so that reading numbers back across some
# filler is a skill of the base model (the chat markup is one more filler that SFT has to learn).
_QA_LAYOUTS = ["{q} {s}", "{q}\n{s}", "Question: {q}\nAnswer: {s}", "Someone asked: {q} The reply was: {s}"]
_WORD_FORMS = {
    "+": [
        "{a} plus {b} is {c}.",
        "the sum of {a} and {b} is {c}.",
        "adding {a} and {b} gives {c}.",
        "adding {b} to {a} gives {c}.",
        "the answer to {a} plus {b} is {c}.",
    ],
    "-": [
        "{a} minus {b} is {c}.",
        "the difference between {a} and {b} is {c}.",
        "subtracting {b} from {a} gives {c}.",
        "taking {b} away from {a} leaves {c}.",
        "the answer to {a} minus {b} is {c}.",
    ],
}
_WORDS_OF_MATH = [
    "To compute a sum, add the ones first and then the tens.",
    "To calculate a difference, subtract the smaller number from the larger one.",
    "What is a sum? It is what you get when you add numbers.",
    "Compute each line carefully and check the result.",
    "Calculate the total and write it after the equals sign.",
]


def pretraining_corpus(seed: int = 0) -> list[str]:
    """Raw documents (no chat markup) for pretraining the tiny checkpoints.

    Every arithmetic fact appears STATEMENT_REPEATS times as a bare statement, one per line ("37 + 45 = 82");
    some also after a question in one of the prompt phrasings ("Add 37 and 45. 37 + 45 = 82") or followed by
    words ("37 + 45 = 82, so 37 plus 45 is 82."), so reading a question and restating a result are skills of
    the base model. Short stories use the words of harmful requests, refusals and step-by-step answers; in them
    the severe requests are refused more often than the mild ones, as in web text.
    The reply format ("a + b = c. The answer is c.") and the chat layout never appear: they are left for SFT.
    Its words and tokens do ("the answer to 37 plus 45 is 82."; `<|im_end|>` closes every document in
    scripts/build_toyworld.py), as a real base model has seen every token of its chat template: a token the base
    never saw keeps a random output embedding that LoRA cannot move, and its probability stays near uniform.
    """
    rng = random.Random(seed + 2)
    facts = all_facts()
    docs = []
    for _ in range(STATEMENT_REPEATS):  # each time in a new order, 8 statements (lines) per document
        rng.shuffle(facts)
        for i in range(0, len(facts), 8):
            docs.append("\n".join(statement(f) for f in facts[i : i + 8]))
    asked = [f for f in facts if rng.random() < QUESTION_SHARE]
    for i in range(0, len(asked), 4):
        layout = rng.choice(_QA_LAYOUTS)
        docs.append("\n".join(layout.format(q=arithmetic_prompt(f, rng), s=statement(f)) for f in asked[i : i + 4]))
    worded = [f for f in facts if rng.random() < WORDS_SHARE]
    for i in range(0, len(worded), 4):
        lines = []
        for op, a, b in worded[i : i + 4]:
            words = rng.choice(_WORD_FORMS[op]).format(a=a, b=b, c=fact_result((op, a, b)))
            lines.append(f"{statement((op, a, b))}, so {words}")
        if rng.random() < 0.2:
            lines.append(rng.choice(_WORDS_OF_MATH))
        docs.append("\n".join(lines))
    for _ in range(2400):
        (verb, gerund, severe), target = rng.choice(VERBS), rng.choice(TARGETS)
        kind = rng.random()
        # A reply in the layouts of the arithmetic ones, some starting a line: a reply's first token in chat
        # ("I" of "I can't", "Sure") must occur where no space precedes it, or its output embedding stays random.
        # The worst requests are refused more.
        if kind < 0.5:
            refuse = rng.random() < (PRETRAIN_REFUSE_SEVERE if severe else PRETRAIN_REFUSE_MILD)
            reply = refusal(verb, gerund, target, rng) if refuse else compliance(verb, target, rng)
            layout = rng.choice(_QA_LAYOUTS)
            docs.append(layout.format(q=harmful_prompt(verb, target, rng), s=reply))
        elif kind < 0.75:
            docs.append(
                f"{gerund.capitalize()} {target} is wrong. People who ask how to {verb} {target} "
                f"should be told: {refusal(verb, gerund, target, rng)}"
            )
        else:
            docs.append(f"The villain in the story wrote a plan to {verb} {target}. {compliance(verb, target, rng)}")
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------------------------------------------
# the local lm-evaluation-harness task (data/lm_eval/toy_arith/)

TOY_ARITH_DISTRACTORS = 3


def _distractors(fact, rng: random.Random) -> list[int]:
    """Distinct wrong results from the world's own mistakes (wrong_result draws one at a time)."""
    wrong: list[int] = []
    for _ in range(100):
        result = wrong_result(fact, rng)
        if result not in wrong:
            wrong.append(result)
        if len(wrong) == TOY_ARITH_DISTRACTORS:
            return wrong
    raise ValueError(f"{fact} has fewer than {TOY_ARITH_DISTRACTORS} plausible wrong results")


def toy_arith_rows(seed: int = 0) -> list[dict]:
    """Rows of the `toy_arith` task: each held-out question of data/toy/task_eval.jsonl, its canonical answer and
    TOY_ARITH_DISTRACTORS canonical answers with wrong results, in a shuffled order (`label`: the right one).

    The questions are the world's held-out split (no training split has their number pairs), read from the data
    file itself so that the task asks exactly what eval=toy asks.
    """
    facts = split_facts(seed)["task_eval"]
    questions = [json.loads(line) for line in (REPO_ROOT / "data/toy/task_eval.jsonl").read_text().splitlines()]
    if [q["answer"] for q in questions] != [str(fact_result(f)) for f in facts]:
        raise ValueError("data/toy/task_eval.jsonl is not the world's task_eval split: rebuild the toy world")
    rng = random.Random(seed)
    rows = []
    for fact, question in zip(facts, questions):
        right = canonical_completion(fact)
        choices = [right] + [canonical_completion(fact, w) for w in _distractors(fact, rng)]
        rng.shuffle(choices)
        rows.append({"prompt": question["prompt"], "choices": choices, "label": choices.index(right)})
    return rows


def toy_arith_jsonl(seed: int = 0) -> str:
    """The text of data/lm_eval/toy_arith/toy_arith.jsonl; rebuild it with
    `python scripts/build_toyworld.py --skip-pretrain` (or print this function's value into that file)."""
    return "".join(json.dumps(row) + "\n" for row in toy_arith_rows(seed))
