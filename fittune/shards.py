"""The engines' tensors, asked in one place: FSDP2 replaces a parameter (and its optimizer states) with a DTensor
holding this rank's shard; ZeRO-3 empties a parameter in place and keeps this rank's partition, the full size and
the full shape beside it (`ds_tensor`, `ds_numel`, `ds_shape`: DeepSpeed's own attributes, the only mark it
leaves)."""

from __future__ import annotations

import torch


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor  # here, not at import: it costs a second where nothing is sharded

    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `t`: a ZeRO-3 parameter's partition, a DTensor's local shard, else `t` itself."""
    partition = getattr(t, "ds_tensor", None)
    if partition is not None:
        return partition
    return t.to_local() if _is_dtensor(t) else t


def full_numel(t: torch.Tensor) -> int:
    """Elements of the whole tensor, however it is sharded (a ZeRO-3 parameter itself holds an empty placeholder)."""
    return int(getattr(t, "ds_numel", t.numel()))


def full_shape(t: torch.Tensor) -> list[int]:
    """The whole tensor's shape, however it is sharded."""
    return list(getattr(t, "ds_shape", t.shape))


def gathered_copy(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor as a CPU copy. A DTensor is all-gathered: a collective, every rank must call it."""
    return (t.full_tensor() if _is_dtensor(t) else t).detach().cpu().clone()


def tensor_bytes(t) -> int:
    """Storage bytes of a state tensor: a torchao quantized state counts its codes, scales and lookup table."""
    inner = getattr(t, "tensor_attrs", None)
    if inner:
        return sum(getattr(t, name).nbytes for name in inner)
    return t.nbytes if isinstance(t, torch.Tensor) else 0


def local_shards(model) -> dict:
    """What this rank holds of the weights: {name: [local shape, full shape]} and element counts (sharded
    under FSDP2 and ZeRO-3; the full tensors under DDP)."""
    shapes, local, total = {}, 0, 0
    for name, p in model.named_parameters():
        mine = local_part(p)
        shapes[name] = [list(mine.shape), full_shape(p)]
        local, total = local + mine.numel(), total + full_numel(p)
    return {"local_parameter_elements": local, "parameter_elements": total, "parameter_shapes": shapes}
