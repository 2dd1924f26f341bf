"""Finding what a checkpoint directory holds: the weights, the run it came from, its config and split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fittune.errors import FittuneError


@dataclass
class CheckpointInfo:
    """Where the weights are, which run they belong to, and that run's saved config (if any)."""

    weights_dir: Path
    run_dir: Path | None
    config_file: Path | None

    @property
    def heldout_ids(self) -> list[str] | None:
        path = self.run_dir / "heldout_ids.json" if self.run_dir else None
        return json.loads(path.read_text())["ids"] if path and path.is_file() else None


def _has_weights(d: Path) -> bool:
    return (d / "adapter_config.json").is_file() or (d / "config.json").is_file()


def resolve_checkpoint(path: str) -> CheckpointInfo:
    """Accept a training output dir (uses its final/), final/ itself, or any model / adapter directory."""
    p = Path(path)
    if not p.exists():
        raise FittuneError(f"checkpoint not found: {path}")
    if not p.is_dir():
        raise FittuneError(f"checkpoint must be a directory (a training output dir or its final/): {path}")
    if (p / "config.yaml").is_file() and (p / "final").is_dir():
        return CheckpointInfo(p / "final", p, p / "config.yaml")
    if not _has_weights(p):
        raise FittuneError(f"{path} holds no model or adapter (no config.json / adapter_config.json); "
                           f"pass a training output dir or its final/")
    if (p.parent / "config.yaml").is_file():
        return CheckpointInfo(p, p.parent, p.parent / "config.yaml")
    own = p / "fittune_config.yaml"
    return CheckpointInfo(p, None, own if own.is_file() else None)
