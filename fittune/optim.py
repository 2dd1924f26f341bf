"""The optimizer of a run, decided and built in one place: `build_optimizer(cfg, params, strategy, precision, fused, gpu)`.

  train.optimizer           adamw (torch's AdamW; torchao's AdamW with bf16 stochastic rounding when the
                            trainable weights are bf16 and fittune steps them itself: DeepSpeed and FSDP2 keep
                            fp32 master weights of a bf16 module), adamw8bit / adamw4bit (torchao, block-quantized
                            moments)
  train.optimizer_in_backward
                            each parameter stepped from its post-accumulate-grad hook the moment its gradient
                            is complete, the gradient freed at once (InBackwardOptimizer)

Why torchao and not bitsandbytes: torchao's low-bit AdamW is written in PyTorch ops compiled by
`torch.compile` (CPU and any CUDA GPU, so the CPU tests run the same optimizer as the GPU), supports
`bf16_stochastic_round=` on the weights, DTensor parameters and CPU offload, and its states are tensor
subclasses that torch.save / accelerate's save_state round-trip. bitsandbytes 0.50 ships prebuilt CUDA
binaries (its CPU path is partial), has no bf16 stochastic rounding of the weights, and is one more binary to
match to the CUDA driver.

What each combination does, and what is refused (one FittuneError naming the fix, `unsupported`):
  * torchao (low-bit states, or bf16 weights): one process (one GPU, the CPU, or `model.parallel: auto`).
    DeepSpeed and FSDP2 own the sharded step; DDP replicas would draw different stochastic roundings.
    Full fine-tuning only for the low-bit ones (LoRA's states are a few MB, and its portable checkpoint
    stores plain moments). fp16 weights: refused (fp16 GPUs keep the fp32-master path, model.dtype auto).
  * in-backward: one process; no accumulation, no global clipping, no fp16 loss scaling, no oom_adaptive
    (checked in fittune.config); the LR schedule advances once per step as usual (the lr a parameter is
    stepped with is the one the schedule set after the previous step, as on the ordinary path). Non-finite
    gradients: the first gradient of a backward is checked (one sync per step); if it is not finite no
    parameter is stepped (a non-finite loss makes every gradient non-finite, so the step is skipped whole).
    A gradient that turns non-finite only deeper in the backward is found at the step's end (the logged
    norm): the parameters before it were already updated, the step counts as non-finite, and the run stops
    after train.max_bad_steps such steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass

import torch

from fittune.errors import FittuneError, Refusal
from fittune.precision import Precision
from fittune.shards import tensor_bytes
from fittune.strategy import Strategy

# torchao's block sizes and the rule it quantizes by (torchao/optim/adam.py, _AdamBase._new_buffer): a moment
# is quantized when its tensor has at least QUANTIZE_MIN elements and a whole number of blocks; otherwise it
# is a plain tensor in the parameter's dtype.
QUANTIZE_MIN = 4096
LOWBIT = {"adamw8bit": ("AdamW8bit", 256), "adamw4bit": ("AdamW4bit", 128)}
"""train.optimizer -> (torchao.optim class, block size)."""
# bytes per moment of a quantized tensor: codes, one fp32 scale per block, and a per-tensor lookup table
CODE_BITS = {"adamw8bit": 8, "adamw4bit": 4}
QMAP_ENTRIES = {"adamw8bit": 256, "adamw4bit": 16}
ADAM_MOMENTS = 2
INSTALL_HINT = "pip install 'fittune[lowbit]' (torchao >= 0.18)"


@dataclass(frozen=True)
class OptimizerChoice:
    """What the run's optimizer is (decided by `choose`)."""

    name: str
    """train.optimizer: adamw, adamw8bit or adamw4bit."""
    stochastic_rounding: bool
    """bf16 trainable weights, updated with stochastic rounding (torchao's bf16_stochastic_round)."""
    in_backward: bool
    """Each parameter stepped inside backward (train.optimizer_in_backward)."""
    fp16_weights: bool = False
    cpu_adam: bool = False
    """DeepSpeed's optimizer offload: accelerate swaps torch's AdamW for DeepSpeedCPUAdam, run in CPU RAM."""

    @property
    def torchao(self) -> bool:
        """Built from torchao (low-bit states, or bf16 weights with stochastic rounding)."""
        return self.name in LOWBIT or self.stochastic_rounding

    def describe(self) -> str:
        """One line for the run log."""
        states = {"adamw": "AdamW", "adamw8bit": "AdamW, 8-bit states", "adamw4bit": "AdamW, 4-bit states"}
        library = "torchao" if self.torchao else "DeepSpeed CPU Adam, in CPU RAM" if self.cpu_adam else "torch"
        parts = [f"{states[self.name]} ({library})"]
        if self.stochastic_rounding:
            parts.append("bf16 weights with stochastic rounding")
        if self.in_backward:
            parts.append("stepped in backward (one gradient at a time)")
        return ", ".join(parts)


def choose(optimizer: str, in_backward: bool, trainable_dtype: torch.dtype, strategy: Strategy,
           gpu: bool = True) -> OptimizerChoice:
    """The optimizer for train.optimizer / optimizer_in_backward and the trainable weights' dtype as loaded.
    DeepSpeed and FSDP2 keep fp32 master weights of a bf16 module themselves: no stochastic rounding there.
    `gpu`: GPU ranks (DeepSpeed's offload then steps with its CPU Adam; CPU ranks keep torch's AdamW, see
    distributed.configure_deepspeed)."""
    native = not strategy.sharded
    return OptimizerChoice(optimizer, native and trainable_dtype == torch.bfloat16, in_backward,
                           fp16_weights=native and trainable_dtype == torch.float16,
                           cpu_adam=strategy.deepspeed and strategy.offload_optimizer and gpu)


def unsupported(choice: OptimizerChoice, strategy: Strategy, precision: Precision, lora: bool) -> Refusal | None:
    """Why `choice` cannot run under `strategy` (None: it can), and the setting refused (fittune.supported asks
    it for the run and the planner; build_optimizer again with the parameters' own dtype)."""
    if choice.torchao and choice.fp16_weights:
        return Refusal("model.dtype", "fp16 weights cannot be trained with low-bit states or stochastic rounding: keep fp32 master "
                "weights (model.dtype auto) on an fp16 GPU, or bf16 weights (model.dtype bfloat16) where it has bf16")
    if choice.name in LOWBIT and lora:
        return Refusal(f"train.optimizer {choice.name}", f"train.optimizer {choice.name} is for full fine-tuning (LoRA's optimizer states are a few MB): "
                f"use train.optimizer adamw with LoRA")
    if choice.torchao and not strategy.plain:
        why = ("DeepSpeed and FSDP2 shard the optimizer step themselves" if strategy.sharded else
               "DDP replicas would each draw their own stochastic rounding" if choice.stochastic_rounding else
               "low-bit states under DDP are not supported yet")
        setting = f"train.optimizer {choice.name}" if choice.name in LOWBIT else "model.dtype bfloat16"
        return Refusal(setting, f"torchao's optimizers (train.optimizer {choice.name}"
                f"{', bf16 weights with stochastic rounding' if choice.stochastic_rounding else ''}) run in one "
                f"process in fittune, not under {strategy.name} ({why}): launch one process "
                f"(accelerate_configs/single_gpu.yaml), or use train.optimizer adamw with fp32 weights "
                f"(model.dtype auto)")
    if choice.in_backward and not strategy.plain:
        return Refusal("train.optimizer_in_backward", f"train.optimizer_in_backward runs in one process, not under {strategy.name} (DDP reduces "
                f"gradients in buckets after the hooks have run; DeepSpeed and FSDP2 own the optimizer step): "
                f"launch one process or turn optimizer_in_backward off")
    if choice.in_backward and precision.scales_loss:
        return Refusal("train.optimizer_in_backward", "train.optimizer_in_backward cannot use fp16 loss scaling (every gradient must be checked before "
                "any update): use bf16, or turn optimizer_in_backward off")
    return None


def import_torchao():
    """torchao.optim, or one FittuneError saying how to install it."""
    try:
        import torchao.optim
    except ImportError as e:
        raise FittuneError(f"train.optimizer / bf16 weights need torchao ({e}): {INSTALL_HINT}, or use "
                           f"train.optimizer adamw with model.dtype auto (fp32 master weights)") from None
    return torchao.optim


# ---------------------------------------------------------------------------------------------------------
# Optimizers


def _factory(choice: OptimizerChoice, lr: float, betas: tuple[float, float], weight_decay: float,
             fused: bool) -> Callable[[list], torch.optim.Optimizer]:
    """A function building the chosen optimizer over a list of parameters."""
    if not choice.torchao:
        return lambda ps: torch.optim.AdamW(ps, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused,
                                            foreach=not fused)
    ao = import_torchao()
    kwargs = dict(lr=lr, betas=betas, weight_decay=weight_decay, bf16_stochastic_round=choice.stochastic_rounding)
    if choice.name in LOWBIT:
        cls_name, block = LOWBIT[choice.name]
        return lambda ps: getattr(ao, cls_name)(ps, block_size=block, **kwargs)
    return lambda ps: ao._AdamW(ps, **kwargs)  # torchao's full-precision AdamW, for bf16 stochastic rounding


class _StateView(MutableMapping):
    """`optimizer.state[p]` of a facade: the state of `p` in the inner optimizer that steps it (what
    fittune.checkpoints reads and writes for LoRA's portable moments)."""

    def __init__(self, by_param: dict):
        self.by_param = by_param

    def __getitem__(self, p):
        return self.by_param[p].state[p]

    def __setitem__(self, p, value) -> None:
        self.by_param[p].state[p] = value

    def __delitem__(self, p) -> None:
        del self.by_param[p].state[p]

    def __iter__(self) -> Iterator:
        return (p for p, inner in self.by_param.items() if inner.state.get(p))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Facade(torch.optim.Optimizer):
    """One param group with float hyperparameters over inner optimizers: the LR schedule writes `lr` here
    (torchao keeps lr as a tensor, which a JSON checkpoint state and the log cannot hold), and each inner
    optimizer is given it before it steps. state_dict / load_state_dict hold every inner optimizer's."""

    def __init__(self, params: list, inners: list[torch.optim.Optimizer], defaults: dict):
        super().__init__(params, defaults)
        self.inners = inners
        self.by_param = {p: inner for inner in inners for g in inner.param_groups for p in g["params"]}
        self.state = _StateView(self.by_param)

    def _give_lr(self, inner: torch.optim.Optimizer) -> None:
        lr = self.param_groups[0]["lr"]
        for group in inner.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def state_dict(self) -> dict:
        return {"inner": [inner.state_dict() for inner in self.inners],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict["inner"]) != len(self.inners):
            raise FittuneError(f"the checkpoint's optimizer holds {len(state_dict['inner'])} inner optimizers, "
                               f"this run {len(self.inners)}: resume with the same train.optimizer_in_backward")
        for inner, saved in zip(self.inners, state_dict["inner"]):
            inner.load_state_dict(saved)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)


class SteppedOptimizer(_Facade):
    """A torchao optimizer stepped once per step, as usual (behind the float-lr facade)."""

    def __init__(self, params: list, make: Callable[[list], torch.optim.Optimizer], defaults: dict):
        super().__init__(params, [make(params)], defaults)

    @torch.no_grad()
    def step(self, closure=None):
        self._give_lr(self.inners[0])
        return self.inners[0].step(closure)


@dataclass
class InBackwardStep:
    """What the in-backward updates of one step did."""

    grad_norm: float
    """Norm of all the step's gradients (each measured in its hook, before its update)."""
    stepped: bool
    """Every parameter was updated with a finite gradient."""


class InBackwardOptimizer(_Facade):
    """One optimizer per parameter, stepped from the parameter's post-accumulate-grad hook, its gradient
    then freed; `step` and `zero_grad` have nothing left to do. See the module docstring for the rules."""

    def __init__(self, params: list, make: Callable[[list], torch.optim.Optimizer], defaults: dict):
        super().__init__(params, [make([p]) for p in params], defaults)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        self._sq_sum: torch.Tensor | None = None
        self._checked, self._skip = False, False

    @torch.no_grad()
    def _hook(self, p: torch.nn.Parameter) -> None:
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        self._sq_sum = sq if self._sq_sum is None else self._sq_sum + sq.to(self._sq_sum.device)
        if not self._checked:  # the step's first gradient: one sync, before anything is updated
            self._checked, self._skip = True, not bool(torch.isfinite(sq))
        if not self._skip:
            inner = self.by_param[p]
            self._give_lr(inner)
            inner.step()
        p.grad = None  # freed at once: no full set of gradients ever exists

    def step(self, closure=None):
        """Nothing to do: every parameter was stepped in backward."""
        return None

    def finish_step(self) -> InBackwardStep:
        """The step's gradient norm and whether it was applied whole; resets for the next step."""
        norm = math.sqrt(float(self._sq_sum)) if self._sq_sum is not None else 0.0
        result = InBackwardStep(norm, not self._skip and math.isfinite(norm))
        self._sq_sum, self._checked, self._skip = None, False, False
        return result


@dataclass
class OptimizerSetup:
    """The built optimizer and what it is."""

    optimizer: torch.optim.Optimizer
    choice: OptimizerChoice
    in_backward: InBackwardOptimizer | None
    """The same object as `optimizer` when it steps inside backward (StepRunner then only finishes)."""


def build_optimizer(cfg, params: list, strategy: Strategy, precision: Precision, fused: bool,
                    gpu: bool) -> OptimizerSetup:
    """The run's optimizer over `params` (the trainable parameters), or one FittuneError when the
    combination is not supported (`unsupported`). `fused`: torch's fused AdamW (every parameter on a GPU);
    `gpu`: the ranks compute on GPUs (see `choose`)."""
    t = cfg.train
    dtypes = {p.dtype for p in params}
    choice = choose(t.optimizer, t.optimizer_in_backward,
                    torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16 if torch.float16 in dtypes
                    else torch.float32, strategy, gpu)
    refused = unsupported(choice, strategy, precision, cfg.lora.enabled)
    if refused:
        raise FittuneError(refused.why)
    make = _factory(choice, t.lr, tuple(t.betas), t.weight_decay, fused)
    defaults = {"lr": t.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay, "fused": fused}
    if choice.in_backward:
        opt = InBackwardOptimizer(params, make, defaults)
        return OptimizerSetup(opt, choice, opt)
    if choice.torchao:
        return OptimizerSetup(SteppedOptimizer(params, make, defaults), choice, None)
    return OptimizerSetup(make(params), choice, None)


# ---------------------------------------------------------------------------------------------------------
# Bytes: the live count and the planner's formula



def live_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the moments an optimizer holds now (the `step` counters, a scalar each, are left out)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    total = 0
    for p in (p for g in inner.param_groups for p in g["params"]):
        state = inner.state.get(p) or {}
        total += sum(tensor_bytes(v) for k, v in state.items() if k != "step")
    return total


def moment_bytes(numel: int, optimizer: str, itemsize: int) -> int:
    """Bytes of ONE AdamW moment of a tensor of `numel` elements (parameter element size `itemsize`)."""
    if optimizer not in LOWBIT:
        return numel * itemsize
    block = LOWBIT[optimizer][1]
    if numel < QUANTIZE_MIN or numel % block:
        return numel * itemsize  # torchao keeps small / ragged tensors' moments unquantized
    return numel * CODE_BITS[optimizer] // 8 + (numel // block) * 4 + QMAP_ENTRIES[optimizer] * 4


def state_bytes(numels: Iterable[int], optimizer: str, itemsize: int) -> int:
    """Bytes of both AdamW moments for trainable tensors of `numels` elements: the planner's 'optimizer'."""
    return sum(ADAM_MOMENTS * moment_bytes(n, optimizer, itemsize) for n in numels)
