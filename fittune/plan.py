"""Memory planner: will this recipe fit this hardware, with which strategy, and how do I launch it?

    fittune-plan --config configs/qwen2.5-3b-lora.yaml [--gpus N --gpu-mem GiB --cpu-mem GiB] [--a.b v ...]

(also `train.py --plan ...`). The model is counted on the meta device (fittune/model_shapes.py: exact
parameter counts, no download), the machine read or taken from the flags (fittune/hardware.py), and every
launch option in LAUNCH_OPTIONS is estimated (fittune/estimate.py: peak memory per GPU and in CPU RAM from
named terms, fittune/activations.py: what autograd keeps) at the recipe's micro-batch, halved until it fits.
This module holds the catalogue of launch options, the search for the fastest one that fits, the printed
plan and the command line.
"""

from __future__ import annotations

import difflib
import math
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from fittune.activations import (
    CHUNKED_LOSS_BYTES_PER_LOGIT,
    DEFAULT_LOSS_CHUNK,
    STANDARD_LOSS_BYTES_PER_LOGIT,
    activation_dtypes,
    layer_activation_terms,
)
from fittune.cli import DEMO_RECIPE, split_flag
from fittune.config import RUN_CONTROL, Config, all_keys, build_config, parse_overrides, split_overrides
from fittune.entry import run_cli
from fittune.errors import FittuneError
from fittune.estimate import (
    Estimate,
    Workload,
    estimate,
    processes,
)
from fittune.hardware import GIB, Hardware, detect_hardware
from fittune.model_shapes import ModelShape, model_shape
from fittune.precision import Precision, resolve_precision, weights_dtype
from fittune.strategy import Strategy
from fittune.supported import check_supported, refusal

REPO_ROOT = Path(__file__).resolve().parents[1]
# The planner plans launches with this repository's accelerate configs, which set mixed_precision 'no' or leave
# it unset (accelerate's default 'no'): train.mixed_precision decides, as for a run launched with them.
LAUNCHER_PRECISION = "no"


@dataclass(frozen=True)
class LaunchOption:
    """A way to launch fittune: a strategy and the accelerate config that launches it."""

    strategy: Strategy
    """The strategy; its world size is the fewest processes it is planned with (2: it needs several GPUs;
    the device map needs several GPUs in one process)."""
    title: str
    """How the plan's table names it."""
    accelerate_config: str | None
    """accelerate_configs/<name>.yaml; None: launched with python (the device map, `model.parallel: auto`)."""
    description: str
    recipe_overrides: tuple[tuple[str, object], ...] = ()
    """Config keys this row sets on top of the recipe (the low-memory full fine-tuning rows), in order."""

    @property
    def name(self) -> str:
        """The strategy's shared name (fittune.strategy.NAMES)."""
        return self.strategy.name

    @property
    def key(self) -> str:
        """Unique among LAUNCH_OPTIONS: the strategy's name, + the optimizer a low-memory row sets."""
        optimizer = dict(self.recipe_overrides).get("train.optimizer")
        return self.name + (f"+{optimizer}_in_backward" if optimizer else "")

    @property
    def runnable(self) -> bool:
        """fittune can launch it: its accelerate config ships with fittune (the device map needs none)."""
        return self.accelerate_config is None or _config_path(self.accelerate_config).is_file()


def _config_path(name: str) -> Path:
    return REPO_ROOT / "accelerate_configs" / f"{name}.yaml"


def _from_here(path: Path) -> str:
    """A repository file as the printed command can use it from the current directory."""
    return shlex.quote(os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path))


def _low_memory(optimizer: str) -> tuple[tuple[str, object], ...]:
    """The recipe keys of full fine-tuning in bf16 with `optimizer`'s low-bit states stepped in backward
    (fittune.optim); clipping off and no accumulation, as in-backward requires (the plan sets the micro-batch)."""
    return (("model.dtype", "bfloat16"), ("train.mixed_precision", "bf16"), ("train.max_grad_norm", 0.0),
            ("train.optimizer", optimizer), ("train.optimizer_in_backward", True))


# From the fastest to the slowest (expected speed): the recommendation is the first one that fits. The
# low-memory rows come right after the recipe's own single-GPU row: the recipe as written is preferred when
# it fits; they keep everything on one GPU (no CPU offload), ahead of the multi-GPU and offload strategies.
LAUNCH_OPTIONS: tuple[LaunchOption, ...] = (
    LaunchOption(Strategy.named("single", 1), "single GPU", "single_gpu", "one process, whole model on one GPU"),
    LaunchOption(Strategy.named("single", 1), "single GPU, bf16 + 8-bit AdamW in backward", "single_gpu",
                 "full fine-tuning, bf16 weights, 8-bit AdamW states, each parameter stepped in backward",
                 _low_memory("adamw8bit")),
    LaunchOption(Strategy.named("single", 1), "single GPU, bf16 + 4-bit AdamW in backward", "single_gpu",
                 "full fine-tuning, bf16 weights, 4-bit AdamW states, each parameter stepped in backward",
                 _low_memory("adamw4bit")),
    LaunchOption(Strategy.named("ddp", 2), "DDP", "multi_gpu",
                 "one process per GPU, each with a full copy of the model"),
    LaunchOption(Strategy.named("zero2", 2), "ZeRO-2", "deepspeed_zero2",
                 "DeepSpeed: optimizer states + gradients sharded"),
    LaunchOption(Strategy.named("fsdp2", 2), "FSDP2 full shard", "fsdp2",
                 "parameters, gradients, optimizer states sharded"),
    LaunchOption(Strategy.named("zero3", 2), "ZeRO-3", "deepspeed_zero3", "DeepSpeed: parameters sharded too"),
    LaunchOption(Strategy.named("device_map", 1), "device-map model parallel", None,
                 "one process, layers spread over the GPUs (they work one after another)"),
    LaunchOption(Strategy.named("zero2_offload", 1), "ZeRO-2 + optimizer offload", "deepspeed_zero2_offload",
                 "DeepSpeed: optimizer states, fp32 master and gradients in CPU RAM"),
    LaunchOption(Strategy.named("zero3_offload", 1), "ZeRO-3 + param/optim offload", "deepspeed_zero3_offload",
                 "DeepSpeed: parameters and optimizer in CPU RAM; the least GPU memory, the slowest"),
)
OPTION_BY_NAME = {o.name: o for o in LAUNCH_OPTIONS if not o.recipe_overrides}
"""The recipe's own row of each strategy."""


# ---------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Row:
    """One launch option as planned: its estimate, and the recipe it runs (the recipe + the row's keys)."""

    option: LaunchOption
    estimate: Estimate
    cfg: Config
    shape: ModelShape
    precision: Precision


@dataclass
class Plan:
    """The result of make_plan: model shape, hardware, one estimate per launch option, the recommendation."""

    cfg: Config
    shape: ModelShape
    hardware: Hardware
    precision: Precision
    global_batch: int
    estimates: list[Estimate]
    """One per LAUNCH_OPTIONS row, in its order."""
    recommended: Estimate | None
    recipe: str
    extra_args: list[str]
    notes: list[str]
    rows: list[Row] = field(default_factory=list)
    """One per LAUNCH_OPTIONS row, in its order (`estimates` are their estimates)."""

    def row(self, est: Estimate) -> Row:
        """The row `est` belongs to."""
        return next(r for r in self.rows if r.estimate is est)

    def command(self, est: Estimate) -> str:
        """The exact command that launches `est` with this repository's files."""
        option = self.row(est).option
        config = option.accelerate_config
        args = ["--config", self.recipe]
        if est.strategy.device_map:
            args += ["--model.parallel", "auto"]  # one process, layers spread over the GPUs
        args += [*self.extra_args, *(a for k, v in option.recipe_overrides for a in (f"--{k}", _arg(v))),
                 "--train.micro_batch_size", str(est.micro_batch), "--train.grad_accum", str(est.grad_accum)]
        tail = " ".join(shlex.quote(a) for a in args)
        train = _from_here(REPO_ROOT / "train.py")
        if config is None:
            return f"python {train} {tail}"
        cmd = f"accelerate launch --config_file {_from_here(_config_path(config))}"
        if est.strategy.one_process_per_gpu:
            cmd += f" --num_processes {est.processes}"
        return f"{cmd} {train} {tail}"

    def command_notes(self, est: Estimate) -> list[str]:
        """Caveats about the command: files or config keys it needs that do not exist yet."""
        name = self.row(est).option.accelerate_config
        if name and not _config_path(name).is_file():
            return [f"accelerate_configs/{name}.yaml does not exist yet"]
        return []

    def render(self) -> str:
        """The plan as text: setup, strategy table, recommendation and its memory breakdown."""
        return render(self)


def _arg(value: object) -> str:
    """A config value as a command-line override (`true`, `0`, `bfloat16`)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


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


class RowRecipe(NamedTuple):
    """The recipe a launch option's row runs, and why the row does not apply ("": it does)."""

    cfg: Config
    why_not: str


def _row_config(cfg: Config, option: LaunchOption, per_process: int) -> RowRecipe:
    """The recipe `option` runs (the recipe itself for the recipe's own rows)."""
    if not option.recipe_overrides:
        return RowRecipe(cfg, "")
    if cfg.lora.enabled:
        return RowRecipe(cfg, "full fine-tuning only")
    tree = cfg.model_dump()
    for key, value in option.recipe_overrides:
        section, leaf = key.split(".")
        tree[section][leaf] = value
    tree["train"].update(micro_batch_size=per_process, grad_accum=1)  # in backward: no accumulation
    # a step in backward cannot be redone after an OOM: the row is estimated without it, for reference only
    tree["train"]["oom_adaptive"] = False
    row_cfg = Config.model_validate(tree)
    same = all(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) == v for k, v in option.recipe_overrides)
    why_not = "not with train.oom_adaptive" if cfg.train.oom_adaptive else "the recipe's own row" if same else ""
    return RowRecipe(row_cfg, why_not)


def _fitted(option: LaunchOption, cfg: Config, shapes: Callable[[Config, Precision], ModelShape], hw: Hardware,
            precision: Precision, global_batch: int) -> Row:
    """`option` at the largest micro-batch that fits (or 1), with the accumulation that keeps the global
    batch (optimizer in backward: accumulation 1); a strategy fittune cannot launch (yet, or with this
    recipe's optimizer) is estimated for reference and marked not applicable."""
    # at least one row each: a one-process recipe's global batch may be smaller than the GPU count (its
    # multi-process rows are then estimated for reference only, not applicable)
    per_process = max(1, global_batch // processes(option.strategy, hw.gpus))
    row_cfg, why_not = _row_config(cfg, option, per_process)
    if option.recipe_overrides and not hw.bf16:
        why_not = why_not or "needs a bf16 GPU"  # fp16 GPUs keep fp32 master weights
    row_precision = Precision("bf16", "the row's recipe keys") if option.recipe_overrides else precision
    shape, t = shapes(row_cfg, row_precision), row_cfg.train
    refused = refusal(row_cfg, option.strategy, row_precision)  # training's own check, before it loads anything
    why_not = why_not or (f"not with {refused.setting}" if refused else "")
    sizes = [per_process] if t.optimizer_in_backward else _micro_candidates(t.micro_batch_size, per_process)
    for m in sizes:  # always ends with 1, unless in backward
        work = Workload(m, row_cfg.data.max_length, t.gradient_checkpointing, t.loss_chunk_size, row_precision,
                        t.optimizer, t.optimizer_in_backward)
        est = estimate(option.strategy, shape, work, hw.gpus)
        est.grad_accum = per_process // m
        _check_fit(est, hw)
        if est.fits or "GPU memory" not in est.limit:
            break  # fits, or only CPU RAM is short: a smaller micro-batch does not change CPU RAM
    if est.applicable and (why_not or not option.runnable):
        est.applicable, est.why_not = False, why_not or "not in fittune yet"
    return Row(option, est, row_cfg, shape, row_precision)


def make_plan(cfg: Config, gpus: int | None = None, gpu_mem_gib: float | None = None,
              cpu_mem_gib: float | None = None, *, recipe: str | None = None,
              extra_args: list[str] | tuple[str, ...] = ()) -> Plan:
    """Plan `cfg` on `gpus` x `gpu_mem_gib` GiB GPUs and `cpu_mem_gib` GiB of CPU RAM (None: detect).

    Every launch option is estimated at the recipe's micro-batch, halved (with the accumulation doubled, so
    the global batch micro x accum x GPUs stays the same) until it fits. The recommendation is the first
    option that fits in LAUNCH_OPTIONS order (expected speed), with several GPUs those that use them all at
    GPU speed first (`_preference`). `recipe` and `extra_args` (the caller's `--key value` overrides) go into
    the printed launch commands.
    """
    hw = detect_hardware(gpus, gpu_mem_gib, cpu_mem_gib)
    if hw.gpus < 1 or hw.gpu_mem_gib <= 0 or hw.cpu_mem_gib <= 0:
        raise FittuneError("GPU count, GPU memory and CPU memory must be positive")
    # GiB, not MB: a value no machine has is a unit mistake, not a plan to print
    for flag, value, most, what in (("--gpu-mem", hw.gpu_mem_gib, 1024, "a GPU"),
                                    ("--cpu-mem", hw.cpu_mem_gib, 8 * 1024, "a machine's RAM")):
        if value > most:
            raise FittuneError(f"{flag} {value:g} is in GiB: more than {what} holds (over {most} GiB); if you meant "
                               f"MiB (as nvidia-smi and free -m print), pass {value / 1024:g}")
    # planned for a GPU even on a machine without one (hw.bf16 is then assumed)
    precision = resolve_precision(cfg.train.mixed_precision, LAUNCHER_PRECISION, gpu=True, bf16_supported=hw.bf16)
    cache: dict[torch.dtype, ModelShape] = {}

    def shapes(row_cfg: Config, row_precision: Precision) -> ModelShape:  # one count per weights dtype
        dtype = weights_dtype(row_cfg, row_precision)
        if dtype not in cache:
            cache[dtype] = model_shape(row_cfg, dtype)
        return cache[dtype]

    shape = shapes(cfg, precision)
    _refuse_what_no_launch_runs(cfg, precision)
    one_process = _runs_in_one_process(cfg, precision)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * (1 if one_process else hw.gpus)
    rows = [_fitted(o, cfg, shapes, hw, precision, global_batch) for o in LAUNCH_OPTIONS]
    estimates = [r.estimate for r in rows]
    fitting = sorted((e for e in estimates if e.fits and e.applicable), key=lambda e: _preference(e.strategy, hw.gpus))
    recommended = fitting[0] if fitting else None
    return Plan(cfg, shape, hw, precision, global_batch, estimates, recommended,
                recipe or "<recipe.yaml>", list(extra_args),
                list(shape.notes) + _hardware_notes(cfg, hw) + _global_batch_notes(cfg, hw, one_process), rows)


def _refuse_what_no_launch_runs(cfg: Config, precision: Precision) -> None:
    """A recipe no launch runs (e.g. LoRA with low-bit states: not even one process runs it) gets training's own
    refusal, not a table of rows that cannot run."""
    check_supported(cfg, Strategy(), precision)


def _runs_in_one_process(cfg: Config, precision: Precision) -> bool:
    """Whether the recipe's optimizer runs in one process only (after `_refuse_what_no_launch_runs`: it runs in
    one): refused under every multi-process strategy (steps in backward, torchao's low-bit states; bf16
    weights' stochastic rounding is refused under DDP only, as ZeRO and FSDP2 keep fp32 master weights)."""
    return all(refusal(cfg, Strategy.named(name, 2), precision) is not None
               for name in ("ddp", "zero2", "fsdp2"))


def _global_batch_notes(cfg: Config, hw: Hardware, one_process: bool) -> list[str]:
    """With several GPUs the planned global batch is the recipe's micro-batch x accumulation on each: say that it
    is larger than on one GPU, while the learning rate stays the recipe's. A recipe whose optimizer runs in one
    process keeps its own global batch: say that the other GPUs stay idle, and what uses them all."""
    t = cfg.train
    one = t.micro_batch_size * t.grad_accum
    if hw.gpus == 1:
        return []
    if one_process:
        return [f"this recipe's optimizer runs in one process (train.optimizer {t.optimizer}"
                f"{', optimizer_in_backward' if t.optimizer_in_backward else ''}, model.dtype {cfg.model.dtype}): it "
                f"is planned at its own global batch of {one} rows on one GPU (or, with model.parallel: auto, its "
                f"layers spread over the {hw.gpus}); to train on all {hw.gpus} GPUs at once, use torch's AdamW with "
                f"fp32 master weights (train.optimizer adamw, model.dtype auto, no optimizer_in_backward), as "
                f"configs/qwen2.5-3b-full.yaml does"]
    keep = (f"; --train.grad_accum {t.grad_accum // hw.gpus} keeps {one} rows per step"
            if t.grad_accum % hw.gpus == 0 else "; a smaller --train.grad_accum makes it smaller"
            if t.grad_accum > 1 else "; a smaller --train.micro_batch_size makes it smaller"
            if t.micro_batch_size > 1 else "")
    return [f"the global batch is the recipe's micro-batch x accumulation on each of {hw.gpus} GPUs: "
            f"{one * hw.gpus} rows per optimizer step, {hw.gpus}x the {one} of one GPU, at the recipe's learning "
            f"rate ({t.lr:g}){keep}"]


def _preference(strategy: Strategy, gpus: int) -> int:
    """The order among the options that fit (a stable sort keeps LAUNCH_OPTIONS' order within a group). On
    one GPU that order alone. With several: every GPU training at GPU speed first (DDP, ZeRO, FSDP2); then one
    of them (a one-GPU row: GPU speed, the others idle); then the device map (all GPUs, one at a time) and the
    offload strategies (bound by the CPU's optimizer step)."""
    if gpus == 1:
        return 0
    if strategy.one_process_per_gpu and not strategy.offload:
        return 0
    return 1 if strategy.single_gpu else 2


def _hardware_notes(cfg: Config, hw: Hardware) -> list[str]:
    """The hardware notes, and what an assumed bf16 GPU means for this recipe."""
    if not hw.bf16_assumed:
        return list(hw.notes)
    needs_bf16 = cfg.model.dtype == "bfloat16" or cfg.train.optimizer_in_backward or cfg.train.mixed_precision == "bf16"
    assumed = ("bf16 support assumed: this recipe needs a GPU with bf16 (bf16 weights, bf16 mixed precision or the "
               "optimizer step in backward refuse fp16)" if needs_bf16 else
               "bf16 support assumed (an fp16-only GPU gives the same plan: both are 2 bytes)")
    return list(hw.notes) + [assumed]


# ---------------------------------------------------------------------------------------------------------
# Text output


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


_SHORT = {"weights": "W", "gradients": "G", "optimizer": "O", "activations": "A", "logits/loss": "L",
          "weight copies": "Wc", "gathered layers": "Wg"}


def _breakdown(est: Estimate) -> str:
    """The table's last column: resident | forward/backward | optimizer step | overhead, in GiB."""
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
    mixed = plan.precision.mixed
    names = {4: "fp32", 2: mixed if plan.precision.half else "half"}
    if s.lora:
        weights = f"base weights {names[s.frozen_itemsize]}, adapters {names[s.trainable_itemsize]}"
    elif s.trainable_itemsize == 2:
        weights = f"weights {names[2]}, updated with stochastic rounding (no fp32 master copy)"
    else:
        weights = f"weights {names[s.trainable_itemsize]} (their own master copy on the native path)"
    mp = f"{mixed} mixed precision" if plan.precision.half else "no mixed precision, fp32 compute"
    return f"{mp} ({plan.precision.why}); {weights}"


def render(plan: Plan) -> str:
    """Format a plan for the terminal: the setup, the table of launch options, the recommendation with its
    launch command and the memory of the recommended run."""
    lines = [*_setup_lines(plan), "", *_table_lines(plan), ""]
    rec = plan.recommended
    if rec is None:
        return "\n".join(lines + _nothing_fits_lines(plan))
    return "\n".join(lines + _recommendation_lines(plan, rec) + [""] + _details(plan, rec))


def _setup_lines(plan: Plan) -> list[str]:
    """Model, parameters, hardware, precision, workload and notes."""
    s, hw, t = plan.shape, plan.hardware, plan.cfg.train
    gpus = f"{hw.gpus} GPU{'s' if hw.gpus > 1 else ''}"
    lines = [f"fittune plan: {plan.recipe}",
             f"  model       {s.name}  [{s.source}]",
             f"              {s.model_type}: {s.num_layers} layers, hidden {s.hidden_size}, MLP "
             f"{s.intermediate_size}, {s.num_heads} heads / {s.num_kv_heads} KV heads, vocab {s.vocab_size}"
             f"{', tied embeddings' if s.tie_word_embeddings else ''}"]
    if s.lora:
        targets = ", ".join(p.name for p in s.projections if p.lora_rank)
        lines.append(f"  parameters  {s.frozen_params:,} base (frozen); LoRA r={s.lora_rank} on {targets}: "
                     f"{s.trainable_params:,} trainable")
    else:
        lines.append(f"  parameters  {s.total_params:,}, all trainable (full fine-tuning)")
    lines.append(f"  hardware    {gpus} x {hw.gpu_mem_gib:.1f} GiB, CPU RAM {hw.cpu_mem_gib:.1f} GiB ({hw.source})")
    lines.append(f"  precision   {_precision_line(plan)}")
    chunk = f"chunked loss ({t.loss_chunk_size} tokens)" if t.loss_chunk_size > 0 else "standard loss (no chunking)"
    lines.append(f"  workload    {plan.cfg.data.max_length} tokens per sequence (data.max_length, planned fully "
                 f"padded); recipe micro-batch {t.micro_batch_size} x accumulation {t.grad_accum} x "
                 f"{gpus if plan.global_batch != t.micro_batch_size * t.grad_accum else '1 process'} = global "
                 f"batch {plan.global_batch}; gradient "
                 f"checkpointing {'on' if t.gradient_checkpointing else 'off'}; {chunk}")
    return lines + [f"  note        {note}" for note in plan.notes]


def _table_lines(plan: Plan) -> list[str]:
    """One row per launch option: does it fit, at which micro-batch, and the memory by term."""
    header = ("strategy", "fits?", "micro x accum", "GPU GiB", "CPU GiB",
              "per GPU, GiB: resident | forward/backward | optimizer step | overhead")
    rows = []
    for row in plan.rows:
        if row.option.recipe_overrides and plan.shape.lora:
            continue  # the low-bit in-backward rows are full fine-tuning recipes: nothing to say for LoRA
        est, single = row.estimate, row.estimate.strategy.single_gpu
        label = row.option.title + (
            f" ({'LoRA' if plan.shape.lora else 'full'})" if single and not row.option.recipe_overrides else "")
        if not est.applicable:
            fits = est.why_not
        else:
            fits = "yes" if est.fits else f"no: {est.limit}"
        if single and plan.hardware.gpus > 1 and est.fits and est.applicable:
            fits = "yes (1 GPU)"
        rows.append((label, fits, f"{est.micro_batch} x {est.grad_accum}", _gib(est.gpu_total),
                     _gib(est.cpu_total), _breakdown(est)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 1, 2, 5) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows),
            "W weights, G gradients, O optimizer states, A activations, L logits/loss, Wc autocast weight "
            "copies, Wg gathered (un-sharded) layers; ctx CUDA context + allocator slack"]


def _nothing_fits_lines(plan: Plan) -> list[str]:
    hw = plan.hardware
    runnable = [e for e in plan.estimates if e.applicable]
    if not runnable:  # `_refuse_what_no_launch_runs` refuses such a recipe first; said plainly if one slips by
        return [f"no launch option runs this recipe: {'; '.join(sorted({e.why_not for e in plan.estimates}))}"]
    best = min(runnable, key=lambda e: e.gpu_total)
    return [f"nothing fits {hw.gpus} x {hw.gpu_mem_gib:.1f} GiB even at micro-batch 1: the smallest "
            f"need is {plan.row(best).option.title} at {_gib(best.gpu_total)} GiB per GPU and "
            f"{_gib(best.cpu_total)} GiB CPU RAM.",
            "try: " + ", ".join(_ways_to_fit(plan.cfg))]


def _ways_to_fit(cfg: Config) -> list[str]:
    """What would shrink this recipe's need (only what it does not do already)."""
    ways = [] if cfg.lora.enabled else ["--lora.enabled true"]
    if not cfg.train.gradient_checkpointing:
        ways.append("--train.gradient_checkpointing true")
    return ways + [f"a smaller --data.max_length (now {cfg.data.max_length})", "more GPUs",
                   "or more CPU RAM for the offload strategies"]


def _recommendation_lines(plan: Plan, rec: Estimate) -> list[str]:
    option = plan.row(rec).option
    keys = "".join(f"; sets {k} {_arg(v)}" for k, v in option.recipe_overrides if _recipe_value(plan.cfg, k) != v)
    shrink = _batch_note(plan, rec)
    return [f"recommended: {option.title} ({option.description}{keys}), micro-batch "
            f"{rec.micro_batch} x accumulation {rec.grad_accum} x {rec.processes} process"
            f"{'es' if rec.processes > 1 else ''} = global batch {plan.global_batch}{shrink}",
            f"  {plan.command(rec)}",
            *(f"  ({note})" for note in plan.command_notes(rec))]


def _batch_note(plan: Plan, rec: Estimate) -> str:
    """Why the recommended micro-batch and accumulation differ from the recipe's ("" when they do not)."""
    t, hw = plan.cfg.train, plan.hardware
    if rec.micro_batch == t.micro_batch_size and rec.grad_accum == t.grad_accum:
        return ""
    why = []
    if rec.processes < hw.gpus:
        why.append(f"{rec.processes} process carries the global batch of {hw.gpus} GPUs")
    if rec.grad_accum == 1 and rec.micro_batch > t.micro_batch_size:
        why.append("the optimizer steps in backward, so no accumulation: the whole per-process batch in one "
                   "micro-batch")
    elif rec.micro_batch < t.micro_batch_size:
        why.append(f"the recipe's micro-batch {t.micro_batch_size} does not fit: halved, accumulation raised to "
                   f"keep the global batch")
    return f" ({'; '.join(why)})" if why else ""


def _recipe_value(cfg: Config, key: str) -> object:
    section, leaf = key.split(".")
    return getattr(getattr(cfg, section), leaf)


def _details(plan: Plan, est: Estimate) -> list[str]:
    """The memory of the recommended run, term by term, with how each term was computed."""
    planned = plan.row(est)
    s, cfg = planned.shape, planned.cfg
    tokens = est.micro_batch * cfg.data.max_length
    dt = activation_dtypes(est.strategy, s, planned.precision)
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
        row("optimizer step", step, est.explain.get("optimizer step", "temporaries of the step") +
            " (activations are freed by then; the larger of the two phases counts)")
    row("peak allocated", est.gpu_peak, "what torch.cuda.max_memory_allocated should show")
    row("overhead", est.overhead, "CUDA context + allocator slack (fixed, not in max_memory_allocated)")
    row("needed", est.gpu_total, f"of {plan.hardware.gpu_mem_gib:.1f} GiB")
    row("CPU RAM", est.cpu_total, ", ".join(f"{k} {_gib(v)}" for k, v in est.cpu.items() if v) +
        f" (of {plan.hardware.cpu_mem_gib:.1f} GiB)")
    return out


# ---------------------------------------------------------------------------------------------------------
# Command line

USAGE = ("usage: fittune-plan [--config FILE] [--gpus N] [--gpu-mem GiB] [--cpu-mem GiB] "
         "[--section.key VALUE ...]")


def _number(flag: str, value: str | None, kind: type) -> int | float | None:
    """`--flag value` as a positive `kind` (None when not given); FittuneError otherwise."""
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
    return [arg for key, text in split_overrides(argv) if key not in ("train.micro_batch_size", "train.grad_accum")
            for arg in (f"--{key}", *(() if text is None else (text,)))]


HARDWARE_FLAGS = ("gpus", "gpu-mem", "cpu-mem")


def _check_hardware_flags(args: list[str]) -> None:
    """An unknown `--name` that looks like one of the planner's own flags (`--gpu`, `--gpu_mem`) is named as
    such, not as an unknown config key."""
    keys = set(all_keys())
    for arg in args:
        name = arg[2:].split("=")[0] if arg.startswith("--") else ""
        close = difflib.get_close_matches(name.replace("_", "-"), HARDWARE_FLAGS, n=1, cutoff=0.6)
        if name and name not in keys and close:
            raise FittuneError(f"unknown flag --{name}: did you mean --{close[0]}? (the planner's hardware flags "
                               f"are --gpus N, --gpu-mem GiB and --cpu-mem GiB)")


def plan_main(argv: list[str]) -> Plan | None:
    """`fittune-plan` without the error handling: parse argv, plan, print (None after --help).
    Raises FittuneError on bad input."""
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        print("Predicts GPU and CPU memory of every strategy (single GPU, DDP, ZeRO-2/3 +- offload, FSDP2, device "
              "map) and prints the fastest that fits with its launch command. Hardware not given is detected.")
        return None
    gpus, argv = split_flag(argv, "gpus")
    gpu_mem, argv = split_flag(argv, "gpu-mem")
    cpu_mem, argv = split_flag(argv, "cpu-mem")
    config_file, rest = split_flag(argv, "config")
    _check_hardware_flags(rest)
    gpus, gpu_mem, cpu_mem = _number("gpus", gpus, int), _number("gpu-mem", gpu_mem, float), \
        _number("cpu-mem", cpu_mem, float)
    if config_file is None:
        config_file = os.path.relpath(DEMO_RECIPE) if DEMO_RECIPE.is_relative_to(Path.cwd()) else str(DEMO_RECIPE)
        print(f"fittune: no --config given: planning the offline demo recipe {config_file}", flush=True)
    cfg = build_config(config_file, parse_overrides(rest), RUN_CONTROL)  # planning replaces or continues nothing
    plan = make_plan(cfg, gpus, gpu_mem, cpu_mem, recipe=config_file, extra_args=_raw_overrides(rest))
    print(plan.render(), flush=True)
    return plan


def exit_code(plan: Plan | None) -> int:
    """1 when nothing fits (a script can tell a plan from none), else 0."""
    return 1 if plan is not None and plan.recommended is None else 0


def main() -> None:
    """Entry point of `fittune-plan`: exit 0 with a recommendation, 1 when nothing fits, 2 (one
    `fittune: error:` line) on bad input."""
    run_cli(lambda: exit_code(plan_main(sys.argv[1:])))


if __name__ == "__main__":
    main()
