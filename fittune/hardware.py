"""The machine: what the memory planner plans for (GPU count and memory, CPU RAM, bf16 support), and the
CPU threads a run computes with.

What is not given on the command line is read from this machine (CUDA devices, psutil's total RAM); with no
GPU here the planner plans for one DEFAULT_GPU_MEM_GIB GPU and says so in a note.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from fittune.strategy import Strategy

GIB = 1024**3
DEFAULT_GPU_MEM_GIB = 16.0  # planned for when there is no GPU here and --gpu-mem is not given


@dataclass
class Hardware:
    """The machine planned for."""

    gpus: int
    gpu_mem_gib: float
    """Memory of the smallest GPU."""
    cpu_mem_gib: float
    bf16: bool
    """The GPUs support bf16 (assumed without a GPU here: `bf16_assumed`)."""
    notes: list[str] = field(default_factory=list)
    source: str = ""
    """What was detected rather than given (shown in the plan)."""
    bf16_assumed: bool = False
    """No GPU here to ask: bf16 support is assumed (the planner says what that means for the recipe)."""


@dataclass(frozen=True)
class _LocalGpus:
    count: int
    smallest_gib: float | None
    bf16: bool


def _local_gpus() -> _LocalGpus:
    """The CUDA devices of this machine (none: count 0, bf16 assumed)."""
    if not torch.cuda.is_available():
        return _LocalGpus(0, None, True)
    count = torch.cuda.device_count()
    smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / GIB
    return _LocalGpus(count, smallest, torch.cuda.is_bf16_supported())


def detect_hardware(gpus: int | None, gpu_mem_gib: float | None, cpu_mem_gib: float | None) -> Hardware:
    """Fill what was not given from this machine: CUDA device count and smallest device memory, psutil's
    total RAM. Without a GPU here, plan for 1 GPU x DEFAULT_GPU_MEM_GIB unless told otherwise, and say so."""
    notes, parts = [], []
    if cpu_mem_gib is None and (gpus is not None or gpu_mem_gib is not None):
        # the GPUs given may be another machine's: its RAM decides the offload rows
        notes.append("CPU RAM is this machine's: when planning for another machine, pass its --cpu-mem GiB "
                     "(the offload strategies keep their optimizer states there)")
    local = _local_gpus()
    if gpus is None and local.count:
        gpus = local.count
        parts.append("GPU count detected")
    if gpu_mem_gib is None and local.smallest_gib is not None:
        gpu_mem_gib = local.smallest_gib
        parts.append("GPU memory detected")
    if not local.count:
        if gpus is None or gpu_mem_gib is None:
            missing = " and ".join(f for f, v in (("--gpus", gpus), ("--gpu-mem", gpu_mem_gib)) if v is None)
            notes.append(f"no CUDA GPU on this machine and no {missing}: planning for "
                         f"{gpus or 1} GPU{'s' if (gpus or 1) > 1 else ''} x {gpu_mem_gib or DEFAULT_GPU_MEM_GIB:g} "
                         f"GiB; pass --gpus N --gpu-mem GiB for your hardware")
        gpus = 1 if gpus is None else gpus  # a 0 given stays 0 (refused by the planner), not one GPU
        gpu_mem_gib = DEFAULT_GPU_MEM_GIB if gpu_mem_gib is None else gpu_mem_gib
    if cpu_mem_gib is None:
        cpu_mem_gib = psutil.virtual_memory().total / GIB
        parts.append("CPU RAM detected")
    source = ", ".join(parts) if parts else "as given"
    return Hardware(gpus, float(gpu_mem_gib), float(cpu_mem_gib), local.bf16, notes, source,
                    bf16_assumed=not local.count)


@dataclass(frozen=True)
class CpuThreads:
    """The CPU threads each process of a run computes with, and why."""

    count: int
    why: str
    """For the run log; empty when the count is left as launched."""


def _cgroup_cpu_limit() -> int | None:
    """The CPUs a container's CPU quota allows (cgroup v2 cpu.max, v1 cfs_quota_us), None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    return max(1, int(int(quota) / int(period)))


def physical_cores() -> int:
    """The physical cores this process may use: hyper-threads do not speed up Adam's arithmetic, and a CPU
    affinity mask or a container's CPU quota (Docker --cpus, Kubernetes limits) limit it further."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limits = [psutil.cpu_count(logical=False) or usable, usable, _cgroup_cpu_limit() or usable]
    return max(1, min(limits))


def choose_cpu_threads(requested: int, cpu_work: str, local_processes: int, current: int, cores: int) -> CpuThreads:
    """train.cpu_threads if set (not 0); else, when the process does heavy work on the CPU (`cpu_work` says
    which) and was launched with the launchers' one thread, `cores` split over the `local_processes` on this
    machine; else as launched (a count above 1 that the user chose, OMP_NUM_THREADS or
    --num_cpu_threads_per_process, is kept; one thread is kept with train.cpu_threads: 1)."""
    if requested:
        return CpuThreads(requested, "train.cpu_threads")
    share = max(1, cores // max(1, local_processes))
    if not cpu_work or current != 1 or share == 1:
        return CpuThreads(current, "")
    return CpuThreads(share, f"{cpu_work}: {cores} physical cores / {local_processes} process(es) on this "
                             f"machine; it was launched with {current} (set train.cpu_threads to choose)")


def run_cpu_threads(requested: int, strategy: Strategy, device: torch.device) -> CpuThreads:
    """choose_cpu_threads for this process: its strategy and device, the processes on this machine
    (LOCAL_WORLD_SIZE, set by the launcher), its threads now and the physical cores."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cpu":
        # one process: accelerate launches it with one thread unless its config says use_cpu (several CPU
        # processes: accelerate's use_cpu configs split the cores already, and a count of 1 is kept)
        work = "the model runs on the CPU" if local == 1 else ""
    else:
        work = "the optimizer step runs on the CPU" if strategy.steps_on_cpu else ""
    return choose_cpu_threads(requested, work, local, torch.get_num_threads(), physical_cores())


def set_cpu_threads(threads: CpuThreads) -> None:
    """Apply `threads` to torch's OpenMP pool, which DeepSpeed's CPU Adam shares (its extension links no
    OpenMP of its own), and to OMP_NUM_THREADS for any OpenMP runtime loaded after this."""
    torch.set_num_threads(threads.count)
    os.environ["OMP_NUM_THREADS"] = str(threads.count)


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
