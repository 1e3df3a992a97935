"""Loading real data layouts from local files, schema detection, and chat-template tokenization."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose
from peftlab.data import load_splits
from peftlab.data.format import IGNORE, encode_prompt_completion, render_prompt
from peftlab.errors import DataError
from peftlab.models import load_tokenizer

ALPACA = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "Show the sum.", "output": f"{2 * i + 1}"}
          for i in range(10)]
MESSAGES = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                          {"role": "assistant", "content": f"Hello {i}"}]} for i in range(10)]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]} for i in range(10)]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def data_cfg(path, **extra):
    return OmegaConf.create({"path": str(path), "name": None, "data_dir": None, "eval_path": None, "split": "train",
                             "eval_split": None, "eval_size": 2, "schema": "auto", "max_rows": None, "max_eval_rows": None,
                             "system_prompt": None, **extra})


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_alpaca_from_every_file_type(tmp_path, suffix):
    splits = load_splits(data_cfg(write(tmp_path / f"a{suffix}", ALPACA)), "sft")
    train, held = splits.train, splits.eval
    assert len(train) == 8 and len(held) == 2
    row = next(r for r in train + held if r["completion"] == "1")  # i = 0 has an input
    assert row["prompt"] == [{"role": "user", "content": "Add 0 and 1.\n\nShow the sum."}]


def test_messages_and_sharegpt(tmp_path):
    train = load_splits(data_cfg(write(tmp_path / "m.jsonl", MESSAGES), eval_size=0), "sft").train
    assert train[0]["prompt"][0] == {"role": "system", "content": "Be brief."} and train[0]["completion"] == "Hello 0"
    train = load_splits(data_cfg(write(tmp_path / "s.jsonl", SHAREGPT), eval_size=0), "sft").train
    assert train[3] == {"prompt": [{"role": "user", "content": "Q3"}], "completion": "A3"}


def test_unknown_columns_name_the_columns(tmp_path):
    path = write(tmp_path / "bad.jsonl", [{"question": "q", "reply": "r"}] * 4)
    with pytest.raises(DataError, match=r"unknown dataset columns \['question', 'reply'\].*data.schema="):
        load_splits(data_cfg(path), "sft")


def test_named_schema_missing_column(tmp_path):
    path = write(tmp_path / "a.jsonl", ALPACA)
    with pytest.raises(DataError, match=r"data.schema=messages needs column\(s\) \['messages'\]"):
        load_splits(data_cfg(path, schema="messages"), "sft")


def test_json_files_are_read_without_datasets(tmp_path):
    """A .json file holding JSON Lines reads like the .jsonl; a row that lacks a column reads as None there (as
    `datasets` fills it: alpaca's optional `input`); and neither import `datasets` (no arrow cache either)."""
    lines = "".join(json.dumps({k: v for k, v in r.items() if k != "input" or v}) + "\n" for r in ALPACA)
    (tmp_path / "lines.json").write_text(lines)
    (tmp_path / "lines.jsonl").write_text(lines)
    as_json, as_jsonl = (load_splits(data_cfg(tmp_path / name, eval_size=0), "sft").train
                         for name in ("lines.json", "lines.jsonl"))
    assert as_json == as_jsonl and len(as_json) == 10
    assert as_json[1]["prompt"] == [{"role": "user", "content": "Add 1 and 2."}]  # no `input` key in that row
    probe = ("import sys; from omegaconf import OmegaConf; from peftlab.data import load_splits; "
             f"load_splits(OmegaConf.create({dict(data_cfg(tmp_path / 'lines.jsonl'))!r}), 'sft'); "
             "print('datasets' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.stdout.split()[-1] == "False"


@pytest.mark.parametrize("name, text, message", [
    ("rows.jsonl", '{"instruction": "a", "output": "b"}\n["a", "b"]\n', r"rows.jsonl, line 2: a row must be a JSON "
                                                                         r"object, found a JSON list"),
    ("rows.json", '[{"instruction": "a", "output": "b"}, 3]', r"rows.json, row 2: a row must be a JSON object"),
    ("rows.json", '"just text"', r"rows.json: expected a list of objects or JSON Lines, found a JSON str"),
    ("rows.json", '[{"instruction": "a",', r"rows.json, line 1: not valid JSON"),
])
def test_json_rows_that_are_not_objects_name_their_place(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        load_splits(data_cfg(tmp_path / name), "sft")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_splits(data_cfg(tmp_path / "nope.jsonl"), "sft")
    with pytest.raises(DataError, match="file not found"):  # a local-looking path is never looked up on the hub
        load_splits(data_cfg(tmp_path / "my-copy-of-alpaca"), "sft")


def test_a_file_has_no_splits_so_a_presets_eval_split_carves(tmp_path):
    """data=<hub preset> data.path=<file>: reading the file again as the eval split would evaluate on training rows."""
    path = write(tmp_path / "a.jsonl", ALPACA)
    splits = load_splits(data_cfg(path, eval_split="test", eval_size=3), "sft")
    assert len(splits.train) == 7 and len(splits.eval) == 3
    assert not {r["completion"] for r in splits.train} & {r["completion"] for r in splits.eval}
    assert splits.eval_source.startswith("3 rows carved from data.path=")


def test_data_dir_needs_a_directory_or_hub_id(tmp_path):
    with pytest.raises(DataError, match=r"data.data_dir=harmless-base .* is a file: set data.data_dir=null"):
        load_splits(data_cfg(write(tmp_path / "a.jsonl", ALPACA), data_dir="harmless-base"), "sft")


def hub_layout(root, tag):
    """A one-configuration directory in the hub layout whose rows say `tag`."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    write(root / "data" / "train-00000-of-00001.parquet", [dict(r, output=f"{tag} {i}") for i, r in enumerate(ALPACA)])
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*\n---\n")
    return root


def test_a_directory_loads_its_current_files(tmp_path):
    """`datasets` caches a directory's tables under its name and card alone: an edited copy, or another directory of
    the same name, must still load its own rows."""
    path = hub_layout(tmp_path / "one" / "alpaca", "first")
    assert load_splits(data_cfg(path, eval_size=0), "sft").train[0]["completion"] == "first 0"
    hub_layout(path, "edited")
    assert load_splits(data_cfg(path, eval_size=0), "sft").train[0]["completion"] == "edited 0"
    other = hub_layout(tmp_path / "two" / "alpaca", "other")
    assert load_splits(data_cfg(other, eval_size=0), "sft").train[0]["completion"] == "other 0"


def test_completion_only_labels_and_chat_template():
    cfg, _ = compose([])
    tokenizer = load_tokenizer(cfg.model)
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    example = encode_prompt_completion(tokenizer, prompt, "2 + 3 = 5. The answer is 5.", max_length=128)
    ids, labels = example["input_ids"], example["labels"]
    n_prompt = sum(1 for l in labels if l == IGNORE)
    assert tokenizer.decode(ids[:n_prompt]) == render_prompt(tokenizer, prompt)
    assert render_prompt(tokenizer, prompt).endswith("<|im_start|>assistant\n")
    target = tokenizer.decode(labels[n_prompt:])
    assert target.startswith("2 + 3 = 5. The answer is 5.<|im_end|>")  # the end-of-turn token is a target
    assert labels[n_prompt:] == ids[n_prompt:]


def test_truncation_keeps_the_end_of_the_prompt():
    cfg, _ = compose([])
    tokenizer = load_tokenizer(cfg.model)
    prompt = [{"role": "user", "content": "pad " * 200 + "What is 2 plus 3?"}]
    example = encode_prompt_completion(tokenizer, prompt, "The answer is 5.", max_length=48)
    assert len(example["input_ids"]) == 48
    assert tokenizer.decode(example["input_ids"]).rstrip().endswith("The answer is 5.<|im_end|>")
