"""One optimizer step: `StepRunner.run` -> forward_backward (every micro-batch) -> optimizer_step.

The update is the same for any split of the global batch: each micro-batch contributes its summed NLL, scaled
so that the final gradient is sum(NLL over the global batch) / (its target tokens). Out-of-memory adaptation
(`OomAdaptive`) is one component around this path, used for one process, DDP and DeepSpeed ZeRO-1/2.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fittune.distributed import Launched, sum_across_ranks
from fittune.errors import FittuneError
from fittune.loss import nll_sum
from fittune.optim import InBackwardOptimizer
from fittune.strategy import Strategy


@dataclass
class StepResult:
    """What one optimizer step did on this rank."""

    nll: float
    """Summed NLL of this rank's target tokens in the step."""
    grad_norm: float | None
    """Global gradient norm before clipping (None where the engine did not report one)."""
    stepped: bool
    """The weights were updated (False: a non-finite step or an fp16 overflow was skipped)."""
    overflow: bool
    """fp16 loss-scale overflow: no update, the loss scale was lowered, the schedule waits."""


@dataclass
class BatchSplit:
    """How this rank splits its share of a global batch (changed by `OomAdaptive`, saved in checkpoints)."""

    micro_batch_size: int
    grad_accum: int

    def apply(self, accelerator, strategy: Strategy, model, global_batch: int) -> None:
        """Tell accelerate (and the DeepSpeed engine, which scales its loss by 1 / accumulation) this split."""
        accelerator.gradient_accumulation_steps = self.grad_accum
        if strategy.engine_steps:
            model.set_train_micro_batch_size(self.micro_batch_size)
            model.set_train_batch_size(global_batch)


@dataclass
class StepPlan:
    """This rank's rows for one step and how to turn rows into a device batch."""

    micro_batches: list[list[int]]
    make_batch: Callable[[list[int]], dict]
    n_targets: int
    """Target tokens of the whole global batch (all ranks), the loss normaliser."""


class _AgreedOom(Exception):
    """Some rank ran out of memory and every rank knows it (raised on all ranks at the same point)."""


class StepRunner:
    """Runs optimizer steps for a prepared model; knows nothing of OOM or the loop around it."""

    def __init__(self, launched: Launched, model, optimizer, scheduler, params, head, max_grad_norm: float,
                 in_backward: InBackwardOptimizer | None = None):
        self.accelerator, self.strategy, self.model = launched.accelerator, launched.strategy, model
        self.optimizer, self.scheduler, self.params, self.head = optimizer, scheduler, params, head
        self.max_grad_norm, self.scales_loss = max_grad_norm, launched.precision.scales_loss
        # the hook between forward and backward of each micro-batch, and whether DDP waits for the step's end
        self.before_backward: Callable[[bool], None] | None = None
        self.defer_sync = False
        # the optimizer when it steps each parameter inside backward: the step only finishes what it did
        self.in_backward = in_backward

    def run(self, plan: StepPlan) -> StepResult:
        """forward + backward of every micro-batch, then the optimizer step."""
        nll = self.forward_backward(plan)
        return self.optimizer_step(nll)

    def forward_backward(self, plan: StepPlan) -> torch.Tensor:
        """Accumulate the gradients of this rank's micro-batches; returns their summed NLL (on the device)."""
        total = None
        for k, rows in enumerate(plan.micro_batches):
            nll = self.micro_step(plan, rows, last=k == len(plan.micro_batches) - 1)
            total = nll if total is None else total + nll  # on the device: no GPU sync per micro-batch
        return total

    def micro_step(self, plan: StepPlan, rows: list[int], last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients are reduced (DDP) or the engine steps
        (DeepSpeed) after the step's last one, unless the reduction is deferred to the step's end."""
        accel = self.accelerator
        accel.sync_gradients = last and not self.defer_sync
        # as accelerate's accumulate(): DDP skips its all-reduce until the gradients are complete
        with contextlib.nullcontext() if accel.sync_gradients else accel.no_sync(self.model):
            loss_sum = self._forward(plan, rows)
            # x world x accumulation undoes DDP's mean over ranks and the engine's / accelerate's / accum
            accel.backward(loss_sum * (self.strategy.world_size * self._accumulation() / plan.n_targets))
        return loss_sum.detach()

    def _forward(self, plan: StepPlan, rows: list[int]) -> torch.Tensor:
        if self.before_backward is None:
            return nll_sum(self.model, plan.make_batch(rows), self.head)
        failed, loss_sum = False, None
        try:
            loss_sum = nll_sum(self.model, plan.make_batch(rows), self.head)
        except torch.OutOfMemoryError:
            failed = True
        self.before_backward(failed)  # raises _AgreedOom on every rank when any failed
        return loss_sum

    def _accumulation(self) -> int:
        if self.strategy.engine_steps:
            return self.model.gradient_accumulation_steps()  # follows set_train_micro_batch_size
        return self.accelerator.gradient_accumulation_steps

    def optimizer_step(self, nll: torch.Tensor) -> StepResult:
        """Clip, step (unless the gradient is not finite), advance the schedule; gradients freed."""
        if self.in_backward is not None:  # already stepped and freed in backward: no clipping, norm measured there
            done = self.in_backward.finish_step()
            if done.stepped:
                self.optimizer.step()  # a no-op: tells the LR schedule that the step happened
                self.scheduler.step()
            return StepResult(float(nll), done.grad_norm, done.stepped, False)
        accel = self.accelerator
        if self.defer_sync and self.strategy.distributed:
            _all_reduce_mean([p.grad for p in self.params if p.grad is not None], self.strategy.world_size)
        accel.sync_gradients = True
        # DeepSpeed clipped inside its own step: max norm 0 only reads the norm
        grad_norm = accel.clip_grad_norm_(self.params, 0.0 if self.strategy.engine_steps else
                                          (self.max_grad_norm or float("inf")))
        norm = None if grad_norm is None else float(grad_norm)
        stepped = overflow = False
        # the norm comes from all-reduced gradients, so every rank takes the same branch; under fp16 the
        # scaler sees the overflow itself and lowers the scale
        if norm is None or math.isfinite(norm) or self.scales_loss:
            self.optimizer.step()  # under DeepSpeed a no-op wrapper: the engine stepped in backward
            overflow = bool(accel.optimizer_step_was_skipped)
            stepped = not overflow
            if stepped:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(float(nll), norm, stepped, overflow)


def _all_reduce_mean(grads: list[torch.Tensor], world: int) -> None:
    """The gradient average DDP skipped while the step's reduction was deferred (one flat all-reduce)."""
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


class OomAdaptive:
    """Survive CUDA out-of-memory in a step: every rank agrees, memory is freed, the micro-batch halves and the
    accumulation doubles (same global batch, same token-normalised update).

    One process / DDP: gradients are reduced only after the whole step (so no collective is in flight when a
    rank fails), the ranks agree after each forward pass, and a failed step is redone from scratch.
    DeepSpeed ZeRO-1/2 reduces inside backward, so the ranks agree after each forward pass, before its
    backward; the gradients already accumulated are kept and the rest of the step is finished at the smaller
    size. ZeRO-3 and FSDP2 gather weights inside the forward pass: refused (`fittune.supported`).
    """

    def __init__(self, runner: StepRunner, split: BatchSplit, global_batch: int, log: Callable[[str], None]):
        self.runner, self.split, self.global_batch, self.log = runner, split, global_batch, log
        runner.before_backward = self._agree
        runner.defer_sync = not runner.strategy.reduces_in_backward

    def _agree(self, failed: bool) -> None:
        if sum_across_ranks(self.runner.accelerator, [float(failed)])[0]:
            raise _AgreedOom()

    def run(self, step: int, plan_for: Callable[[BatchSplit], StepPlan]) -> StepResult:
        """Run the step, shrinking the micro-batch as often as needed; `plan_for` re-splits the rows."""
        plan = plan_for(self.split)
        while True:
            try:
                if self.runner.strategy.reduces_in_backward:  # the reduced gradients cannot be taken back
                    return self.runner.optimizer_step(self._finish_in_place(step, plan))
                return self.runner.run(plan)
            except _AgreedOom:
                # the failed step's partial gradients (the micro-batches done before the failure); directly,
                # as accelerate's zero_grad does nothing while gradients are not synchronised
                for p in self.runner.params:
                    p.grad = None
                self._shrink(step, "redoing the step")
                plan = plan_for(self.split)

    def _finish_in_place(self, step: int, plan: StepPlan) -> torch.Tensor:
        """ZeRO-1/2: keep what was accumulated; re-split the rows not yet done at the smaller size."""
        total, pending = None, [list(m) for m in plan.micro_batches]
        while pending:
            try:
                nll = self.runner.micro_step(plan, pending[0], last=len(pending) == 1)
            except _AgreedOom:
                self._shrink(step, "finishing the step with the smaller micro-batch")
                rest, size = [j for m in pending for j in m], self.split.micro_batch_size
                pending = [rest[k:k + size] for k in range(0, len(rest), size)]
                continue
            pending.pop(0)
            total = nll if total is None else total + nll
        return total

    def _shrink(self, step: int, then: str) -> None:
        gc.collect()  # the failed forward's activations, before the cache is emptied
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        old = self.split.micro_batch_size
        if old == 1:
            raise FittuneError(f"out of memory at step {step + 1} even with micro-batch 1: shorten "
                               f"data.max_length, turn on train.gradient_checkpointing or LoRA, or pick a "
                               f"ZeRO offload config (fittune-plan shows what fits)")
        new = old // 2 if old % 2 == 0 else 1  # same global batch: old // new times more accumulation
        self.split.micro_batch_size, self.split.grad_accum = new, self.split.grad_accum * (old // new)
        self.split.apply(self.runner.accelerator, self.runner.strategy, self.runner.model, self.global_batch)
        self.log(f"out of memory at step {step + 1}: micro-batch -> {new}, accumulation -> "
                 f"{self.split.grad_accum}; {then}")
