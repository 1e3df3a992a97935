"""lm-evaluation-harness on the in-memory policy (`eval=lm_eval`), and the local toy tasks it ships with.

`run_tasks` hands the model object itself to lm-eval's HFLM: no save, no reload, so the numbers are those of the
weights being trained, adapter included. Every entry of `eval.tasks` is a registered lm-eval task name or a path to a
task YAML (its directory becomes an include path; its `task:` field names it). `check_tasks` resolves and builds
them before any weight loads, so a typo or a missing dataset is a one-line ConfigError, not a traceback after loading.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import yaml

from peftlab.errors import ConfigError
from peftlab.sampling import unwrap

TASK_FILE_SUFFIXES = (".yaml", ".yml")
# lm-eval's CLI seeds (lm_eval.defaults), set inside a forked RNG: scores equal the CLI's and repeat from one call to
# the next, and the training RNG streams continue as if no evaluation had run.
LM_EVAL_SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


# ----------------------------------------------------------------------------------------------------------------
# tasks: resolution, loading, checks


class _TaskFileLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML without importing anything: `!function module.name` stays a string."""


_TaskFileLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {loader.construct_scalar(node)}")


def is_task_file(entry) -> bool:
    return str(entry).endswith(TASK_FILE_SUFFIXES)


def _entries(tasks) -> list[str]:
    """eval.tasks as a list of strings; one string is one task."""
    return [str(tasks)] if isinstance(tasks, (str, Path)) else [str(entry) for entry in tasks or []]


def _task_name(config) -> str | None:
    """A task file's `task:`; a group file lists its tasks there and is named by `group:`."""
    if not isinstance(config, dict):
        return None
    name = config.get("task") if isinstance(config.get("task"), str) else config.get("group")
    return name if isinstance(name, str) else None


def read_task_file(path: str | Path) -> dict:
    """The YAML of a local task; ConfigError when it is missing, unreadable or names no task."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval.tasks: task file {path} does not exist")
    try:
        config = yaml.load(path.read_text(), Loader=_TaskFileLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"eval.tasks: {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if _task_name(config) is None:
        raise ConfigError(f"eval.tasks: {path} has no `task:` (or `group:`) name")
    return config


def resolve_tasks(tasks) -> tuple[list[str], list[str]]:
    """eval.tasks → (lm-eval task names, include directories of the local task files), both without duplicates."""
    names, include_dirs = [], []
    for entry in _entries(tasks):
        if is_task_file(entry):
            name = _task_name(read_task_file(entry))
            directory = str(Path(entry).resolve().parent)
            if directory not in include_dirs:
                include_dirs.append(directory)
        else:
            name = entry
        if name not in names:
            names.append(name)
    return names, include_dirs


@lru_cache(maxsize=8)
def task_manager(include_dirs: tuple[str, ...], include_defaults: bool):
    """lm-eval's task index; the built-in one (thousands of YAML files) only when a task is named, not a file."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_dirs) or None, include_defaults=include_defaults)


def _names_and_manager(tasks):
    names, include_dirs = resolve_tasks(tasks)
    include_defaults = any(not is_task_file(entry) for entry in _entries(tasks))
    return names, task_manager(tuple(include_dirs), include_defaults)


def _load_tasks(manager, names: list[str], num_fewshot: int | None) -> dict:
    """The tasks with the few-shot settings simple_evaluate gives them (lm-eval's rules, so scores match its CLI)."""
    loaded = manager.load(names)
    for task in loaded["tasks"].values():
        configured = task.get_config("num_fewshot")
        if num_fewshot is not None and configured != 0:  # lm-eval never overrides a task that fixes 0 shots
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif configured is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=LM_EVAL_SEEDS["fewshot_random_seed"])
    return loaded


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every task, request count and seed at INFO and warns that a model object was passed in (which
    is the point here); datasets shows a bar for each json file it reads."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def local_metrics() -> set[str]:
    """The metrics lm-eval computes itself, offline (acc, exact_match, bleu, ...)."""
    import lm_eval.api.metrics  # noqa: F401  (registers them)
    from lm_eval.api.registry import metric_registry

    return set(metric_registry.keys())


def _check_metrics(entry: str, config: dict) -> None:
    """Metrics outside lm-eval's own come from HF `evaluate` (the hub, or its cache): load them now, since lm-eval
    only finds out that it cannot after generating every answer."""
    local = local_metrics()
    for metric in config.get("metric_list") or []:
        name = metric.get("metric") if isinstance(metric, dict) else metric
        from_hub = isinstance(metric, dict) and metric.get("hf_evaluate")
        if not isinstance(name, str) or name.startswith("!") or (name in local and not from_hub):
            continue
        try:
            import evaluate

            evaluate.load(name)
        except Exception as err:  # offline, not cached, or no such metric: the same advice
            raise ConfigError(
                f"eval.tasks: {entry} uses metric {name!r}, which lm-eval loads with HF `evaluate` and which cannot be "
                f"loaded here ({type(err).__name__}); metrics lm-eval computes itself: {', '.join(sorted(local))}"
            ) from None


def check_tasks(tasks) -> None:
    """Raise ConfigError unless every entry of eval.tasks resolves to a task lm-eval can run here.

    Task files must exist, parse, name a task and use metrics that load here; names must be known to lm-eval;
    then every task is built as lm-eval builds it, datasets included (from the local cache when offline; a relative
    `data_files` path is read from the working directory), so what fails here would have failed after loading.
    """
    entries = _entries(tasks)
    if not entries:
        raise ConfigError("eval.tasks is empty: name lm-eval tasks or task YAML files (eval.tasks=[path/to/task.yaml])")
    for entry in filter(is_task_file, entries):
        _check_metrics(entry, read_task_file(entry))
    names, manager = _names_and_manager(entries)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"eval.tasks: unknown lm-eval task {name!r}{hint}; name one, or give a task YAML file")
    try:
        with _quiet_lm_eval():
            _load_tasks(manager, names, num_fewshot=None)
    except Exception as err:  # whatever lm-eval or datasets raise, the cause is the task list or its files
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"eval.tasks: lm-eval cannot load {names}: {type(err).__name__}: {first_line}") from None


# ----------------------------------------------------------------------------------------------------------------
# evaluation of the model in memory


@contextlib.contextmanager
def _preserved_rng(device: torch.device):
    """Python, numpy and torch RNG states restored on exit: lm-eval seeds all three."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _no_bootstrap_processes():
    """Bootstrapped stderrs (f1, mcc, bleu, perplexity...) in this process, not a forked pool: forking a training
    process (CUDA, process groups, their threads) is not safe."""
    previous = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = previous


@lru_cache(maxsize=None)
def _in_memory_hflm():
    """lm-eval's HFLM with two changes for use inside training (built on first use: lm-eval imports slowly).

    * No progress bars in the request loops (lm-eval's evaluator never passes `disable_tqdm`).
    * Generation budgets with `max_new_tokens`: lm-eval passes max_length = context + the task's max_gen_toks,
      and transformers lets a generation_config's own max_new_tokens (the shipped tiny models have one) take
      precedence over that, warning once per batch (lm-eval issues #2070, #2730).
    """
    from lm_eval.models.huggingface import HFLM

    class InMemoryHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            return super()._model_generate(
                context, max_length=None, stop=stop, max_new_tokens=max_length - context.shape[1], **generation_kwargs
            )

    return InMemoryHFLM


def metric_values(results: dict) -> dict[str, float]:
    """lm-eval's results["results"] → {`<task>/<metric>`: value}.

    lm-eval keys are `<metric>,<filter>` (`acc,none`, `acc_stderr,none`, `exact_match,strict-match`). The `none`
    filter is dropped; another filter joins the metric name (`exact_match_strict-match`), and stderr goes last so a
    value and its error sort together (`exact_match_strict-match_stderr`). Non-numbers (alias, "N/A") are dropped.
    """
    values = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            metric = metric.removesuffix("_stderr")
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            values[f"{task}/{name}{'_stderr' if stderr else ''}"] = float(value)
    return values


def run_tasks(model, tokenizer, tasks, *, limit: int | float | None = None, num_fewshot: int | None = None,
              batch_size: int = 8, max_length: int | None = None, apply_chat_template: bool = False,
              bootstrap_iters: int = 100) -> dict[str, float]:
    """lm-eval `tasks` on `model` as it is in memory → {`<task>/<metric>`: value}.

    `model`: a transformers causal LM or a PeftModel, possibly inside DDP/DeepSpeed. It is not moved, cast or copied
    and is left in the train/eval mode it was in; inputs go to its device. `tokenizer`: the one training uses.
    `limit`: rows per task (a float < 1: a share). `num_fewshot`: None keeps each task's own. `max_length`: None =
    the model config's context length. `apply_chat_template`: render each question with the tokenizer's chat
    template, as SFT prompts are (few-shot examples then become earlier turns, as with lm-eval's CLI).
    `bootstrap_iters`: resamples for the stderr of metrics without a closed form (f1, mcc, bleu, perplexity...);
    lm-eval's default of 100000 takes minutes per such metric, and it caps bleu, chrf and ter at 100 itself. Means
    (acc, exact_match) have a closed-form stderr whatever this is; 0 reports no stderr at all.
    The RNG states of python, numpy and torch are restored afterwards. Under DDP/DeepSpeed call it on every process
    (ZeRO-3 needs every rank in every forward): each evaluates every row and returns the same figures.
    """
    from lm_eval.evaluator import evaluate

    names, manager = _names_and_manager(tasks)
    model = unwrap(model)
    was_training = model.training
    try:
        with _quiet_lm_eval(), _preserved_rng(model.device), _no_bootstrap_processes(), torch.no_grad():
            random.seed(LM_EVAL_SEEDS["random_seed"])
            np.random.seed(LM_EVAL_SEEDS["numpy_random_seed"])
            torch.manual_seed(LM_EVAL_SEEDS["torch_random_seed"])
            # A model object makes HFLM skip loading, placement and its own distributed setup (rank 0 of 1).
            lm = _in_memory_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            # evaluator.evaluate, not simple_evaluate: that one also collects environment info (pip, GPUs, in
            # subprocesses) on every call and returns nothing on processes whose LOCAL_RANK is not 0.
            results = evaluate(
                lm=lm, task_dict=_load_tasks(manager, names, num_fewshot), limit=limit, log_samples=False,
                bootstrap_iters=bootstrap_iters, apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=apply_chat_template,
            )
    finally:
        model.train(was_training)  # HFLM puts the model in eval mode
    return metric_values(results["results"])


class HarnessTasks:
    """eval=lm_eval: the eval group's lm-evaluation-harness tasks as the Evaluator's task runner (`run_tasks` on
    the policy in memory); `max_new_tokens` and `num_samples` are the Evaluator's, for its samples."""

    def __init__(self, *, tasks, limit, num_fewshot, batch_size: int, apply_chat_template: bool,
                 max_length: int | None, bootstrap_iters: int, max_new_tokens: int, num_samples: int):
        self.tasks, self.options = list(tasks), {
            "limit": limit, "num_fewshot": num_fewshot, "batch_size": int(batch_size), "max_length": max_length,
            "apply_chat_template": bool(apply_chat_template), "bootstrap_iters": int(bootstrap_iters)}

    def check(self) -> None:
        limit = self.options["limit"]
        if limit is not None and not (isinstance(limit, int) and limit > 0 or isinstance(limit, float) and 0 < limit < 1):
            raise ConfigError(f"eval.limit={limit} must be null, a positive integer (rows) or a share in (0, 1)")
        check_tasks(self.tasks)

    def __call__(self, model, tokenizer) -> tuple[dict[str, float], list[dict]]:
        return run_tasks(model, tokenizer, self.tasks, **self.options), []
