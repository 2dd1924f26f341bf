"""Model parallelism inside one process (`model.parallel: auto`): decoder layers spread over the visible GPUs.

The placement is accelerate's (`get_balanced_memory` + `infer_auto_device_map`, never splitting a decoder
layer, keeping tied weights together) computed from the model's own modules, so it can be checked on the
meta device without any GPU; `dispatch_model` then moves each block and adds the hooks that carry
activations from one device to the next. Layers mapped to `cpu` (only when `model.max_memory` names it) run
on the CPU: slow, but the weights stay trainable (no streaming offload, which would drop LoRA parameters).
"""

from __future__ import annotations

import torch

from fittune.errors import FittuneError

ACTIVATION_HEADROOM = 0.8  # of each GPU's free memory for weights; the rest for activations and states


def default_max_memory() -> dict:
    """Weights budget per visible GPU: a share of what is free now."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise FittuneError("model.parallel: auto needs at least one visible GPU (or model.max_memory naming "
                           "'cpu'); on a CPU-only machine leave model.parallel: none")
    return {i: int(torch.cuda.mem_get_info(i)[0] * ACTIVATION_HEADROOM) for i in range(torch.cuda.device_count())}


def parse_max_memory(max_memory: dict[str, str] | None) -> dict:
    """`{"0": "10GiB", "cpu": "30GiB"}` -> accelerate's form `{0: bytes, "cpu": bytes}`."""
    if not max_memory:
        return default_max_memory()
    from accelerate.utils import convert_file_size_to_int

    out = {}
    for key, size in max_memory.items():
        try:
            out[key if key == "cpu" else int(key)] = convert_file_size_to_int(size)
        except ValueError:
            raise FittuneError(f"model.max_memory['{key}'] = '{size}' is not a size like 10GiB or 500MB") from None
    return out


def plan_device_map(model: torch.nn.Module, max_memory: dict, dtype: torch.dtype | None = None) -> dict[str, int | str]:
    """Which device each block of `model` goes to (works on a meta-device model). Balanced over the GPUs in
    `max_memory` (accelerate's `get_balanced_memory`), whole decoder layers only."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    inner = _inner(model)
    if getattr(getattr(inner, "config", None), "tie_word_embeddings", False):
        inner.tie_weights()  # a model built on the meta device is not tied yet; tied weights share a device
    no_split = list(getattr(inner, "_no_split_modules", None) or [])
    if not no_split:
        raise FittuneError(f"model.parallel: auto places whole decoder layers, but {type(inner).__name__} does not "
                           f"name them (no _no_split_modules): this architecture cannot use a device map; "
                           f"use FSDP2 or ZeRO-3 to shard it")
    gpus = [k for k in max_memory if k != "cpu"]
    budget = dict(max_memory)
    if len(gpus) > 1:
        # spread the layers evenly instead of filling GPU 0 first
        budget = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                     dtype=dtype, low_zero=False)
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    if "disk" in device_map.values() or not device_map:
        total = sum(v for k, v in max_memory.items())
        raise FittuneError(f"the model does not fit the memory given to model.parallel: auto ({total / 2**30:.1f} "
                           f"GiB in all): add GPUs, raise model.max_memory, use LoRA, or use a ZeRO-3 offload "
                           f"config (fittune-plan shows what fits)")
    return device_map


def _inner(model):
    """The transformers model inside a PEFT wrapper (for its `_no_split_modules`)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def training_share(model: torch.nn.Module) -> float:
    """Fraction of each device's budget the weights may take when training: every trainable parameter also
    needs its gradient and two Adam moments next to it (x4 for full fine-tuning, ~x1 for LoRA)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights / (weights + 3 * trainable) if weights else 1.0


def place_model(model: torch.nn.Module, max_memory_cfg: dict[str, str] | None, dtype: torch.dtype | None = None,
                training: bool = True):
    """Spread `model` over the devices in `model.max_memory` (default: all visible GPUs). Returns the
    device map; the model's forward then takes inputs on `input_device(model)` and returns outputs there.
    `training`: leave room on each device for the gradients and optimizer states of its layers."""
    from accelerate import dispatch_model

    max_memory = parse_max_memory(max_memory_cfg)
    if training:
        share = training_share(model)
        max_memory = {k: int(v * share) for k, v in max_memory.items()}
    device_map = plan_device_map(model, max_memory, dtype)
    gpus = sorted({d for d in device_map.values() if d != "cpu"})
    # main_device="cpu": accelerate would otherwise *stream* cpu-mapped weights to the GPU (offload), which
    # replaces them by meta tensors: fine for inference, not for training
    dispatch_model(model, device_map=device_map, main_device="cpu" if "cpu" in device_map.values() else gpus[0])
    return device_map


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings."""
    return model.get_input_embeddings().weight.device


def batch_device(model: torch.nn.Module, accelerator, strategy) -> torch.device:
    """Where this process puts a batch for `model`: a device-mapped model's input embeddings (its first block),
    else the process's own device."""
    return input_device(accelerator.unwrap_model(model)) if strategy.device_map else accelerator.device
