"""Load a dataset from the hub, a local copy of a hub repository, or a local json/jsonl/parquet/csv file, and map
it onto canonical columns. JSON and JSON Lines files are read by the json module (`JsonRows`): no `datasets`
import and no arrow cache for the commonest local format; the others go through `datasets`."""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from peftlab.data import schemas
from peftlab.errors import DataError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def is_local_file(path: str) -> bool:
    """A path to a file, existing or not. A directory is not one: it is read like a hub repository. A path that
    looks local but does not exist counts as a file, so that a typo is "not found" rather than a hub lookup."""
    local = Path(path).expanduser()
    if local.is_dir():
        return False
    return local.exists() or local.suffix in LOCAL_FORMATS or path.startswith(("/", ".", "~"))


def one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def load_table(path: str, split: str, name: str | None, data_dir: str | None, key: str):
    """A `datasets.Dataset` from a local file, or from a hub id or a local directory in the hub layout (the one
    `hf download <id> --repo-type dataset --local-dir DIR` writes: data files plus a README.md whose `configs:`
    name each configuration's files per split). `name` is the configuration (gsm8k's `main`), `data_dir` a folder
    inside the repository (hh-rlhf's `harmless-base`); a file has neither, so both are ignored for one. `key`
    names the config key the path came from, for the error lines."""
    if is_local_file(path):
        file = Path(path).expanduser()
        if not file.exists():
            raise DataError(f"{key}={path}: file not found (check data.path / data.eval_path)")
        if file.suffix not in LOCAL_FORMATS:
            raise DataError(f"{key}={path}: unsupported file type {file.suffix!r}; use {', '.join(LOCAL_FORMATS)} "
                            "or a directory in the hub layout")
        if file.stat().st_size == 0:
            raise DataError(f"{key}={file} has no rows (the file is empty)")
        if LOCAL_FORMATS[file.suffix] == "json":
            return JsonRows(read_json_records(file, key))
        datasets = quiet_datasets()
        try:
            return datasets.load_dataset(LOCAL_FORMATS[file.suffix], data_files=str(file), split="train")
        except Exception as err:  # the reader's own message names the problem; its traceback does not help
            raise DataError(f"{key}={path}: cannot be read as {file.suffix[1:]} ({one_line(err)})") from err
    datasets = quiet_datasets()
    directory = Path(path).expanduser()
    where = f"(config {name!r}, data_dir {data_dir!r}, split {split!r})"
    try:
        if directory.is_dir():
            return datasets.load_dataset(str(directory), name, split=split, data_dir=data_dir,
                                         cache_dir=directory_cache(directory))
        return datasets.load_dataset(path, name, split=split, data_dir=data_dir)
    except Exception as err:  # datasets names the configs and splits there are; its traceback does not help
        if directory.is_dir():
            raise DataError(f"{key}={path} {where}: {one_line(err)}") from err
        raise DataError(
            f"could not load dataset {path!r} {where} from the hub ({one_line(err)}). Without network, download it "
            f"elsewhere (hf download {path} --repo-type dataset --local-dir DIR) and pass {key}=DIR, or pass a "
            "local json/jsonl/parquet/csv file"
        ) from err


def quiet_datasets():
    """`datasets`, imported only when a table needs it, without its logging and progress bars."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def directory_cache(directory: Path) -> str:
    """Where `datasets` keeps the tables it prepares from a local directory: a folder named by the directory's
    place and its files' sizes and modification times. Its default cache is named by the directory's name and its
    card's `configs:` alone, so an edited file, or another directory of the same name, would load the tables
    prepared from the first one."""
    import datasets

    files = [(str(f.relative_to(directory)), f.stat().st_size, f.stat().st_mtime_ns)
             for f in sorted(directory.rglob("*")) if f.is_file()]
    digest = hashlib.sha256(json.dumps([str(directory.resolve()), files]).encode()).hexdigest()[:16]
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "local" / digest)


class JsonRows:
    """A JSON/JSONL file's rows as `to_rows` reads a `datasets.Dataset`: the column names (every key of every row,
    in order of first appearance), a length, rows as dicts with every column (None where a row lacks one, as
    `datasets` fills them), and `select`."""

    def __init__(self, records: list[dict]):
        self.records = records
        self.column_names = list(dict.fromkeys(key for record in records for key in record))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return ({column: record.get(column) for column in self.column_names} for record in self.records)

    def select(self, indices) -> JsonRows:
        return JsonRows([self.records[i] for i in indices])


def read_json_records(file: Path, key: str) -> list[dict]:
    """The objects of a JSON Lines file (one per non-blank line), or of a JSON file holding a list of them (a
    .json file may also be JSON Lines, as `datasets` reads it). A line that is not JSON, or a row that is not an
    object, is a DataError naming its line or row."""
    text = file.read_text()
    if file.suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None  # JSON Lines in a .json file, or broken: the line reader below names the line
        if isinstance(document, list):
            return [_json_object(item, f"{key}={file}, row {number}") for number, item in enumerate(document, 1)]
        if isinstance(document, dict):
            return [document]
        if document is not None:
            raise DataError(f"{key}={file}: expected a list of objects or JSON Lines, found a JSON "
                            f"{type(document).__name__}")
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{key}={file}, line {number}: not valid JSON ({err.msg})") from None
        records.append(_json_object(item, f"{key}={file}, line {number}"))
    return records


def _json_object(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{where}: a row must be a JSON object, found a JSON {type(item).__name__}")
    return item


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
    from the training rows (a seeded shuffle; disjoint from the rows trained on). A local file has no splits, so a
    preset's eval split does not apply to it: its held-out rows are carved (reading the file again would evaluate
    on the training rows)."""
    path, name, data_dir = str(data_cfg.path), data_cfg.name, data_cfg.data_dir
    if data_dir and is_local_file(path):
        raise DataError(f"data.data_dir={data_dir} selects a folder of a hub data set or of a directory, but "
                        f"data.path={path} is a file: set data.data_dir=null")
    train = load_table(path, data_cfg.split, name, data_dir, "data.path")
    eval_split = None if is_local_file(path) else data_cfg.eval_split
    carved = not data_cfg.eval_path and not eval_split
    if data_cfg.max_rows and not carved:  # the rows past the cap are never converted
        train = train.select(range(min(len(train), int(data_cfg.max_rows))))
    train_rows = to_rows(train, kind, data_cfg.schema, f"data.path={path}")
    if data_cfg.eval_path:
        table = load_table(str(data_cfg.eval_path), data_cfg.eval_split or "train", name, data_dir, "data.eval_path")
        eval_rows = to_rows(table, kind, data_cfg.schema, f"data.eval_path={data_cfg.eval_path}")
        source = f"data.eval_path={data_cfg.eval_path}"
    elif eval_split:
        table = load_table(path, eval_split, name, data_dir, "data.path")
        eval_rows = to_rows(table, kind, data_cfg.schema, f"data.eval_split={eval_split} of data.path={path}")
        source = f"data.eval_split={eval_split} of {path}"
    else:  # carve a fixed held-out slice
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        held = set(order[: int(data_cfg.eval_size)])
        eval_rows = [r for i, r in enumerate(train_rows) if i in held]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
        source = f"{len(eval_rows)} rows carved from data.path={path} (data.eval_size, seed {seed})"
    if data_cfg.max_eval_rows and not carved and len(eval_rows) > int(data_cfg.max_eval_rows):
        eval_rows = eval_rows[: int(data_cfg.max_eval_rows)]  # a whole test split would be re-read at every eval
        source += f" (its first {len(eval_rows)} rows, data.max_eval_rows)"
    if data_cfg.max_rows:
        train_rows = train_rows[: int(data_cfg.max_rows)]
    system = data_cfg.system_prompt
    if system:
        for row in train_rows + eval_rows:
            prompt = row.get("prompt")
            if isinstance(prompt, list) and (not prompt or prompt[0]["role"] != "system"):
                row["prompt"] = [{"role": "system", "content": system}] + prompt
    if not train_rows:
        raise DataError(f"data.path={path} has no training rows"
                        + (f" left after holding out data.eval_size={data_cfg.eval_size}" if carved else ""))
    return Splits(train_rows, eval_rows, source)
