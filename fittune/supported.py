"""What a recipe can run under a strategy, decided in one place. Training asks it right after the launch is
known, before anything is loaded or written; the planner asks it for each strategy row, so it never
recommends a launch that training would refuse. The rules that depend on the recipe alone (e.g.
optimizer_in_backward with gradient accumulation) are the config's own validators (fittune/config.py)."""

from __future__ import annotations

import torch

from fittune.config import Config
from fittune.errors import FittuneError, Refusal
from fittune.optim import choose, unsupported
from fittune.precision import Precision, weights_dtype
from fittune.strategy import Strategy


def trainable_dtype(cfg: Config, precision: Precision) -> torch.dtype:
    """The dtype of the weights the optimizer updates: LoRA adapters stay fp32 on any base (PEFT's
    autocast_adapter_dtype), full fine-tuning trains the weights in the dtype they are loaded in."""
    return torch.float32 if cfg.lora.enabled else weights_dtype(cfg, precision)


def refusal(cfg: Config, strategy: Strategy, precision: Precision) -> Refusal | None:
    """Why `cfg` cannot run under `strategy` with `precision` (None: it can). The optimizer's rules are judged
    on the trainable weights' dtype as `trainable_dtype` predicts it (build_optimizer asks them again on the
    parameters themselves)."""
    t = cfg.train
    if t.compile and strategy.sharded:
        return Refusal("train.compile", f"train.compile works with one process, DDP and model.parallel: auto, not "
                                        f"under {strategy.name} (DeepSpeed's and FSDP2's hooks run inside each "
                                        f"layer call): turn it off there")
    if t.oom_adaptive and strategy.gathers_weights:
        return Refusal("train.oom_adaptive", f"train.oom_adaptive does not work under {strategy.name} (its forward "
                                             f"pass gathers weights with collectives, so a rank that fails "
                                             f"mid-forward leaves the others waiting): use DDP or ZeRO-2 (+offload) "
                                             f"with it, or turn it off and pick the micro-batch with "
                                             f"fittune-plan")
    choice = choose(t.optimizer, t.optimizer_in_backward, trainable_dtype(cfg, precision), strategy)
    return unsupported(choice, strategy, precision, cfg.lora.enabled)


def check_supported(cfg: Config, strategy: Strategy, precision: Precision) -> None:
    """Raise `refusal`'s error, if there is one."""
    found = refusal(cfg, strategy, precision)
    if found is not None:
        raise FittuneError(found.why)
