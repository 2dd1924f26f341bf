"""What autograd keeps for backward, in bytes per token: the planner's activation and logits model.

Written for Qwen2 / Llama-style decoder layers (fittune/model_shapes.py reads their projections from the
real modules) and checked tensor by tensor on the CPU with saved_tensors_hooks (tests/test_plan.py pins every
term on a tiny shape computed by hand):

  layer_activation_terms   what one decoder layer saves for backward, by term;
  activation_terms         all layers with or without gradient checkpointing, the masks, the layer being
                           back-propagated and the final norm / head input;
  logits_bytes             the vocabulary-sized tensors of the output head and the cross-entropy.

The dtypes those tensors have depend on the strategy (activation_dtypes): accelerate's autocast over the
weights as fittune loads them (one process, DDP, device map), or a module the engine keeps in half precision
(DeepSpeed, FSDP2).
"""

from __future__ import annotations

from dataclasses import dataclass

from fittune.model_shapes import ModelShape
from fittune.precision import Precision
from fittune.strategy import Strategy

# ---- element sizes and counts (bytes) ------------------------------------------------------------------
FP32 = 4
HALF = 2  # bf16 or fp16
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


def activation_dtypes(strategy: Strategy, shape: ModelShape, precision: Precision) -> ActivationDtypes:
    """The activation dtypes of `strategy`: accelerate autocast over the weights as loaded (no sharding
    engine: one process, DDP, device map) or a module the engine keeps in half precision (DeepSpeed, FSDP2)."""
    half = precision.half
    if not strategy.sharded:
        residual = base_itemsize(shape)
        return ActivationDtypes(residual=residual, compute=HALF if half else residual,
                                lora_input=HALF if half else shape.trainable_itemsize, autocast=half)
    width = HALF if half else base_itemsize(shape)
    return ActivationDtypes(residual=width, compute=width, lora_input=width, autocast=False)



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


def _rmsnorm_bytes_per_token(shape: ModelShape, dt: ActivationDtypes) -> int:
    """One RMSNorm: its fp32 input copy (saved by pow and mul), 1/rms, and the normalised x before the weight
    multiply when the norm weight trains."""
    h = shape.hidden_size
    return FP32 * h + RSQRT_BYTES + (dt.residual * h if shape.norm_trainable else 0)


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
    inter, heads = shape.intermediate_size, shape.num_heads
    q_width = heads * shape.head_dim
    kv_width = q_width if gqa_repeated else shape.num_kv_heads * shape.head_dim
    return {
        "rmsnorm": 2 * _rmsnorm_bytes_per_token(shape, dt),
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
    head_input = 0
    if shape.head_trainable and not chunked:
        head_input = (dt.compute if dt.autocast and dt.residual != dt.compute else dt.residual) * shape.hidden_size
    return _rmsnorm_bytes_per_token(shape, dt) + head_input


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
