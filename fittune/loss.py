"""Training loss: summed next-token NLL over target tokens (the caller normalises by the global count).

Two implementations with equal results (tested to 1e-5 in fp32, loss and gradients):
  * standard: the model returns full logits, cross-entropy in fp32. For Qwen2.5 that is
    tokens x 151,936 x (2 bytes bf16 + 4 bytes fp32 + 4 bytes gradient) -- 5.8 GiB at 4 x 1024 tokens.
  * chunked (`train.loss_chunk_size` > 0, the default): the output head itself computes the loss, only at
    target positions (answer tokens; prompt positions never get logits), over `chunk` tokens at a time, each
    chunk recomputed in the backward pass (activation checkpointing), so at most chunk x vocab logits exist.
    It runs inside the model's forward, so DDP, DeepSpeed ZeRO-3 and FSDP hooks that gather the head's
    weight work unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fittune.batches import IGNORE_INDEX


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), targets, reduction="sum")  # fp32 log-softmax for accuracy


class ChunkedLossHead(nn.Linear):
    """An output head that, while `targets` is set, returns the summed NLL instead of logits.

    Installed by swapping the class of the model's existing `lm_head` (same parameters, same state-dict
    keys, tied embeddings stay tied); with `targets` unset it is a plain linear layer (evaluation, generation).
    """

    targets: torch.Tensor | None = None
    chunk: int = 1024
    fused = None  # Liger's fused linear + cross-entropy (GPU), set at install: gradients in the forward, no recompute

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits without `targets`; with them, the summed NLL of the target tokens as a (1, 1, 1) tensor."""
        if self.targets is None:
            return super().forward(hidden)
        shifted = self.targets[:, 1:].reshape(-1).to(hidden.device)  # the head may sit on another GPU (device map)
        keep = shifted != IGNORE_INDEX  # indexing by it waits for the GPU once: the chunks need the count
        h = hidden[:, :-1].reshape(-1, hidden.size(-1))[keep]
        t = shifted[keep]
        # zero-valued terms keep every input in the graph even with no target token in the micro-batch
        total = (hidden.sum() + self.weight.sum()).float() * 0.0
        if self.fused is not None and t.numel():
            # Liger chunks internally and never holds more than a chunk of logits; one dtype for the matmul
            # (fp32 master weights under autocast meet bf16 hidden states here)
            bias = None if self.bias is None else self.bias.to(h.dtype)
            return (total + self.fused(self.weight.to(h.dtype), h, t, bias).float()).reshape(1, 1, 1).clone()
        for s in range(0, t.numel(), self.chunk):
            # checkpointed: the chunk's logits are recomputed in backward instead of being kept
            total = total + checkpoint(_ce_sum, h[s:s + self.chunk], self.weight, self.bias, t[s:s + self.chunk],
                                       use_reentrant=False)
        # the model hands this back as `.logits`; a copy, not a view: FSDP2 hooks must see the output itself
        return total.reshape(1, 1, 1).clone()


def install_chunked_loss(model, chunk: int, fused: bool = False) -> bool:
    """Swap the model's output head for a ChunkedLossHead; False (standard loss) if the head is not a plain
    linear layer (e.g. a LoRA-wrapped head). `fused`: Liger's fused linear cross-entropy (GPU only)."""
    head = model.get_output_embeddings()
    if chunk <= 0 or type(head) is not nn.Linear:
        return False
    head.__class__ = ChunkedLossHead
    head.chunk = chunk
    head.fused = None
    if fused:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        # kept out of the module tree (no state-dict key, nothing for FSDP/PEFT to see): it has no parameters
        head.__dict__["fused"] = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    head.targets = None
    return True


@contextlib.contextmanager
def _targets(head: ChunkedLossHead, labels: torch.Tensor):
    head.targets = labels
    try:
        yield
    finally:
        head.targets = None


def nll_sum(model, batch: dict[str, torch.Tensor], head: ChunkedLossHead | None = None) -> torch.Tensor:
    """The sum of NLL over the micro-batch's target tokens, a 0-d tensor on the model's device.

    Returning a sum, not a mean, lets the loop divide by the target tokens of the whole global batch (counted
    on the CPU when the step is planned: counting them here would wait for the GPU every micro-batch), so every
    token weighs the same whatever the micro-batch / accumulation / process split. `head`: the installed
    ChunkedLossHead, or None for the standard loss.
    """
    labels = batch["labels"]
    if head is not None:
        with _targets(head, labels):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return out.reshape(())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()  # fp32 log-softmax: half-precision CE loses accuracy
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), labels[:, 1:].reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss
