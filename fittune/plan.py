"""Memory planner: will this recipe fit this hardware, with which strategy, and how do I launch it?

    python -m fittune.plan --config configs/qwen2.5-3b-lora.yaml [--gpus N --gpu-mem GiB --cpu-mem GiB] [--a.b v ...]

The model is counted on the meta device (fittune/model_shapes.py: exact parameter counts, no download). For
every strategy fittune can launch, the peak memory per GPU and in CPU RAM is predicted from named terms:

  weights      parameters resident on the GPU, in the dtype they are kept in by that strategy;
  gradients    one per trainable parameter (sharded by ZeRO / FSDP, moved to the CPU by offload);
  optimizer    AdamW's two moments (exp_avg, exp_avg_sq) in the trainable parameter's dtype (fp32), plus an
               fp32 master copy where the engine keeps the module in half precision (DeepSpeed);
  activations  what autograd saves in forward for backward (layer_activation_terms), or with gradient
               checkpointing each layer's input, plus the layer being back-propagated (activation_terms);
  logits/loss  the vocabulary-sized tensors of the output head and the cross-entropy (logits_bytes);
  transients   copies that live only in part of the step: autocast's half-precision weight copies, gathered
               (un-sharded) layers, the optimizer step's temporaries;
  overhead     CUDA context + allocator slack, a fixed CUDA_OVERHEAD_GIB, shown separately (it is not part of
               torch.cuda.max_memory_allocated, which the other terms predict).

Peak per GPU = weights + gradients + optimizer + max(forward/backward peak, optimizer-step temporaries)
+ overhead, where the forward/backward peak is the kept activations + weight copies + the larger of the
logits/loss term and the layer being back-propagated (they are never live together). Gradients are counted
as live during forward, which is true from the second micro-batch of an accumulation on (grad_accum > 1)
and over-estimates by the gradient term at grad_accum = 1. Sequences are planned padded to data.max_length
(the worst case; length grouping usually pads less).

Checked against torch.cuda.max_memory_allocated on an H200 (Qwen2.5-3B shape, random weights, bf16,
accelerate autocast, standard loss, 1024 tokens, accumulation 2, steady-state step): LoRA r=16 micro-batch 4
with / without checkpointing 13.95 / 36.84 GiB measured vs 13.80 / 36.73 predicted; full fine-tuning
micro-batch 2 with / without checkpointing 57.56 / 66.48 measured vs 57.48 / 66.22 predicted. The per-layer
saved-tensor bytes were also matched exactly on the CPU with saved_tensors_hooks. DeepSpeed, FSDP2, the
device map and the chunked loss are not measured yet.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fittune.config import Config
from fittune.errors import FittuneError
from fittune.model_shapes import ModelShape, model_shape

GIB = 1024**3
REPO_ROOT = Path(__file__).resolve().parents[1]

# ---- element sizes and counts (bytes) ------------------------------------------------------------------
FP32 = 4
HALF = 2  # bf16 or fp16
ADAM_MOMENTS = 2  # exp_avg + exp_avg_sq, each the size (and dtype) of the trainable parameter
MASK_BYTES = 1  # bool element: CUDA dropout masks (native_dropout), transformers' 4-D padding mask
LSE_BYTES = FP32  # SDPA saves one fp32 log-sum-exp per query head per token for its backward
RSQRT_BYTES = FP32  # RMSNorm saves 1/rms, one fp32 per token

# Standard loss (train.loss_chunk_size = 0), bytes per logit (tokens x vocab) at its peak, inside the
# cross-entropy backward: the fp32 log-softmax output it saved (4) + the incoming gradient of the
# log-probabilities (4) + the gradient it produces for the logits (4). In forward the peak is the same 12:
# fp32 logits (accelerate's convert_outputs_to_fp32 or loss.py's .float(), 4) + the contiguous copy made by
# reshaping the shifted slice (4) + the log-softmax output (4); the bf16 logits (2) are freed by then.
STANDARD_LOSS_BYTES_PER_LOGIT = 12
# Chunked loss: head + cross-entropy over CHUNK tokens at a time, recomputed in backward. Per chunk the same
# 12 bytes as above plus the chunk's bf16 logits (2) that the recompute holds while the loss runs.
CHUNKED_LOSS_BYTES_PER_LOGIT = 14
DEFAULT_LOSS_CHUNK = 1024  # what the "chunked" comparison uses when the recipe has chunking off

# ---- fixed overheads (clearly not derived from the model) ----------------------------------------------
CUDA_OVERHEAD_GIB = 1.0  # CUDA context + cuBLAS workspaces (~0.5 GiB) + allocator fragmentation (~0.5 GiB)
HOST_PROCESS_GIB = 2.0  # CPU RAM of one training process before the model: Python, torch, CUDA runtime
CHECKPOINT_SHARD_GIB = 5.0  # hub checkpoints are saved in shards of at most 5 GB, loaded one at a time
DEFAULT_GPU_MEM_GIB = 16.0  # planned for when there is no GPU here and --gpu-mem is not given

# ---- engine constants -----------------------------------------------------------------------------------
DS_BUCKET_BUFFERS = 2  # DeepSpeed's gradient reduce buckets are double-buffered with overlap_comm (ds_configs)
ZERO3_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed default sub_group_size: fp32 grads are made per sub-group


@dataclass(frozen=True)
class Strategy:
    """A way to launch fittune. Listed in STRATEGIES from the fastest to the slowest (expected speed)."""

    key: str
    label: str
    accelerate_config: str | None  # accelerate_configs/<name>.yaml; None: launched with python (device map)
    needs_multi_gpu: bool
    description: str


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("single", "single GPU", "single_gpu", False, "one process, whole model on one GPU"),
    Strategy("ddp", "DDP", "multi_gpu", True, "one process per GPU, each with a full copy of the model"),
    Strategy("zero2", "ZeRO-2", "deepspeed_zero2", True, "DeepSpeed: optimizer states + gradients sharded"),
    Strategy("fsdp2", "FSDP2 full shard", "fsdp2", True, "parameters, gradients, optimizer states sharded"),
    Strategy("zero3", "ZeRO-3", "deepspeed_zero3", True, "DeepSpeed: parameters sharded too"),
    Strategy("device_map", "device-map model parallel", None, True,
             "one process, layers spread over the GPUs (they work one after another)"),
    Strategy("zero2_offload", "ZeRO-2 + optimizer offload", "deepspeed_zero2_offload", False,
             "DeepSpeed: optimizer states, fp32 master and gradients in CPU RAM"),
    Strategy("zero3_offload", "ZeRO-3 + param/optim offload", "deepspeed_zero3_offload", False,
             "DeepSpeed: parameters and optimizer in CPU RAM; the least GPU memory, the slowest"),
)
STRATEGY_BY_KEY = {s.key: s for s in STRATEGIES}
NATIVE = ("single", "ddp", "device_map")  # accelerate's own autocast path (no DeepSpeed / FSDP engine)


# ---------------------------------------------------------------------------------------------------------
# Precision and dtypes


def resolve_mixed_precision(cfg: Config, bf16_supported: bool) -> tuple[str, str]:
    """(precision used for the plan, why). Mirrors fittune.train_loop.resolve_mixed_precision for a GPU.

    `best` is bf16 on a bf16 GPU and fp16 otherwise (both 2 bytes, the plan is the same); `auto` follows the
    launch config, and this repository's accelerate configs set mixed_precision 'no' or leave it unset ('no').
    """
    wanted = cfg.train.mixed_precision
    if wanted == "best":
        return ("bf16" if bf16_supported else "fp16"), "train.mixed_precision: best"
    if wanted == "auto":
        return "no", "train.mixed_precision: auto follows the launch config; the repo's configs say 'no'"
    return wanted, f"train.mixed_precision: {wanted}"


@dataclass(frozen=True)
class ActivationDtypes:
    """Bytes per element of the tensors autograd saves, for one strategy.

    residual    the residual stream (layer inputs/outputs, RMSNorm outputs): the dtype of the embedding
                output, i.e. of the base weights. fp32 for full fine-tuning under accelerate's autocast (fp32
                weights; fp32 + bf16 residual adds stay fp32), half for a LoRA half-precision base and for
                engines that keep the module in half precision (DeepSpeed, FSDP2 param_dtype).
    compute     matmul outputs (q/k/v, attention, MLP): half under mixed precision.
    lora_input  the LoRA A input saved for backward: PEFT casts x to the adapter dtype (fp32) and autocast
                casts it back to half, so half under mixed precision, the adapter dtype otherwise.
    autocast    torch.autocast casts each matmul input separately (fittune's native path); a cast of the
                same tensor for q, k and v is three tensors, not one.
    """

    residual: int
    compute: int
    lora_input: int
    autocast: bool


def base_itemsize(shape: ModelShape) -> int:
    """Bytes per element of the base model's weights as fittune loads them."""
    return shape.frozen_itemsize if shape.lora else shape.trainable_itemsize


def activation_dtypes(strategy: str, shape: ModelShape, mixed: str) -> ActivationDtypes:
    """The activation dtypes of `strategy`: accelerate autocast (native) or a half-precision module (engines)."""
    half = mixed in ("bf16", "fp16")
    if strategy in NATIVE:
        residual = base_itemsize(shape)
        return ActivationDtypes(residual=residual, compute=HALF if half else residual,
                                lora_input=HALF if half else shape.trainable_itemsize, autocast=half)
    width = HALF if half else base_itemsize(shape)
    return ActivationDtypes(residual=width, compute=width, lora_input=width, autocast=False)


# ---------------------------------------------------------------------------------------------------------
# Activations


def _projection_inputs(shape: ModelShape, dt: ActivationDtypes, names: tuple[str, ...], x_bytes: int,
                       x_already_saved: bool) -> int:
    """Bytes per token saved for the backward of projections `names`, which all read the same input x.

    A trainable (full fine-tuning) Linear saves its input for the weight gradient: one shared x when x is
    already in the compute dtype, or, under autocast with x in another dtype (fp32 residual stream), each
    Linear its own half-precision cast. A frozen Linear saves nothing (its input gradient needs only the
    weight). A LoRA adapter saves its dropout mask (bool) and its A input (after dropout, in `lora_input`
    dtype), and A's rank-sized output for B.
    """
    total, share_x = 0, False
    for proj in (shape.projection(n) for n in names):
        if proj.trainable:
            if dt.autocast and x_bytes != dt.compute:
                total += dt.compute * proj.in_features
            else:
                share_x = True
        if proj.lora_rank:
            if shape.lora_dropout > 0:
                total += (MASK_BYTES + dt.lora_input) * proj.in_features
            elif dt.autocast or dt.lora_input != x_bytes:
                total += dt.lora_input * proj.in_features  # a cast copy of x per adapter
            else:
                share_x = True  # no dropout, no cast: A saves x itself
            total += dt.lora_input * proj.lora_rank
    if share_x and not x_already_saved:
        total += x_bytes * shape.projection(names[0]).in_features
    return total


def layer_activation_terms(shape: ModelShape, dt: ActivationDtypes, gqa_repeated: bool = True) -> dict[str, int]:
    """Bytes per token that one Qwen2 decoder layer saves for backward (SDPA / flash attention), by term.

    Walking Qwen2DecoderLayer.forward:
      RMSNorm x2      `x.to(float32)` is saved by pow and mul (4 B x hidden, the layer input itself when the
                      residual is already fp32), plus 1/rms (4 B), plus the normalised x before the weight
                      multiply when the norm weight trains (full fine-tuning).
      q/k/v inputs    see _projection_inputs (x = input norm output, residual dtype).
      attention       the kernel saves q, k, v and its output (compute dtype) and an fp32 log-sum-exp per
                      head; no T x T matrix. With a padding mask transformers' SDPA path repeats the K/V
                      heads (repeat_kv) before the kernel, so k and v are saved at the full query width
                      (`gqa_repeated`); RoPE saves only the shared cos/sin tables.
      o_proj input    the attention output, already saved by the kernel (no extra bytes for a full linear).
      gate/up inputs  as q/k/v (x = post-attention norm output).
      MLP             SiLU saves its input (gate output); the product act * up saves both factors.
      down input      the product, saved by a trainable down_proj (or the LoRA terms).
    Residual adds, views, transposes and RoPE's multiplies by constants save nothing.
    """
    h, inter, heads = shape.hidden_size, shape.intermediate_size, shape.num_heads
    q_width = heads * shape.head_dim
    kv_width = q_width if gqa_repeated else shape.num_kv_heads * shape.head_dim
    norm = FP32 * h + RSQRT_BYTES + (dt.residual * h if shape.norm_trainable else 0)
    return {
        "rmsnorm": 2 * norm,
        "qkv_inputs": _projection_inputs(shape, dt, ("q_proj", "k_proj", "v_proj"), dt.residual, False),
        "attention": dt.compute * (2 * q_width + 2 * kv_width) + LSE_BYTES * heads,
        "o_input": _projection_inputs(shape, dt, ("o_proj",), dt.compute, True),
        "gate_up_inputs": _projection_inputs(shape, dt, ("gate_proj", "up_proj"), dt.residual, False),
        "mlp": 3 * dt.compute * inter,
        "down_input": _projection_inputs(shape, dt, ("down_proj",), dt.compute, False),
    }


def head_activation_bytes_per_token(shape: ModelShape, dt: ActivationDtypes, chunked: bool) -> int:
    """Bytes per token saved after the last layer: the final RMSNorm and, for a trainable output head under
    the standard loss, the head's input (its own half cast under autocast with an fp32 residual stream).
    With the chunked loss the head input is part of the loss term instead (logits_bytes)."""
    h = shape.hidden_size
    norm = FP32 * h + RSQRT_BYTES + (dt.residual * h if shape.norm_trainable else 0)
    head_input = 0
    if shape.head_trainable and not chunked:
        head_input = (dt.compute if dt.autocast and dt.residual != dt.compute else dt.residual) * h
    return norm + head_input


def layer_backward_workspace_per_token(shape: ModelShape, dt: ActivationDtypes) -> int:
    """Gradients in flight while one layer is back-propagated, bytes per token: the MLP's three
    intermediate-size gradients (of down_proj's input, of the activation and of up's output, live together
    in the product's backward) and two hidden-size ones (the layer's output gradient and the input gradient
    being accumulated)."""
    return 3 * dt.compute * shape.intermediate_size + 2 * dt.residual * shape.hidden_size


def activation_terms(shape: ModelShape, dt: ActivationDtypes, micro_batch: int, seq_len: int,
                     checkpointing: bool, chunked: bool, num_layers: int | None = None) -> dict[str, int]:
    """Activation bytes per GPU for `micro_batch` sequences of `seq_len` tokens, by term.

    "kept" terms live from forward until their layer's backward:
      without checkpointing, every layer's saved tensors (layers x layer_activation_terms x tokens);
      with (non-reentrant) gradient checkpointing, only each layer's input hidden state
      (tokens x hidden x residual bytes);
      the attention masks: transformers builds one bool padding mask (micro x seq x seq x 1 B) and SDPA
      converts it, in every layer, to an additive mask in the compute dtype that the kernel saves
      (micro x seq x seq x compute bytes per layer that holds its saved tensors);
      the final norm / head input.
    "layer backward" lives only while one layer is back-propagated: with checkpointing that layer's
    recomputed saved tensors (and its converted mask), plus the gradients in flight
    (layer_backward_workspace_per_token). It is never live at the same time as the loss's logits.
    `num_layers` (default: all) is the number of layers on this GPU, for a device map.
    """
    tokens = micro_batch * seq_len
    layers = shape.num_layers if num_layers is None else num_layers
    per_layer = sum(layer_activation_terms(shape, dt).values()) * tokens
    converted_mask = micro_batch * seq_len * seq_len * dt.compute
    workspace = layer_backward_workspace_per_token(shape, dt) * tokens
    if checkpointing:
        terms = {"layer inputs (checkpointed)": layers * dt.residual * shape.hidden_size * tokens,
                 "attention masks": micro_batch * seq_len * seq_len * MASK_BYTES,
                 "layer backward": per_layer + converted_mask + workspace}
    else:
        terms = {"saved by all layers": layers * (per_layer + converted_mask),
                 "attention masks": micro_batch * seq_len * seq_len * MASK_BYTES,
                 "layer backward": workspace}
    terms["final norm / head input"] = head_activation_bytes_per_token(shape, dt, chunked) * tokens
    return terms


def logits_bytes(shape: ModelShape, dt: ActivationDtypes, micro_batch: int, seq_len: int, chunk: int) -> int:
    """Bytes of the output-head logits and cross-entropy at their peak.

    Standard loss (chunk = 0): every token's full-vocabulary logits at once, tokens x vocab x
    STANDARD_LOSS_BYTES_PER_LOGIT. Chunked loss: only min(chunk, tokens) tokens' logits exist at a time, in
    forward and in the backward recompute (x CHUNKED_LOSS_BYTES_PER_LOGIT), plus the final hidden states
    kept for that recompute (tokens x hidden x residual bytes).
    """
    tokens = micro_batch * seq_len
    if chunk <= 0:
        return tokens * shape.vocab_size * STANDARD_LOSS_BYTES_PER_LOGIT
    return (min(chunk, tokens) * shape.vocab_size * CHUNKED_LOSS_BYTES_PER_LOGIT
            + tokens * shape.hidden_size * dt.residual)


# ---------------------------------------------------------------------------------------------------------
# Per-strategy memory


@dataclass(frozen=True)
class Workload:
    """What one process runs per micro-batch."""

    micro_batch: int
    seq_len: int
    checkpointing: bool
    loss_chunk: int
    mixed: str


@dataclass
class Estimate:
    """Predicted memory of one strategy at one micro-batch size, bytes on the busiest GPU."""

    strategy: Strategy
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
        if self.grad_accum == 1 and self.strategy.key in NATIVE:
            grads = self.gpu.get("gradients", 0)
            return sum(self.gpu.values()) - grads + max(self.pass_peak, grads + step)
        return sum(self.gpu.values()) + max(self.pass_peak, step)

    @property
    def gpu_total(self) -> int:
        """GPU memory needed: the allocated peak plus the fixed overhead."""
        return self.gpu_peak + self.overhead

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())


def _native_bytes(shape: ModelShape, frozen: int, trainable: int) -> int:
    return frozen * shape.frozen_itemsize + trainable * shape.trainable_itemsize


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


def _gathered_params(shape: ModelShape) -> int:
    """Parameters un-sharded at once under ZeRO-3: the layer being computed and the one prefetched, or a
    layer and the (large) embedding / output head while those are gathered."""
    return shape.layer_params + max(shape.layer_params, shape.embed_params, shape.head_params)


def estimate(strategy: str, shape: ModelShape, work: Workload, gpus: int) -> Estimate:
    """Predict per-GPU and CPU memory of `strategy` on `gpus` GPUs for one micro-batch size.

    Native path (single, DDP, device map): weights as fittune loads them (fp32 for full fine-tuning: they are
    their own fp32 master copy; LoRA: half base + fp32 adapters), gradients and AdamW moments in the
    trainable dtype; under autocast the half copies of fp32 trainable matmul weights are cached for the
    forward (2 B each); the foreach AdamW step makes one temporary the size of the trainable parameters
    (sqrt of exp_avg_sq). DDP adds its gradient buckets (a second copy of the gradients:
    gradient_as_bucket_view is off by default).
    DeepSpeed: the engine keeps the module in the half dtype (2 B/param), an fp32 master copy + 2 fp32
    moments (12 B/trainable param) and half gradients, sharded over the GPUs (ZeRO-2: optimizer states and
    gradients; ZeRO-3: parameters too, gathered a layer or two at a time), plus double-buffered reduce
    buckets of hidden^2 elements (accelerate's "auto" reduce_bucket_size); the step upcasts the gradient
    partition to fp32 and AdamW makes one more fp32 temporary. Offload moves master + moments + fp32
    gradients (16 B/trainable param), and with ZeRO-3 the half parameters, to pinned CPU RAM.
    FSDP2: sharded parameters (trainable ones upcast to fp32 by accelerate under mixed precision),
    gradients and moments; layers are all-gathered in the half param_dtype, the output head (accelerate's
    tail group) stays gathered, and one layer's un-sharded half gradients wait for the reduce-scatter.
    CPU RAM: HOST_PROCESS_GIB per process plus what each process materialises while loading (the whole
    model, or one checkpoint shard at a time under ZeRO-3's zero.Init and for a device map) plus offloaded
    states.
    """
    s = STRATEGY_BY_KEY[strategy]
    n, t, f = shape.total_params, shape.trainable_params, shape.frozen_params
    ti = shape.trainable_itemsize
    half = work.mixed in ("bf16", "fp16")
    dt = activation_dtypes(strategy, shape, work.mixed)
    loaded = _native_bytes(shape, f, t)  # what from_pretrained materialises in each process
    host = int(HOST_PROCESS_GIB * GIB)
    shard = min(loaded, int(CHECKPOINT_SHARD_GIB * GIB))
    procs = 1 if strategy in ("single", "device_map") else gpus
    other_chunk = 0 if work.loss_chunk > 0 else DEFAULT_LOSS_CHUNK
    logits_other = logits_bytes(shape, dt, work.micro_batch, work.seq_len, other_chunk)
    explain: dict[str, str] = {}

    if strategy == "device_map":
        return _device_map(s, shape, work, dt, gpus, half, host, shard, logits_other)
    gpu_pass = _pass_terms(shape, dt, work)
    other = _pass_terms(shape, dt, work, checkpointing=not work.checkpointing)
    acts_other = other["activations"] + other["layer backward"]

    if strategy in ("single", "ddp"):
        gpu = {"weights": loaded, "gradients": t * ti, "optimizer": ADAM_MOMENTS * t * ti}
        if half and ti == FP32:
            gpu_pass["weight copies"] = HALF * shape.autocast_cast_params
            explain["weight copies"] = "autocast's half copies of the fp32 trainable matmul weights (forward)"
        if strategy == "ddp":
            gpu["gradients"] += t * ti
            explain["gradients"] = "gradients + DDP's reducer buckets (a second copy)"
        # fittune steps with fused AdamW on CUDA: in place, no per-parameter temporaries. Measured on an H200,
        # 3B full fine-tune 2 x 1024, accumulation 1: 47.23 GiB = weights + gradients + moments + 1.2 GiB
        gpu_step = {"optimizer step": 0}
        cpu = {"processes": procs * host, "model load": procs * loaded}
    elif strategy in ("zero2", "zero2_offload", "zero3", "zero3_offload"):
        width = HALF if half else base_itemsize(shape)
        bucket = DS_BUCKET_BUFFERS * min(shape.hidden_size**2, t) * width
        master_and_moments = (FP32 + ADAM_MOMENTS * FP32) * t
        stage3 = strategy.startswith("zero3")
        offload = strategy.endswith("offload")
        if stage3:
            weights = 0 if offload else n * width // gpus
            gpu_pass["gathered layers"] = _gathered_params(shape) * width
            explain["gathered layers"] = "parameters all-gathered for the layer computed + the one prefetched"
        else:
            weights = n * width
        cpu = {"processes": procs * host, "model load": procs * (shard if stage3 else loaded)}
        if offload:
            gpu = {"weights": weights, "gradients": bucket, "optimizer": 0}
            gpu_step = {}
            explain["gradients"] = "reduce buckets only (the gradients go to CPU RAM)"
            cpu["offloaded optimizer"] = master_and_moments + FP32 * t
            if stage3:
                cpu["offloaded parameters"] = n * width
        else:
            gpu = {"weights": weights, "gradients": t * width // gpus + bucket,
                   "optimizer": master_and_moments // gpus}
            part = t // gpus if not stage3 else min(t // gpus, ZERO3_SUB_GROUP_SIZE)
            gpu_step = {"fp32 gradients + AdamW temp": 2 * FP32 * part}
            explain["gradients"] = f"{width} B per trainable parameter, sharded / {gpus}, + reduce buckets"
        explain["weights"] = (f"{n:,} x {width} B" + ("" if not stage3 else " in CPU RAM" if offload
                                                      else f", sharded / {gpus}"))
        explain["optimizer"] = "fp32 master + 2 fp32 AdamW moments (12 B per trainable parameter)" + (
            ", in CPU RAM" if offload else f", sharded / {gpus}")
    elif strategy == "fsdp2":
        width = HALF if half else base_itemsize(shape)
        train_b = FP32 if half else ti
        gpu = {"weights": (f * shape.frozen_itemsize + t * train_b) // gpus, "gradients": t * train_b // gpus,
               "optimizer": ADAM_MOMENTS * t * train_b // gpus}
        tail = shape.head_params or shape.embed_params
        gpu_pass["gathered layers"] = (tail + 2 * shape.layer_params) * width + shape.layer_trainable * width
        explain["gathered layers"] = ("output head (kept gathered) + layer computed + layer prefetched, "
                                      "+ one layer's un-sharded gradients")
        explain["weights"] = f"sharded / {gpus} (trainable parameters in fp32)"
        explain["gradients"] = f"{train_b} B per trainable parameter, sharded / {gpus}"
        explain["optimizer"] = f"2 AdamW moments x {train_b} B per trainable parameter, sharded / {gpus}"
        gpu_step = {"optimizer step": t * train_b // gpus}
        cpu = {"processes": procs * host, "model load": procs * loaded}
    else:
        raise FittuneError(f"unknown strategy {strategy}")

    est = Estimate(s, procs, work.micro_batch, 0, gpu, gpu_pass, gpu_step, cpu, explain,
                   activations_other=acts_other, logits_other=logits_other)
    if s.needs_multi_gpu and gpus < 2:
        est.applicable, est.why_not = False, "needs 2+ GPUs"
    return est


def _device_map(s: Strategy, shape: ModelShape, work: Workload, dt: ActivationDtypes, gpus: int, half: bool,
                host: int, shard: int, logits_other: int) -> Estimate:
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
        trainable = per_gpu * shape.layer_trainable + (embed_t if first else 0) + (
            head_t if not first or gpus == 1 else 0)
        weights = per_gpu * _native_bytes(shape, layer_f, shape.layer_trainable) + (embed_b if first else 0) + (
            head_b if not first or gpus == 1 else 0)
        gpu = {"weights": weights, "gradients": trainable * ti, "optimizer": ADAM_MOMENTS * trainable * ti}
        gpu_pass = _pass_terms(shape, dt, work, per_gpu, has_head)
        if half and ti == FP32:  # autocast copies of this GPU's share of the fp32 trainable weights
            gpu_pass["weight copies"] = HALF * shape.autocast_cast_params * trainable // max(
                shape.trainable_params, 1)
        other = _pass_terms(shape, dt, work, per_gpu, has_head, checkpointing=not work.checkpointing)
        est = Estimate(s, 1, work.micro_batch, 0, gpu, gpu_pass, {"optimizer step": 0},  # fused AdamW
                       {"processes": host, "model load": shard},
                       {"weights": f"{per_gpu} of {shape.num_layers} layers on this GPU (+ the embedding / "
                                   f"output head where they sit)"},
                       activations_other=other["activations"] + other["layer backward"],
                       logits_other=logits_other if has_head else 0)
        candidates.append(est)
    est = max(candidates, key=lambda e: e.gpu_peak)
    if gpus < 2:
        est.applicable, est.why_not = False, "needs 2+ GPUs"
    return est


# ---------------------------------------------------------------------------------------------------------
# Hardware


@dataclass
class Hardware:
    """The machine planned for."""

    gpus: int
    gpu_mem_gib: float
    cpu_mem_gib: float
    bf16: bool
    notes: list[str] = field(default_factory=list)
    source: str = ""


def detect_hardware(gpus: int | None, gpu_mem_gib: float | None, cpu_mem_gib: float | None) -> Hardware:
    """Fill what was not given from this machine: CUDA device count and smallest device memory, psutil's
    total RAM. Without a GPU here, plan for 1 GPU x DEFAULT_GPU_MEM_GIB unless told otherwise, and say so."""
    notes, parts = [], []
    bf16 = True
    detected_gpus, detected_mem = 0, None
    if torch.cuda.is_available():
        detected_gpus = torch.cuda.device_count()
        detected_mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(detected_gpus)) / GIB
        bf16 = torch.cuda.is_bf16_supported()
    if gpus is None and detected_gpus:
        gpus = detected_gpus
        parts.append("GPU count detected")
    if gpu_mem_gib is None and detected_mem is not None:
        gpu_mem_gib = detected_mem
        parts.append("GPU memory detected")
    if not detected_gpus:
        if gpus is None or gpu_mem_gib is None:
            notes.append(f"no CUDA GPU on this machine and no --gpus/--gpu-mem: planning for "
                         f"{gpus or 1} GPU{'s' if (gpus or 1) > 1 else ''} x {gpu_mem_gib or DEFAULT_GPU_MEM_GIB:g} "
                         f"GiB; pass --gpus N --gpu-mem GiB for your hardware")
        notes.append("bf16 support assumed (an fp16-only GPU gives the same plan: both are 2 bytes)")
        gpus = gpus or 1
        gpu_mem_gib = gpu_mem_gib or DEFAULT_GPU_MEM_GIB
    if cpu_mem_gib is None:
        import psutil

        cpu_mem_gib = psutil.virtual_memory().total / GIB
        parts.append("CPU RAM detected")
    source = ", ".join(parts) if parts else "as given"
    return Hardware(gpus, float(gpu_mem_gib), float(cpu_mem_gib), bf16, notes, source)


# ---------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """The result of make_plan: model shape, hardware, one estimate per strategy, the recommendation."""

    cfg: Config
    shape: ModelShape
    hardware: Hardware
    mixed: str
    mixed_reason: str
    global_batch: int
    estimates: list[Estimate]
    recommended: Estimate | None
    recipe: str
    extra_args: list[str]
    notes: list[str]

    def command(self, est: Estimate) -> str:
        """The exact command that launches `est` with this repository's files."""
        args = ["--config", self.recipe]
        if est.strategy.accelerate_config is None:
            args += ["--model.parallel", "auto"]  # the device-map strategy (see command_notes)
        args += [*self.extra_args, "--train.micro_batch_size", str(est.micro_batch),
                 "--train.grad_accum", str(est.grad_accum)]
        tail = " ".join(shlex.quote(a) for a in args)
        if est.strategy.accelerate_config is None:
            return f"python train.py {tail}"
        cmd = f"accelerate launch --config_file accelerate_configs/{est.strategy.accelerate_config}.yaml"
        if est.strategy.key != "single":
            cmd += f" --num_processes {est.processes}"
        return f"{cmd} train.py {tail}"

    def command_notes(self, est: Estimate) -> list[str]:
        """Caveats about the command: files or config keys it needs that do not exist yet."""
        out = []
        name = est.strategy.accelerate_config
        if name and not (REPO_ROOT / "accelerate_configs" / f"{name}.yaml").is_file():
            out.append(f"accelerate_configs/{name}.yaml does not exist yet")
        return out

    def render(self) -> str:
        """The plan as text: setup, strategy table, recommendation and its memory breakdown."""
        return render(self)


def _micro_candidates(micro: int, per_process: int) -> list[int]:
    """Micro-batch sizes to try, largest first: the recipe's, halved down to 1, keeping only those that
    divide the per-process batch (so the accumulation is a whole number and the global batch unchanged)."""
    out, m = [], micro
    while True:
        if per_process % m == 0:
            out.append(m)
        if m == 1:
            return out
        m //= 2


def _check_fit(est: Estimate, hw: Hardware) -> None:
    """Set est.fits, and est.limit to what does not fit (GPU memory, CPU RAM or both)."""
    over = [name for name, need, have in (("GPU memory", est.gpu_total, hw.gpu_mem_gib),
                                          ("CPU RAM", est.cpu_total, hw.cpu_mem_gib)) if need > have * GIB]
    est.fits, est.limit = not over, " + ".join(over)


def runnable(s: Strategy) -> bool:
    """Whether fittune can launch this strategy: its accelerate config ships with fittune (the one-process
    device map needs none: `model.parallel: auto`)."""
    return s.accelerate_config is None or (REPO_ROOT / "accelerate_configs" / f"{s.accelerate_config}.yaml").is_file()


def make_plan(cfg: Config, gpus: int | None = None, gpu_mem_gib: float | None = None,
              cpu_mem_gib: float | None = None, *, recipe: str | None = None,
              extra_args: list[str] | tuple[str, ...] = ()) -> Plan:
    """Plan `cfg` on `gpus` x `gpu_mem_gib` GiB GPUs and `cpu_mem_gib` GiB of CPU RAM (None: detect).

    Every strategy is estimated at the recipe's micro-batch, halved (with the accumulation doubled, so the
    global batch micro x accum x GPUs stays the same) until it fits. The recommendation is the first
    strategy in STRATEGIES order (expected speed) that fits; with several GPUs the single-GPU row is shown
    for reference only, since DDP uses the same per-GPU memory on every GPU. `recipe` and `extra_args` (the
    caller's `--key value` overrides) go into the printed launch commands.
    """
    hw = detect_hardware(gpus, gpu_mem_gib, cpu_mem_gib)
    if hw.gpus < 1 or hw.gpu_mem_gib <= 0 or hw.cpu_mem_gib <= 0:
        raise FittuneError("GPU count, GPU memory and CPU memory must be positive")
    mixed, mixed_reason = resolve_mixed_precision(cfg, hw.bf16)
    from fittune.model import weights_dtype

    shape = model_shape(cfg, weights_dtype(cfg, mixed))
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum * hw.gpus
    estimates, recommended = [], None
    for s in STRATEGIES:
        procs = 1 if s.key in ("single", "device_map") else hw.gpus
        per_process = global_batch // procs
        chosen = None
        for m in _micro_candidates(t.micro_batch_size, per_process):
            work = Workload(m, cfg.data.max_length, t.gradient_checkpointing, t.loss_chunk_size, mixed)
            est = estimate(s.key, shape, work, hw.gpus)
            est.grad_accum = per_process // m
            _check_fit(est, hw)
            chosen = est
            if est.fits or "GPU memory" not in est.limit:
                break  # fits, or only CPU RAM is short: a smaller micro-batch does not change CPU RAM
        if chosen.applicable and not runnable(s):
            # still estimated (a reference for what the strategy would need), never recommended
            chosen.applicable, chosen.why_not = False, "not in fittune yet"
        estimates.append(chosen)
        eligible = chosen.applicable and not (s.key == "single" and hw.gpus > 1)
        if recommended is None and chosen.fits and eligible:
            recommended = chosen
    notes = list(shape.notes) + list(hw.notes)
    return Plan(cfg, shape, hw, mixed, mixed_reason, global_batch, estimates, recommended,
                recipe or "<recipe.yaml>", list(extra_args), notes)


# ---------------------------------------------------------------------------------------------------------
# Text output


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


_SHORT = {"weights": "W", "gradients": "G", "optimizer": "O", "activations": "A", "logits/loss": "L",
          "weight copies": "Wc", "gathered layers": "Wg"}


def _breakdown(est: Estimate) -> str:
    fixed = " ".join(f"{_SHORT[k]} {_gib(v)}" for k, v in est.gpu.items() if v)
    shown = {"activations": est.activations, **{k: v for k, v in est.gpu_pass.items()
                                                 if k not in ("activations", "layer backward")}}
    pass_ = " ".join(f"{_SHORT[k]} {_gib(v)}" for k, v in shown.items() if v)
    step = sum(est.gpu_step.values())
    out = f"{fixed} | {pass_}"
    if step:
        out += f" | step {_gib(step)}"
    return out + f" | +{est.overhead / GIB:.1f} ctx"


def _precision_line(plan: Plan) -> str:
    s = plan.shape
    names = {4: "fp32", 2: plan.mixed if plan.mixed != "no" else "half"}
    if s.lora:
        weights = f"base weights {names[s.frozen_itemsize]}, adapters {names[s.trainable_itemsize]}"
    else:
        weights = f"weights {names[s.trainable_itemsize]} (their own master copy on the native path)"
    mp = f"{plan.mixed} mixed precision" if plan.mixed != "no" else "no mixed precision, fp32 compute"
    return f"{mp} ({plan.mixed_reason}); {weights}"


def render(plan: Plan) -> str:
    """Format a plan for the terminal."""
    s, hw, cfg = plan.shape, plan.hardware, plan.cfg
    t = cfg.train
    lines = [f"fittune plan: {plan.recipe}"]
    lines.append(f"  model       {s.name}  [{s.source}]")
    lines.append(f"              {s.model_type}: {s.num_layers} layers, hidden {s.hidden_size}, MLP "
                 f"{s.intermediate_size}, {s.num_heads} heads / {s.num_kv_heads} KV heads, vocab {s.vocab_size}"
                 f"{', tied embeddings' if s.tie_word_embeddings else ''}")
    if s.lora:
        targets = ", ".join(p.name for p in s.projections if p.lora_rank)
        lines.append(f"  parameters  {s.frozen_params:,} base (frozen); LoRA r={s.lora_rank} on {targets}: "
                     f"{s.trainable_params:,} trainable")
    else:
        lines.append(f"  parameters  {s.total_params:,}, all trainable (full fine-tuning)")
    lines.append(f"  hardware    {hw.gpus} GPU{'s' if hw.gpus > 1 else ''} x {hw.gpu_mem_gib:.1f} GiB, "
                 f"CPU RAM {hw.cpu_mem_gib:.1f} GiB ({hw.source})")
    lines.append(f"  precision   {_precision_line(plan)}")
    chunk = f"chunked loss ({t.loss_chunk_size} tokens)" if t.loss_chunk_size > 0 else "standard loss (no chunking)"
    lines.append(f"  workload    {cfg.data.max_length} tokens per sequence (data.max_length, planned fully "
                 f"padded); recipe micro-batch {t.micro_batch_size} x accumulation {t.grad_accum} x "
                 f"{hw.gpus} GPU{'s' if hw.gpus > 1 else ''} = global batch {plan.global_batch}; gradient "
                 f"checkpointing {'on' if t.gradient_checkpointing else 'off'}; {chunk}")
    for note in plan.notes:
        lines.append(f"  note        {note}")
    lines.append("")
    header = ("strategy", "fits?", "micro x accum", "GPU GiB", "CPU GiB",
              "per GPU, GiB: resident | forward/backward | optimizer step | overhead")
    rows = []
    for est in plan.estimates:
        label = est.strategy.label + (f" ({'LoRA' if s.lora else 'full'})" if est.strategy.key == "single" else "")
        if not est.applicable:
            fits = est.why_not
        else:
            fits = "yes" if est.fits else f"no: {est.limit}"
        if est.strategy.key == "single" and hw.gpus > 1 and est.fits:
            fits = "yes (1 GPU)"
        rows.append((label, fits, f"{est.micro_batch} x {est.grad_accum}", _gib(est.gpu_total),
                     _gib(est.cpu_total), _breakdown(est)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i in (0, 1, 2, 5) else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt(r) for r in rows)
    lines.append("W weights, G gradients, O optimizer states, A activations, L logits/loss, Wc autocast weight "
                 "copies, Wg gathered (un-sharded) layers; ctx CUDA context + allocator slack")
    lines.append("")
    rec = plan.recommended
    if rec is None:
        best = min((e for e in plan.estimates if e.applicable), key=lambda e: e.gpu_total)
        lines.append(f"nothing fits {hw.gpus} x {hw.gpu_mem_gib:.1f} GiB even at micro-batch 1: the smallest "
                     f"need is {best.strategy.label} at {_gib(best.gpu_total)} GiB per GPU and "
                     f"{_gib(best.cpu_total)} GiB CPU RAM.")
        lines.append("try: --lora.enabled true, --train.gradient_checkpointing true, a smaller "
                     "--data.max_length, more GPUs, or more CPU RAM for the offload strategies")
        return "\n".join(lines)
    shrink = "" if rec.micro_batch == t.micro_batch_size else (
        f" (the recipe's micro-batch {t.micro_batch_size} does not fit: halved, accumulation raised to keep "
        f"the global batch)")
    lines.append(f"recommended: {rec.strategy.label} ({rec.strategy.description}), micro-batch "
                 f"{rec.micro_batch} x accumulation {rec.grad_accum} x {rec.processes} process"
                 f"{'es' if rec.processes > 1 else ''} = global batch {plan.global_batch}{shrink}")
    lines.append(f"  {plan.command(rec)}")
    for note in plan.command_notes(rec):
        lines.append(f"  ({note})")
    lines.append("")
    lines.extend(_details(plan, rec))
    return "\n".join(lines)


def _details(plan: Plan, est: Estimate) -> list[str]:
    s, cfg = plan.shape, plan.cfg
    tokens = est.micro_batch * cfg.data.max_length
    dt = activation_dtypes(est.strategy.key, s, plan.mixed)
    per_layer = sum(layer_activation_terms(s, dt).values())
    ckpt = cfg.train.gradient_checkpointing
    chunk = cfg.train.loss_chunk_size
    gpus_word = f"per GPU ({est.processes} processes)" if est.processes > 1 else "on the GPU"
    out = [f"memory of the recommended run, {gpus_word}:"]

    def row(name: str, value: int, why: str) -> None:
        out.append(f"  {name:<17}{_gib(value):>7} GiB  {why}")

    why_w = est.explain.get("weights") or (
        f"{s.frozen_params:,} x {s.frozen_itemsize} B + {s.trainable_params:,} x {s.trainable_itemsize} B"
        if s.lora else f"{s.total_params:,} x {s.trainable_itemsize} B")
    row("weights", est.gpu["weights"], why_w)
    row("gradients", est.gpu["gradients"], est.explain.get("gradients", "one per trainable parameter"))
    row("optimizer", est.gpu["optimizer"], est.explain.get(
        "optimizer", "AdamW exp_avg + exp_avg_sq in the trainable dtype (the fp32 weights are the master copy)"))
    mode = "gradient checkpointing on" if ckpt else "gradient checkpointing off"
    other = "off" if ckpt else "on"
    kept = (f"{s.num_layers} checkpointed layer inputs x {tokens:,} tokens x {s.hidden_size} x {dt.residual} B"
            if ckpt else f"{s.num_layers} layers x {per_layer:,} B per token x {tokens:,} tokens")
    row("activations", est.gpu_pass["activations"],
        f"kept until backward ({mode}, recipe): {kept}, + masks, final norm")
    row("layer backward", est.gpu_pass["layer backward"],
        ("one layer recomputed (" + f"{per_layer:,} B per token) + " if ckpt else "") +
        "gradients in flight; never live together with logits/loss, the larger counts")
    row("  (other choice)", est.activations_other, f"activations + layer backward with checkpointing {other}")
    if chunk > 0:
        why_l = (f"chunked: {min(chunk, tokens):,} tokens x {s.vocab_size:,} x {CHUNKED_LOSS_BYTES_PER_LOGIT} B "
                 f"(+ hidden states); the standard loss would need {_gib(est.logits_other)} GiB")
    else:
        why_l = (f"standard: {tokens:,} tokens x {s.vocab_size:,} x {STANDARD_LOSS_BYTES_PER_LOGIT} B; "
                 f"--train.loss_chunk_size {DEFAULT_LOSS_CHUNK} would need {_gib(est.logits_other)} GiB")
    row("logits/loss", est.gpu_pass["logits/loss"], why_l)
    for key in ("weight copies", "gathered layers"):
        if est.gpu_pass.get(key):
            row(key, est.gpu_pass[key], est.explain.get(key, ""))
    step = sum(est.gpu_step.values())
    if step:
        row("optimizer step", step, "temporaries of the step (activations are freed by then; the larger "
                                    "of the two phases counts)")
    row("peak allocated", est.gpu_peak, "what torch.cuda.max_memory_allocated should show")
    row("overhead", est.overhead, "CUDA context + allocator slack (fixed, not in max_memory_allocated)")
    row("needed", est.gpu_total, f"of {plan.hardware.gpu_mem_gib:.1f} GiB")
    row("CPU RAM", est.cpu_total, ", ".join(f"{k} {_gib(v)}" for k, v in est.cpu.items() if v) +
        f" (of {plan.hardware.cpu_mem_gib:.1f} GiB)")
    return out


# ---------------------------------------------------------------------------------------------------------
# Command line

USAGE = ("usage: python -m fittune.plan [--config FILE] [--gpus N] [--gpu-mem GiB] [--cpu-mem GiB] "
         "[--section.key VALUE ...]")


def _number(flag: str, value: str | None, kind: type):
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or number <= 0 or (isinstance(number, float) and not math.isfinite(number)):
        what = "a whole number >= 1" if kind is int else "a positive number of GiB"
        raise FittuneError(f"--{flag} must be {what} (got '{value}')")
    return number


def _raw_overrides(argv: list[str]) -> list[str]:
    """The override arguments as given (`--key value` pairs), for the printed launch command, without the
    micro-batch / accumulation keys the plan sets itself."""
    out, i = [], 0
    while i < len(argv):
        key, eq, value = argv[i][2:].partition("=")
        if not eq:
            value, i = argv[i + 1], i + 1
        if key not in ("train.micro_batch_size", "train.grad_accum"):
            out += [f"--{key}", value]
        i += 1
    return out


def plan_main(argv: list[str]) -> Plan:
    """`python -m fittune.plan` without the error handling: parse argv, plan, print. Raises FittuneError."""
    from fittune.cli import DEMO_RECIPE, split_flag
    from fittune.config import build_config, parse_overrides

    if "-h" in argv or "--help" in argv:
        print(USAGE)
        print("Predicts GPU and CPU memory of every strategy (single GPU, DDP, ZeRO-2/3 +- offload, FSDP2, device "
              "map) and prints the fastest that fits with its launch command. Hardware not given is detected.")
        sys.exit(0)
    gpus, argv = split_flag(argv, "gpus")
    gpu_mem, argv = split_flag(argv, "gpu-mem")
    cpu_mem, argv = split_flag(argv, "cpu-mem")
    config_file, rest = split_flag(argv, "config")
    gpus, gpu_mem, cpu_mem = _number("gpus", gpus, int), _number("gpu-mem", gpu_mem, float), \
        _number("cpu-mem", cpu_mem, float)
    if config_file is None:
        config_file = str(DEMO_RECIPE.relative_to(REPO_ROOT)) if DEMO_RECIPE.is_relative_to(REPO_ROOT) \
            else str(DEMO_RECIPE)
        print(f"fittune: no --config given: planning the offline demo recipe {config_file}", flush=True)
    cfg = build_config(config_file, parse_overrides(rest))
    plan = make_plan(cfg, gpus, gpu_mem, cpu_mem, recipe=config_file, extra_args=_raw_overrides(rest))
    print(plan.render(), flush=True)
    return plan


def main() -> None:
    """Entry point of `python -m fittune.plan`: one `fittune: error:` line and exit 2 on bad input."""
    from fittune.errors import run_cli

    run_cli(lambda: plan_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
