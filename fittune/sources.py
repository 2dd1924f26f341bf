"""Reading data: rows from JSONL / JSON / CSV / parquet files, a saved `datasets` directory, the Hub or a
built-in set, as plain dicts; and the digest of a data source's bytes (a run's identity of what it read)."""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from fittune.config import BUILTIN_DATA, DEMO_DATA, DataConfig
from fittune.errors import DataNotFound, FittuneError


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


def detect_format(path: str, fmt: str) -> str:
    """The data format: `fmt` itself, or for `auto` the one the path names (a file's extension, a saved
    `datasets` directory, or an `owner/name` Hub dataset id); a missing path is DataNotFound."""
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
    fmt = detect_format(path, cfg.format)
    if fmt != "hub" and not Path(path).exists():
        raise DataNotFound(f"data file not found: {path}{_relative_to_cwd(path)} (data.path / data.test_path)")
    rows = _READERS[fmt](path, cfg, split)
    if not rows:
        key = "data.test_path" if cfg.test_path and same_file(path, resolve_data_path(cfg.test_path)) else "data.path"
        raise FittuneError(f"{path} holds no rows: add examples or point {key} at another file")
    return rows


def peek_columns(cfg: DataConfig) -> set[str] | None:
    """The columns of data.path's local file, read from its start only (a JSON Lines file's first row, a CSV
    header or data.column_names, a Parquet schema); None for a hub dataset, a saved dataset or a JSON file
    (those are read whole when training reads them), and for a file that cannot be read (training says why)."""
    try:
        path = resolve_data_path(cfg.path)
        fmt = detect_format(path, cfg.format)
        if fmt == "jsonl":
            with open(path, encoding="utf-8-sig") as f:
                first = next((line for line in f if line.strip()), None)
            row = json.loads(first) if first is not None else None
            return set(row) if isinstance(row, dict) else None
        if fmt == "csv":
            import csv

            with open(path, encoding="utf-8-sig", newline="") as f:
                return set(cfg.column_names) if cfg.column_names else set(next(csv.reader(f), []))
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(path).names)
    except (FittuneError, OSError, ValueError, ImportError):
        return None
    return None


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


def _check_csv_width(text: str, cfg: DataConfig, path: str) -> None:
    """data.column_names must name every field: pandas would turn extra leading fields into an index (every
    column shifted) or silently drop names."""
    import csv

    first = next(csv.reader(io.StringIO(text)), None)
    if cfg.column_names and first is not None and len(first) != len(cfg.column_names):
        raise FittuneError(f"{path}: its rows have {len(first)} fields but data.column_names names "
                           f"{len(cfg.column_names)} ({', '.join(cfg.column_names)}): name every field, in order")


def _file_digest(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _path_digest(path: str, cfg: DataConfig) -> str | None:
    """sha256 of one source's bytes: a file; a save_to_disk directory's files (names and bytes, sorted by
    name); None for a hub dataset, which has no local bytes to hash."""
    path = resolve_data_path(path)
    fmt = detect_format(path, cfg.format)
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


def scored_digest(cfg: DataConfig) -> str | None:
    """sha256 (hex) of the bytes an evaluation scores rows of: data.test_path when given (data.path, the run's
    training data, may be gone), else data.path; None for a hub dataset."""
    return _path_digest(cfg.test_path, cfg) if cfg.test_path else _path_digest(cfg.path, cfg)


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
