"""Load a dataset from the hub or a local json/jsonl/parquet/csv file and map it onto canonical columns."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from peftlab.data import schemas
from peftlab.errors import DataError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def is_local_file(path: str) -> bool:
    return Path(path).suffix in LOCAL_FORMATS or Path(path).exists()


def load_table(path: str, split: str, name: str | None, key: str):
    """A `datasets.Dataset` from a local file or a hub id (`name`: the hub data set's configuration, e.g. gsm8k's
    `main`; local files have none). `key` names the config key the path came from, for the error lines."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if is_local_file(path):
        file = Path(path).expanduser()
        if not file.exists():
            raise DataError(f"{key}={path}: file not found (check data.path / data.eval_path)")
        if file.suffix not in LOCAL_FORMATS:
            raise DataError(f"{key}={path}: unsupported file type {file.suffix!r}; use {', '.join(LOCAL_FORMATS)}")
        check_local_file(file, key)
        try:
            return datasets.load_dataset(LOCAL_FORMATS[file.suffix], data_files=str(file), split="train")
        except Exception as err:  # the reader's own message names the problem; its traceback does not help
            raise DataError(f"{key}={path}: cannot be read as {file.suffix[1:]} ({type(err).__name__}: "
                            f"{' '.join(str(err).split())[:200]})") from err
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as err:  # the hub's errors are long; the user needs the id and the way out
        raise DataError(
            f"could not load dataset {path!r} (config {name!r}, split {split!r}) from the hub: {type(err).__name__}. "
            "Without network, download it elsewhere and pass data.path=<local json/jsonl/parquet/csv file>"
        ) from err


def check_local_file(file: Path, key: str) -> None:
    """An empty file, or a jsonl line that is not JSON, named with its line number before the reader sees it."""
    if file.stat().st_size == 0:
        raise DataError(f"{key}={file} has no rows (the file is empty)")
    if file.suffix != ".jsonl":
        return
    with open(file) as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{key}={file}, line {number}: not valid JSON ({err.msg})") from None


def is_empty(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value)


def to_rows(table, kind: str, schema: str, source: str) -> list[dict]:
    """Every row of `table` in the canonical columns of `kind`; a bad row is a DataError naming its number."""
    try:
        name = schemas.detect(kind, list(table.column_names), schema)
    except DataError as err:
        raise DataError(f"{source}: {err}") from err
    required = schemas.SCHEMAS[kind][name][0]
    if len(table) == 0:
        raise DataError(f"{source} has no rows")
    rows = []
    for number, row in enumerate(table, 1):
        empty = [c for c in required if is_empty(row.get(c))]
        if empty:
            raise DataError(f"{source}, row {number} ({name} schema): column `{empty[0]}` is empty")
        try:
            rows.append(schemas.convert(kind, name, row))
        except (DataError, KeyError, TypeError, AttributeError) as err:  # converters index and iterate user data
            raise DataError(f"{source}, row {number} ({name} schema): {err}") from err
    return rows


@dataclass
class Splits:
    """A run's rows in the canonical columns of its data kind, and where the held-out rows came from."""

    train: list[dict]
    eval: list[dict]
    eval_source: str  # e.g. "data.eval_path=<file>", "data.eval_split=test of <id>", "64 rows carved from <path>"


def load_splits(data_cfg, kind: str, seed: int = 0) -> Splits:
    """Train and held-out rows: the data's eval file or eval split when given, else `data.eval_size` rows carved
    from the training rows (a seeded shuffle; disjoint from the rows trained on)."""
    name = data_cfg.name
    train = load_table(str(data_cfg.path), data_cfg.split, name, "data.path")
    train_rows = to_rows(train, kind, data_cfg.schema, f"data.path={data_cfg.path}")
    if data_cfg.eval_path:
        table = load_table(str(data_cfg.eval_path), data_cfg.eval_split or "train", name, "data.eval_path")
        eval_rows = to_rows(table, kind, data_cfg.schema, f"data.eval_path={data_cfg.eval_path}")
        source = f"data.eval_path={data_cfg.eval_path}"
    elif data_cfg.eval_split:
        table = load_table(str(data_cfg.path), data_cfg.eval_split, name, "data.path")
        eval_rows = to_rows(table, kind, data_cfg.schema, f"data.eval_split={data_cfg.eval_split}")
        source = f"data.eval_split={data_cfg.eval_split} of {data_cfg.path}"
    else:  # carve a fixed held-out slice
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        held = set(order[: int(data_cfg.eval_size)])
        eval_rows = [r for i, r in enumerate(train_rows) if i in held]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
        source = f"{len(eval_rows)} rows carved from data.path={data_cfg.path} (data.eval_size, seed {seed})"
    if data_cfg.max_rows:
        train_rows = train_rows[: int(data_cfg.max_rows)]
    system = data_cfg.system_prompt
    if system:
        for row in train_rows + eval_rows:
            prompt = row.get("prompt")
            if isinstance(prompt, list) and (not prompt or prompt[0]["role"] != "system"):
                row["prompt"] = [{"role": "system", "content": system}] + prompt
    if not train_rows:
        raise DataError(f"data.path={data_cfg.path} has no training rows"
                        + (f" left after holding out data.eval_size={data_cfg.eval_size}" if "carved" in source else ""))
    return Splits(train_rows, eval_rows, source)
