"""The one place that decides a run's mixed precision, shared by training, evaluation and the planner."""

from __future__ import annotations

from dataclasses import dataclass

from fittune.errors import FittuneError


@dataclass(frozen=True)
class Precision:
    """The precision a run uses and why (for the planner's report)."""

    mixed: str
    """`no`, `bf16` or `fp16` (accelerate's names)."""
    why: str
    """Which setting decided it."""


def resolve_precision(wanted: str, launcher: str, gpu: bool, bf16_supported: bool) -> Precision:
    """`train.mixed_precision` against the launch config's: `auto` follows the launcher, `best` picks bf16
    where the GPU has it, fp16 on older GPUs and `no` on the CPU; a recipe that contradicts the launcher
    is an error, not a guess."""
    if wanted == "auto":
        return Precision(launcher, f"train.mixed_precision: auto follows the launch config ('{launcher}')")
    why = f"train.mixed_precision: {wanted}"
    if wanted == "best":
        wanted = "no" if not gpu else ("bf16" if bf16_supported else "fp16")
    if launcher not in ("no", wanted):
        raise FittuneError(f"train.mixed_precision is '{wanted}' but the accelerate launch config says "
                           f"'{launcher}': make them agree (or set train.mixed_precision: auto)")
    return Precision(wanted, why)


def run_precision(wanted: str) -> str:
    """The precision of this process: the launch's setting (ACCELERATE_MIXED_PRECISION) and this machine."""
    import os

    import torch

    gpu = torch.cuda.is_available()
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return resolve_precision(wanted, launcher, gpu, gpu and torch.cuda.is_bf16_supported()).mixed


def check_device_precision(mixed: str, device) -> None:
    """bf16 asked for explicitly on a GPU without it (T4, V100) is an error that names the fix."""
    import torch

    if mixed == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FittuneError("this GPU has no bf16: use --train.mixed_precision fp16")
