"""Peak memory of one strategy at one micro-batch size: per GPU and in CPU RAM, from named terms.

  weights      parameters resident on the GPU, in the dtype they are kept in by that strategy;
  gradients    one per trainable parameter (sharded by ZeRO / FSDP, moved to the CPU by offload); with the
               optimizer in backward (train.optimizer_in_backward) only the largest tensor's at a time;
  optimizer    AdamW's two moments (exp_avg, exp_avg_sq) in the trainable parameter's dtype (fp32, or bf16
               for bf16 weights), or torchao's 8-/4-bit blocks (train.optimizer, fittune.optim.state_bytes:
               exact per tensor), plus an fp32 master copy where the engine keeps the module in half
               precision (DeepSpeed);
  activations  what autograd saves in forward for backward (fittune/activations.py), or with gradient
               checkpointing each layer's input, plus the layer being back-propagated;
  logits/loss  the vocabulary-sized tensors of the output head and the cross-entropy (logits_bytes);
  transients   copies that live only in part of the step: autocast's half-precision weight copies, gathered
               (un-sharded) layers, the optimizer step's temporaries;
  overhead     CUDA context + allocator slack, a fixed CUDA_OVERHEAD_GIB, shown separately (it is not part of
               torch.cuda.max_memory_allocated, which the other terms predict).

Peak per GPU = weights + gradients + optimizer + max(forward/backward peak, optimizer-step temporaries)
+ overhead, where the forward/backward peak is the kept activations + weight copies + the larger of the
logits/loss term and the layer being back-propagated (they are never live together). Gradients are counted
as live during forward, which is true from the second micro-batch of an accumulation on (grad_accum > 1);
without accumulation they count in the optimizer-step phase instead (Estimate.gpu_peak). Sequences are
planned padded to data.max_length (the worst case; length grouping usually pads less).

Checked against torch.cuda.max_memory_allocated on an H200 (Qwen2.5-3B shape, random weights, bf16,
accelerate autocast, standard loss, 1024 tokens, accumulation 2, steady-state step): LoRA r=16 micro-batch 4
with / without checkpointing 13.95 / 36.84 GiB measured vs 13.80 / 36.73 predicted; full fine-tuning
micro-batch 2 with / without checkpointing 57.56 / 66.48 measured vs 57.48 / 66.22 predicted. The per-layer
saved-tensor bytes were also matched exactly on the CPU with saved_tensors_hooks. DeepSpeed, FSDP2, the
device map and the chunked loss are not measured yet.

The strategy is a `fittune.strategy.Strategy`; every decision here asks its fields (sharded, deepspeed,
zero_stage, fsdp, offload_optimizer, offload_params, device_map, ddp), never its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from fittune.activations import (
    DEFAULT_LOSS_CHUNK,
    FP32,
    HALF,
    ActivationDtypes,
    activation_dtypes,
    activation_terms,
    base_itemsize,
    logits_bytes,
)
from fittune.errors import FittuneError
from fittune.hardware import GIB
from fittune.model_shapes import ModelShape
from fittune.optim import QUANTIZE_MIN, state_bytes
from fittune.precision import Precision
from fittune.strategy import Strategy

ADAM_MOMENTS = 2  # exp_avg + exp_avg_sq, each the size (and dtype) of the trainable parameter

# ---- fixed overheads (clearly not derived from the model) ----------------------------------------------
CUDA_OVERHEAD_GIB = 1.0  # CUDA context + cuBLAS workspaces (~0.5 GiB) + allocator fragmentation (~0.5 GiB)
HOST_PROCESS_GIB = 2.0  # CPU RAM of one training process before the model: Python, torch, CUDA runtime
CHECKPOINT_SHARD_GIB = 5.0  # hub checkpoints are saved in shards of at most 5 GB, loaded one at a time

# ---- engine constants -----------------------------------------------------------------------------------
DS_BUCKET_BUFFERS = 2  # DeepSpeed's gradient reduce buckets are double-buffered with overlap_comm (ds_configs)
ZERO3_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed default sub_group_size: fp32 grads are made per sub-group


@dataclass(frozen=True)
class Workload:
    """What one process runs per micro-batch."""

    micro_batch: int
    seq_len: int
    checkpointing: bool
    loss_chunk: int
    """train.loss_chunk_size (0: the standard loss)."""
    precision: Precision
    """The run's mixed precision."""
    optimizer: str = "adamw"
    """train.optimizer: the moments' bytes (fittune.optim.state_bytes)."""
    in_backward: bool = False
    """train.optimizer_in_backward: one gradient at a time instead of a full set."""


@dataclass
class Estimate:
    """Predicted memory of one strategy at one micro-batch size, bytes on the busiest GPU."""

    strategy: Strategy
    """The strategy estimated; where the GPUs suffice, with its world size set to `processes`."""
    processes: int
    micro_batch: int
    grad_accum: int
    gpu: dict[str, int]
    """Resident for the whole step: weights, gradients, optimizer states."""
    gpu_pass: dict[str, int]
    """Live during forward/backward on top of `gpu`: 'activations' (kept), 'layer backward', 'logits/loss',
    and 'weight copies' / 'gathered layers' where the strategy has them. 'layer backward' and
    'logits/loss' are never live together: the peak counts the larger."""
    gpu_step: dict[str, int]
    """Live during the optimizer step on top of `gpu` (activations are freed by then)."""
    cpu: dict[str, int]
    """CPU RAM of all processes on the machine."""
    explain: dict[str, str] = field(default_factory=dict)
    activations_other: int = 0
    """Activations (kept + layer backward) with the other gradient-checkpointing choice, for comparison."""
    logits_other: int = 0
    """Logits term with the other loss (standard vs chunked), for comparison."""
    overhead: int = int(CUDA_OVERHEAD_GIB * GIB)
    applicable: bool = True
    why_not: str = ""
    """Why the strategy does not apply to this hardware (e.g. it needs several GPUs)."""
    fits: bool = False
    limit: str = ""
    """What is exceeded when it does not fit: 'GPU memory', 'CPU RAM' or both."""

    @property
    def activations(self) -> int:
        """Kept activations + the layer being back-propagated (what the table shows as A)."""
        return self.gpu_pass["activations"] + self.gpu_pass["layer backward"]

    @property
    def pass_peak(self) -> int:
        """Forward/backward transients at their peak: everything but the smaller of the two exclusive terms."""
        p = self.gpu_pass
        return sum(p.values()) - min(p["layer backward"], p["logits/loss"])

    @property
    def gpu_peak(self) -> int:
        """torch.cuda.max_memory_allocated predicted for the busiest GPU (no overhead).

        Without accumulation (grad_accum 1) on the native path, the gradients do not exist during the forward
        pass (zero_grad(set_to_none)) and grow while backward frees the activations: they then count in the
        optimizer-step phase instead of on top of the forward/backward transients. Measured on an H200 for
        the 3B full fine-tune at 2 x 1024: 47.23 GiB, where counting them twice predicted 57.5 GiB."""
        step = sum(self.gpu_step.values())
        if self.grad_accum == 1 and not self.strategy.sharded:
            grads = self.gpu.get("gradients", 0)
            return sum(self.gpu.values()) - grads + max(self.pass_peak, grads + step)
        return sum(self.gpu.values()) + max(self.pass_peak, step)

    @property
    def gpu_total(self) -> int:
        """GPU memory needed: the allocated peak plus the fixed overhead."""
        return self.gpu_peak + self.overhead

    @property
    def cpu_total(self) -> int:
        """CPU RAM needed by all processes on the machine."""
        return sum(self.cpu.values())


def processes(strategy: Strategy, gpus: int) -> int:
    """Processes `strategy` launches on `gpus` GPUs."""
    return gpus if strategy.one_process_per_gpu else 1


def min_gpus(strategy: Strategy) -> int:
    """GPUs `strategy` needs: its world size (one per process), and 2 for a device map."""
    return max(strategy.world_size, 2 if strategy.device_map else 1)


def estimate(strategy: Strategy, shape: ModelShape, work: Workload, gpus: int) -> Estimate:
    """Predict per-GPU and CPU memory of `strategy` on `gpus` GPUs for one micro-batch size.

    The activations and logits are common to all strategies (in the strategy's dtypes, activation_dtypes);
    what each strategy keeps resident is in _native, _deepspeed, _fsdp2 and _device_map. CPU RAM:
    HOST_PROCESS_GIB per process plus what each process materialises while loading (the whole model, or one
    checkpoint shard at a time under ZeRO-3's zero.Init and for a device map) plus offloaded states. A
    strategy that needs more GPUs than `gpus` is still estimated (on `gpus`, for reference) and marked not
    applicable. The result's grad_accum is 0: the caller sets it (it changes the peak, see gpu_peak).
    """
    procs = processes(strategy, gpus)
    dt = activation_dtypes(strategy, shape, work.precision)
    if strategy.device_map:
        est = _device_map(strategy, shape, work, dt, gpus)
    else:
        res = _resident(strategy, shape, work, procs)
        other = _pass_terms(shape, dt, work, checkpointing=not work.checkpointing)
        est = Estimate(strategy, procs, work.micro_batch, 0, res.gpu, _pass_terms(shape, dt, work) | res.gpu_pass,
                       res.gpu_step, res.cpu, res.explain,
                       activations_other=other["activations"] + other["layer backward"],
                       logits_other=_other_loss_logits(shape, dt, work))
    need = min_gpus(strategy)
    if gpus < need:
        est.applicable, est.why_not = False, f"needs {need}+ GPUs"
    else:
        est.strategy = replace(strategy, world_size=procs)  # as it launches on these GPUs
    return est


@dataclass
class _Resident:
    """What one strategy adds to the common activations: resident state, transients, CPU RAM."""

    gpu: dict[str, int]
    gpu_step: dict[str, int]
    cpu: dict[str, int]
    gpu_pass: dict[str, int] = field(default_factory=dict)
    """'weight copies' / 'gathered layers', where the strategy has them."""
    explain: dict[str, str] = field(default_factory=dict)


def _resident(strategy: Strategy, shape: ModelShape, work: Workload, procs: int) -> _Resident:
    """The strategy's own memory terms on each of its `procs` processes' GPUs."""
    if not strategy.sharded:
        return _native(strategy, shape, work, procs)
    if strategy.deepspeed and strategy.zero_stage >= 2:
        return _deepspeed(strategy, shape, work, procs)
    if strategy.fsdp and not strategy.offload_params:
        return _fsdp2(shape, work, procs)
    raise FittuneError(f"the memory planner has no model of {strategy.name} yet: it knows single, ddp, zero2, "
                       f"zero3 (with or without offload), fsdp2 and device_map")


def _half(work: Workload) -> bool:
    return work.precision.half


def _module_width(shape: ModelShape, work: Workload) -> int:
    """Bytes per parameter of a module an engine keeps in the compute dtype (DeepSpeed, FSDP2 param_dtype)."""
    return HALF if _half(work) else base_itemsize(shape)


def _loaded_bytes(shape: ModelShape, frozen: int | None = None, trainable: int | None = None) -> int:
    """Bytes of parameters as fittune loads them (default: the whole model), what from_pretrained
    materialises in each process."""
    frozen = shape.frozen_params if frozen is None else frozen
    trainable = shape.trainable_params if trainable is None else trainable
    return frozen * shape.frozen_itemsize + trainable * shape.trainable_itemsize


def _cpu(procs: int, loaded_per_process: int) -> dict[str, int]:
    """CPU RAM of `procs` processes that each materialise `loaded_per_process` bytes while loading."""
    return {"processes": procs * int(HOST_PROCESS_GIB * GIB), "model load": procs * loaded_per_process}


def _checkpoint_shard(shape: ModelShape) -> int:
    """The most one process holds while loading shard by shard (zero.Init, device map)."""
    return min(_loaded_bytes(shape), int(CHECKPOINT_SHARD_GIB * GIB))


def _native(strategy: Strategy, shape: ModelShape, work: Workload, procs: int) -> _Resident:
    """No sharding engine (one process, DDP): weights as fittune loads them (fp32 for full fine-tuning: they
    are their own fp32 master copy; LoRA: half base + fp32 adapters), gradients and AdamW moments in the
    trainable dtype; under autocast the half copies of fp32 trainable matmul weights are cached for the
    forward (2 B each). DDP adds its gradient buckets (a second copy of the gradients:
    gradient_as_bucket_view is off by default)."""
    t, ti = shape.trainable_params, shape.trainable_itemsize
    loaded = _loaded_bytes(shape)
    # fittune steps with fused AdamW on CUDA: in place, no per-parameter temporaries. Measured on an H200,
    # 3B full fine-tune 2 x 1024, accumulation 1: 47.23 GiB = weights + gradients + moments + 1.2 GiB
    res = _Resident(gpu={"weights": loaded, "gradients": t * ti, "optimizer": _optimizer_bytes(shape, work)},
                    gpu_step={"optimizer step": _lowbit_step_temp(shape, work)}, cpu=_cpu(procs, loaded))
    _explain_optimizer(res, shape, work)
    if work.in_backward:
        res.gpu["gradients"] = max(trainable_numels(shape)) * ti
        res.explain["gradients"] = ("one gradient at a time (optimizer in backward): the largest trainable "
                                    "tensor's" + (", the tied embedding, held from the output head's backward to "
                                                  "the embedding's" if shape.tie_word_embeddings else ""))
    if _half(work) and ti == FP32:
        res.gpu_pass["weight copies"] = HALF * shape.autocast_cast_params
        res.explain["weight copies"] = "autocast's half copies of the fp32 trainable matmul weights (forward)"
    if strategy.ddp:
        res.gpu["gradients"] += t * ti
        res.explain["gradients"] = "gradients + DDP's reducer buckets (a second copy)"
    return res


def trainable_numels(shape: ModelShape) -> list[int]:
    """Element counts of every trainable tensor (what torchao quantizes tensor by tensor): per decoder layer
    its projections' weights, the q/k/v biases (Qwen2) and the two norms, then the embedding, a separate
    head and the final norm. Whatever the layer holds beyond these (other biases) is one small tensor."""
    if shape.lora:
        return [shape.trainable_params]  # LoRA never uses the low-bit states (fittune.optim.unsupported)
    layer = [p.in_features * p.out_features for p in shape.projections]
    qkv_bias = [shape.projection(n).out_features for n in ("q_proj", "k_proj", "v_proj")]
    norms = [shape.hidden_size] * 2 if shape.norm_trainable else []
    rest = shape.layer_params - sum(layer) - sum(norms)
    layer += norms + (qkv_bias if rest == sum(qkv_bias) else [rest] if rest else [])
    out = layer * shape.num_layers + [shape.embed_params] + ([shape.head_params] if shape.head_params else [])
    left = shape.trainable_params - sum(out)
    return out + ([left] if left > 0 else [])  # the final norm


def _optimizer_bytes(shape: ModelShape, work: Workload) -> int:
    """AdamW's two moments for every trainable tensor (fittune.optim.state_bytes: fp32/bf16, or torchao's
    8-/4-bit blocks with their scales; tensors too small to quantize stay in the weights' dtype)."""
    if work.optimizer == "adamw":
        return ADAM_MOMENTS * shape.trainable_params * shape.trainable_itemsize
    return state_bytes(trainable_numels(shape), work.optimizer, shape.trainable_itemsize)


def _lowbit_step_temp(shape: ModelShape, work: Workload) -> int:
    """torchao's low-bit step of one tensor (it steps one tensor at a time): both moments in fp32 while they
    are re-quantized block by block (2 x 4 B per element of the largest tensor), the rest of its compiled
    step being element-wise. An upper estimate, not yet measured (bench/run_gpu_fullft.sh measures it).
    0 for torch's fused AdamW (in place) and torchao's bf16 AdamW (element-wise, moments in bf16)."""
    if work.optimizer == "adamw":
        return 0
    return ADAM_MOMENTS * FP32 * max(trainable_numels(shape))


def _explain_optimizer(res: _Resident, shape: ModelShape, work: Workload) -> None:
    if work.optimizer != "adamw":
        bits = "8-bit" if work.optimizer == "adamw8bit" else "4-bit"
        res.explain["optimizer"] = (f"2 AdamW moments, {bits} blocks + fp32 scales (torchao; tensors under "
                                    f"{QUANTIZE_MIN} elements in {shape.trainable_itemsize} B)")
    if res.gpu_step["optimizer step"]:
        res.explain["optimizer step"] = "fp32 copies of the largest tensor's two moments while re-quantized"


def _deepspeed(strategy: Strategy, shape: ModelShape, work: Workload, procs: int) -> _Resident:
    """DeepSpeed ZeRO-2/3: the engine keeps the module in the half dtype (2 B/param), an fp32 master copy + 2
    fp32 moments (12 B/trainable param) and half gradients, sharded over the processes (ZeRO-2: optimizer
    states and gradients; ZeRO-3: parameters too, gathered a layer or two at a time), plus double-buffered
    reduce buckets of hidden^2 elements (accelerate's "auto" reduce_bucket_size); the step upcasts the
    gradient partition to fp32 and AdamW makes one more fp32 temporary. offload_optimizer moves master +
    moments + fp32 gradients (16 B/trainable param) to pinned CPU RAM, offload_params (ZeRO-3) the half
    parameters."""
    n, t = shape.total_params, shape.trainable_params
    width = _module_width(shape, work)
    bucket = DS_BUCKET_BUFFERS * min(shape.hidden_size**2, t) * width
    master_and_moments = (FP32 + ADAM_MOMENTS * FP32) * t
    stage3 = strategy.zero_stage == 3
    params_offloaded = stage3 and strategy.offload_params
    res = _Resident(gpu={}, gpu_step={},
                    cpu=_cpu(procs, _checkpoint_shard(shape) if stage3 else _loaded_bytes(shape)))
    weights = 0 if params_offloaded else (n * width // procs if stage3 else n * width)
    if stage3:
        res.gpu_pass["gathered layers"] = _gathered_params(shape) * width
        res.explain["gathered layers"] = "parameters all-gathered for the layer computed + the one prefetched"
    if strategy.offload_optimizer:
        res.gpu = {"weights": weights, "gradients": bucket, "optimizer": 0}
        res.explain["gradients"] = "reduce buckets only (the gradients go to CPU RAM)"
        res.cpu["offloaded optimizer"] = master_and_moments + FP32 * t
    else:
        res.gpu = {"weights": weights, "gradients": t * width // procs + bucket,
                   "optimizer": master_and_moments // procs}
        part = t // procs if not stage3 else min(t // procs, ZERO3_SUB_GROUP_SIZE)
        res.gpu_step = {"fp32 gradients + AdamW temp": 2 * FP32 * part}
        res.explain["gradients"] = f"{width} B per trainable parameter, sharded / {procs}, + reduce buckets"
    if params_offloaded:
        res.cpu["offloaded parameters"] = n * width
    res.explain["weights"] = f"{n:,} x {width} B" + (
        "" if not stage3 else " in CPU RAM" if params_offloaded else f", sharded / {procs}")
    res.explain["optimizer"] = "fp32 master + 2 fp32 AdamW moments (12 B per trainable parameter)" + (
        ", in CPU RAM" if strategy.offload_optimizer else f", sharded / {procs}")
    return res


def _gathered_params(shape: ModelShape) -> int:
    """Parameters un-sharded at once under ZeRO-3: the layer being computed and the one prefetched, or a
    layer and the (large) embedding / output head while those are gathered."""
    return shape.layer_params + max(shape.layer_params, shape.embed_params, shape.head_params)


def _fsdp2(shape: ModelShape, work: Workload, procs: int) -> _Resident:
    """FSDP2: sharded parameters (trainable ones upcast to fp32 by accelerate under mixed precision),
    gradients and moments; layers are all-gathered in the half param_dtype, the output head (accelerate's
    tail group) stays gathered, and one layer's un-sharded half gradients wait for the reduce-scatter."""
    f, t = shape.frozen_params, shape.trainable_params
    width = _module_width(shape, work)
    train_b = FP32 if _half(work) else shape.trainable_itemsize
    tail = shape.head_params or shape.embed_params
    gpu = {"weights": (f * shape.frozen_itemsize + t * train_b) // procs, "gradients": t * train_b // procs,
           "optimizer": ADAM_MOMENTS * t * train_b // procs}
    return _Resident(
        gpu=gpu, gpu_step={"optimizer step": t * train_b // procs}, cpu=_cpu(procs, _loaded_bytes(shape)),
        gpu_pass={"gathered layers": (tail + 2 * shape.layer_params) * width + shape.layer_trainable * width},
        explain={"gathered layers": "output head (kept gathered) + layer computed + layer prefetched, "
                                    "+ one layer's un-sharded gradients",
                 "weights": f"sharded / {procs} (trainable parameters in fp32)",
                 "gradients": f"{train_b} B per trainable parameter, sharded / {procs}",
                 "optimizer": f"2 AdamW moments x {train_b} B per trainable parameter, sharded / {procs}"})


def _pass_terms(shape: ModelShape, dt: ActivationDtypes, work: Workload, num_layers: int | None = None,
                has_head: bool = True, checkpointing: bool | None = None) -> dict[str, int]:
    """{'activations', 'layer backward', 'logits/loss'} for `num_layers` layers (default all); `has_head`:
    whether this GPU computes the final norm, output head and loss."""
    ckpt = work.checkpointing if checkpointing is None else checkpointing
    terms = activation_terms(shape, dt, work.micro_batch, work.seq_len, ckpt, work.loss_chunk > 0, num_layers)
    backward = terms.pop("layer backward")
    if not has_head:
        terms.pop("final norm / head input")
    logits = logits_bytes(shape, dt, work.micro_batch, work.seq_len, work.loss_chunk) if has_head else 0
    return {"activations": sum(terms.values()), "layer backward": backward, "logits/loss": logits}


def _other_loss_logits(shape: ModelShape, dt: ActivationDtypes, work: Workload) -> int:
    """The logits term with the other loss (chunked at DEFAULT_LOSS_CHUNK when the recipe's is standard)."""
    other_chunk = 0 if work.loss_chunk > 0 else DEFAULT_LOSS_CHUNK
    return logits_bytes(shape, dt, work.micro_batch, work.seq_len, other_chunk)


def _device_map(strategy: Strategy, shape: ModelShape, work: Workload, dt: ActivationDtypes,
                gpus: int) -> Estimate:
    """The busiest GPU of a device map: ceil(layers / gpus) layers, plus the embedding on the first GPU and
    the output head (with the logits) on the GPU that holds it (the first one when tied to the embedding).
    Each GPU keeps the weights, gradients, AdamW moments, activations and autocast copies of its own
    layers; one process, so CPU RAM is one process loading shard by shard onto the GPUs."""
    per_gpu = math.ceil(shape.num_layers / gpus)
    layer_f = shape.layer_params - shape.layer_trainable
    ti, fi = shape.trainable_itemsize, shape.frozen_itemsize
    embed_b = shape.embed_params * (ti if shape.embed_trainable else fi)
    embed_t = shape.embed_params if shape.embed_trainable else 0
    head_b = shape.head_params * (ti if shape.head_trainable else fi)
    head_t = shape.head_params if shape.head_trainable else 0
    candidates = []
    for first in (True, False):  # the first GPU (embedding) and the last one (untied head)
        has_head = gpus == 1 or shape.tie_word_embeddings == first
        holds_tail = not first or gpus == 1  # the separate output head sits on the last GPU
        trainable = per_gpu * shape.layer_trainable + (embed_t if first else 0) + (head_t if holds_tail else 0)
        weights = (per_gpu * _loaded_bytes(shape, layer_f, shape.layer_trainable) + (embed_b if first else 0)
                   + (head_b if holds_tail else 0))
        share = trainable / max(shape.trainable_params, 1)  # this GPU's part of the optimizer states
        grads = min(trainable, max(trainable_numels(shape))) if work.in_backward else trainable
        gpu = {"weights": weights, "gradients": grads * ti, "optimizer": int(_optimizer_bytes(shape, work) * share)}
        gpu_pass = _pass_terms(shape, dt, work, per_gpu, has_head)
        if _half(work) and ti == FP32:  # autocast copies of this GPU's share of the fp32 trainable weights
            gpu_pass["weight copies"] = HALF * shape.autocast_cast_params * trainable // max(
                shape.trainable_params, 1)
        other = _pass_terms(shape, dt, work, per_gpu, has_head, checkpointing=not work.checkpointing)
        candidates.append(Estimate(
            strategy, 1, work.micro_batch, 0, gpu, gpu_pass, {"optimizer step": 0},  # fused AdamW
            _cpu(1, _checkpoint_shard(shape)),
            {"weights": f"{per_gpu} of {shape.num_layers} layers on this GPU (+ the embedding / output head "
                        f"where they sit)"},
            activations_other=other["activations"] + other["layer backward"],
            logits_other=_other_loss_logits(shape, dt, work) if has_head else 0))
    return max(candidates, key=lambda e: e.gpu_peak)
