"""Graceful stop on SIGTERM / SIGINT: finish the current step, save a checkpoint, exit.

Schedulers (Slurm, Kubernetes, spot reclaim) send SIGTERM and kill a little later; a user presses Ctrl-C.
The first signal only sets a flag that the loop reads after each step (all ranks agree through the step's
all-reduce). A second signal exits at once. Launchers forward the scheduler's signal to every worker, so a
worker can receive the same request twice within moments: copies within `grace_s` count as one, and so does
the launcher's death signal whenever it comes (Ctrl-C under `accelerate launch` reaches the worker both directly
and, once the launcher has exited, as that signal, see fittune/launch.py).

Who sees which exit code (measured with accelerate 1.15 / torch 2.13):
- `python train.py`: the worker itself, 143 (SIGTERM) or 130 (SIGINT).
- `accelerate launch` with one process: the launcher does not forward signals and dies of the signal at once
  (a shell shows 143 / 130; Python's subprocess shows -15 / -2). The worker learns of it from the kernel
  (parent death signal, SIGTERM), finishes its step, saves and exits 143 a moment later, with nobody waiting
  for it: a supervisor that tears the job down as soon as the launcher exits can cut that save short. A
  second signal ("exit at once") then has to go to the worker's own pid. Ctrl-C in a terminal signals the
  whole process group: the worker gets SIGINT itself and exits 130.
- multi-process launches (torch elastic): the launcher forwards SIGTERM / SIGINT to every worker, waits up to
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30; raise it when a checkpoint takes longer) for them to
  finish the step and save, then SIGKILLs them, and exits 1 with a `SignalException` traceback: that code
  comes from torch, not from fittune. A second signal to the launcher is forwarded again (exit at once); a
  launcher killed with SIGKILL forwards nothing, and the parent death signal stops the workers as above.
"""

from __future__ import annotations

import os
import signal
import time


class StopRequest:
    """Installs the handlers; `requested` is the signal number (0 when none) and `exit_code` the code to use.
    `announce`: say so when a signal arrives (the main process; the launcher signals every rank, and the
    stop the ranks agree on is said once by the loop)."""

    def __init__(self, grace_s: float = 2.0, announce: bool = True):
        self.requested = 0
        self._announce = announce
        self._first_at = 0.0
        self._grace_s = grace_s
        from fittune.launch import parent_death_signal_armed

        self._parent = os.getppid()
        # the kernel's one SIGTERM at the launcher's death: expected only where fittune asked for it
        self._orphan_notice = not parent_death_signal_armed()
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        notice = self._parent_death_notice(signum)
        if self.requested and now - self._first_at > self._grace_s and not notice:
            os._exit(128 + signum)  # second request: the user means it
        if not self.requested:
            self.requested, self._first_at = signum, now
            if self._announce:
                print(f"fittune: got {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                      f"(send it again to exit at once)", flush=True)

    def _parent_death_notice(self, signum: int) -> bool:
        """Whether this is the kernel's SIGTERM for the launcher's death (fittune/launch.py asks for it): the
        same request as the Ctrl-C that killed the launcher, however late a loaded machine delivers it (it
        came after the 2 s grace once and cut the checkpoint short). Only the first one after the parent
        changed, and only where it was asked for: a signal sent to an orphaned worker otherwise is the user's."""
        if signum != signal.SIGTERM or self._orphan_notice or os.getppid() == self._parent:
            return False
        self._orphan_notice = True
        return True

    @property
    def exit_code(self) -> int:
        """143 for SIGTERM (so schedulers requeue), 130 for SIGINT."""
        return 128 + self.requested if self.requested else 0

    def restore(self) -> None:
        """Put back the handlers that were installed before (the end of training)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
