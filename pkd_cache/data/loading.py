"""Raw examples for a task split: from the Hugging Face hub, or from a local folder of files.

Local folders may hold the original GLUE TSV layout or the Hugging Face export (both occur in the wild),
or CSV, JSONL or Parquet files with the same column names. A folder that holds the GLUE task folders
(e.g. `glue/SST-2/`) works too.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import PkdCacheError
from .tasks import TaskSpec

SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")


@dataclass
class Examples:
    """The texts and labels of one split, in file order."""

    text_a: list[str]
    text_b: Optional[list[str]]
    labels: np.ndarray  # int64 class ids, or float32 scores for regression
    source: str  # where they came from, for metadata

    def __len__(self) -> int:
        return len(self.text_a)

    def fingerprint(self) -> str:
        """sha256 of the content (texts and labels), independent of file names and formats."""
        h = hashlib.sha256()
        for i in range(len(self)):
            h.update(self.text_a[i].encode())
            h.update(b"\x1f")
            if self.text_b is not None:
                h.update(self.text_b[i].encode())
            h.update(b"\x1e")
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()

    def head(self, n: int) -> "Examples":
        return self.take(slice(0, n))

    def take(self, rows) -> "Examples":
        """The examples at `rows` (a slice, or integer indices), in that order."""
        def pick(values: list) -> list:
            return values[rows] if isinstance(rows, slice) else [values[i] for i in rows]

        b = None if self.text_b is None else pick(self.text_b)
        return Examples(pick(self.text_a), b, self.labels[rows], self.source)


def load_examples(task: TaskSpec, split: str, data_dir: Optional[str] = None,
                  max_examples: Optional[int] = None) -> Examples:
    if split not in task.splits:
        raise PkdCacheError(f"task {task.name} has no split {split!r}; its splits are {', '.join(task.splits)}")
    if max_examples is not None and max_examples <= 0:  # rows[:-n] would silently drop the last n
        raise PkdCacheError(f"the number of examples to take must be > 0, got {max_examples}")
    rows, source = _split_rows(task, split, data_dir, max_examples)
    return _to_examples(task, rows, source)


def _split_rows(task: TaskSpec, split: str, data_dir: Optional[str],
                max_examples: Optional[int]) -> tuple[list[dict], str]:
    """The split's rows (the first `max_examples`) from the hub or `data_dir`, and where they came from."""
    if data_dir is None:
        rows, source = _hub_rows(task, split, max_examples)
    else:
        path = find_split_file(task, split, data_dir)
        rows, source = read_rows(path, task), str(path)
    rows = rows[:max_examples] if max_examples is not None else rows
    if not rows:
        raise PkdCacheError(f"{source}: no examples in split {split!r}")
    return rows, source


def test_splits(task: TaskSpec) -> tuple[str, ...]:
    """The task's test splits, named as on the hub: `test`, or MNLI's `test_matched` and `test_mismatched`."""
    return tuple(s.replace("validation", "test") for s in task.dev_splits)


def load_test_examples(task: TaskSpec, split: str, data_dir: Optional[str] = None,
                       max_examples: Optional[int] = None) -> Examples:
    """A test split's texts, in file order (`--do-predict`). GLUE hides test labels (-1 on the hub, no column in
    test.tsv): the labels here are -1 (NaN for regression) and never read."""
    if split not in test_splits(task):
        raise PkdCacheError(f"task {task.name} has no test split {split!r}; its test splits are "
                            f"{', '.join(test_splits(task))}")
    rows, source = _split_rows(task, split, data_dir, max_examples)
    text_a, text_b = _texts(task, rows, source)
    labels = np.full(len(rows), np.nan, np.float32) if task.is_regression else np.full(len(rows), -1, np.int64)
    return Examples(text_a, text_b, labels, source)


def find_split_file(task: TaskSpec, split: str, data_dir: str) -> Path:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise PkdCacheError(f"--data-dir {data_dir} is not a directory")
    stems = task.local_dev_names.get(split) or (("train",) if split == "train" else (split,)
                                                if split.startswith("test") else ("dev", "validation"))
    for folder in (root, root / task.glue_dir):
        for stem in stems:
            for suffix in SUFFIXES:
                if (folder / f"{stem}{suffix}").is_file():
                    return folder / f"{stem}{suffix}"
    wanted = ", ".join(f"{s}.tsv" for s in stems)
    raise PkdCacheError(f"no file for split {split!r} of {task.name} in {root} (looked for {wanted}, "
                        f"or .csv/.jsonl/.parquet; also in {task.glue_dir}/)")


def read_rows(path: Path, task: TaskSpec) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".tsv":
            return _read_delimited(path, task, "\t", csv.QUOTE_NONE)
        if suffix == ".csv":
            return _read_delimited(path, task, ",", csv.QUOTE_MINIMAL)
        if suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except PkdCacheError:
        raise
    except (OSError, ValueError, csv.Error, UnicodeDecodeError) as e:
        raise PkdCacheError(f"{path}: cannot read: {e}") from e
    except Exception as e:  # pyarrow raises its own types for broken files
        raise PkdCacheError(f"{path}: cannot read: {e}") from e


def _read_delimited(path: Path, task: TaskSpec, delimiter: str, quoting: int) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        lines = [(reader.line_num, r) for r in reader if r]  # line_num: the file line a record ends on
    if not lines:
        raise PkdCacheError(f"{path}: the file is empty")
    header = [c.strip() for c in lines[0][1]]
    known = set(task.text_a) | set(task.text_b or ()) | set(task.label)
    body_start = 1
    if task.headerless_columns and not known & set(header) and len(header) == len(task.headerless_columns):
        header, body_start = list(task.headerless_columns), 0
    rows = []
    for lineno, r in lines[body_start:]:
        if len(r) != len(header):
            raise PkdCacheError(f"{path} line {lineno}: {len(r)} fields where the header has {len(header)} "
                                f"(ragged row or a stray quote/tab)")
        rows.append(dict(zip(header, r)))
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PkdCacheError(f"{path} line {lineno}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise PkdCacheError(f"{path} line {lineno}: expected one JSON object per line (JSON Lines), "
                                        f"got a {type(row).__name__}")
                rows.append(row)
    return rows


def _hub_rows(task: TaskSpec, split: str, max_examples: Optional[int]) -> tuple[list[dict], str]:
    import datasets

    hub_split = split if max_examples is None else f"{split}[:{max_examples}]"
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task.hub_config, split=hub_split)
    except Exception as e:  # no network, unknown dataset, ...: one line, with the way out
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PkdCacheError(f"could not load glue/{task.hub_config} ({split}) from the Hugging Face hub: {first}. "
                            f"Offline? Pass --data-dir with local GLUE files.") from e
    return ds.to_list(), f"hub:nyu-mll/glue/{task.hub_config}/{split}"


def _column(task: TaskSpec, names: tuple[str, ...], row: dict, source: str, what: str) -> str:
    for n in names:
        if n in row:
            return n
    raise PkdCacheError(f"{source}: no {what} column for {task.name} (expected one of: {', '.join(names)}; "
                        f"found: {', '.join(map(str, row))})")


def _texts(task: TaskSpec, rows: list[dict], source: str) -> tuple[list[str], Optional[list[str]]]:
    col_a = _column(task, task.text_a, rows[0], source, "text")
    col_b = _column(task, task.text_b, rows[0], source, "second text") if task.text_b else None
    text_a = [str(_value(r, col_a, source, i)) for i, r in enumerate(rows)]
    text_b = [str(_value(r, col_b, source, i)) for i, r in enumerate(rows)] if col_b else None
    return text_a, text_b


def _to_examples(task: TaskSpec, rows: list[dict], source: str) -> Examples:
    text_a, text_b = _texts(task, rows, source)
    col_label = _column(task, task.label, rows[0], source, "label")
    labels = [parse_label(task, _value(r, col_label, source, i), source, i) for i, r in enumerate(rows)]
    dtype = np.float32 if task.is_regression else np.int64
    return Examples(text_a, text_b, np.asarray(labels, dtype=dtype), source)


def _value(row: dict, column: str, source: str, index: int):
    """row[column]; a row without it (JSONL, Parquet) or with a null there is an error, not a KeyError or 'None'."""
    value = row.get(column)
    if value is None:
        raise PkdCacheError(f"{source} example {index}: no value in column {column!r}")
    return value


def parse_label(task: TaskSpec, value, source: str, index: int):
    """A class id from a label name or an integer id; a float score for regression."""
    if task.is_regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise PkdCacheError(f"{source} example {index}: label {value!r} is not a number") from None
    if isinstance(value, str):
        v = value.strip()
        if v in task.label_names:
            return task.label_names.index(v)
        try:
            value = int(float(v)) if v.replace(".", "", 1).isdigit() and float(v).is_integer() else int(v)
        except ValueError:
            raise PkdCacheError(f"{source} example {index}: label {value!r} is not in the task's label set "
                                f"({', '.join(task.label_names)} or 0..{task.num_labels - 1})") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < task.num_labels:
        return int(value)
    raise PkdCacheError(f"{source} example {index}: label {value!r} is outside the task's label set "
                        f"(0..{task.num_labels - 1}: {', '.join(task.label_names)})")
