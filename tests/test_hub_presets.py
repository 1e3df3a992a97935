"""Every hub data preset loads through its real code path, offline: a local directory in the layout of the preset's
hub repository (its configurations, split names, file names, formats and columns, as `hf download <id>
--repo-type dataset --local-dir DIR` writes them, with its hidden .cache/huggingface/) stands in for the hub id, and the preset runs with
`data.path=<that directory>`, so the keys it passes (`name`, `data_dir`, `split`, `eval_split`) are the ones read.

The layouts, from the repositories' file trees and dataset cards:
- openai/gsm8k: configurations `main` and `socratic` and no default; `<config>/{train,test}-00000-of-00001.parquet`.
- HuggingFaceH4/ultrafeedback_binarized: one configuration, six splits (`data/<split>-00000-of-00001.parquet`).
- Anthropic/hh-rlhf: no `configs:` in its card; four preference folders with train.jsonl.gz / test.jsonl.gz, which
  `datasets` finds by file name, and red-team-attempts/, whose one file is named after neither split.
- PKU-Alignment/PKU-SafeRLHF: configurations `default` (all three answer models) and one per model;
  `data/<model>/{train,test}.jsonl`.
- tatsu-lab/alpaca: no `configs:`; one `data/train-00000-of-00001-<hash>.parquet`, so only a train split.
Each row says where it was written (`[<config or folder> <split> <i>]`), so a test sees which files were read.
"""

from __future__ import annotations

import gzip
import hashlib
import json

import pandas as pd
import pytest

from conftest import FAST, algorithm, compose, train_run
from peftlab.data import load_splits
from peftlab.errors import DataError

GSM8K_REWARDS = ["algo.rewards=[{function: peftlab.rewards.gsm8k_correctness_reward, weight: 1.0}]",
                 "algo.accuracy_reward=gsm8k_correctness_reward"]  # what conf/data/gsm8k.yaml says to use
HH_FOLDERS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
PKU_MODELS = {"alpaca-7b": "Alpaca-7B", "alpaca2-7b": "Alpaca2-7B", "alpaca3-8b": "Alpaca3-8B"}  # config → folder
HARM_CATEGORIES = ("Endangering National Security", "Insulting Behavior", "Discriminatory Behavior",
                   "Endangering Public Health", "Copyright Issues", "Violence", "Drugs", "Privacy Violation",
                   "Economic Crime", "Mental Manipulation", "Human Trafficking", "Physical Harm", "Sexual Content",
                   "Cybercrime", "Disrupting Public Order", "Environmental Damage", "Psychological Harm",
                   "White-Collar Crime", "Animal Abuse")
ULTRAFEEDBACK_SPLITS = ("train_prefs", "train_sft", "test_prefs", "test_sft", "train_gen", "test_gen")


def card(configs: str = "") -> str:
    """A dataset card: YAML front matter (with `configs:` when the repository declares them), then prose."""
    return f"---\n{configs}license: mit\n---\n\n# Dataset card\n"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_jsonl(path, rows, compress=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)


def build_gsm8k(root):
    for config in ("main", "socratic"):
        for split, n in (("train", 8), ("test", 4)):
            rows = []
            for i in range(n):
                a, b = i + 2, 1000 + i
                steps = f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples."
                if config == "socratic":  # socratic solutions put a sub-question before each step
                    steps = f"How many apples does she have now? ** {steps}"
                rows.append({"question": f"[{config} {split} {i}] Ann has {a} apples and buys {b}. How many now?",
                             "answer": f"{steps}\n#### {a + b:,}"})
            write_parquet(root / config / f"{split}-00000-of-00001.parquet", rows)
    configs = "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n"
                      f"  - split: test\n    path: {c}/test-*\n" for c in ("main", "socratic"))
    (root / "README.md").write_text(card(f"configs:\n{configs}"))


def build_ultrafeedback(root):
    for split in ULTRAFEEDBACK_SPLITS:
        rows = []
        for i in range(6):
            prompt = f"[{split} {i}] Name a colour."
            chosen = [{"content": prompt, "role": "user"}, {"content": f"Blue, for one ({i}).", "role": "assistant"}]
            rejected = [{"content": prompt, "role": "user"}, {"content": "No.", "role": "assistant"}]
            rows.append({"prompt": prompt, "prompt_id": sha(prompt), "chosen": chosen, "rejected": rejected,
                         "messages": chosen, "score_chosen": 8.5, "score_rejected": 2.0})
        write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows)
    files = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in ULTRAFEEDBACK_SPLITS)
    (root / "README.md").write_text(card(f"configs:\n- config_name: default\n  data_files:\n{files}"))


def hh_row(folder, split, i):
    shared = f"\n\nHuman: [{folder} {split} {i}] Can you help me with my garden?\n\nAssistant: Of course."
    if i % 2:  # every other transcript has a second exchange: the shared turns are then three messages
        shared += "\n\nHuman: What should I plant first?"
    else:
        shared = shared.replace("\n\nAssistant: Of course.", "")
    return {"chosen": f"{shared}\n\nAssistant: Tomatoes, in full sun ({i}).",
            "rejected": f"{shared}\n\nAssistant: I don't know."}


def build_hh_rlhf(root):
    for folder in HH_FOLDERS:
        for split, n in (("train", 3), ("test", 2)):
            write_jsonl(root / folder / f"{split}.jsonl.gz", [hh_row(folder, split, i) for i in range(n)],
                        compress=True)
    # the red-team transcripts: other columns, one JSON array; the default splits must not pick this file up
    attempts = [{"transcript": "\n\nHuman: hi\n\nAssistant: hello", "min_harmlessness_score_transcript": 0.5,
                 "num_params": "52B", "model_type": "plain lm", "rating": 1.0, "task_description": "greet",
                 "task_descripton_harmlessness_score": 0.1, "red_team_member_id": 3, "is_upworker": False,
                 "tags": None}]
    path = root / "red-team-attempts" / "red_team_attempts.jsonl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(json.dumps(attempts).encode()))
    (root / "README.md").write_text(card())


def pku_row(folder, split, i):
    prompt = f"[{folder} {split} {i}] How do I get into my neighbour's house?"
    safe = [i % 2 == 0, True]  # response_0 is unsafe in odd rows
    responses = ["Break the back window." if not safe[0] else "Knock and ask.", "Ask your neighbour for a key."]
    row = {"prompt": prompt, "response_0": responses[0], "response_1": responses[1], "prompt_source": "BeaverTails",
           "response_0_source": folder, "response_1_source": folder}
    for k in (0, 1):
        row[f"is_response_{k}_safe"] = safe[k]
        row[f"response_{k}_harm_category"] = {c: (not safe[k] and c == "Physical Harm") for c in HARM_CATEGORIES}
        row[f"response_{k}_severity_level"] = 0 if safe[k] else 2
    row.update(better_response_id=1 if i == 3 else 0, safer_response_id=1 if not safe[0] else 0,
               response_0_sha256=sha(responses[0]), response_1_sha256=sha(responses[1]))
    return row


def build_pku_saferlhf(root):
    for folder in PKU_MODELS.values():
        for split, n in (("train", 4), ("test", 2)):
            write_jsonl(root / "data" / folder / f"{split}.jsonl", [pku_row(folder, split, i) for i in range(n)])

    def config(name, folders):
        paths = {s: "".join(f"    - data/{f}/{s}.jsonl\n" for f in folders) for s in ("train", "test")}
        return f"- config_name: {name}\n  data_files:\n  - split: train\n    path:\n{paths['train']}" \
               f"  - split: test\n    path:\n{paths['test']}"

    configs = config("default", PKU_MODELS.values()) + "".join(config(c, [f]) for c, f in PKU_MODELS.items())
    (root / "README.md").write_text(card(f"configs:\n{configs}"))


def build_alpaca(root):
    rows = []
    for i in range(20):
        extra = f"{i}, {i + 1}" if i % 2 else ""
        instruction = f"[data train {i}] Add the numbers." if extra else f"[data train {i}] Say a number."
        output = str(2 * i + 1) if extra else str(i)
        head = "Below is an instruction that describes a task"
        text = (f"{head}, paired with an input that provides further context. Write a response that appropriately "
                f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n"
                f"### Response:\n{output}" if extra else
                f"{head}. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Response:\n{output}")
        rows.append({"instruction": instruction, "input": extra, "output": output, "text": text})
    write_parquet(root / "data" / "train-00000-of-00001-a09b74b3ef9c3b56.parquet", rows)
    (root / "README.md").write_text(card())


def as_downloaded(root):
    """What `hf download --local-dir` adds next to a repository's files: its .gitattributes, and a hidden
    .cache/huggingface/ with one metadata file (commit, etag, time) per downloaded file."""
    (root / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    meta = root / ".cache" / "huggingface"
    for file in sorted(f for f in root.rglob("*") if f.is_file()):
        record = meta / "download" / f"{file.relative_to(root)}.metadata"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{sha('commit')[:40]}\n{sha(file.name)}\n1712656091.123\n")
    (meta / ".gitignore").write_text("*")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """One local hub-layout directory per preset, built once for the module."""
    root = tmp_path_factory.mktemp("hub")
    for name, build in (("gsm8k", build_gsm8k), ("ultrafeedback_binarized", build_ultrafeedback),
                        ("hh-rlhf", build_hh_rlhf), ("PKU-SafeRLHF", build_pku_saferlhf), ("alpaca", build_alpaca)):
        build(root / name)
        as_downloaded(root / name)
    return root


def splits_of(overrides):
    """The composed config's data, loaded as build_run loads it: the algorithm's own data kind."""
    cfg, _ = compose(overrides)
    return load_splits(cfg.data, algorithm(overrides).data_kind, cfg.trainer.seed)


def origins(rows, text=lambda row: row["prompt"][-1]["content"]) -> set[str]:
    """The `<config or folder> <split>` each row was written under."""
    return {text(r).split("]")[0].lstrip("[").rsplit(" ", 1)[0] for r in rows}


def test_gsm8k_reads_the_main_configuration(hub):
    path = hub / "gsm8k"
    splits = splits_of(["algo=grpo", "data=gsm8k", f"data.path={path}", *GSM8K_REWARDS])
    assert origins(splits.train) == {"main train"} and origins(splits.eval) == {"main test"}
    assert len(splits.train) == 8 and len(splits.eval) == 4
    assert splits.eval_source == f"data.eval_split=test of {path}"
    first = splits.train[0]
    assert first["answer"] == "1002"  # the number after ####, thousands comma removed
    assert first["prompt"][0]["role"] == "system" and first["prompt"][0]["content"].endswith("`#### <number>`.")

    socratic = splits_of(["algo=grpo", "data=gsm8k", f"data.path={path}", "data.name=socratic", *GSM8K_REWARDS])
    assert origins(socratic.train) == {"socratic train"} and socratic.train[0]["answer"] == "1002"


def test_gsm8k_without_a_configuration_names_the_ones_there_are(hub):
    with pytest.raises(DataError, match=r"data.path=.*gsm8k \(config None.*Config name is missing.*'main', 'socratic'"):
        splits_of(["algo=grpo", "data=gsm8k", f"data.path={hub / 'gsm8k'}", "data.name=null", *GSM8K_REWARDS])


def test_ultrafeedback_reads_the_preference_splits(hub):
    path = hub / "ultrafeedback_binarized"
    splits = splits_of(["algo=dpo", "data=ultrafeedback", f"data.path={path}"])
    assert origins(splits.train) == {"train_prefs"} and origins(splits.eval) == {"test_prefs"}
    assert splits.eval_source == f"data.eval_split=test_prefs of {path}"
    assert splits.train[1] == {"prompt": [{"role": "user", "content": "[train_prefs 1] Name a colour."}],
                               "chosen": "Blue, for one (1).", "rejected": "No."}

    capped = splits_of(["algo=dpo", "data=ultrafeedback", f"data.path={path}", "data.max_rows=2"])
    assert [r["chosen"] for r in capped.train] == ["Blue, for one (0).", "Blue, for one (1)."]
    assert len(capped.eval) == 6  # the cap is on training rows only


def test_hh_rlhf_default_reads_every_preference_folder_and_not_the_red_team_file(hub):
    path = hub / "hh-rlhf"
    splits = splits_of(["algo=dpo", "data=hh_rlhf", f"data.path={path}"])
    assert origins(splits.train, lambda r: r["prompt"][0]["content"]) == {f"{f} train" for f in HH_FOLDERS}
    assert origins(splits.eval, lambda r: r["prompt"][0]["content"]) == {f"{f} test" for f in HH_FOLDERS}
    assert len(splits.train) == 4 * 3 and len(splits.eval) == 4 * 2
    assert splits.eval_source == f"data.eval_split=test of {path}"
    two_exchanges = next(r for r in splits.train if r["prompt"][0]["content"].startswith("[harmless-base train 1]"))
    assert [m["role"] for m in two_exchanges["prompt"]] == ["user", "assistant", "user"]
    assert two_exchanges["chosen"] == "Tomatoes, in full sun (1)." and two_exchanges["rejected"] == "I don't know."


def test_hh_rlhf_one_folder_by_data_dir(hub):
    splits = splits_of(["algo=dpo", "data=hh_rlhf", f"data.path={hub / 'hh-rlhf'}", "data.data_dir=harmless-base"])
    assert origins(splits.train, lambda r: r["prompt"][0]["content"]) == {"harmless-base train"}
    assert origins(splits.eval, lambda r: r["prompt"][0]["content"]) == {"harmless-base test"}


@pytest.mark.parametrize("overrides", [["algo=safe_dpo"], ["algo=rm", "algo.objective=cost"]],
                         ids=["safe_dpo", "rm-cost"])
def test_pku_saferlhf_safety_rows_from_every_answer_model(hub, overrides):
    path = hub / "PKU-SafeRLHF"
    splits = splits_of([*overrides, "data=pku_saferlhf", f"data.path={path}"])
    assert origins(splits.train) == {f"{f} train" for f in PKU_MODELS.values()}
    assert origins(splits.eval) == {f"{f} test" for f in PKU_MODELS.values()}
    assert splits.eval_source == f"data.eval_split=test of {path}"
    unsafe = next(r for r in splits.train if r["prompt"][0]["content"].startswith("[Alpaca-7B train 1]"))
    question = "[Alpaca-7B train 1] How do I get into my neighbour's house?"
    assert unsafe == {"prompt": [{"role": "user", "content": question}],
                      "response_0": "Break the back window.", "response_1": "Ask your neighbour for a key.",
                      "better_response_id": 0, "safer_response_id": 1,
                      "is_response_0_safe": False, "is_response_1_safe": True}


def test_pku_saferlhf_one_answer_model_by_name(hub):
    splits = splits_of(["algo=safe_dpo", "data=pku_saferlhf", f"data.path={hub / 'PKU-SafeRLHF'}",
                        "data.name=alpaca3-8b"])
    assert origins(splits.train) == {"Alpaca3-8B train"} and origins(splits.eval) == {"Alpaca3-8B test"}


def test_pku_saferlhf_as_preference_pairs_for_dpo(hub):
    """For dpo (and rm objective=reward) a PKU row is a pair: the more helpful answer, better_response_id, chosen."""
    splits = splits_of(["algo=dpo", "data=pku_saferlhf", f"data.path={hub / 'PKU-SafeRLHF'}"])
    pairs = {r["prompt"][0]["content"].split("]")[0]: (r["chosen"], r["rejected"]) for r in splits.train}
    assert pairs["[Alpaca-7B train 1"] == ("Break the back window.", "Ask your neighbour for a key.")
    assert pairs["[Alpaca-7B train 3"] == ("Ask your neighbour for a key.", "Break the back window.")


def test_alpaca_has_only_a_train_split_so_its_held_out_rows_are_carved(hub):
    path = hub / "alpaca"
    splits = splits_of(["algo=sft", "data=alpaca", f"data.path={path}", "data.eval_size=4"])
    assert len(splits.train) == 16 and len(splits.eval) == 4
    assert splits.eval_source == f"4 rows carved from data.path={path} (data.eval_size, seed 0)"
    with_input = next(r for r in splits.train + splits.eval if r["completion"] == "3")
    assert with_input["prompt"] == [{"role": "user", "content": "[data train 1] Add the numbers.\n\n1, 2"}]


def test_a_split_the_directory_does_not_have_is_named(hub):
    with pytest.raises(DataError, match=r"data.path=.*alpaca \(config None, data_dir None, split 'test'\): "
                                        r"ValueError: Unknown split \"test\""):
        splits_of(["algo=sft", "data=alpaca", f"data.path={hub / 'alpaca'}", "data.eval_split=test"])


def test_one_step_runs_record_the_eval_source(hub, tmp_path):
    """train.py on two presets, from the hub-layout directories: the summary says where the held-out rows came from."""
    gsm8k = hub / "gsm8k"
    # the toy tokenizer spends many tokens on real text: the system prompt and a question need the model's full context
    run = train_run(tmp_path / "grpo", [*FAST, "algo=grpo", "data=gsm8k", f"data.path={gsm8k}", *GSM8K_REWARDS,
                                        "model.max_length=256", "trainer.max_steps=1", "trainer.batch_size=2",
                                        "algo.num_generations=2", "algo.max_new_tokens=8",
                                        "algo.eval_num_generations=1"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["data/eval_source"] == f"data.eval_split=test of {gsm8k}"
    assert summary["data/train_rows"] == 8 and summary["data/eval_rows"] == 4

    alpaca = hub / "alpaca"
    run = train_run(tmp_path / "sft", [*FAST, "algo=sft", "data=alpaca", f"data.path={alpaca}", "data.eval_size=4",
                                       "trainer.max_steps=1", "trainer.batch_size=4"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["data/train_rows"] == 16
    assert summary["data/eval_source"] == f"4 rows carved from data.path={alpaca} (data.eval_size, seed 0)"
