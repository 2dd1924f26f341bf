"""Notices that libraries print on every run for their own maintainers, silenced in one place.

Each one is about how a library calls another (a deprecated API, an optional extension), says nothing about
the user's run and cannot be acted on by the user; left on, they bury fittune's own lines (and in a
multi-process launch come once per process). Only these exact messages are dropped: any other warning
from the same libraries still prints. `run_cli` calls `quiet_maintainer_notices` before an entry point runs.
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex) of Python warnings; who triggers each, on which runs
WARNINGS = (
    # PEFT 0.21 reads transformers' deprecated alias when wrapping a model (every LoRA run)
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # DeepSpeed's collectives call torch's deprecated names (every ZeRO step)
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # torch 2.13 deprecates DDP's broadcast_buffers for forward_sync_buffers, which accelerate 1.15's
    # DistributedDataParallelKwargs cannot pass yet (fittune/distributed.py; every DDP rank)
    (FutureWarning, r"`broadcast_buffers` is deprecated\. Use `forward_sync_buffers`"),
)
# (logger, message) of log records
LOG_NOTICES = (
    # torch >= 2.12, twice whenever transformers imports torchao, which registers its Enums as pytree constants
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
    # accelerate, at every checkpoint of a model with tied embeddings (the tie is restored on load; fittune
    # verifies final/ against the live weights)
    ("accelerate.utils.other", "Removed shared tensor"),
)


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


def quiet_maintainer_notices() -> None:
    """Drop the notices above (idempotent)."""
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in LOG_NOTICES:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.text == text for f in log.filters):
            log.addFilter(_DropNotice(text))
    # torchao logs a warning for each CUDA extension its wheel cannot load (they serve its quantized kernels,
    # not the optimizers, which are PyTorch ops compiled by torch.compile)
    logging.getLogger("torchao").setLevel(logging.ERROR)


def quiet_scheduler_order_notice() -> None:
    """torch's "`lr_scheduler.step()` before `optimizer.step()`" warning, for a DeepSpeed run only: the engine
    steps its (CPU Adam) optimizer past the counter that check reads, so it fires on every rank although the
    order is right (the losses equal DDP's step for step: tests/test_deepspeed.py). Other runs keep it."""
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`",
                            category=UserWarning)
