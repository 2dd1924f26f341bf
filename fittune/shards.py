"""The engines' tensors, asked in one place: FSDP2 replaces a parameter (and its optimizer states) with a DTensor
holding this rank's shard; ZeRO-3 empties a parameter in place and keeps this rank's partition and the full
size beside it (`ds_tensor`, `ds_numel`, `ds_shape`: DeepSpeed's own attributes, the only mark it leaves)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def _zero3_partitioned(t: torch.Tensor) -> bool:
    return hasattr(t, "ds_tensor")


def local_part(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `t`: a ZeRO-3 parameter's partition, a DTensor's local shard, else `t` itself."""
    if _zero3_partitioned(t):
        return t.ds_tensor
    return t.to_local() if isinstance(t, DTensor) else t


def full_numel(t: torch.Tensor) -> int:
    """Elements of the whole tensor, however it is sharded (a ZeRO-3 parameter itself holds an empty placeholder)."""
    return int(t.ds_numel) if _zero3_partitioned(t) else t.numel()


def full_shape(t: torch.Tensor) -> list[int]:
    """The whole tensor's shape, however it is sharded."""
    return list(t.ds_shape) if _zero3_partitioned(t) else list(t.shape)


def gathered_copy(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor as a CPU copy. A DTensor is all-gathered: a collective, every rank must call it."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()
