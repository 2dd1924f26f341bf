"""The held-out split: deterministic by seed, stratified by label, or by whole groups; the notes it says (rows on
both sides, groups); `load_splits`, the whole pipeline from the config to the training and held-out examples;
and the digest of a set of examples (what a run trained and was evaluated on)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from fittune.columns import Example, count_rows, is_class_task, map_columns, task_classes
from fittune.config import DataConfig
from fittune.errors import FittuneError
from fittune.sources import detect_format, read_rows, resolve_data_path, same_file


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


def leaked_rows_note(train: list[Example], test: list[Example], cfg: DataConfig, evaluation: bool = False) -> str | None:
    """Held-out rows that are also training rows (the same prompt, answer and choices: a duplicated row split to
    both sides, or a test file that repeats training rows). Their scores measure recall, not generalisation.
    None when there are none. `evaluation`: said by evaluate.py, where the fix is in the rows scored, not in
    how a run splits its data."""
    def key(e: Example) -> str:
        return json.dumps([e.messages, e.answer, e.choices], sort_keys=True, ensure_ascii=False)

    trained = {key(e) for e in train}
    leaked = [e for e in test if key(e) in trained]
    if not leaked:
        return None
    fix = ("score rows the run did not train on for a measure of generalisation" if evaluation else
           "point data.test_path at rows that are not in data.path" if cfg.test_path else
           # grouping by the question instead would split the groups the run keeps whole (one group column)
           f"remove the duplicates from the data (the same text in two {cfg.group_column} groups)"
           if cfg.group_column else
           f"remove the duplicates from the data, or hold out identical rows together with --data.group_column "
           f"{cfg.question_column}")
    rows = "rows scored are also rows the run trained on" if evaluation else "held-out rows are also training rows"
    return (f"NOTE: {len(leaked)} of the {len(test)} {rows} (the same prompt and answer, e.g. row id "
            f"{leaked[0].id}): their scores measure what the model memorised; {fix}")


def groups_note(column: str, train: list[Example], test: list[Example]) -> str:
    """How a grouped split held out its rows (data.group_column), said at the start of a run."""
    held, trained = {e.group for e in test}, {e.group for e in train}
    return (f"held out {len(test)} of {len(train) + len(test)} rows: {len(held)} of the {len(held | trained)} "
            f"groups of data.group_column '{column}', whole ({len(held & trained)} on both sides)")


def _check_test_split(cfg: DataConfig) -> None:
    """data.test_path naming the training data itself, read at the training split, would score training rows;
    data.test_split, or a data.hub_split other than the default, on a file (which has no splits) would be
    ignored."""
    if cfg.hub_split != "train" and detect_format(resolve_data_path(cfg.path), cfg.format) not in ("hub", "disk"):
        raise FittuneError(f"data.hub_split picks a split of a hub dataset or a save_to_disk DatasetDict; "
                           f"data.path {cfg.path} is a file, which has none: set data.hub_split back to train "
                           f"(its default)")
    if cfg.test_split and detect_format(resolve_data_path(cfg.test_path), cfg.format) not in ("hub", "disk"):
        raise FittuneError(f"data.test_split picks a split of a hub dataset or a save_to_disk DatasetDict; "
                           f"data.test_path {cfg.test_path} is a file, which has none: remove data.test_split")
    if cfg.test_path and same_file(resolve_data_path(cfg.path), resolve_data_path(cfg.test_path)) \
            and (cfg.test_split or cfg.hub_split) == cfg.hub_split:
        if detect_format(resolve_data_path(cfg.path), cfg.format) in ("hub", "disk"):
            raise FittuneError(f"data.test_path is data.path ({cfg.test_path}), read at the same split "
                               f"'{cfg.hub_split}': every held-out row would be a training row; set data.test_split "
                               f"to the split to evaluate on (e.g. test), or point data.test_path at another file")
        raise FittuneError(f"data.test_path is data.path ({cfg.test_path}): every held-out row would be a training "
                           f"row; point data.test_path at another file, or leave it out to hold out data.test_size")


def other_splits_note(cfg: DataConfig) -> str | None:
    """A `save_to_disk` DatasetDict trained on one split: say which splits it also has, unused (its own test split,
    with no test_path, or its dev split beside the test split test_path names, would go unused without a word)."""
    path = resolve_data_path(cfg.path)
    if detect_format(path, cfg.format) != "disk" or cfg.test_path and not same_file(cfg.test_path, cfg.path):
        return None
    try:
        splits = json.loads((Path(path) / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):  # a single Dataset: no other split
        return None
    used = {cfg.hub_split, cfg.test_split} if cfg.test_path else {cfg.hub_split}
    others = sorted((s for s in splits if s not in used), key=lambda s: s != "test")  # test named first
    if not others:
        return None
    if cfg.test_path:
        return (f"NOTE: {path} also has the split(s) {', '.join(others)}, not used: training on '{cfg.hub_split}', "
                f"the held-out rows are '{cfg.test_split}'")
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


def load_test_file(cfg: DataConfig) -> list[Example]:
    """The rows of data.test_path alone, mapped as `load_splits` maps them, with data.classes (or, with none,
    the file's own labels) as the candidates: for evaluate.py on a run, whose training rows are the run's own
    (data.path is then neither read nor checked against classes given for the test file)."""
    _check_test_split(cfg)
    test_rows = read_rows(cfg.test_path, cfg, cfg.test_split)
    classes = task_classes(cfg, [], test_rows) if is_class_task(cfg) else None
    return map_columns(test_rows, cfg, cfg.test_path, classes)


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


def select_ids(examples: list[Example], ids: list[str], source: str) -> list[Example]:
    """The examples with these ids, in this order; an id that is gone means the data changed."""
    by_id = {e.id: e for e in examples}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise FittuneError(f"{len(missing)} held-out ids (e.g. '{missing[0]}') are not in {source}: the data "
                           f"changed since training; pass --data.path/--data.test_path to evaluate other data")
    return [by_id[i] for i in ids]
