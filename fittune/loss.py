"""Training loss: summed next-token NLL over target tokens (the caller normalises by the global count)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fittune.data import IGNORE_INDEX


def nll_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of NLL over the micro-batch's target tokens, number of target tokens).

    Returning a sum, not a mean, lets the loop divide by the target tokens of the whole global batch, so
    every token weighs the same whatever the micro-batch / accumulation / process split.
    """
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()  # fp32 log-softmax: half-precision CE loses accuracy
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shift_labels != IGNORE_INDEX).sum())
