"""train_log.jsonl: one JSON row per logged step, appended durably; on resume, rows after the checkpoint
and a line torn by a crash are dropped (and said)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from fittune.errors import FittuneError
from fittune.rundir import append_line, atomic_write_text


@dataclass
class LogRepair:
    """What resuming did to the log."""

    kept: int
    dropped_after_checkpoint: int
    torn_line: str | None
    """The unparseable last line a crash left (dropped), if any."""


class LogRows(NamedTuple):
    """The log's rows, and the last line if a crash tore it (unpacks as `rows, torn_line`)."""

    rows: list[dict]
    torn_line: str | None


def read_rows(path: Path) -> LogRows:
    """The log's rows, and the last line if a crash tore it (an unparseable last line)."""
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    rows, torn = [], None
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if k != len(lines) - 1:  # only a crash mid-append tears a line, and only the last one
                raise FittuneError(f"{path}:{k + 1} is not valid JSON and is not the last line (so not a write a "
                                   f"crash tore): fix or remove that line, then resume") from None
            torn = line
    return LogRows(rows, torn)


def start(path: Path) -> None:
    """An empty log for a fresh run."""
    atomic_write_text(path, "")


def truncate_after(path: Path, step: int) -> LogRepair:
    """Keep the rows up to `step` (the checkpoint resumed from); rewritten atomically."""
    if not path.is_file():
        start(path)
        return LogRepair(0, 0, None)
    rows, torn = read_rows(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return LogRepair(len(kept), len(rows) - len(kept), torn)


def append(path: Path, row: dict) -> None:
    """One row, fsynced: a crash can tear only this last line."""
    append_line(path, json.dumps(row))
