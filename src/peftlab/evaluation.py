"""Held-out evaluation: the algorithm's own metrics on the run's eval rows, the tasks of the `eval` group, and
samples of what the model answers.

    evaluate = Evaluator(cfg.eval, algo, tokenizer, eval_rows, eval_examples)
    metrics, samples = evaluate(model, "base")   # {"base/loss": ..., "base/accuracy": ...} before the first step
    metrics, samples = evaluate(model, "eval")   # the same names under eval/ during and after training

The eval rows are the run's own held-out rows (peftlab.data.load_splits: the data's eval file or split, or rows
carved from it). The `eval` group names a task runner by `_target_`: `GenerationTasks` (eval=toy: held-out prompts
answered greedily and scored per row; they measure the toy world, so they run only on toy-world data) or
`peftlab.harness.HarnessTasks` (eval=lm_eval: lm-evaluation-harness on the policy in memory). A task's metric name
must not be one the algorithm reports: a collision is an error, not a silent overwrite.

Samples: the first `eval.num_samples` eval rows answered greedily (with the row's reference answer and, where the
algorithm has them, its scores: GRPO's rewards, safe_dpo's reward and cost), plus the first rows of each
generation task with their score; they go to samples.jsonl and a W&B table at every evaluation.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from hydra.utils import get_class, get_method

from peftlab.data.format import prompt_ids
from peftlab.data.schemas import as_messages
from peftlab.errors import ConfigError
from peftlab.sampling import answer_texts, eval_mode

REFERENCE_COLUMNS = ("completion", "chosen", "answer", "response_0")  # the row's own answer, by data kind


@lru_cache(maxsize=None)
def _rows(path: str) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())


def prompt_text(prompt) -> str:
    """The last user turn of a prompt (what a reader of the samples wants to see)."""
    return as_messages(prompt)[-1]["content"]


class GenerationTasks:
    """eval=toy: each task's held-out prompts answered greedily, scored per row by `metric(answer, row)` and
    averaged into `eval/<task>`. `applies` is false when the run's data is not the data the tasks measure."""

    def __init__(self, *, tasks: dict, max_new_tokens: int, batch_size: int, applies: bool, num_samples: int):
        self.tasks = dict(tasks or {}) if applies else {}
        self.max_new_tokens, self.batch_size, self.num_samples = int(max_new_tokens), int(batch_size), int(num_samples)

    def check(self) -> None:
        for name, task in self.tasks.items():
            if not Path(str(task.path)).exists():
                raise ConfigError(f"eval.tasks.{name}.path={task.path}: file not found")
            module = str(task.metric).rsplit(".", 1)[0]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"eval.tasks.{name}.metric={task.metric}: cannot import {module}")

    def __call__(self, model, tokenizer) -> tuple[dict[str, float], list[dict]]:
        results, samples = {}, []
        for name, task in self.tasks.items():
            rows = _rows(str(task.path))
            ids = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
            answers = answer_texts(model, tokenizer, ids, self.max_new_tokens, self.batch_size)
            scores = [get_method(task.metric)(a, r) for a, r in zip(answers, rows)]
            results[name] = sum(scores) / len(rows)
            samples += [{"task": name, "prompt": prompt_text(r["prompt"]), "answer": a, name: s}
                        for r, a, s in list(zip(rows, answers, scores))[:self.num_samples]]
        return results, samples


class Evaluator:
    """Everything a run measures on held-out data, called by the loop with the metrics' prefix (base/eval)."""

    def __init__(self, eval_cfg, algo, tokenizer, rows: list[dict], examples: list[dict]):
        self.algo, self.tokenizer, self.examples = algo, tokenizer, examples
        self.batch_size, self.max_new_tokens = int(eval_cfg.batch_size), int(eval_cfg.max_new_tokens)
        self.sample_rows = rows[:int(eval_cfg.num_samples)] if algo.generates else []
        options = {k: v for k, v in eval_cfg.items() if k != "_target_"}
        self.tasks = get_class(eval_cfg._target_)(**options) if algo.generates else None

    def answer_samples(self, model) -> list[dict]:
        """The first held-out rows answered greedily, with their reference answer and the algorithm's scores."""
        if not self.sample_rows or not self.max_new_tokens:
            return []
        ids = [prompt_ids(self.tokenizer, r["prompt"]) for r in self.sample_rows]
        answers = answer_texts(model, self.tokenizer, ids, self.max_new_tokens, self.batch_size)
        scores = self.algo.score_samples(self.sample_rows, answers)
        samples = []
        for i, (row, answer) in enumerate(zip(self.sample_rows, answers)):
            reference = next((row[c] for c in REFERENCE_COLUMNS if isinstance(row.get(c), str)), None)
            samples.append({"prompt": prompt_text(row["prompt"]), "answer": answer, "reference": reference,
                            **{k: v[i] for k, v in scores.items()}})
        return samples

    def __call__(self, model, prefix: str) -> tuple[dict[str, float], list[dict]]:
        with eval_mode(model):
            metrics = self.algo.evaluate(model, self.examples, self.batch_size) if self.examples else {}
            tasks, samples = self.tasks(model, self.tokenizer) if self.tasks is not None else ({}, [])
            samples = self.answer_samples(model) + samples
        tasks = {f"eval/{k}": v for k, v in tasks.items()}
        clash = sorted(set(metrics) & set(tasks))
        if clash:
            raise ValueError(f"eval task(s) {clash} report the same metric names as the algorithm: rename the task "
                             "in eval.tasks")
        return {f"{prefix}/{k.split('/', 1)[1]}": v for k, v in {**metrics, **tasks}.items()}, samples


def check_eval(eval_cfg, generates: bool) -> None:
    """The eval group's task runner checks its tasks before any weight loads (files, imports, lm-eval tasks)."""
    if generates:
        options = {k: v for k, v in eval_cfg.items() if k != "_target_"}
        get_class(eval_cfg._target_)(**options).check()
