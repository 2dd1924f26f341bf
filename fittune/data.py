"""Data: read rows from any supported source, map columns, build chat prompts, tokenize with answer-only
labels, split deterministically, and plan length-grouped global batches.

Rows are small Python dicts: fine-tuning sets are thousands to a few hundred thousand rows, and keeping them
as plain lists lets every rank compute the same batch plan (and the global target-token count used to
normalise the loss) without any communication.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import io
import json
import math
import os
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from fittune.config import BUILTIN_DATA, DEMO_DATA, DataConfig
from fittune.errors import DataNotFound, FittuneError

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------
# Reading


def resolve_data_path(path: str) -> str:
    """Map the built-in demo name to its file inside the package."""
    return str(DEMO_DATA) if path == BUILTIN_DATA else path


def absolute_path(path: str | None) -> str | None:
    """A local file or directory as an absolute path (a run's saved config must find its data from any working
    directory); a hub name, a built-in name or a missing path unchanged."""
    if path is None or path.startswith("builtin:") or not Path(path).exists():
        return path
    return os.path.abspath(path)


def same_file(a: str | None, b: str | None) -> bool:
    """Two data paths that name the same file (relative or absolute, or through a link)."""
    if a == b:
        return True
    if a is None or b is None or not (Path(a).exists() and Path(b).exists()):
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def _detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "disk"
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".json", ".csv", ".parquet"):
        return suffix[1:]
    if p.exists() or suffix in (".txt", ".tsv", ".arrow"):
        raise FittuneError(f"cannot tell the format of {path}: use .jsonl, .json, .csv or .parquet, or set data.format")
    if "/" in path and not path.startswith((".", "/")) and len(path.split("/")) == 2:
        return "hub"
    raise DataNotFound(f"data file not found: {path}{_relative_to_cwd(path)} (set data.path to a "
                       f".jsonl/.json/.csv/.parquet file, a save_to_disk directory or a hub dataset name)")


def _relative_to_cwd(path: str) -> str:
    """For a relative path: where it was looked for (the current directory, not the recipe's)."""
    return "" if Path(path).is_absolute() else f", looked for in the current directory {Path.cwd()}"


def read_rows(path: str, cfg: DataConfig, split: str | None = None) -> list[dict[str, Any]]:
    """Read every row of a data source as a dict (`split` of a hub dataset or DatasetDict; default
    `data.hub_split`). Raises FittuneError naming the file (and line) on problems."""
    split = split or cfg.hub_split
    path = resolve_data_path(path)
    fmt = _detect_format(path, cfg.format)
    if fmt != "hub" and not Path(path).exists():
        raise DataNotFound(f"data file not found: {path}{_relative_to_cwd(path)} (data.path / data.test_path)")
    rows = _READERS[fmt](path, cfg, split)
    if not rows:
        key = "data.test_path" if cfg.test_path and same_file(path, resolve_data_path(cfg.test_path)) else "data.path"
        raise FittuneError(f"{path} holds no rows: add examples or point {key} at another file")
    return rows


def _read_csv(path: str, cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    import pandas as pd

    text = _utf8_text(Path(path).read_bytes(), path)
    _check_csv_width(text, cfg, path)
    try:
        frame = pd.read_csv(io.StringIO(text), header=0 if cfg.csv_header else None, names=cfg.column_names,
                            dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise FittuneError(f"{path}: not a readable CSV file ({str(e).strip()})") from None
    return frame.to_dict(orient="records")


def _read_parquet(path: str, cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        return pd.read_parquet(path).to_dict(orient="records")
    except Exception as e:  # pyarrow raises several unrelated types for a broken file
        raise FittuneError(f"{path}: not a readable Parquet file ({e})") from None


def _read_saved(path: str, cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    """A `save_to_disk` directory: one Dataset, or a DatasetDict read at `split`."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise FittuneError(f"{path}: not a datasets.save_to_disk directory ({e})") from None
    key = "data.test_split" if split != cfg.hub_split else "data.hub_split"  # which key asked for `split`
    if not isinstance(ds, datasets.DatasetDict):
        if split == "train":
            return ds.to_list()
        if key == "data.test_split":
            raise FittuneError(f"{path} is one dataset, not a DatasetDict with splits: remove data.test_split")
        raise FittuneError(f"{path} is one dataset, not a DatasetDict with splits: data.hub_split '{split}' "
                           f"picks nothing there; set data.hub_split back to train (its default)")
    if split not in ds:
        raise FittuneError(f"{path} has splits {list(ds)}, not '{split}': set {key}")
    return ds[split].to_list()


def _read_hub(path: str, cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(path, split=split).to_list()
    except Exception as e:  # network, missing dataset, missing split: all the user's to fix
        raise FittuneError(f"cannot load hub dataset '{path}' split '{split}' "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           f"check the name and your network, or point data.path at a local file") from None


_READERS = {"jsonl": lambda path, cfg, split: _read_jsonl(path), "json": lambda path, cfg, split: _read_json(path),
            "csv": _read_csv, "parquet": _read_parquet, "disk": _read_saved, "hub": _read_hub}


def _utf8_text(data: bytes, path: str) -> str:
    """The file's bytes as text (a leading byte-order mark dropped); bad UTF-8 names its line and byte."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line = data.count(b"\n", 0, at) + 1
        raise FittuneError(f"{path}:{line}: not valid UTF-8 (byte {at} of the file is {data[at:at + 1]!r}); "
                           f"save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT") from None


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    # lines as a text-mode file gives them (not str.splitlines, which also cuts at U+2028 inside a JSON string)
    for lineno, line in enumerate(io.StringIO(_utf8_text(Path(path).read_bytes(), path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            # json's "Invalid control character at" ends in "at" already
            raise FittuneError(f"{path}:{lineno}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                               f"fix or remove that line") from None
        if not isinstance(row, dict):
            raise FittuneError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_json(path: str) -> list[dict]:
    try:
        data = json.loads(_utf8_text(Path(path).read_bytes(), path))
    except json.JSONDecodeError as e:
        raise FittuneError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise FittuneError(f"{path}: expected a list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise FittuneError(f"{path}: expected a list of JSON objects")
    return data


# ---------------------------------------------------------------------------------------------------------
# Column mapping


@dataclass
class Example:
    """One row after column mapping: chat prompt, target answer, optional candidates and gold index."""

    id: str
    messages: list[dict[str, str]]
    answer: str
    choices: list[str] | None = None
    gold: int | None = None
    label: str | None = None
    group: str | None = None
    """The row's value of data.group_column: rows of one group stay on one side of the held-out split."""


def _as_list(value: Any, where: str) -> list:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:  # a Python-list string, as in MMLU-Redux's CSV
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise FittuneError(f"{where}: expected a list, got the string {value[:60]!r}") from None
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise FittuneError(f"{where}: expected a list, got {type(value).__name__}")
    return list(value)


def _is_missing(value: Any) -> bool:
    """No value: None (JSON null), NaN (JSON `NaN`, a pandas or parquet gap), pandas' NA, or blank text."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _show(value: Any) -> str:
    if isinstance(value, str):
        return "blank"
    return "NaN" if isinstance(value, float) else "null" if value is None else str(value)


def _key(cfg: DataConfig, name: str) -> str:
    """`data.choices_column`, plus where its value came from when that was a file (a recipe, a saved config)."""
    origin = cfg.origin(name)
    return f"data.{name}, {origin}" if origin else f"data.{name}"


def _cell(row: dict, cfg: DataConfig, name: str, where: str, what: str, column: str | None = None) -> Any:
    """The value a row holds in the column config field `name` points at; absent or empty is an error."""
    col = getattr(cfg, name) if column is None else column
    if col not in row:
        raise FittuneError(f"{where} has no column '{col}' ({_key(cfg, name)}); this row's columns are: "
                           f"{', '.join(map(str, row))}; add it to the row or remove the row")
    value = row[col]
    if _is_missing(value):
        raise FittuneError(f"{where}: empty {what} in column '{col}' ({_key(cfg, name)}): the cell is "
                           f"{_show(value)}; fill it in or remove the row")
    return value


def _check_csv_width(text: str, cfg: DataConfig, path: str) -> None:
    """data.column_names must name every field: pandas would turn extra leading fields into an index (every
    column shifted) or silently drop names."""
    import csv

    first = next(csv.reader(io.StringIO(text)), None)
    if cfg.column_names and first is not None and len(first) != len(cfg.column_names):
        raise FittuneError(f"{path}: its rows have {len(first)} fields but data.column_names names "
                           f"{len(cfg.column_names)} ({', '.join(cfg.column_names)}): name every field, in order")


def _column_hint(cfg: DataConfig, name: str, source: str) -> str:
    """What usually causes a missing column, where it is not the key's value itself: a CSV read with its first
    row as the header (said first: then every column is missing), a classification set's answer column."""
    hint = ""
    if str(source).lower().endswith(".csv") and cfg.csv_header and not cfg.column_names:
        hint = ("; if the file has no header row (the columns above are its first row's values), set "
                "data.csv_header false and name the fields with data.column_names")
    if name == "answer_column" and cfg.label_column:
        hint += "; for a classification set (data.label_column) with no answer column set data.answer_column null"
    elif name == "answer_column":
        hint += ("; for a classification set name its label column (data.label_column COLUMN, data.answer_column "
                 "null)")
    return hint


def _check_columns(columns: list, cfg: DataConfig, source: str) -> None:
    wanted = ["id_column", "label_column", "group_column"]
    wanted += ["messages_column"] if cfg.messages_column else ["question_column", "answer_column"]
    pairs = [(name, getattr(cfg, name)) for name in wanted]
    choice_cols = cfg.choices_column if isinstance(cfg.choices_column, list) else [cfg.choices_column]
    pairs += [("choices_column", c) for c in choice_cols]
    for name, col in pairs:
        if col is not None and col not in columns:
            fix = f"; set --data.{name} to one of the columns, or null" if cfg.origin(name) else ""
            raise FittuneError(f"{source}: column '{col}' ({_key(cfg, name)}) not found; the columns are: "
                               f"{', '.join(map(str, columns))}{fix}{_column_hint(cfg, name, source)}")


def map_columns(rows: list[dict], cfg: DataConfig, source: str, classes: list[str] | None = None) -> list[Example]:
    """Apply the config's column mapping. Missing columns and malformed rows are FittuneErrors.

    `classes`: the label set of a classification task (default: the labels found in `rows`).
    """
    _check_columns(list(rows[0].keys()), cfg, source)
    class_task = is_class_task(cfg)
    if class_task and classes is None:
        classes = task_classes(cfg, rows)
    if not class_task:
        classes = None
    examples, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        ex_id = str(_cell(row, cfg, "id_column", where, "id")) if cfg.id_column else str(i)
        if ex_id in seen:
            raise FittuneError(f"{where}: duplicate id '{ex_id}' in column '{cfg.id_column}'; ids must be unique")
        seen.add(ex_id)
        # a missing label must fail here: as text ('nan', 'None', '') it would become a class of its own
        label = None if cfg.label_column is None else _label(row, cfg, where)
        messages, answer = _prompt_and_answer(row, cfg, where, label)
        choices, gold = None, None
        if cfg.choices_column:
            choices = _row_choices(row, cfg, where)
            gold = _resolve_gold(answer, choices, cfg.answer_format, where)
            answer = choices[gold]
            if cfg.choices_in_prompt:
                messages, choices = _list_choices(messages, choices, where)
                answer = choices[gold]
        elif classes is not None:
            if label not in classes:
                raise FittuneError(f"{where}: label {label!r} is not one of the classes {classes} (data.classes: "
                                   f"the candidates the model chooses among; a trained run's own): remove the "
                                   f"row, or add the class to data.classes")
            if str(answer) != label:
                raise _answer_is_not_label(cfg, where, answer, label)
            choices, gold = classes, classes.index(label)
        group = None if cfg.group_column is None else _group(row, cfg, where)
        examples.append(Example(ex_id, messages, str(answer), choices, gold, label, group))
    if classes is not None:
        _check_classes(classes, cfg)  # after the rows: a row's own problem (an empty label) is named first
    return examples


def _prompt_and_answer(row: dict, cfg: DataConfig, where: str, label: str | None) -> tuple[list[dict], Any]:
    """The chat messages up to the answer, and the answer (the label when there is no answer column)."""
    if cfg.messages_column:
        messages, answer = _split_messages(_as_list(_cell(row, cfg, "messages_column", where, "messages"), where),
                                           where)
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}] + messages
        return messages, answer
    question = _cell(row, cfg, "question_column", where, "question")
    if not isinstance(question, str):
        fix = ("write one row per item (e.g. per sentence), or join the items into one text" if _is_many(question)
               else "fix the row")
        raise FittuneError(f"{where}: the question in column '{cfg.question_column}' ({_key(cfg, 'question_column')}) "
                           f"is a {type(question).__name__} ({_show_short(question)}), not text; {fix}")
    messages = [{"role": "user", "content": question}]
    if cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    answer = _cell(row, cfg, "answer_column", where, "answer") if cfg.answer_column else label
    return messages, answer


def _row_choices(row: dict, cfg: DataConfig, where: str) -> list[str]:
    if isinstance(cfg.choices_column, list):
        choices = [str(_cell(row, cfg, "choices_column", where, "choice", c)) for c in cfg.choices_column]
    else:
        values = _as_list(_cell(row, cfg, "choices_column", where, "choices"), where)
        for k, v in enumerate(values):
            if _is_missing(v):
                raise FittuneError(f"{where}: choice {k + 1} in column '{cfg.choices_column}' "
                                   f"({_key(cfg, 'choices_column')}) is {_show(v)}; fill it in or remove the row")
        choices = [str(c) for c in values]
    if len(choices) < 2:
        raise FittuneError(f"{where}: needs at least 2 choices, got {len(choices)}")
    return choices


def _list_choices(messages: list[dict], choices: list[str], where: str) -> tuple[list[dict], list[str]]:
    """The question with its choices listed under it (`A. text`, one a line), and the letters as candidates."""
    if len(choices) > len(string.ascii_uppercase):
        raise FittuneError(f"{where}: {len(choices)} choices, more than letters A-Z for data.choices_in_prompt: "
                           f"turn it off for this data")
    letters = list(string.ascii_uppercase[:len(choices)])
    listed = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, choices))
    question = messages[-1]
    return messages[:-1] + [{**question, "content": f"{question['content']}\n\n{listed}"}], letters


def _answer_is_not_label(cfg: DataConfig, where: str, answer: Any, label: str) -> FittuneError:
    source = ("the last assistant message" if cfg.messages_column
              else f"column '{cfg.answer_column}' ({_key(cfg, 'answer_column')})")
    drop = "data.messages_column" if cfg.messages_column else "data.answer_column (--data.answer_column null)"
    return FittuneError(f"{where}: the answer in {source} is {str(answer)[:60]!r} but the label in column "
                        f"'{cfg.label_column}' ({_key(cfg, 'label_column')}) is {label[:60]!r}; with a label column "
                        f"and no choices the task is classification and the label is the answer: drop {drop}, or "
                        f"drop data.label_column (--data.label_column null) to generate the answers instead")


def class_labels(rows: list[dict], cfg: DataConfig) -> list[str]:
    """Sorted distinct labels of a classification task (empty or list labels are left to map_columns to report)."""
    col = cfg.label_column
    return sorted({str(r[col]) for r in rows if col in r and not _is_missing(r[col]) and not _is_many(r[col])})


def _is_many(value: Any) -> bool:
    """A list-like cell (a JSON list, a tuple, a numpy array from parquet), which is never one value."""
    return isinstance(value, (list, tuple, dict)) or getattr(value, "ndim", 0) >= 1  # numpy scalars have ndim 0


def task_classes(cfg: DataConfig, rows: list[dict], test_rows: list[dict] | None = None) -> list[str]:
    """The candidates of a classification task: data.classes when given, else every label in `rows` (and
    `test_rows`). One class is refused (by map_columns): every prediction would be right by construction."""
    return list(cfg.classes) if cfg.classes else class_labels(rows + (test_rows or []), cfg)


def _check_classes(classes: list[str], cfg: DataConfig) -> None:
    if len(classes) == 1:
        raise FittuneError(f"the label column '{cfg.label_column}' ({_key(cfg, 'label_column')}) has one class, "
                           f"{classes[0]!r}: with one candidate every prediction is right; add rows of the other "
                           f"classes, or name them all in data.classes")


def untrained_classes_note(classes: list[str], train: list[Example], test: list[Example]) -> str | None:
    """Which candidate classes no training row has (held-out only, with their row counts, or named in
    data.classes only): the model was never trained to choose them. None when every class was trained."""
    trained = {e.label for e in train}
    held_out = Counter(e.label for e in test if e.label not in trained)
    said = [f"{c!r} ({held_out[c]} held-out row{'s' if held_out[c] > 1 else ''})" if held_out[c] else f"{c!r} (no row)"
            for c in classes if c not in trained]
    if not said:
        return None
    return (f"classes with no training row: {', '.join(said)}: they are candidates the model was never trained "
            f"to choose")


def similar_classes_note(classes: list[str]) -> str | None:
    """Classes that differ only in case or spacing (`'no'` / `'no '` / `'No'`): most likely one class written
    two ways, which the metrics would count as two. None when there are none."""
    same: dict[str, list[str]] = {}
    for c in classes:
        same.setdefault(" ".join(c.split()).casefold(), []).append(c)
    alike = [" / ".join(repr(c) for c in group) for group in same.values() if len(group) > 1]
    if not alike:
        return None
    return (f"NOTE: classes that differ only in case or spaces: {'; '.join(alike)}: they are scored as different "
            f"classes; if each is one class, write it one way in the data (or name the classes in data.classes)")


def _label(row: dict, cfg: DataConfig, where: str) -> str:
    """A row's class label as text; a list (one label per sentence, per token) is not one class."""
    value = _cell(row, cfg, "label_column", where, "label")
    if _is_many(value):
        raise FittuneError(f"{where}: the label in column '{cfg.label_column}' ({_key(cfg, 'label_column')}) is a "
                           f"{type(value).__name__} ({_show_short(value)}), not one class: fittune classifies one "
                           f"text per row; write one row per item (e.g. per sentence) with its own label, and the id of the "
                           f"text it came from in a column that data.group_column names, so the held-out split keeps "
                           f"each text's rows together")
    return str(value)


def _group(row: dict, cfg: DataConfig, where: str) -> str:
    """A row's group (data.group_column) as text: one value, never a list."""
    value = _cell(row, cfg, "group_column", where, "group")
    if _is_many(value):
        raise FittuneError(f"{where}: the group in column '{cfg.group_column}' ({_key(cfg, 'group_column')}) is a "
                           f"{type(value).__name__} ({_show_short(value)}): name one group per row (e.g. the id "
                           f"of the abstract or paper the row comes from)")
    return str(value)


def count_rows(n: int) -> str:
    """`1 row`, `2 rows`: a count of rows as a sentence says it."""
    return f"{n} row" if n == 1 else f"{n} rows"


def prompts_cut_note(n: int) -> str:
    """What data.max_length did to `n` kept rows' prompts (training and evaluate.py say it alike)."""
    its, them = ("its", "it") if n == 1 else ("their", "them")
    return f"{count_rows(n)} had the start of {its} prompt cut to fit data.max_length (raise it to keep {them} whole)"


def _show_short(value: Any) -> str:
    text = str(value.tolist() if hasattr(value, "tolist") else value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class TaskType:
    """How a data config is trained and scored, and why (printed in a run's first lines)."""

    kind: Literal["classification", "multiple_choice", "open_generation", "chat"]
    reason: str

    def __str__(self) -> str:
        return f"task: {self.kind.replace('_', ' ')}: {self.reason}"


def describe_task(cfg: DataConfig) -> TaskType:
    """The task type a data config gives, with the rule that picked it.

    Choices make it multiple choice; else a label column makes it classification over the labels (an
    answer column or chat answer, if also set, must equal the label); else chat messages or open answers
    are generated and scored by exact match.
    """
    said = {n: f"data.{n} {getattr(cfg, n)!r}" + (f" ({cfg.origin(n)})" if cfg.origin(n) else "")
            for n in ("choices_column", "label_column", "messages_column", "answer_column")}
    if cfg.choices_column:
        strata = f"; {said['label_column']} only stratifies the split" if cfg.label_column else ""
        return TaskType("multiple_choice", f"{said['choices_column']} is set: each row's choices are the candidates, "
                                           f"ranked by the model's log-likelihood (accuracy){strata}")
    if cfg.label_column:
        also = ""
        if cfg.messages_column:
            also = "; the last assistant message must equal the label in every row"
        elif cfg.answer_column not in (None, cfg.label_column):
            also = f"; {said['answer_column']} must equal the label in every row"
        return TaskType("classification", f"{said['label_column']} is set and there are no choices: the classes "
                                          f"are the candidates (accuracy, F1 per class){also}")
    if cfg.messages_column:
        return TaskType("chat", f"{said['messages_column']} is set, with no choices or label column: the last "
                                f"assistant turn is generated and scored by exact match and token F1")
    return TaskType("open_generation", f"{said['answer_column']} is set, with no choices or label column: the "
                                       f"answer is generated and scored by exact match and token F1")


def is_class_task(cfg: DataConfig) -> bool:
    """A classification set: the label is the answer and the set of labels is every row's candidates."""
    return describe_task(cfg).kind == "classification"


def _split_messages(messages: list, where: str) -> tuple[list[dict], str]:
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise FittuneError(f"{where}: each message needs 'role' and 'content'")
        # null/NaN content is never text; a blank turn is harmless unless it is the answer
        if _is_missing(m["content"]) and (m["role"] == "assistant" or not isinstance(m["content"], str)):
            raise FittuneError(f"{where}: message {k + 1} ({m['role']}) has no content ({_show(m['content'])}); "
                               f"fill it in or remove the row")
    if not messages or messages[-1]["role"] != "assistant":
        raise FittuneError(f"{where}: the last message must be the assistant's answer")
    if len(messages) < 2:
        raise FittuneError(f"{where}: needs at least one message before the assistant's answer")
    return [dict(role=m["role"], content=str(m["content"])) for m in messages[:-1]], str(messages[-1]["content"])


def _resolve_gold(answer: Any, choices: list[str], fmt: str, where: str) -> int:
    if fmt == "text":
        if str(answer) not in choices:
            raise FittuneError(f"{where}: answer {str(answer)[:60]!r} is not among the choices; "
                               f"fix the row or set data.answer_format to letter/index")
        return choices.index(str(answer))
    if fmt == "letter":
        letter = str(answer).strip().upper()
        letters = string.ascii_uppercase[: len(choices)]
        if len(letter) != 1 or letter not in letters:
            hint = "; the answers look like indexes: set data.answer_format index" if letter.isdigit() else \
                "; fix the row, or set data.answer_format to text/index"
            raise FittuneError(f"{where}: answer {answer!r} is not a choice letter ({', '.join(letters)}){hint}")
        return letters.index(letter)
    try:
        idx = int(answer)
    except (TypeError, ValueError):
        raise FittuneError(f"{where}: answer {answer!r} is not a choice index; fix the row, or set "
                           f"data.answer_format to text/letter") from None
    if not 0 <= idx < len(choices):
        raise FittuneError(f"{where}: answer index {idx} is out of range for {len(choices)} choices")
    return idx


# ---------------------------------------------------------------------------------------------------------
# Split


class Split(NamedTuple):
    """The rows a run trains on and the rows it holds out (unpacks as `train, test`)."""

    train: list[Example]
    test: list[Example]


def split_heldout(examples: list[Example], test_size: float, seed: int) -> Split:
    """Deterministic train / held-out split by seed, stratified by label when every class can be split."""
    from sklearn.model_selection import train_test_split

    n_test = max(1, round(len(examples) * test_size))
    if len(examples) - n_test < 1:
        raise FittuneError(f"only {count_rows(len(examples))}: too few to hold out {test_size:g} of them and train "
                           f"on the rest; add data or lower data.test_size")
    labels = [e.label for e in examples]
    counts = Counter(labels)
    # a class with one row cannot be on both sides: it goes to training, the other classes are stratified
    alone = [i for i, lb in enumerate(labels) if lb is not None and counts[lb] == 1]
    idx = [i for i, lb in enumerate(labels) if lb is None or counts[lb] > 1]
    stratify, n_strata = [labels[i] for i in idx], len(counts) - len(alone)
    if None in counts:  # no labels
        idx, alone, stratify = list(range(len(examples))), [], None
    elif not (n_strata <= n_test <= len(idx) - n_strata):
        stratify = None  # too few rows per class to stratify: one-row classes still go to training
        if not alone or n_test >= len(idx):  # no one-row classes: the same split as before they were moved
            idx, alone = list(range(len(examples))), []
    train_idx, test_idx = train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)
    return Split([examples[i] for i in sorted(train_idx + alone)], [examples[i] for i in sorted(test_idx)])


GROUP_SPLIT_CANDIDATES = 32  # seeded group splits compared for their held-out label mix


def split_heldout_groups(examples: list[Example], test_size: float, seed: int, column: str) -> Split:
    """Deterministic train / held-out split by seed that holds out whole groups (`Example.group`):
    round(test_size x groups) of them, at least one, never all. With labels, of GROUP_SPLIT_CANDIDATES
    seeded splits (scikit-learn's GroupShuffleSplit) the one whose held-out label mix is closest to the whole
    data's (total variation distance; the first of equals), so a class is not left out of the held-out rows by
    the luck of one draw; without labels, the first."""
    from sklearn.model_selection import GroupShuffleSplit

    groups = [e.group for e in examples]
    n_groups = len(set(groups))
    if n_groups < 2:
        raise FittuneError(f"data.group_column '{column}' has one value in every row: nothing can be held out "
                           f"by group; name the column that tells the rows' sources apart, or remove "
                           f"data.group_column")
    n_test = min(n_groups - 1, max(1, round(n_groups * test_size)))
    labels = [e.label for e in examples]
    tries = 1 if None in labels else GROUP_SPLIT_CANDIDATES
    splits = GroupShuffleSplit(n_splits=tries, test_size=n_test, random_state=seed).split(examples, groups=groups)
    whole = _label_mix(labels)
    train_idx, test_idx = min(splits, key=lambda s: _mix_distance(_label_mix([labels[i] for i in s[1]]), whole))
    return Split([examples[i] for i in sorted(train_idx)], [examples[i] for i in sorted(test_idx)])


def _label_mix(labels: list) -> dict:
    """Each label's share of the rows."""
    return {label: n / len(labels) for label, n in Counter(labels).items()}


def _mix_distance(a: dict, b: dict) -> float:
    """Total variation distance between two label mixes: the share of rows that would have to change label."""
    return sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in a.keys() | b.keys()) / 2


def leaked_rows_note(train: list[Example], test: list[Example], cfg: DataConfig) -> str | None:
    """Held-out rows that are also training rows (the same prompt, answer and choices: a duplicated row split to
    both sides, or a test file that repeats training rows). Their scores measure recall, not generalisation.
    None when there are none."""
    def key(e: Example) -> str:
        return json.dumps([e.messages, e.answer, e.choices], sort_keys=True, ensure_ascii=False)

    trained = {key(e) for e in train}
    leaked = [e for e in test if key(e) in trained]
    if not leaked:
        return None
    fix = ("point data.test_path at rows that are not in data.path" if cfg.test_path else
           f"remove the duplicates from the data, or hold out identical rows together with --data.group_column "
           f"{cfg.question_column}")
    return (f"NOTE: {len(leaked)} of the {len(test)} held-out rows are also training rows (the same prompt and "
            f"answer, e.g. row id {leaked[0].id}): their scores measure what the model memorised; {fix}")


def groups_note(column: str, train: list[Example], test: list[Example]) -> str:
    """How a grouped split held out its rows (data.group_column), said at the start of a run."""
    held, trained = {e.group for e in test}, {e.group for e in train}
    return (f"held out {len(test)} of {len(train) + len(test)} rows: {len(held)} of the {len(held | trained)} "
            f"groups of data.group_column '{column}', whole ({len(held & trained)} on both sides)")


# ---------------------------------------------------------------------------------------------------------
# Prompts and tokenization


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat prompt up to the start of the assistant's answer.

    Uses the tokenizer's chat template (Qwen's ChatML for Qwen). Fallback for tokenizers without one:
    ChatML written out (`<|im_start|>role\\ncontent<|im_end|>\\n` per turn, then `<|im_start|>assistant\\n`).
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def end_of_turn(tokenizer) -> str:
    """Text that closes the assistant's answer: ChatML's <|im_end|>, or the tokenizer's EOS."""
    if getattr(tokenizer, "chat_template", None) and "<|im_end|>" not in tokenizer.chat_template:
        return tokenizer.eos_token or ""
    return "<|im_end|>"


@dataclass
class TokExample:
    """A tokenized example: prompt ids, answer ids (with the end-of-turn token) and candidate ids."""

    id: str
    prompt_ids: list[int]
    answer_ids: list[int]
    candidates: list[list[int]] | None = None
    gold: int | None = None
    label: str | None = None
    choices: list[str] | None = None
    answer: str = ""
    train_on_prompt: bool = False
    cand_prompt_ids: list[int] | None = None  # the prompt cut further, if needed, to fit the longest choice
    question: str = ""  # the last user turn as written, so predictions.jsonl can be read without the data file

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids

    @property
    def labels(self) -> list[int]:
        prompt_labels = self.prompt_ids if self.train_on_prompt else [IGNORE_INDEX] * len(self.prompt_ids)
        return prompt_labels + self.answer_ids

    @property
    def n_targets(self) -> int:
        # the first token is never a target (nothing predicts it)
        return len(self.answer_ids) + (len(self.prompt_ids) - 1 if self.train_on_prompt else 0)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


@dataclass
class TokenizeStats:
    """What tokenizing a split did to its rows."""

    rows: int = 0
    """Rows kept."""
    truncated: int = 0
    """Rows kept with the start of their prompt cut to fit data.max_length."""
    dropped: int = 0
    """Rows left out: their answer (or longest choice) does not fit."""
    dropped_ids: list[str] = field(default_factory=list)
    """The ids of the dropped rows."""


def _last_user_turn(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


class Tokenized(NamedTuple):
    """Tokenized rows and what fitting them into max_length did (unpacks as `examples, stats`)."""

    examples: list[TokExample]
    stats: TokenizeStats


def tokenize_examples(examples: list[Example], tokenizer, cfg: DataConfig) -> Tokenized:
    """Tokenize prompts and answers; cut prompts from the left to fit `max_length`, drop rows that cannot fit.

    A row counts as truncated when its prompt had to be cut to fit the answer; scoring a longer choice may
    cut the prompt further (`cand_prompt_ids`) without touching what the model trains on.
    """
    end = end_of_turn(tokenizer)
    prompts = tokenizer([render_prompt(tokenizer, e.messages) for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.answer + end for e in examples], add_special_tokens=False)["input_ids"]
    out, stats = [], TokenizeStats(rows=len(examples))
    for e, p, a in zip(examples, prompts, answers):
        cands = None
        if e.choices is not None:
            cands = tokenizer([c + end for c in e.choices], add_special_tokens=False)["input_ids"]
        budget = cfg.max_length - len(a)
        cand_budget = cfg.max_length - max([len(c) for c in cands or []] + [len(a)])
        if cand_budget < 1:
            stats.dropped += 1
            stats.dropped_ids.append(e.id)
            continue
        if len(p) > budget:
            stats.truncated += 1
        # keep the end of the prompt, next to the answer
        out.append(TokExample(e.id, p[-budget:], a, cands, e.gold, e.label, e.choices, e.answer,
                              cfg.train_on_prompt, p[-cand_budget:], _last_user_turn(e.messages)))
    return Tokenized(out, stats)


# ---------------------------------------------------------------------------------------------------------
# Batch plan


def plan_global_batches(lengths: list[int], global_size: int, seed: int, epoch: int,
                        group_by_length: bool) -> list[list[int]]:
    """Split one epoch into global batches (one optimizer step each) of `global_size` example indices.

    The plan depends only on the global batch size, never on how it is split into micro-batches, processes
    or accumulation steps; that is what makes 4x1, 2x2 and 1x4 (and 1 vs 2 processes) the same update.
    Length grouping sorts within windows of 32 global batches, then shuffles the batch order.
    The incomplete last global batch is dropped (a different one each epoch, as the order changes).
    """
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    n_batches = len(perm) // global_size
    if group_by_length:
        window = global_size * 32
        grouped = []
        for i in range(0, len(perm), window):
            grouped += sorted(perm[i:i + window], key=lambda j: -lengths[j])
        batches = [grouped[b * global_size:(b + 1) * global_size] for b in range(n_batches)]
        order = torch.randperm(n_batches, generator=g).tolist()
        return [batches[i] for i in order]
    return [perm[b * global_size:(b + 1) * global_size] for b in range(n_batches)]


def micro_batches_for_rank(global_batch: list[int], lengths: list[int], micro: int, accum: int,
                           world: int, rank: int) -> list[list[int]]:
    """The `accum` micro-batches this rank runs for one global batch.

    Sorted by length so each micro-batch holds similar lengths; micro-batch m goes to rank m % world at
    accumulation step m // world, so the ranks get similar work at every step.
    """
    ordered = sorted(global_batch, key=lambda j: (-lengths[j], j))
    return [ordered[(a * world + rank) * micro:(a * world + rank + 1) * micro] for a in range(accum)]


def collate_train(items: list[TokExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels for a training micro-batch."""
    width = max(len(x) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x)
        ids[i, :n] = torch.tensor(x.input_ids)
        labels[i, :n] = torch.tensor(x.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_fraction(batch_lengths: list[list[int]]) -> float:
    """Share of padded slots over micro-batches given as lists of example lengths."""
    slots = sum(max(b) * len(b) for b in batch_lengths if b)
    real = sum(sum(b) for b in batch_lengths)
    return 0.0 if slots == 0 else 1.0 - real / slots


class StepCount(NamedTuple):
    total: int
    """Optimizer steps of the whole run."""
    per_epoch: int
    """Optimizer steps in one pass over the training split."""


def count_steps(n_examples: int, global_size: int, max_steps: int, epochs: float, dropped: int = 0,
                max_length: int = 0) -> StepCount:
    """The optimizer steps of the run and of one epoch; `dropped` rows of the split did not fit `max_length`."""
    per_epoch = n_examples // global_size
    if per_epoch < 1:
        if dropped and n_examples + dropped >= global_size:  # the rows exist: the length limit dropped them
            raise FittuneError(f"only {n_examples} training examples fit data.max_length {max_length} ({dropped} "
                               f"rows were dropped: their answer or longest choice does not fit), fewer than one "
                               f"global batch ({global_size}); raise data.max_length")
        raise FittuneError(f"the training split has {n_examples} examples, fewer than one global batch "
                           f"({global_size} = micro_batch_size x grad_accum x processes); lower them or add data")
    total = max_steps if max_steps > 0 else max(1, math.ceil(per_epoch * epochs))
    return StepCount(total, per_epoch)


# ---------------------------------------------------------------------------------------------------------
# The whole pipeline up to tokenization


def _check_test_split(cfg: DataConfig) -> None:
    """data.test_path naming the training data itself, read at the training split, would score training rows;
    data.test_split, or a data.hub_split other than the default, on a file (which has no splits) would be
    ignored."""
    if cfg.hub_split != "train" and _detect_format(resolve_data_path(cfg.path), cfg.format) not in ("hub", "disk"):
        raise FittuneError(f"data.hub_split picks a split of a hub dataset or a save_to_disk DatasetDict; "
                           f"data.path {cfg.path} is a file, which has none: set data.hub_split back to train "
                           f"(its default)")
    if cfg.test_split and _detect_format(resolve_data_path(cfg.test_path), cfg.format) not in ("hub", "disk"):
        raise FittuneError(f"data.test_split picks a split of a hub dataset or a save_to_disk DatasetDict; "
                           f"data.test_path {cfg.test_path} is a file, which has none: remove data.test_split")
    if cfg.test_path and same_file(resolve_data_path(cfg.path), resolve_data_path(cfg.test_path)) \
            and (cfg.test_split or cfg.hub_split) == cfg.hub_split:
        if _detect_format(resolve_data_path(cfg.path), cfg.format) in ("hub", "disk"):
            raise FittuneError(f"data.test_path is data.path ({cfg.test_path}), read at the same split "
                               f"'{cfg.hub_split}': every held-out row would be a training row; set data.test_split "
                               f"to the split to evaluate on (e.g. test), or point data.test_path at another file")
        raise FittuneError(f"data.test_path is data.path ({cfg.test_path}): every held-out row would be a training "
                           f"row; point data.test_path at another file, or leave it out to hold out data.test_size")


def other_splits_note(cfg: DataConfig) -> str | None:
    """A `save_to_disk` DatasetDict trained on one split, with no test_path: say which splits it also has
    (its own test split goes unused otherwise, without a word)."""
    path = resolve_data_path(cfg.path)
    if cfg.test_path or _detect_format(path, cfg.format) != "disk":
        return None
    try:
        splits = json.loads((Path(path) / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):  # a single Dataset: no other split
        return None
    others = sorted((s for s in splits if s != cfg.hub_split), key=lambda s: s != "test")  # test named first
    if not others:
        return None
    return (f"NOTE: {path} also has the split(s) {', '.join(others)}, not used: the held-out rows are "
            f"{cfg.test_size:g} of '{cfg.hub_split}'; to evaluate on one, pass --data.test_path {path} "
            f"--data.test_split {others[0]}")


def load_splits(cfg: DataConfig, seed: int) -> Split:
    """Read, map and split: (train examples, held-out examples). No tokenizer needed, so errors come fast."""
    _check_test_split(cfg)
    rows = read_rows(cfg.path, cfg)
    test_rows = read_rows(cfg.test_path, cfg, cfg.test_split) if cfg.test_path else []
    classes = task_classes(cfg, rows, test_rows) if is_class_task(cfg) else None
    examples = map_columns(rows, cfg, resolve_data_path(cfg.path), classes)
    if cfg.test_path:
        return Split(examples, map_columns(test_rows, cfg, cfg.test_path, classes))
    if cfg.group_column:
        return split_heldout_groups(examples, cfg.test_size, seed, cfg.group_column)
    return split_heldout(examples, cfg.test_size, seed)


# ---------------------------------------------------------------------------------------------------------
# Data identity: what a run trained and was evaluated on, so a changed file is noticed


def examples_digest(examples: list[Example]) -> str:
    """sha256 (hex) of the examples' content, in the given order.

    Each example is one canonical JSON line (id, messages with the question and system prompt, answer,
    choices, gold index, label; keys sorted, UTF-8). The order counts: the same examples in another order
    give another digest, as the split and the batch plan follow the order. Pass the held-out examples in
    their saved id order to fingerprint a held-out set; the file's name and format do not count.
    """
    h = hashlib.sha256()
    for e in examples:
        record = {"id": e.id, "messages": e.messages, "answer": e.answer, "choices": e.choices, "gold": e.gold,
                  "label": e.label}
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")  # json.dumps escapes newlines, so one line per example is unambiguous
    return h.hexdigest()


def _file_digest(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _path_digest(path: str, cfg: DataConfig) -> str | None:
    """sha256 of one source's bytes: a file; a save_to_disk directory's files (names and bytes, sorted by
    name); None for a hub dataset, which has no local bytes to hash."""
    path = resolve_data_path(path)
    fmt = _detect_format(path, cfg.format)
    if fmt == "hub":
        return None
    p = Path(path)
    if not p.exists():
        raise FittuneError(f"data file not found: {path}")
    h = hashlib.sha256()
    if not p.is_dir():
        _file_digest(p, h)
        return h.hexdigest()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        name = f.relative_to(p).as_posix().encode("utf-8")
        h.update(len(name).to_bytes(8, "little") + name + f.stat().st_size.to_bytes(8, "little"))
        _file_digest(f, h)
    return h.hexdigest()


def source_digest(cfg: DataConfig) -> str | None:
    """sha256 (hex) of the data source's bytes, or None when a source is a hub dataset.

    Without `test_path`: the digest of `path` alone (for a file, what `sha256sum FILE` prints; the built-in
    demo set hashes its file). With `test_path`: a digest over both (`train:<hex>\\ntest:<hex>\\n`), so a change
    to either file changes it. Only bytes count, never the path: a moved or renamed file keeps its digest.
    """
    train = _path_digest(cfg.path, cfg)
    if not cfg.test_path:
        return train
    test = _path_digest(cfg.test_path, cfg)
    if train is None or test is None:
        return None
    return hashlib.sha256(f"train:{train}\ntest:{test}\n".encode()).hexdigest()


def select_ids(examples: list[Example], ids: list[str], source: str) -> list[Example]:
    """The examples with these ids, in this order; an id that is gone means the data changed."""
    by_id = {e.id: e for e in examples}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise FittuneError(f"{len(missing)} held-out ids (e.g. '{missing[0]}') are not in {source}: the data "
                           f"changed since training; pass --data.path/--data.test_path to evaluate other data")
    return [by_id[i] for i in ids]
