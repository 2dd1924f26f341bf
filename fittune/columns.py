"""Column mapping: a row becomes an `Example` (chat prompt, answer, candidates and gold, label, group), with
one clear error per bad row that names the row, the column and the config key; what kind of task the mapping
describes; the classes of a classification task, and notes about them."""

from __future__ import annotations

import ast
import json
import math
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from fittune.config import DataConfig
from fittune.errors import FittuneError


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
