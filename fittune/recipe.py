"""Fine-tuning as a recipe: `setup` (every check before the first write), `train` (the loop), `finish`.

    recipe = FineTuneRecipe(cfg)
    recipe.setup()       # accelerator + Strategy, output_dir checks, data, model, optimizer, resume, then writes
    result = recipe.train()   # train_step per global batch; logging, divergence, signals, checkpoints; finish()

The strategy is decided once (`self.strategy`); the loop never asks which engine runs it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from fittune import runlog
from fittune.batches import (
    TokExample,
    collate_train,
    count_steps,
    micro_batches_for_rank,
    plan_global_batches,
    tokenize_examples,
)
from fittune.checkpoints import (
    CheckpointHold,
    CheckpointTarget,
    check_compatible,
    find_resume_checkpoint,
    hold_checkpoint,
    load_checkpoint,
    read_state,
    rotate_checkpoints,
    save_checkpoint,
)
from fittune.columns import (
    Example,
    count_rows,
    describe_task,
    prompts_cut_note,
    similar_classes_note,
    untrained_classes_note,
)
from fittune.config import BUILTIN_MODEL, Config, to_yaml
from fittune.distributed import (
    Launched,
    configure_deepspeed,
    on_main_then_agree,
    raise_if_any_failed,
    start_accelerator,
    sum_across_ranks,
)
from fittune.errors import FittuneError
from fittune.evaldir import check_eval_dir
from fittune.evaluator import evaluate_and_report, validation_loss
from fittune.final import save_final
from fittune.hardware import peak_memory_gib, run_cpu_threads, set_cpu_threads
from fittune.loss import install_chunked_loss
from fittune.metrics import majority_note, majority_of
from fittune.model import (
    build_model,
    compile_layers,
    compiled_graphs,
    count_parameters,
    load_tokenizer,
    prepare_builtin_model,
    resolve_model_path,
    use_liger,
)
from fittune.notices import quiet_scheduler_order_notice
from fittune.optim import build_optimizer
from fittune.placement import batch_device, place_model
from fittune.precision import weights_dtype
from fittune.progress import TrainingProgress
from fittune.reports import metrics_table, plot_loss_curve
from fittune.rundir import (
    DirInUse,
    DirLock,
    RunDir,
    RunLayout,
    atomic_write_text,
    complete_checkpoints,
    inspect_output_dir,
    owned,
    remove_partial_checkpoints,
    run_finished,
    write_guard,
)
from fittune.shards import local_shards
from fittune.signals import StopRequest
from fittune.sources import absolute_path, source_digest
from fittune.splits import examples_digest, groups_note, leaked_rows_note, load_splits, other_splits_note
from fittune.step import BatchSplit, OomAdaptive, StepPlan, StepResult, StepRunner
from fittune.supported import check_supported
from fittune.testing import install_oom_injection

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from fittune.precision import Precision
    from fittune.rundir import OutputDirCheck
    from fittune.strategy import Strategy


@dataclass
class RunCounters:
    """The run's position and tallies (saved in every checkpoint's trainer_state.json)."""

    step: int = 0
    optimizer_steps: int = 0
    skipped_overflow: int = 0
    skipped_nonfinite: int = 0
    pad_slots: int = 0
    real_tokens: int = 0

    @property
    def padding(self) -> float:
        """The share of this rank's micro-batch slots so far that were padding."""
        return 1 - self.real_tokens / max(1, self.pad_slots)


@dataclass(frozen=True)
class GlobalBatch:
    """One optimizer step's rows, over all ranks."""

    step: int
    """Its index in the run (0-based)."""
    ids: list[int]
    """Indices into the training set."""
    n_targets: int
    """Target tokens of all of them: the loss normaliser, the same on every rank."""


@dataclass
class Throughput:
    """Tokens (all ranks) since `start` (time.perf_counter), for the logged tokens/s."""

    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def rate(self, now: float) -> float:
        return self.tokens / max(now - self.start, 1e-9)


@dataclass
class StepTally:
    """One step as all ranks agree on it: the loss over the global batch, and whether a stop was asked for."""

    loss: float
    stop: bool


@dataclass
class RunResult:
    """How a run ended: the held-out metrics of a finished run, and the process exit code."""

    metrics: dict | None
    exit_code: int = 0


@dataclass(frozen=True)
class DataFit:
    """What data.max_length did to the rows: said in the log, kept in config.yaml."""

    train_dropped: list[str]
    """Ids of training rows whose answer does not fit (not trained on)."""
    heldout_dropped: list[str]
    """Ids of held-out rows whose answer does not fit: not in the held-out metrics."""
    truncated: int
    """Rows kept with the start of their prompt cut."""
    heldout_total: int

    def notes(self) -> list[str]:
        """What the length limit did to the data, as lines for the start of the run."""
        notes = []
        if self.train_dropped:
            notes.append(f"dropped from training, their answer does not fit data.max_length: "
                         f"{count_rows(len(self.train_dropped))} (e.g. row id {self.train_dropped[0]})")
        if self.heldout_dropped:
            notes.append(f"NOTE: {len(self.heldout_dropped)} of the {self.heldout_total} held-out rows do not fit "
                         f"data.max_length (e.g. row id {self.heldout_dropped[0]}) and are left out of the held-out "
                         f"metrics, which cover the other {self.heldout_total - len(self.heldout_dropped)}; raise "
                         f"data.max_length to score them all")
        if self.truncated:
            notes.append(prompts_cut_note(self.truncated))
        return notes


class FineTuneRecipe:
    """One fine-tuning run: built by `setup`, run by `train`. Its state, by the step that sets it:"""

    # _setup_accelerator: where and how this process computes (decided once; the loop only asks it)
    launched: Launched
    world: int
    rank: int
    # _check_output_dir: what output_dir holds and what this run may do with it
    dir_check: OutputDirCheck
    finished: bool  # --resume auto of a run that has finished: nothing to train
    resume_from: Path | None
    resume_hold: CheckpointHold | None  # held from _check_output_dir until the run is set up from it
    # _setup_data: the rows, tokenised, and the step count they give
    class_task: bool
    model_path: str
    tokenizer: PreTrainedTokenizerBase
    train_set: list[TokExample]
    test_set: list[TokExample]
    fit: DataFit
    digests: dict[str, str]  # the data's identity, part of the resume fingerprint
    heldout_ids_digest: str
    lengths: list[int]
    global_batch: int
    total_steps: int
    steps_per_epoch: int
    # _setup_model and _setup_optimizer: the prepared model and what steps it
    head: torch.nn.Module | None  # the output head when the chunked loss computes the logits itself
    n_total: int
    n_trainable: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    in_device: torch.device
    runner: StepRunner
    target: CheckpointTarget
    split: BatchSplit
    oom: OomAdaptive | None
    # _setup_resume, _commit_output_dir, _setup_baselines
    resume_how: str
    config_yaml: str
    compare: dict[str, dict]  # the baselines the held-out metrics are reported beside, by name
    # train
    stop: StopRequest
    window: Throughput  # tokens since the last logged step, for its tokens/s
    _log_failure: Exception | None  # a failed train_log write on the main process, not yet agreed

    def __init__(self, cfg: Config, program: str = "train.py"):
        self.cfg, self.program, self.out = cfg, program, Path(cfg.output_dir)
        self.layout = RunLayout(self.out)
        self.counters, self.bad_in_a_row, self.run_dir, self.resumed_at = RunCounters(), 0, None, None
        self.lock, self.progress, self.done, self.resume_hold = None, None, None, None
        self._plan, self._plan_epoch = [], -1  # the epoch's global batches, made when an epoch starts

    @property
    def accelerator(self) -> Accelerator:
        return self.launched.accelerator

    @property
    def precision(self) -> Precision:
        return self.launched.precision

    @property
    def strategy(self) -> Strategy:
        return self.launched.strategy

    # ---- setup: checks first, writes last ---------------------------------------------------------------

    def setup(self) -> None:
        """Everything that can refuse the run happens before anything under output_dir is created or changed."""
        self._setup_accelerator()
        self._check_output_dir()
        if self.done is not None:  # --resume auto of a finished run saved without checkpoints: nothing to check
            return
        self._check_launch()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_resume()
        if self.done is not None:  # --resume auto of a run that has finished with this recipe: nothing to write
            return
        self._commit_output_dir()
        if self.resume_hold is not None:  # loaded and its recipe read (`_facts`): its run may rotate it now
            self.resume_hold.release()
        self._setup_baselines()

    def _setup_accelerator(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.launched = start_accelerator(cfg.train.mixed_precision, cfg.model.parallel, cfg.train.grad_accum,
                                          None if cfg.log_with == "none" else cfg.log_with, str(self.out))
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        threads = run_cpu_threads(cfg.train.cpu_threads, self.strategy, self.accelerator.device)
        if threads.why:
            set_cpu_threads(threads)
            self._log(f"CPU threads per process: {threads.count} ({threads.why})")
        set_seed(cfg.seed)

    def _check_launch(self) -> None:
        """What this recipe cannot run under the launch is refused (the planner asks the same), before anything
        loads; DeepSpeed's config gets the recipe's batch and clipping, before ZeRO-3 builds the model."""
        t = self.cfg.train
        check_supported(self.cfg, self.strategy, self.precision)
        if self.strategy.deepspeed:
            configure_deepspeed(self.accelerator, self.strategy, t.micro_batch_size, t.grad_accum, t.max_grad_norm)

    def _check_output_dir(self) -> None:
        """Refuse a directory this run must not touch, and lock an existing one (main process; all agree); note
        whether a --resume auto is of a run that has finished (`_setup_resume` then ends the run there)."""
        cfg = self.cfg
        complete = False  # only the main process looks

        def check() -> None:
            nonlocal complete
            # locked first: a run that is training now is said to be, not offered --resume or --overwrite
            self.lock = self._lock_run()
            self.dir_check = inspect_output_dir(self.out, cfg.resume, cfg.overwrite)
            complete = self.dir_check.complete
            if cfg.resume and not complete:  # its end replaces eval/ (built beside it): refused now, not then
                check_eval_dir(self.layout.eval, "the run's eval/", run_writes=True)

        on_main_then_agree(self.accelerator, check)
        # every rank learns it (a sum): each then stops after the resume checks, before anything is written
        self.finished = cfg.resume == "auto" and bool(sum_across_ranks(self.accelerator, [complete])[0])
        self._find_resume_checkpoint()
        if self.resume_from is not None and not self.finished and self.layout.log.is_file():
            runlog.read_rows(self.layout.log)  # a damaged log is refused now, before config.yaml is rewritten
        if self.finished and self.resume_from is None:  # train.save_steps 0: no state to check the recipe against
            self._nothing_to_resume("")

    def _find_resume_checkpoint(self) -> None:
        """The checkpoint to resume from (`--resume`; None: a fresh run), held by every rank until the run is set
        up from it (`hold_checkpoint`): a branch from a run still training is not cut off by that run's rotation.
        The ranks agree: one that sees it removed (each looks for itself) stops them all."""
        failure, self.resume_from = None, None
        try:
            self.resume_from = find_resume_checkpoint(self.out, self.cfg.resume) if self.cfg.resume else None
            if self.resume_from is not None:
                self.resume_hold = hold_checkpoint(self.resume_from)
        except FittuneError as e:
            failure = e
        raise_if_any_failed(self.accelerator, failure)

    def _lock_run(self) -> DirLock | None:
        """The run's lock (None: no run there yet). A --resume auto of a finished run writes nothing, so while
        evaluations read the run it shares their lock (a requeue loop's call still exits 0)."""
        try:
            return RunDir.lock_existing(self.out, self.program)
        except DirInUse:
            if self.cfg.resume != "auto" or not run_finished(self.out):
                raise
        # granted only if every holder is a reader: a writer's hold refuses it, naming the writer
        return DirLock(self.out).acquire(self.program, create=False, shared=True)

    def _nothing_to_resume(self, steps: str) -> None:
        """A --resume auto of a run that has finished (a requeue loop's, say): exit 0, nothing trained or
        written; only the runs an --overwrite replaced are removed if they still could not be."""
        self._log(f"--resume auto: {self.out} has finished ({steps}final/ and eval/ are written): nothing to "
                  f"resume, nothing trained or rewritten. Evaluate it again with evaluate.py --checkpoint {self.out}, or train "
                  f"it anew with --overwrite")
        run_dir = RunDir(self.out, self.lock, None)

        def tidy() -> None:  # the main process (the one that holds the lock); every rank takes part in agreeing
            if self.lock is None or not self.lock.shared:
                self._remove_replaced(run_dir)
            elif run_dir.replaced():  # a reader removes nothing
                self._log(f"--overwrite: the replaced runs ({', '.join(map(str, run_dir.replaced()))}) are kept "
                          f"while this run is read; a --resume auto after that removes them")

        on_main_then_agree(self.accelerator, tidy)
        self.done = RunResult(self._finished_metrics())

    def _setup_data(self) -> None:
        cfg = self.cfg
        task = describe_task(cfg.data)
        self._log(str(task))  # said first, so it is seen even when a data check then refuses
        train_examples, test_examples = load_splits(cfg.data, cfg.seed)
        if note := other_splits_note(cfg.data):
            self._log(note)
        if cfg.data.group_column:
            self._log(groups_note(cfg.data.group_column, train_examples, test_examples))
        if note := leaked_rows_note(train_examples, test_examples, cfg.data):
            self._log(note)
        # saved in config.yaml: evaluate.py and --resume find the data from any working directory
        cfg.data.path, cfg.data.test_path = absolute_path(cfg.data.path), absolute_path(cfg.data.test_path)
        self.class_task = task.kind == "classification"
        if self.class_task:
            self._settle_classes(train_examples, test_examples)
        prepare_builtin_model(cfg, self.accelerator)
        self.model_path = resolve_model_path(cfg)
        self.tokenizer = load_tokenizer(self.model_path, cfg.model.trust_remote_code)
        self.train_set, train_stats = tokenize_examples(train_examples, self.tokenizer, cfg.data)
        self.test_set, test_stats = tokenize_examples(test_examples, self.tokenizer, cfg.data)
        if not self.test_set:
            raise FittuneError("no held-out example fits data.max_length: raise it or check the data")
        self.fit = DataFit(train_stats.dropped_ids, test_stats.dropped_ids, train_stats.truncated + test_stats.truncated,
                           len(test_examples))
        self.digests = {"source_sha256": source_digest(cfg.data), "train_sha256": examples_digest(train_examples),
                        "heldout_sha256": examples_digest(test_examples)}
        by_id = {e.id: e for e in test_examples}
        # what evaluate.py recomputes from the saved ids (rows that fit data.max_length, in this order)
        self.heldout_ids_digest = examples_digest([by_id[x.id] for x in self.test_set])
        self.lengths = [len(x) for x in self.train_set]
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * self.world
        self.total_steps, self.steps_per_epoch = count_steps(len(self.train_set), self.global_batch,
                                                               cfg.train.max_steps, cfg.train.epochs,
                                                               len(train_stats.dropped_ids), cfg.data.max_length)

    def _settle_classes(self, train: list[Example], test: list[Example]) -> None:
        """Record the candidates in the run's config (evaluate.py on other data scores the same ones), and say
        which of them training never saw."""
        self.cfg.data.classes = train[0].choices
        note = untrained_classes_note(self.cfg.data.classes, train, test)
        if note:
            self._log(f"NOTE: {note}")
        if note := similar_classes_note(self.cfg.data.classes):
            self._log(note)

    def _setup_model(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        set_seed(cfg.seed)  # the same adapter initialisation whatever ran before (data, model download/build)
        model = build_model(cfg, self.precision, self.strategy.device_map)
        install_oom_injection(model, self.rank)
        if cfg.train.compile:
            self._log(f"torch.compile: {compile_layers(model)} decoder layers (the first steps compile)")
        liger = use_liger(cfg, model, self.strategy.device_map)
        self.head = model.get_output_embeddings() if install_chunked_loss(model, cfg.train.loss_chunk_size, liger) else None
        if liger:
            self._log("Liger kernels: RMSNorm, SwiGLU, RoPE" + (", fused output head + cross-entropy" if self.head else ""))
        self.n_total, self.n_trainable = count_parameters(model)
        self._log(f"parameters: {self.n_total:,} total, {self.n_trainable:,} trainable")
        if self.strategy.device_map:
            device_map = place_model(model, cfg.model.max_memory, weights_dtype(cfg, self.precision))
            self._log(f"model.parallel: auto placed the blocks on {sorted(set(map(str, device_map.values())))}: "
                      f"{device_map}")
        self.model = model

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        cfg, accel = self.cfg, self.accelerator
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused AdamW needs every parameter on a GPU: a device map may keep some on the CPU; otherwise
        # accelerate moves the model to the GPU in prepare() below
        fused = (all(p.device.type == "cuda" for p in params) if self.strategy.device_map
                 else accel.device.type == "cuda")
        setup = build_optimizer(cfg, params, self.strategy, self.precision, fused,  # FittuneError if unsupported
                                gpu=accel.device.type != "cpu")
        optimizer = setup.optimizer
        self._log(f"optimizer: {setup.choice.describe()}")
        if self.strategy.deepspeed:
            quiet_scheduler_order_notice()
        # stepped by hand once per optimizer step (accelerate's wrapper would step it once per process)
        self.scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_training_steps=self.total_steps,
                                       num_warmup_steps=round(cfg.train.warmup_ratio * self.total_steps))
        # a device map placed the model already (even all on one device): accelerate must not move it
        # (DeepSpeed refuses any device_placement argument; a device map never runs under it)
        placement = {"device_placement": [False, True]} if self.strategy.device_map else {}
        self.model, self.optimizer = accel.prepare(self.model, optimizer, **placement)
        self.in_device = batch_device(self.model, accel, self.strategy)
        # FSDP2 replaces every parameter with a sharded DTensor one: clip and check the live ones
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.runner = StepRunner(self.launched, self.model, self.optimizer, self.scheduler, params, self.head,
                                 cfg.train.max_grad_norm, setup.in_backward)
        self.target = CheckpointTarget(accel, self.strategy, self.model, self.optimizer, self.scheduler,
                                       cfg.lora.enabled)
        self.split = BatchSplit(cfg.train.micro_batch_size, cfg.train.grad_accum)
        self.oom = OomAdaptive(self.runner, self.split, self.global_batch, self._log) if cfg.train.oom_adaptive else None

    def fingerprint(self) -> dict:
        """What a checkpoint must share with this run to be resumed (content, not paths: a moved run resumes)."""
        cfg = self.cfg
        return {"model": cfg.model.name_or_path, "lora": cfg.lora.model_dump() if cfg.lora.enabled else None,
                "trainable_parameters": self.n_trainable, "global_batch_size": self.global_batch,
                "seed": cfg.seed, "total_steps": self.total_steps, "lr": cfg.train.lr,
                "lr_scheduler": cfg.train.lr_scheduler, "warmup_ratio": cfg.train.warmup_ratio,
                "betas": list(cfg.train.betas), "weight_decay": cfg.train.weight_decay, "optimizer": cfg.train.optimizer,
                "optimizer_in_backward": cfg.train.optimizer_in_backward, "model_dtype": cfg.model.dtype,
                **self.digests}

    def _setup_resume(self) -> None:
        if self.resume_from is None:
            return
        state = read_state(self.resume_from)
        check_compatible(state, self.fingerprint(), self.resume_from, self.world)
        if self.finished:  # the recipe is the run's (checked above): nothing to train
            self._nothing_to_resume(f"{self.total_steps} steps; ")
            return
        how = load_checkpoint(self.target, self.resume_from, state, self.cfg.trust_checkpoint)
        self.counters = RunCounters(**{k: state[k] for k in asdict(self.counters) if k in state})
        if state.get("world_size") == self.world:  # the same layout keeps an adapted micro-batch (oom_adaptive)
            self.split.micro_batch_size = state.get("micro_batch_size", self.split.micro_batch_size)
            self.split.grad_accum = state.get("grad_accum", self.split.grad_accum)
        self.split.apply(self.accelerator, self.strategy, self.model, self.global_batch)
        self.resume_how = how
        if self.resume_from.resolve().parent == self.layout.checkpoints.resolve():  # this run's own (not a branch's)
            self.resumed_at = self.counters.step

    def _commit_output_dir(self) -> None:
        """The first writes: claim (create, mark, lock) output_dir, then the config, held-out ids and log."""
        cfg = self.cfg
        # absolute: `--config RUN/config.yaml --resume auto` from another directory continues this run (a
        # relative output_dir started a new one there)
        saved = cfg.model_copy(update={"output_dir": os.path.abspath(cfg.output_dir)})
        self.config_yaml = to_yaml(saved, self._facts())
        on_main_then_agree(self.accelerator, self._write_run_files)
        if self.resume_from is not None:
            self._log(f"resumed from {self.resume_from} at step {self.counters.step} ({self.resume_how} restore)")
        elif cfg.resume == "auto":
            self._log(f"--resume auto: no complete checkpoint in {self.out}, starting fresh")
        if cfg.log_with != "none":
            self.accelerator.init_trackers("tensorboard", config={k: v for k, v in _flat(cfg.model_dump()).items()
                                                                  if isinstance(v, (int, float, str, bool))})

    def _write_run_files(self) -> None:
        """Main process: claim output_dir, then the config, the held-out ids and the log."""
        with write_guard(f"the run's files in {self.out}", "nothing that was there before was lost"):
            self._claim_and_write()
        self._log("resolved config\n" + self.config_yaml.rstrip())
        for line in self.fit.notes():
            self._log(line)

    def _claim_and_write(self) -> None:
        cfg = self.cfg
        self.run_dir = RunDir.claim(self.dir_check, self.lock, cfg.overwrite, self.program)
        if self.run_dir.aside is not None:
            self._log(f"--overwrite: the previous run was moved to {self.run_dir.aside}; it is removed when "
                      f"this run has finished")
        for partial in remove_partial_checkpoints(self.out):  # saves a crash cut short: never resumed from
            self._log(f"removed incomplete checkpoint {partial}")
        atomic_write_text(self.layout.config, self.config_yaml)
        atomic_write_text(self.layout.heldout_ids, json.dumps(
            {"ids": [x.id for x in self.test_set], "examples_sha256": self.heldout_ids_digest,
             "source_sha256": self.digests["source_sha256"]}, indent=0))
        self._start_log()

    def _start_log(self) -> None:
        log = self.layout.log
        if self.resume_from is None:
            runlog.start(log)
            return
        repair = runlog.truncate_after(log, self.counters.step)
        if repair.torn_line is not None:
            self._log(f"train_log.jsonl: dropped a last line torn by a crash ({repair.torn_line[:60]!r})")

    def _facts(self) -> dict:
        """The run facts saved under `run:` in config.yaml."""
        return {"world_size": self.world, "mixed_precision": self.precision.mixed, "strategy": self.strategy.name,
                "strategy_detail": self.strategy.label, "device": str(self.accelerator.device),
                "model_path": self.model_path, "global_batch_size": self.global_batch,
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "train_examples": len(self.train_set), "heldout_examples": len(self.test_set),
                "truncated_rows": self.fit.truncated, "train_dropped_rows": len(self.fit.train_dropped),
                "heldout_dropped_rows": len(self.fit.heldout_dropped),
                "resumed_from": str(self.resume_from) if self.resume_from else None,
                "trained_with": self._layouts(), **self.digests}

    def _layouts(self) -> list[dict]:
        """Each layout the run has trained under, from the step it started at: a resume under another strategy,
        process count, micro-batch or accumulation adds one (the checkpoint's config.yaml holds the earlier)."""
        now = {"strategy": self.strategy.name, "world_size": self.world,
               "micro_batch_size": self.split.micro_batch_size, "grad_accum": self.split.grad_accum,
               "from_step": self.counters.step}
        if self.resume_from is None:
            return [now]
        try:
            earlier = yaml.safe_load(RunLayout(self.resume_from).config.read_text())
            layouts = earlier["run"].get("trained_with") or [
                {"strategy": earlier["run"]["strategy"], "world_size": earlier["run"]["world_size"],
                 "micro_batch_size": earlier["train"]["micro_batch_size"],
                 "grad_accum": earlier["train"]["grad_accum"], "from_step": 0}]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return [now]  # a checkpoint of an older fittune: its layouts are not known
        same = {k: v for k, v in layouts[-1].items() if k != "from_step"} == \
            {k: v for k, v in now.items() if k != "from_step"}
        return layouts if same else [*layouts, now]

    def _setup_baselines(self) -> None:
        self.compare = {}
        if baseline := majority_of(self.train_set, self.test_set, self.class_task):
            self.compare["majority"] = baseline
            self._log(majority_note(baseline))
        cfg = self.cfg
        if not cfg.eval.before_training:
            return
        # the built-in tiny model starts from random weights; any other model is pretrained
        title = "untrained" if cfg.model.name_or_path == BUILTIN_MODEL else "zero-shot"
        if self.resume_from is None:
            self.compare[title] = self._evaluate(self.layout.eval_untrained, title)
            return
        # resumed: the evaluation before training is the run's own (or, --resume PATH, the run it came from)
        for run in (self.layout, RunLayout.of_checkpoint(self.resume_from)):
            if owned(run.eval_untrained, "eval") and (run.eval_untrained / "metrics.json").is_file():
                self.compare[title] = json.loads((run.eval_untrained / "metrics.json").read_text())
                return

    # ---- the loop ----------------------------------------------------------------------------------------

    def train(self) -> RunResult:
        """One global batch per step; after each: account, log, check divergence and signals, checkpoint."""
        self.stop = StopRequest(announce=self.accelerator.is_main_process)
        self._log_failure = None
        self.progress = TrainingProgress(self.total_steps, self.counters.step, self.accelerator.is_main_process)
        self.model.train()
        self.window = Throughput()
        for step in range(self.counters.step, self.total_steps):
            batch = self._global_batch(step)
            result = self.train_step(batch)
            tally = self._account(batch, result)
            self._log_step(step, tally.loss, result)
            self._check_divergence(step, tally.loss, result)
            if tally.stop:
                return self._stop_for_signal(step)
            if self._checkpoint_due(step + 1):
                self.checkpoint(step + 1)
        return self.finish()

    def _checkpoint_due(self, steps_done: int) -> bool:
        """Every train.save_steps steps, but not after the last (`finish` saves that one)."""
        every = self.cfg.train.save_steps
        return bool(every) and steps_done % every == 0 and steps_done < self.total_steps

    def _global_batch(self, step: int) -> GlobalBatch:
        """The rows of global batch `step` (all ranks): the data order depends only on the seed, the epoch and
        the global batch size, so a resumed or re-launched run sees the same batches."""
        epoch = step // self.steps_per_epoch
        if self._plan_epoch != epoch:
            self._plan = plan_global_batches(self.lengths, self.global_batch, self.cfg.seed, epoch,
                                               self.cfg.data.group_by_length)
            self._plan_epoch = epoch
        ids = self._plan[step % self.steps_per_epoch]
        return GlobalBatch(step, ids, sum(self.train_set[j].n_targets for j in ids))

    def train_step(self, batch: GlobalBatch) -> StepResult:
        """This rank's share of `batch` through forward, backward and the optimizer step."""
        if self.oom is not None:  # it may split the micro-batches again, and retry
            return self.oom.run(batch.step, lambda split: self._step_plan(split, batch))
        return self.runner.run(self._step_plan(self.split, batch))

    def _step_plan(self, split: BatchSplit, batch: GlobalBatch) -> StepPlan:
        micro = micro_batches_for_rank(batch.ids, self.lengths, split.micro_batch_size, split.grad_accum,
                                         self.world, self.rank)
        return StepPlan(micro, self._make_batch, batch.n_targets)

    def _make_batch(self, rows: list[int]) -> dict:
        batch = collate_train([self.train_set[j] for j in rows], self.tokenizer.pad_token_id)
        return {k: v.to(self.in_device) for k, v in batch.items()}

    def _account(self, batch: GlobalBatch, result: StepResult) -> StepTally:
        """Count the step (one all-reduce for the loss, tokens and stop requests)."""
        c, micro = self.counters, self._step_plan(self.split, batch).micro_batches
        c.pad_slots += sum(len(m) * max(self.lengths[j] for j in m) for m in micro if m)
        step_tokens = sum(self.lengths[j] for m in micro for j in m)
        c.real_tokens += step_tokens
        c.skipped_overflow += int(result.overflow)
        total_nll, total_tokens, stop, log_failed = sum_across_ranks(
            self.accelerator, [result.nll, step_tokens, self.stop.requested, self._log_failure is not None])
        if log_failed:  # the main process could not log the last step: every rank stops, none left waiting
            self._agree_on_the_log()
        loss = total_nll / batch.n_targets
        if result.stepped and math.isfinite(loss):
            c.optimizer_steps += 1
            self.bad_in_a_row = 0
        elif not result.overflow or not math.isfinite(loss):  # an fp16 overflow skips its step by design
            c.skipped_nonfinite += 1  # skipped, weights untouched (the data moves on)
            self.bad_in_a_row += 1
        c.step = batch.step + 1
        self.window.tokens += total_tokens
        self.progress.step_done()
        return StepTally(loss, bool(stop))

    def _log_step(self, step: int, loss: float, result: StepResult) -> None:
        cfg, c = self.cfg, self.counters
        logged = (step + 1) % cfg.train.log_every == 0 or step + 1 == self.total_steps or self.bad_in_a_row
        validate = cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0  # the same on every rank
        if not (logged or validate):
            return
        now = time.perf_counter()
        row = {"step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 4), "loss": loss,
               "lr": self.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm,
               "tokens_per_s": self.window.rate(now),
               "peak_mem_gib": peak_memory_gib(self.accelerator.device),
               "padding_frac": c.padding,
               "overflow_skipped": c.skipped_overflow, "nonfinite_skipped": c.skipped_nonfinite}
        self.window = Throughput(now)
        if validate:
            row["val_loss"] = validation_loss(self.model, self.launched, self.test_set[:cfg.train.val_examples],
                                              self.tokenizer, cfg.eval.batch_size, cfg.eval.max_batch_tokens)
        if self.accelerator.is_main_process and self._log_failure is None:
            try:
                self._write(runlog.append, self.layout.log, row)
            except Exception as e:  # noqa: BLE001 - every rank learns of it at the next step's all-reduce
                self._log_failure = e
        self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                             step=row["step"])
        self.progress.logged(row)

    def _check_divergence(self, step: int, loss: float, result: StepResult) -> None:
        """After train.max_bad_steps non-finite steps in a row: save the last good weights and stop."""
        if self.bad_in_a_row < self.cfg.train.max_bad_steps:
            return
        self.progress.close()
        # skipped steps left the weights at the last good ones, unless the step was applied inside backward
        # (DeepSpeed's engine, or train.optimizer_in_backward, may have updated part of the weights)
        in_backward = self.strategy.engine_steps or self.runner.in_backward is not None
        saved = self.checkpoint(step + 1) if self.cfg.train.save_steps and not in_backward else None
        last = saved or (complete_checkpoints(self.out)[-1] if complete_checkpoints(self.out) else None)
        raise FittuneError(f"training diverged: {self.bad_in_a_row} consecutive steps with a non-finite loss or "
                           f"gradient (step {step + 1}, loss {loss}, grad norm {result.grad_norm}); last good "
                           f"checkpoint: {last or 'none (set train.save_steps)'}; lower train.lr, keep "
                           f"train.max_grad_norm on, or use bf16 instead of fp16")

    def _stop_for_signal(self, step: int) -> RunResult:
        self.progress.close()
        path = self.checkpoint(step + 1)
        code = self.stop.exit_code or 143
        replaced = self.run_dir.replaced() if self.run_dir is not None else []  # the main process holds run_dir
        kept = "".join(f"; the run it replaces stays at {old} until this one finishes" for old in replaced)
        self._log(f"stopped by signal after step {step + 1}: checkpoint {path}; continue with --resume auto "
                  f"(exit code {code}){kept}")
        self.accelerator.end_training()
        return RunResult(None, code)

    def _agree_on_the_log(self) -> None:
        """Every rank stops if the main process failed to log a step (its flag rides on the per-step all-reduce;
        this collective runs only then and before a checkpoint or the end, so no checkpoint outruns its log)."""
        raise_if_any_failed(self.accelerator, self._log_failure)

    def checkpoint(self, step: int) -> Path:
        """Save a resumable checkpoint of the state after `step` steps."""
        self._agree_on_the_log()
        state = {**asdict(self.counters), "step": step, "micro_batch_size": self.split.micro_batch_size,
                 "grad_accum": self.split.grad_accum, "world_size": self.world,
                 "epoch": step // self.steps_per_epoch, "step_in_epoch": step % self.steps_per_epoch,
                 "fingerprint": self.fingerprint()}
        saved = save_checkpoint(self.target, self.out, step, state, self.config_yaml, self.cfg.train.keep_checkpoints)
        self._log(f"saved checkpoint {saved.path}")
        for old in saved.kept:
            self._log(f"kept {old} beyond train.keep_checkpoints for now: another run is loading it (a --resume "
                      f"from it, e.g. a branch); this run's next save or its end removes it")
        return saved.path

    # ---- the end: final/, evaluation, reports ------------------------------------------------------------

    def finish(self) -> RunResult:
        """Last checkpoint, final/ (verified), held-out evaluation, plots; the replaced run is removed."""
        self.progress.close()
        self.stop.restore()
        self._agree_on_the_log()
        c = self.counters
        if c.skipped_overflow:
            self._log(f"{c.skipped_overflow} steps skipped for fp16 overflow (loss scale lowered)")
        if c.skipped_nonfinite:
            self._log(f"{c.skipped_nonfinite} steps skipped for a non-finite loss or gradient")
        # the state after the last step, unless the run resumed from exactly that state (its checkpoint is
        # there; saving it again would replace it, which an unsealed one, of a moved or copied run, refuses)
        if self.cfg.train.save_steps and c.step == self.total_steps and self.resumed_at != c.step:
            self.checkpoint(self.total_steps)
        self._write_ranks()
        save_final(self.model, self.accelerator, self.tokenizer, self.out, self.config_yaml, self._log)
        metrics = self._evaluate(self.layout.eval, "fine-tuned")
        # every rank waits for the main process's last writes: none tears the process group down early, and a
        # failed write there fails the run on every rank
        on_main_then_agree(self.accelerator, lambda: self._report(metrics))
        self.accelerator.end_training()
        return RunResult(metrics)

    def _report(self, metrics: dict) -> None:
        """The replaced run goes; the loss curve, the summary lines and the metrics table (main process)."""
        c = self.counters
        self._remove_replaced(self.run_dir)  # first: final/ and eval/ are there, the plot may fail
        self._rotate_kept()
        plot_loss_curve(self.layout.log, self.layout.loss_curve)
        self._log(f"padding: {c.padding:.1%} of micro-batch slots were padding")
        if self.cfg.train.compile:  # a count growing with the run's lengths would mean compiling every step
            self._log(f"torch.compile: {compiled_graphs()} graphs built in this process (the decoder layers' for "
                      f"training and evaluation, any sequence length; plus a torchao optimizer's, one per "
                      f"parameter shape)")
        left_out = f" of {self.fit.heldout_total}: {len(self.fit.heldout_dropped)} do not fit data.max_length" \
            if self.fit.heldout_dropped else ""
        self._log(f"held-out metrics ({count_rows(len(self.test_set))}{left_out})\n"
                  + metrics_table({**self.compare, "fine-tuned": metrics}))
        self._log(f"outputs in {self.out}/ (final/, eval/, config.yaml, train_log.jsonl, loss_curve.png)")

    def _rotate_kept(self) -> None:
        """The checkpoints a save kept for a resume elsewhere (`checkpoint`) go now if that resume has let go:
        no save comes after the last one to remove them. One still held stays, and the run says so."""
        if not self.cfg.train.save_steps:
            return
        try:
            kept = rotate_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        except (OSError, FittuneError) as e:  # the run's outputs are all written: an extra checkpoint fails nothing
            self._log(f"could not remove the checkpoints beyond train.keep_checkpoints: {e}")
            return
        for old in kept:
            self._log(f"kept {old} beyond train.keep_checkpoints: another run is still loading it (a --resume "
                      f"from it, e.g. a branch); remove it yourself once that run has started training")

    def _remove_replaced(self, run_dir: RunDir) -> None:
        """Remove the runs an --overwrite replaced (the main process), and say what was removed or kept."""
        cleanup = run_dir.finish()
        for old in cleanup.removed:
            self._log(f"--overwrite: removed the replaced run {old}")
        for why in cleanup.kept:
            self._log(f"--overwrite: kept a replaced run: {why}")

    def _finished_metrics(self) -> dict | None:
        """The held-out metrics a finished run wrote (the main process reads them; None elsewhere)."""
        try:
            return json.loads((self.layout.eval / "metrics.json").read_text()) if self.accelerator.is_main_process \
                else None
        except (OSError, ValueError):  # damaged since: the run still has nothing to train
            return None

    def _evaluate(self, out_dir: Path, title: str) -> dict:
        about = {"model": f"{self.cfg.model.name_or_path} ({title}, step {self.counters.step} of this run)",
                 "data": "the run's held-out rows (heldout_ids.json)"}
        return evaluate_and_report(self.model, self.launched, self.cfg, self.tokenizer,
                                   self.test_set, self.class_task, out_dir, title, self.compare, about)

    def _write_ranks(self) -> None:
        """Which rows each rank trained on first, and what it holds of the weights: proof the ranks are real."""
        from accelerate.utils import gather_object

        cfg = self.cfg
        first_batch = plan_global_batches(self.lengths, self.global_batch, cfg.seed, 0, cfg.data.group_by_length)[0]
        first = micro_batches_for_rank(first_batch, self.lengths, cfg.train.micro_batch_size, cfg.train.grad_accum,
                                         self.world, self.rank)
        report = {"rank": self.rank, "world_size": self.world, "cpu_threads": torch.get_num_threads(),
                  "examples_seen": self.total_steps * cfg.train.micro_batch_size * cfg.train.grad_accum,
                  "first_step_ids": [self.train_set[j].id for m in first for j in m], **local_shards(self.model)}
        ranks = gather_object([report])
        on_main_then_agree(self.accelerator, lambda: self._write(atomic_write_text, self.layout.ranks,
                                                                 json.dumps(ranks, indent=1)))

    def _write(self, write, path: Path, content) -> None:
        """A write of the main process into the run: a full disk is one clear error that stops every rank."""
        with write_guard(str(path), "the checkpoints already saved are intact (--resume auto continues from the "
                                    "last one)"):
            write(path, content)

    def release(self) -> None:
        """Close the progress bar (an error then prints on its own line) and let go of output_dir's lock
        (the process ending does the same)."""
        if self.progress is not None:
            self.progress.close()
        for holder in (self.resume_hold, self.run_dir, self.lock):
            if holder is not None:
                holder.release()

    def _log(self, msg: str) -> None:
        self.accelerator.print(f"fittune: {msg}", flush=True)


def train(cfg: Config) -> RunResult:
    """Run one fine-tuning job end to end (the output directory's lock is released however it ends)."""
    recipe = FineTuneRecipe(cfg)
    try:
        recipe.setup()
        return recipe.done if recipe.done is not None else recipe.train()
    finally:
        recipe.release()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

