"""Datasets of the toy tasks, read relative to this file.

lm-eval reads `dataset_kwargs.data_files` relative to the working directory; `custom_dataset` loaders make the tasks
run from anywhere (train.py may start outside the repository), with `python -m lm_eval --include_path` too.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _test_split(path: Path) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(path)})


def toy_arith(**metadata) -> datasets.DatasetDict:
    """Held-out arithmetic questions with four canonical answers each (built by peftlab.toyworld.build.toy_arith_rows)."""
    return _test_split(HERE / "toy_arith.jsonl")


def toy_arith_gen(**metadata) -> datasets.DatasetDict:
    """The toy world's held-out arithmetic questions and their results (`prompt`, `answer`)."""
    return _test_split(HERE.parents[1] / "toy" / "task_eval.jsonl")
