"""The one place that decides a run's mixed precision, shared by training, evaluation and the planner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fittune.errors import FittuneError

if TYPE_CHECKING:
    import torch

    from fittune.config import Config


@dataclass(frozen=True)
class Precision:
    """The mixed precision a run uses and why: what every part of fittune asks about precision, asked here."""

    mixed: str
    """`no`, `bf16` or `fp16` (accelerate's names)."""
    why: str = ""
    """Which setting decided it (for the planner's report)."""

    @property
    def half(self) -> bool:
        """Whether matmuls run in a 16-bit type (autocast)."""
        return self.mixed in ("bf16", "fp16")

    @property
    def scales_loss(self) -> bool:
        """fp16's narrow range: the loss is scaled, and a step whose gradients overflow is skipped, not an error."""
        return self.mixed == "fp16"

    @property
    def half_dtype(self):
        """The 16-bit torch dtype of the compute (fp16's, else bf16's: what a half-precision copy of fp32 weights
        uses), whether or not `half`."""
        import torch

        return torch.float16 if self.mixed == "fp16" else torch.bfloat16


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


def run_precision(wanted: str) -> Precision:
    """The precision of this process: the launch's setting (ACCELERATE_MIXED_PRECISION) and this machine."""
    import os

    import torch

    gpu = torch.cuda.is_available()
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return resolve_precision(wanted, launcher, gpu, gpu and torch.cuda.is_bf16_supported())


def check_device_precision(precision: Precision, device) -> None:
    """bf16 asked for explicitly on a GPU without it (T4, V100) is an error that names the fix."""
    import torch

    if precision.mixed == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FittuneError("this GPU has no bf16: use --train.mixed_precision fp16")


def weights_dtype(cfg: Config, precision: Precision) -> torch.dtype:
    """The dtype the weights are loaded in: model.dtype when set; else fp32 master weights for full fine-tuning,
    and a LoRA run's frozen base in the half dtype of its mixed precision."""
    import torch

    if cfg.model.dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    if cfg.lora.enabled and precision.half:
        return precision.half_dtype
    return torch.float32
