"""How every command-line entry point runs (train.py, evaluate.py, fittune-export, fittune-plan):
one line and exit code 2 for a user's error, the code the command returns otherwise, and a clean exit of
every rank. The only place in the library that exits the process."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

from fittune.errors import FittuneError
from fittune.launcher_env import is_launch_main, launched_world_size
from fittune.notices import quiet_maintainer_notices
from fittune.progress import library_bars_only_on_a_terminal

# how long a rank other than the main one waits before it exits on a FittuneError (the main rank, hitting the
# same error, prints it and exits at once, and the launcher then stops this one; a loaded machine was seen to
# need more than an instant)
OTHER_RANKS_WAIT_S = 5.0


def run_cli(main: Callable[[], int | None]) -> None:
    """Run an entry point and exit with the code it returns (e.g. 143 after a SIGTERM checkpoint); turn a
    `FittuneError` into one line on stderr and exit code 2.

    Every rank hits the same input error, so only the main rank prints it (one line, not one per GPU).
    Other exceptions keep their traceback: they are bugs or hardware faults, not user errors.
    """
    quiet_maintainer_notices()
    library_bars_only_on_a_terminal()
    try:
        code = main() or 0
    except FittuneError as e:
        if is_launch_main():
            print(f"fittune: error: {e}", file=sys.stderr, flush=True)
        else:  # torch's launcher stops every rank as soon as one exits: let the main rank say why first
            time.sleep(OTHER_RANKS_WAIT_S)
        code = 2
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (start-up, final save and evaluation, an
        # evaluate.py), where no stop handler finishes a step first: a user's choice, not a bug to trace back
        if is_launch_main():
            print("fittune: interrupted (Ctrl-C): stopped here; every file fittune writes is written whole or "
                  "not at all", file=sys.stderr, flush=True)
        code = 130
    except BrokenPipeError:  # `train.py --help | head`: the reader left; nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        code = 1
    _leave(code)


def _leave(code: int) -> None:
    """Exit with `code` (a lone process returns on 0). One rank of several leaves without the interpreter's
    teardown: there, the C++ destructors of the communication threads (gloo) now and then abort the process
    (std::terminate, SIGABRT) after the run's files are written, and the launcher reports a finished run as
    failed."""
    if launched_world_size() > 1:
        logging.shutdown()  # what the skipped teardown would have done that matters: flush and close
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
