"""Graceful stop on SIGTERM / SIGINT: finish the current step, save a checkpoint, exit.

Schedulers (Slurm, Kubernetes, spot reclaim) send SIGTERM and kill a little later; a user presses Ctrl-C.
The first signal only sets a flag that the loop reads after each step (all ranks agree through the step's
all-reduce). A second signal exits at once. Launchers forward the scheduler's signal to every worker, so a
worker can receive the same request twice within moments: copies within `grace_s` count as one.
"""

from __future__ import annotations

import os
import signal
import time


class StopRequest:
    """Installs the handlers; `requested` is the signal number (0 when none) and `exit_code` the code to use."""

    def __init__(self, grace_s: float = 2.0):
        self.requested = 0
        self._first_at = 0.0
        self._grace_s = grace_s
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested and now - self._first_at > self._grace_s:
            os._exit(128 + signum)  # second request: the user means it
        if not self.requested:
            self.requested, self._first_at = signum, now
            print(f"fittune: got {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  f"(send it again to exit at once)", flush=True)

    @property
    def exit_code(self) -> int:
        """143 for SIGTERM (so schedulers requeue), 130 for SIGINT."""
        return 128 + self.requested if self.requested else 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
