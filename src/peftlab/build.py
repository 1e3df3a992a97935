"""One build: a composed config → everything a run trains with (`Run`). train.py, the benchmark and the tests'
helpers all call `build_run`, so what they train is the same thing.

Order matters: every config and data mistake the build can find (algorithm options, scorer paths, data files and
rows, batch size against the data) raises before the first weight is loaded. Each builder gets the config groups
it needs, not the whole tree:

    tokenizer       ← model                       (peftlab.models.load_tokenizer)
    policy identity ← model, peft, algo.start_from (what the policy is built from; handed to the algorithm)
    algorithm       ← algo + tokenizer, model.max_length, identity
    dist checks     ← dist, peft, trainer.optimizer
    rows, examples  ← data, trainer.seed          (peftlab.data.load_splits → algo.build_examples)
    policy          ← model, peft, trainer.precision / gradient_checkpointing (auto: from the architecture and
                      the micro-batch's tokens), identity
    evaluator       ← eval + algorithm, eval examples
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from hydra.utils import get_class
from omegaconf import OmegaConf

from peftlab import dist
from peftlab.data import load_splits
from peftlab.errors import ConfigError, DataError
from peftlab.evaluation import Evaluator
from peftlab.memory import release_host_memory, use_checkpointing
from peftlab.models import (PolicyIdentity, Reference, build_policy, count_parameters, load_model_config, load_tokenizer,
                            policy_identity, train_dtype, weights_dtype)

INJECTED = ("tokenizer", "max_length", "policy", "logits_chunk_size")  # what every algorithm gets besides conf/algo/


@dataclass
class Run:
    """What one run trains with, built once."""

    tokenizer: object
    algo: object                  # a peftlab.algos.base.Algorithm
    policy: object                # the model being trained (a PeftModel unless peft=none)
    reference: Reference | None   # π_ref when the algorithm needs one
    train_examples: list[dict]
    eval_examples: list[dict]
    identity: PolicyIdentity
    data: dict                    # data/* figures for summary.json: row counts, where eval rows came from, truncation
    evaluate: Evaluator           # evaluate(model, prefix) → held-out metrics and samples


def algorithm_keys(cls) -> list[str]:
    """The keyword-only constructor parameters of an algorithm class and of the bases it forwards `**common` to."""
    keys = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(vars(klass)["__init__"]).parameters.values()
            keys += [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name not in keys]
    return keys


def make_algorithm(algo_cfg, *, tokenizer, max_length: int, policy: PolicyIdentity, logits_chunk_size):
    """The algorithm class named by algo._target_, constructed from the algo group's keys (each one a keyword of
    its constructor) plus the injected ones. Errors are one line naming the key, not Hydra's wrapper of them."""
    cls = get_class(algo_cfg._target_)
    options = {k: v for k, v in OmegaConf.to_container(algo_cfg, resolve=True).items() if k != "_target_"}
    keys = [k for k in algorithm_keys(cls) if k not in INJECTED]
    unknown, missing = [k for k in options if k not in keys], [k for k in keys if k not in options]
    if unknown:
        raise ConfigError(f"algo.{unknown[0]} is not an option of {cls.__name__} (its keys: {', '.join(keys)})")
    if missing:
        raise ConfigError(f"algo.{missing[0]} is not set: {cls.__name__} needs every one of {', '.join(keys)}")
    return cls(tokenizer=tokenizer, max_length=max_length, policy=policy, logits_chunk_size=logits_chunk_size,
               **options)


def build_run(cfg, accelerator) -> Run:
    from accelerate.utils import set_seed

    set_seed(cfg.trainer.seed)
    if cfg.trainer.release_host_memory:
        release_host_memory()  # before the weights load: loading is one of the peaks
    tokenizer = load_tokenizer(cfg.model)
    identity = policy_identity(cfg.model, cfg.peft, cfg.algo.start_from)
    algo = make_algorithm(cfg.algo, tokenizer=tokenizer, max_length=cfg.model.max_length, policy=identity,
                          logits_chunk_size=cfg.trainer.logits_chunk_size)
    dist.check(cfg.dist, peft_cfg=cfg.peft, optimizer=cfg.trainer.optimizer, needs_reference=algo.needs_reference)
    splits = load_splits(cfg.data, algo.data_kind, cfg.trainer.seed)
    train_examples, eval_examples = algo.build_examples(splits.train), algo.build_examples(splits.eval)
    data = describe_data(cfg, splits, train_examples, eval_examples, accelerator)

    device, compute = accelerator.device, train_dtype(cfg.trainer.precision, accelerator.device)
    tokens = int(cfg.trainer.batch_size) * int(cfg.model.max_length) * algo.sequences_per_example
    checkpointing = use_checkpointing(cfg.trainer.gradient_checkpointing, load_model_config(cfg.model), tokens,
                                      weights_dtype(cfg.model, compute), identity.quantize is not None)
    policy = build_policy(cfg.model, cfg.peft, start_adapter=identity.start_adapter, compute=compute, device=device,
                          head=algo.head, gradient_checkpointing=checkpointing,
                          reference_adapter=algo.needs_reference)
    trainable, total = count_parameters(policy)
    accelerator.print(f"policy: {identity.describe()}; {trainable:,} trainable of {total:,} parameters "
                      f"({100 * trainable / total:.2f}%); gradient checkpointing {'on' if checkpointing else 'off'}")
    reference = Reference(policy, cfg.peft.method) if algo.needs_reference else None
    algo.setup(policy, reference=reference, device=device, train_examples=train_examples,
               eval_examples=eval_examples)
    return Run(tokenizer=tokenizer, algo=algo, policy=policy, reference=reference, train_examples=train_examples,
               eval_examples=eval_examples, identity=identity, data=data,
               evaluate=Evaluator(cfg.eval, algo, tokenizer, splits.eval, eval_examples))


def truncated(example: dict) -> bool:
    return bool(example.get("truncated")) or any(a.get("truncated") for a in example.get("answers", ()))


def describe_data(cfg, splits, train_examples: list[dict], eval_examples: list[dict], accelerator) -> dict:
    """The data figures of summary.json (data/*), after the checks that need the tokenized rows: enough rows for
    one batch, and a model.max_length that does not cut most of them."""
    per_step = int(cfg.trainer.batch_size) * accelerator.num_processes
    if len(train_examples) < per_step:
        raise DataError(f"data.path={cfg.data.path}: {len(train_examples)} training rows cannot fill one batch of "
                        f"trainer.batch_size={cfg.trainer.batch_size} × {accelerator.num_processes} process(es): "
                        "lower trainer.batch_size or add rows")
    cut = sum(map(truncated, train_examples)) + sum(map(truncated, eval_examples))
    rows = len(train_examples) + len(eval_examples)
    if cut > rows / 2:
        raise DataError(f"model.max_length={cfg.model.max_length} cuts {cut} of {rows} rows of data.path="
                        f"{cfg.data.path}: raise model.max_length")
    if cut:
        accelerator.print(f"warning: model.max_length={cfg.model.max_length} cuts {cut} of {rows} rows (prompts "
                          "from the left, then answers from the right); data/truncated_rows in summary.json")
    accelerator.print(f"data: {len(train_examples)} training rows from data.path={cfg.data.path}; "
                      f"{len(eval_examples)} held-out rows from {splits.eval_source}")
    return {"data/train_rows": len(train_examples), "data/eval_rows": len(eval_examples),
            "data/eval_source": splits.eval_source, "data/truncated_rows": cut}
