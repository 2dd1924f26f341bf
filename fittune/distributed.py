"""Distributed helpers: the Accelerator, and the one place that makes CPU launches truly multi-rank.

Why this module exists: accelerate picks the process-group backend from the accelerator it finds. With no
GPU and `cpu=False`, `PartialState._prepare_backend` returns *no* backend, so under
`accelerate launch --multi_gpu --num_processes 2` (or a DeepSpeed launch) every rank decides it is alone
(world size 1) and trains on all the data. Choosing gloo there makes the ranks real:
  * plain/DDP launches -> `cpu=True`, accelerate's MULTI_CPU path (DDP over gloo);
  * DeepSpeed launches -> backend "gloo" passed to DeepSpeed's own `init_distributed`.
Tests check that each rank reports world size 2 and sees its own shard.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


def launched_world_size() -> int:
    """World size the launcher asked for (1 when run without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def has_accelerator() -> bool:
    """True when a GPU (or other device accelerate would pick a backend for) is present."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def deepspeed_requested() -> bool:
    """True when `accelerate launch` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(mixed_precision: str, grad_accum: int, log_with: str | None, project_dir: str) -> Accelerator:
    """Create the run's Accelerator, with real gloo ranks on a CPU-only machine (see module docstring)."""
    handlers = []
    cpu = False
    if launched_world_size() > 1 and not has_accelerator():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        # DeepSpeed only takes its own init path (and gets the gloo backend) when cpu=False
        cpu = not deepspeed_requested()
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=handlers,
    )


def strategy_name(accelerator: Accelerator) -> str:
    """Short human name of the parallel strategy in use (for the resolved config and logs)."""
    dt = accelerator.distributed_type.value.lower()
    if dt == "deepspeed":
        plugin = accelerator.state.deepspeed_plugin
        stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        off = [k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device", "none") not in ("none", None)]
        return f"deepspeed-zero{stage}" + ("+" + "+".join(off) if off else "")
    if accelerator.num_processes > 1:
        return f"ddp ({dt})"
    return "single-process"


def sum_across_ranks(accelerator: Accelerator, values: list[float]) -> list[float]:
    """Sum a few scalars over all ranks (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()
