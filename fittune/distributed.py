"""Distributed helpers: the Accelerator, and the one place that makes CPU launches truly multi-rank.

Why this module exists: accelerate picks the process-group backend from the accelerator it finds. With no
GPU and `cpu=False`, `PartialState._prepare_backend` returns *no* backend, so under
`accelerate launch --multi_gpu --num_processes 2` (or a DeepSpeed launch) every rank decides it is alone
(world size 1) and trains on all the data. Choosing gloo there makes the ranks real:
  * plain/DDP launches -> `cpu=True`, accelerate's MULTI_CPU path (DDP over gloo);
  * DeepSpeed launches -> backend "gloo" passed to DeepSpeed's own `init_distributed`;
  * FSDP launches -> accelerate only turns FSDP on for GPU-like distributed types, never for MULTI_CPU, so
    after the gloo ranks exist the state is switched to FSDP with the launch's plugin (`_enable_fsdp_on_cpu`).
    From there accelerate's own FSDP2 path runs unchanged: `fully_shard` on a CPU device mesh, DTensor
    shards, torch.distributed.checkpoint.
Tests check that each rank reports world size 2 and sees its own shard (and, for FSDP2, the shard shapes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from fittune.errors import FittuneError
from fittune.launch import check_world_size
from fittune.launcher_env import launched_world_size
from fittune.precision import Precision, check_device_precision, run_precision
from fittune.strategy import Strategy, fsdp_version, strategy_of


def has_accelerator() -> bool:
    """True when a GPU (or other device accelerate would pick a backend for) is present."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def deepspeed_requested() -> bool:
    """True when `accelerate launch` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def fsdp_requested() -> bool:
    """True when `accelerate launch` was given an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _enable_fsdp_on_cpu(accelerator: Accelerator, precision: Precision) -> None:
    """Turn on the FSDP the launch asked for, on real gloo ranks (see the module docstring)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = FullyShardedDataParallelPlugin()  # read from the launch's FSDP_* environment, as accelerate does
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise FittuneError("fsdp_offload_params moves the shards from GPU memory to CPU RAM; without a GPU they are "
                           "in CPU RAM already: use accelerate_configs/fsdp2.yaml")
    if precision.half:
        plugin.set_mixed_precision(precision.mixed)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # as AcceleratorState.__init__ does for GPUs: every later AcceleratorState() re-reads PartialState's copy
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_deepspeed_config_file() -> None:
    """Refuse a launch config whose `deepspeed_config_file` is not there, naming the file and the fix (accelerate
    says only that it expected "a string path to an existing deepspeed config")."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if deepspeed_requested() and path != "none" and not os.path.isfile(path):
        # accelerate reads a relative path from the directory the launch ran in, not from the config's own
        raise FittuneError(f"the launch config's deepspeed_config_file {path} does not exist (a relative path is "
                           f"read from the current directory, {os.getcwd()}): launch from fittune's repository "
                           f"root, or write an absolute deepspeed_config_file in your accelerate config")


def name_deepspeed_cpu_accelerator() -> None:
    """Without a GPU, tell DeepSpeed (before it is imported) what its own detection would pick, so it does not
    warn on every rank ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to
    detect it"), also where a library imports it into a run that does not use it (saving final/, export)."""
    if not has_accelerator():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def skip_deepspeed_shm_op() -> None:
    """A DeepSpeed launch on CPU ranks: DeepSpeed compiles its shared-memory all-reduce op when its process group
    starts (90 s on 2 cores, the first time on a machine). That op serves only DeepSpeed's inference all-reduce;
    training's collectives go through torch.distributed (gloo here), so it is marked unavailable and not built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the probed table DeepSpeed keeps and reads


def make_accelerator(precision: Precision, grad_accum: int, log_with: str | None, project_dir: str) -> Accelerator:
    """Create the run's Accelerator, with real gloo ranks on a CPU-only machine (see module docstring)."""
    check_deepspeed_config_file()
    # DDP re-broadcasts module buffers at every forward by default; Qwen2's only buffers are constant rotary
    # tables, and the extra collective would leave ranks waiting if one fails mid-step (OOM-adaptive steps)
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    cpu = False
    name_deepspeed_cpu_accelerator()
    if deepspeed_requested() and not has_accelerator():
        skip_deepspeed_shm_op()
    if launched_world_size() > 1 and not has_accelerator():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        # DeepSpeed only takes its own init path (and gets the gloo backend) when cpu=False
        cpu = not deepspeed_requested()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision.mixed,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=handlers,
    )
    if cpu and fsdp_requested():
        _enable_fsdp_on_cpu(accelerator, precision)
    if fsdp_version(accelerator) not in (None, 2):
        raise FittuneError("FSDP1 is not supported by fittune: set fsdp_version: 2 in the accelerate config "
                           "(see accelerate_configs/fsdp2.yaml)")
    return accelerator


@dataclass(frozen=True)
class Launched:
    """What the launch set up for this process, decided once: training and evaluation ask it."""

    accelerator: Accelerator
    precision: Precision
    strategy: Strategy


def start_accelerator(mixed_precision: str, parallel: str, grad_accum: int = 1, log_with: str | None = None,
                      project_dir: str = ".") -> Launched:
    """The run's Accelerator with its precision (`train.mixed_precision` against the launch and the machine)
    and strategy (`model.parallel`). Refused, before anything is written: fewer processes than the launch asked
    for, a precision the machine has not (fp16 on the CPU, bf16 on a GPU without it)."""
    precision = run_precision(mixed_precision)
    try:
        accelerator = make_accelerator(precision, grad_accum, log_with, project_dir)
    except ValueError as e:  # e.g. fp16 requested on a machine without a GPU
        raise FittuneError(f"cannot set up accelerate: {e}") from None
    check_world_size(accelerator.num_processes)
    check_device_precision(precision, accelerator.device)
    return Launched(accelerator, precision, strategy_of(accelerator, parallel))


def sum_across_ranks(accelerator: Accelerator, values: list[float]) -> list[float]:
    """Sum a few scalars over all ranks (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def agree_on_failure(accelerator: Accelerator, failure: Exception | None) -> Exception | None:
    """Every rank learns whether any rank failed (a sum of failure flags; the messages are gathered only
    then), so all stop together and none waits forever in the next collective. A failed rank gets its own
    exception back; the others a FittuneError with the first failed rank's message (only the main process
    prints errors). None when no rank failed."""
    if accelerator.num_processes == 1:
        return failure
    if not sum_across_ranks(accelerator, [1.0 if failure else 0.0])[0]:
        return None
    from accelerate.utils import gather_object

    # every rank calls the gather (a collective), the failed ones included
    kind = "" if failure is None or isinstance(failure, FittuneError) else f"{type(failure).__name__}: "
    messages = gather_object([f"{kind}{failure}" if failure is not None else ""])
    if failure is not None:
        return failure
    rank, message = next((i, m) for i, m in enumerate(messages) if m)
    return FittuneError(f"on process {rank}: {message}")


def raise_if_any_failed(accelerator: Accelerator, failure: Exception | None) -> None:
    """`agree_on_failure`, then raise what it returns on every rank."""
    agreed = agree_on_failure(accelerator, failure)
    if agreed is not None:
        raise agreed


def on_main_then_agree(accelerator: Accelerator, work) -> None:
    """Run `work()` on the main process only, then let every rank know whether it failed: a refusal or a
    failed write on the main process stops every rank instead of leaving them waiting in the next
    collective. The main process re-raises its own exception; the others raise a FittuneError naming it."""
    error = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = e
    raise_if_any_failed(accelerator, error)


def configure_deepspeed(accelerator: Accelerator, strategy: Strategy, micro_batch: int, grad_accum: int,
                        max_grad_norm: float) -> None:
    """Fill the DeepSpeed config's "auto" values from the training recipe, before the engine is built
    (`strategy`: the run's, read from the same config: whether the optimizer is offloaded).

    The recipe owns micro-batch, accumulation, global batch and clipping; an explicit JSON value that
    disagrees is an error (silently training with another batch size is worse). The optimizer and the
    schedule come from `train.*`, so a DeepSpeed `optimizer` / `scheduler` section is refused.
    Precision ("auto" under bf16/fp16) is filled by accelerate from the resolved mixed precision.
    """
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise FittuneError(f"the DeepSpeed config has a '{section}' section: remove it; fittune builds the "
                               f"optimizer and schedule from train.lr / train.lr_scheduler (CPU Adam with offload)")
    owned = {
        "train_micro_batch_size_per_gpu": (micro_batch, "train.micro_batch_size"),
        "gradient_accumulation_steps": (grad_accum, "train.grad_accum"),
        "train_batch_size": (micro_batch * grad_accum * accelerator.num_processes,
                             "train.micro_batch_size x train.grad_accum x processes"),
        # DeepSpeed reads 0 as "no clipping", as fittune does
        "gradient_clipping": (max_grad_norm, "train.max_grad_norm"),
    }
    for key, (value, source) in owned.items():
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif float(current) != float(value):
            raise FittuneError(f"the DeepSpeed config sets {key}={current} but the recipe gives {value} "
                               f"({source}): set it to \"auto\" in the JSON (fittune fills it) or change the recipe")
    zero, on_cpu = ds.get("zero_optimization", {}), accelerator.device.type == "cpu"
    if on_cpu and strategy.offload_optimizer:
        # DeepSpeed's CPU Adam is a C++ extension compiled on first use (2 to 4 minutes on 2 cores); on CPU ranks
        # every state is in CPU RAM anyway, so torch's AdamW steps the offloaded partitions (GPUs keep CPU Adam)
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if on_cpu and zero.get("overlap_comm") and grad_accum > 1:
        # overlap_comm overlaps reduction with backward on a side CUDA stream. DeepSpeed's CPU accelerator has
        # no streams, and with accumulation the reused buckets corrupt gradients (seen on gloo: the grad norm
        # 3.7% off DDP's at step 1, accumulation 2). Off on the CPU; GPUs keep it.
        zero["overlap_comm"] = False
    plugin.set_deepspeed_weakref()  # ZeRO-3 model loading (zero.Init) reads the filled copy
