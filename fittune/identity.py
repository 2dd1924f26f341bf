"""Content identity of a run's data: a resumed run or an evaluation must see the rows the run saw."""

from __future__ import annotations

import hashlib
import json


def examples_digest(examples) -> str:
    """sha256 over the content of each `fittune.data.Example` (id, chat messages, answer, choices, gold,
    label), in the given order."""
    h = hashlib.sha256()
    for e in examples:
        row = {"id": e.id, "messages": e.messages, "answer": e.answer, "choices": e.choices, "gold": e.gold,
               "label": e.label}
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
