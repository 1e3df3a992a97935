"""Held-out evaluation: the algorithm's own metrics on the run's eval rows, plus the tasks of the `eval` group.

    evaluate = Evaluator(cfg.eval, algo, tokenizer, eval_examples)
    metrics = evaluate(model, "base")     # {"base/loss": ..., "base/accuracy": ...} before the first step
    metrics = evaluate(model, "eval")     # the same names under eval/ during and after training

Generation tasks (`eval.tasks`: name → held-out prompts and a per-row scorer) answer greedily through
`peftlab.sampling`, and apply only to algorithms that generate (`Algorithm.generates`). A task's metric name must
not be one the algorithm reports: a collision is an error, not a silent overwrite.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from hydra.utils import get_method

from peftlab.data.format import prompt_ids
from peftlab.sampling import answer_texts, eval_mode


@lru_cache(maxsize=None)
def _rows(path: str) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())


class Evaluator:
    """Everything a run measures on held-out data, called by the loop with the metrics' prefix (base/eval)."""

    def __init__(self, eval_cfg, algo, tokenizer, examples: list[dict]):
        self.algo, self.tokenizer, self.examples = algo, tokenizer, examples
        self.batch_size, self.max_new_tokens = int(eval_cfg.batch_size), int(eval_cfg.max_new_tokens)
        self.tasks = dict(eval_cfg.tasks or {}) if algo.generates else {}

    def run_tasks(self, model) -> dict[str, float]:
        """Each task: greedy answers to its prompts, scored per row, averaged → `eval/<task>`."""
        results = {}
        for name, task in self.tasks.items():
            rows = _rows(str(task.path))
            ids = [prompt_ids(self.tokenizer, r["prompt"]) for r in rows]
            answers = answer_texts(model, self.tokenizer, ids, self.max_new_tokens, self.batch_size)
            metric = get_method(task.metric)
            results[f"eval/{name}"] = sum(metric(a, r) for a, r in zip(answers, rows)) / len(rows)
        return results

    def __call__(self, model, prefix: str) -> dict[str, float]:
        with eval_mode(model):
            metrics = self.algo.evaluate(model, self.examples, self.batch_size) if self.examples else {}
            tasks = self.run_tasks(model)
        clash = sorted(set(metrics) & set(tasks))
        if clash:
            raise ValueError(f"eval task(s) {clash} report the same metric names as the algorithm: rename the task "
                             "in eval.tasks")
        return {f"{prefix}/{k.split('/', 1)[1]}": v for k, v in {**metrics, **tasks}.items()}
