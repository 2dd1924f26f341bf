"""Test hooks, installed once at setup when their environment variable is set; never in the step path."""

from __future__ import annotations

import os

import torch


def install_oom_injection(model: torch.nn.Module, rank: int) -> bool:
    """FITTUNE_TEST_OOM_ABOVE=M (and optionally FITTUNE_TEST_OOM_RANK=r) makes the training forward pass raise
    a real torch.OutOfMemoryError whenever the micro-batch exceeds M, on that rank only;
    FITTUNE_TEST_OOM_SKIP=k lets the first k such micro-batches through (an out-of-memory mid-step).
    Evaluation (model.eval()) is never affected. Returns whether the hook was installed."""
    above = os.environ.get("FITTUNE_TEST_OOM_ABOVE")
    if above is None or rank != int(os.environ.get("FITTUNE_TEST_OOM_RANK", rank)):
        return False
    passed = [0]
    skip = int(os.environ.get("FITTUNE_TEST_OOM_SKIP", "0"))

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not module.training or ids is None or ids.shape[0] <= int(above):
            return None
        if passed[0] < skip:
            passed[0] += 1
            return None
        raise torch.OutOfMemoryError(f"injected by FITTUNE_TEST_OOM_ABOVE={above} (micro-batch {ids.shape[0]}, "
                                     f"rank {rank})")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return True
