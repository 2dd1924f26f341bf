"""What the launcher told this process in its environment, readable before any process group exists (an error
raised at start-up, the lock taken before the accelerator starts)."""

from __future__ import annotations

import os


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 when run without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """World size the launcher asked for (1 when run without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_launch_main() -> bool:
    """Whether this process is the launch's main one, which alone speaks for all (rank 0)."""
    return launch_rank() == 0
