"""The parallel strategy of a run, decided once, right after the accelerator exists, and asked everywhere.

A `Strategy` is a plain value with boolean properties (the idea of torchtitan's `ParallelDims`): code asks
`strategy.gathers_weights`, never compares engine names. This is the only module that reads accelerate's
`distributed_type` or the DeepSpeed / FSDP plugin settings to decide; `fittune.distributed`, which creates the
accelerator, is the only one that writes them (real CPU ranks, DeepSpeed's batch keys) and reads the launch's
request before the accelerator exists. The same names are used by the planner
(`fittune-plan`), the run facts in `config.yaml`, checkpoints, logs and errors:

    single, ddp, zero1, zero2, zero2_offload, zero3, zero3_offload, fsdp2, fsdp2_offload, device_map
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fittune.errors import FittuneError

NAMES = ("single", "ddp", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp2", "fsdp2_offload",
         "device_map")


@dataclass(frozen=True)
class Strategy:
    """How the model, its gradients and optimizer states are spread over processes and devices."""

    world_size: int = 1
    """Number of training processes (all nodes)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (1-3); 0 when DeepSpeed is not in use."""
    fsdp: bool = False
    """PyTorch FSDP2 (`fully_shard`): weights, gradients and optimizer states sharded over the processes."""
    offload_optimizer: bool = False
    """Optimizer states (and the optimizer step) in CPU RAM (DeepSpeed offload_optimizer)."""
    offload_params: bool = False
    """Weights kept in CPU RAM between uses (DeepSpeed offload_param, FSDP2 offload_params)."""
    device_map: bool = False
    """One process with the decoder layers spread over several devices (`model.parallel: auto`)."""

    @property
    def deepspeed(self) -> bool:
        """The DeepSpeed engine owns the backward pass and the optimizer step."""
        return self.zero_stage > 0

    @property
    def sharded(self) -> bool:
        """An engine (DeepSpeed or FSDP2) shards training state across the processes."""
        return self.deepspeed or self.fsdp

    @property
    def ddp(self) -> bool:
        """Several processes, each with a full replica (plain data parallel)."""
        return self.world_size > 1 and not self.sharded

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def plain(self) -> bool:
        """One process with a plain PyTorch model: no replicas to keep in step, no engine owning the backward
        pass or the optimizer step (a single GPU, the device map)."""
        return not (self.distributed or self.sharded)

    @property
    def gathers_weights(self) -> bool:
        """The forward pass all-gathers weights with collectives (ZeRO-3, FSDP2): every rank must run the
        same number of forward calls, and a rank that fails mid-forward would leave the others waiting."""
        return self.zero_stage == 3 or self.fsdp

    @property
    def forwards_in_lockstep(self) -> bool:
        """Every process must make the same forward calls, even one with no rows left (weights gathered by
        collectives over several processes): generation keeps stepping until every process is done."""
        return self.gathers_weights and self.distributed

    @property
    def engine_steps(self) -> bool:
        """An engine (DeepSpeed) clips the gradients and steps the optimizer inside the backward pass of a
        step's last micro-batch, and divides the loss by its own accumulation count: the loop only reads the
        norm and whether it stepped."""
        return self.deepspeed

    @property
    def reduces_in_backward(self) -> bool:
        """The engine reduces gradients inside its backward pass (DeepSpeed ZeRO, FSDP2): the reduction cannot be
        deferred to the step's end, as it is for DDP."""
        return self.sharded

    @property
    def one_process_per_gpu(self) -> bool:
        """DDP and the sharding engines launch one process per GPU; a single GPU and the device map (one process
        whose layers span the GPUs) one process in all."""
        return not self.plain

    @property
    def single_gpu(self) -> bool:
        """One process on one GPU: no replicas, no sharding engine, no device map."""
        return self.plain and not self.device_map

    @property
    def offload(self) -> bool:
        """Any training state lives in CPU RAM."""
        return self.offload_optimizer or self.offload_params

    @property
    def steps_on_cpu(self) -> bool:
        """The optimizer step runs on the CPU (DeepSpeed's CPU Adam; FSDP2 offload steps the CPU shards)."""
        return self.offload_optimizer or (self.fsdp and self.offload_params)

    @property
    def name(self) -> str:
        """The strategy's name (see the module docstring), shared by the planner, logs and checkpoints."""
        if self.device_map:
            return "device_map"
        if self.deepspeed:
            return f"zero{self.zero_stage}" + ("_offload" if self.offload else "")
        if self.fsdp:
            return "fsdp2" + ("_offload" if self.offload_params else "")
        return "ddp" if self.world_size > 1 else "single"

    @property
    def label(self) -> str:
        """The name with what it offloads, for people (`zero3_offload (optimizer, params), 2 processes`)."""
        what = [w for w, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        return self.name + (f" ({', '.join(what)})" if what else "") + f", {self.world_size} process(es)"

    @classmethod
    def named(cls, name: str, world_size: int = 1) -> Strategy:
        """The strategy a planner row stands for (`zero2_offload` offloads the optimizer, `zero3_offload`
        the optimizer and the weights, as the shipped ds_configs do)."""
        if name not in NAMES:
            raise ValueError(f"unknown strategy '{name}' (known: {', '.join(NAMES)})")
        offload = name.endswith("_offload")
        if name.startswith("zero"):
            stage = int(name[4])
            return cls(world_size, zero_stage=stage, offload_optimizer=offload, offload_params=offload and stage == 3)
        if name.startswith("fsdp2"):
            return cls(world_size, fsdp=True, offload_params=offload)
        return cls(world_size, device_map=name == "device_map")


def strategy_of(accelerator, parallel: str = "none") -> Strategy:
    """Read the strategy the launch set up (the accelerate state and its DeepSpeed / FSDP plugin);
    `parallel` is `model.parallel` (`auto`: the one-process device map)."""
    launched = _launched(accelerator)
    if parallel != "auto":
        return launched
    if not launched.plain:
        # one process drives several GPUs; a distributed launch would place the whole model on the same GPUs
        raise FittuneError(f"model.parallel: auto splits one model across the GPUs of a single process, but this "
                           f"launch is distributed ({launched.label}): launch with --num_processes 1, or drop "
                           f"model.parallel and shard with FSDP2 / ZeRO-3")
    return replace(launched, device_map=True)


def _launched(accelerator) -> Strategy:
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED":
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if int(zero.get("stage", 0)) == 0:
            raise FittuneError("the DeepSpeed config uses ZeRO stage 0 (no sharding): use DDP instead "
                               "(accelerate_configs/multi_gpu.yaml), or a ZeRO-2/3 config")

        def on(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") not in ("none", None)

        return Strategy(accelerator.num_processes, zero_stage=int(zero["stage"]),
                        offload_optimizer=on("offload_optimizer"), offload_params=on("offload_param"))
    if kind == "FSDP":
        from torch.distributed.fsdp import CPUOffloadPolicy

        offload = isinstance(accelerator.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy)
        return Strategy(accelerator.num_processes, fsdp=True, offload_params=offload)
    return Strategy(accelerator.num_processes)


def fsdp_version(accelerator) -> int | None:
    """The FSDP version the launch asked for (None when FSDP is not in use)."""
    if accelerator.distributed_type.value != "FSDP":
        return None
    return int(accelerator.state.fsdp_plugin.fsdp_version)
