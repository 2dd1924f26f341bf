"""The training run's progress on the main process, readable on a terminal and in a log file.

On a terminal: a tqdm bar with the last logged loss and learning rate. In a file (a scheduler's log, nohup,
`2>&1 | tee`), a bar's redraws are carriage returns that pile up into one unreadable line, so instead a plain line
is printed at every logged step (`train.log_every`): the same numbers train_log.jsonl gets.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO


def library_bars_only_on_a_terminal() -> None:
    """transformers' and the Hugging Face hub's own bars (loading weights, writing shards) only on a terminal,
    like fittune's: before either is imported, through the hub's variable (one the user set wins)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class TrainingProgress:
    """Steps done of `total`, shown as a bar on a terminal or as a line per logged step elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool, terminal: TextIO | None = None):
        """`enabled` on the main process only; the bar goes to `terminal` (stderr) when it is one, else the
        lines go to stdout with fittune's other lines."""
        self.total, self.enabled, self.bar = total, enabled, None
        terminal = terminal or sys.stderr
        if enabled and terminal.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="training", dynamic_ncols=True, file=terminal)

    def step_done(self) -> None:
        """One optimizer step more on the bar."""
        if self.bar is not None:
            self.bar.update(1)

    def logged(self, row: dict) -> None:
        """A train_log row was written: the bar shows its loss and learning rate, a log file gets a line."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        elif self.enabled:
            norm = "" if row["grad_norm"] is None else f"  grad_norm {row['grad_norm']:.3g}"
            val = f"  val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""
            print(f"fittune: step {row['step']}/{self.total}  epoch {row['epoch']:g}  loss {row['loss']:.4f}  "
                  f"lr {row['lr']:.2e}{norm}  tokens/s {row['tokens_per_s']:,.0f}{val}", flush=True)

    def close(self) -> None:
        """End the bar (idempotent), so what is printed next starts on its own line."""
        if self.bar is not None:
            self.bar.close()
