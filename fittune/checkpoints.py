"""Finding what a checkpoint directory holds: the weights, the run it came from, its config and split."""

from __future__ import annotations

import json
import os
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fittune.distributed import agree_on_failure, raise_if_any_failed
from fittune.errors import FittuneError, first_line
from fittune.launcher_env import is_launch_main
from fittune.rundir import (
    MARKER,
    OWN_CONFIG,
    RUN_FILES,
    STATE_FILE,
    STEP_NAME,
    MarkerBusy,
    RunLayout,
    atomic_write_text,
    check_free_space,
    checkpoint_root,
    claim_build_dir,
    complete_checkpoints,
    fittunes_own,
    hold_for_reading,
    lock_marker,
    own_checkpoints,
    owned,
    owning_run,
    publish_dir,
    remove_checkpoint,
    remove_owned,
    run_finished,
    seal_problem,
    write_guard,
)
from fittune.shards import gathered_copy, local_part, tensor_bytes
from fittune.strategy import NAMES, Strategy


@dataclass
class CheckpointInfo:
    """Where the weights are, which run they belong to, and that run's saved config (if any)."""

    weights_dir: Path
    run_dir: Path | None
    """The directory whose config.yaml describes the weights (a run, or a checkpoint of one)."""
    config_file: Path | None

    @property
    def run(self) -> Path | None:
        """The training run the weights lie in (its final/, a checkpoint's adapter/): whose lock and held-out
        ids count."""
        return owning_run(self.weights_dir)


def _has_weights(d: Path) -> bool:
    return (d / "adapter_config.json").is_file() or (d / "config.json").is_file()


def resolve_checkpoint(path: str) -> CheckpointInfo:
    """Accept a training output dir (uses its final/), final/ itself, or any model / adapter directory."""
    p = Path(path)
    if not p.exists():
        raise FittuneError(f"checkpoint not found: {path}")
    if not p.is_dir():
        raise FittuneError(f"checkpoint must be a directory (a training output dir or its final/): {path}")
    run = RunLayout(p)
    if owned(p, "train") and run.config.is_file() and run.final.is_dir():
        return CheckpointInfo(run.final, p, run.config)
    if owned(p, "train") and not _has_weights(p):
        raise FittuneError(_unfinished_run(p))
    if owned(p, "checkpoint") and not _has_weights(p):
        adapter = p / "adapter"
        what = (f"evaluate its adapter: --checkpoint {adapter}" if (adapter / "adapter_config.json").is_file()
                else f"export it first: fittune-export --checkpoint {p} --output DIR")
        raise FittuneError(f"{path} is a fittune training checkpoint (resumable state, not a model): {what}")
    if not _has_weights(p):
        raise FittuneError(f"{path} holds no model or adapter (no config.json / adapter_config.json); "
                           f"pass a training output dir or its final/")
    holder = recipe_holder(p)
    if holder is not None:
        return CheckpointInfo(p, holder, holder / "config.yaml")
    own = p / OWN_CONFIG
    return CheckpointInfo(p, None, own if own.is_file() else None)


def recipe_holder(weights: Path) -> Path | None:
    """The fittune run or checkpoint directory whose config.yaml is the recipe of the model in `weights` (its
    final/, a checkpoint's adapter/); None for weights anywhere else, whose own fittune_config.yaml (an export,
    a copied final/) is the recipe. A config.yaml beside weights in a folder fittune did not make is not ours."""
    parent = weights.parent
    if (parent / "config.yaml").is_file() and (owned(parent, "train") or owned(parent, "checkpoint")):
        return parent
    return None


def _unfinished_run(run: Path) -> str:
    """Why a training run directory without final/ cannot be evaluated, and what can be. Only the main process
    looks at the lock (every rank gets here; ranks probing at once would see each other as the holder)."""
    if is_launch_main():
        try:
            lock = hold_for_reading(run, "evaluate.py", "evaluate")
        except FittuneError as e:
            return str(e)
        if lock is not None:
            lock.release()
    latest = complete_checkpoints(run)[-1:]
    adapter = [c / "adapter" for c in latest if (c / "adapter" / "adapter_config.json").is_file()]
    saved = (f"; or evaluate its last checkpoint's adapter now: --checkpoint {adapter[0]} --output_dir DIR"
             if adapter else "")
    return (f"{run} is a fittune training run that has no final/ yet (it stopped before the end): finish it with "
            f"train.py --output_dir {run} --resume auto (and the same recipe){saved}")


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints: output_dir/checkpoints/step-00000012/ (complete) or step-00000012.tmp/ (partial)

# 2: the strategy is stored under its Strategy.name (`zero3`, not `deepspeed-zero3`); each checkpoint
# directory carries fittune's marker
FORMAT_VERSION = 2
# files written with torch.save (zip archives) or safetensors that a resume reads; checked before loading
_TENSOR_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pkl")


@dataclass
class CheckpointTarget:
    """What a checkpoint saves and restores: the prepared training objects and the run's strategy."""

    accelerator: Any
    """The run's `accelerate.Accelerator` (after `prepare`)."""
    strategy: Strategy
    """The run's parallel strategy (`fittune.strategy.strategy_of`)."""
    model: Any
    """The prepared model (a DeepSpeed engine, an FSDP2 module, a DDP wrapper or the bare model)."""
    optimizer: Any
    """The prepared optimizer."""
    scheduler: Any
    """The learning-rate scheduler (stepped by hand, not prepared)."""
    lora: bool
    """LoRA run: the checkpoint also holds an unsharded adapter + optimizer moments (portable restore)."""


def find_resume_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None (fresh), `auto` (newest complete in output_dir) or a path."""
    if resume is None:
        existing = complete_checkpoints(output_dir)
        if existing:
            raise FittuneError(f"{output_dir} already has checkpoints (newest {existing[-1].name}) from an earlier "
                               f"run: pass --resume auto to continue it, or choose another output_dir")
        return None
    if resume == "auto":
        existing = own_checkpoints(output_dir)
        return existing[-1] if existing else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FittuneError(f"--resume {resume}: not a complete fittune checkpoint (no {STATE_FILE}); "
                           f"use --resume auto or a checkpoints/step-N directory")
    _refuse_replacing_later_work(Path(output_dir), path)
    return path


def _refuse_replacing_later_work(output_dir: Path, path: Path) -> None:
    """An explicit --resume continues the run in output_dir from `path`: refused where that would mix two runs'
    steps or replace what the run did after `path` (its later checkpoints, and a finished run's final/ and
    eval/; a kill midway would also leave them beside the new ones, for a --resume auto to continue the wrong
    one). Going on from `path` in a new output_dir replaces nothing."""
    branch = f"pass a new --output_dir to go on from {path} there (the new run starts from its state)"
    layout = RunLayout(output_dir)
    if not any((output_dir / f).exists() for f in RUN_FILES):
        return
    run = owning_run(path)
    if run is None or run != owning_run(output_dir):
        raise FittuneError(f"--resume {path}: it is not a checkpoint of the run in {output_dir}, which continuing "
                           f"from it there would mix with: {branch}")
    step = read_state(path).get("step", 0)
    later = [c.name for c in complete_checkpoints(output_dir) if read_state(c).get("step", 0) > step]
    # from the newest checkpoint of a run that has not finished: what --resume auto does (a final/ written
    # after it by an end that was cut short is redone)
    done = [f"{d.name}/" for d in (layout.final, layout.eval) if d.is_dir()] if run_finished(output_dir) else []
    if later or done:
        raise FittuneError(f"--resume {path}: {output_dir} holds what the run did after it ({', '.join(later + done)}), "
                           f"which continuing from it there would replace: {branch}; --resume auto continues "
                           f"from the newest checkpoint")


def read_state(path: Path) -> dict:
    """The trainer state of a checkpoint (JSON: never unpickled)."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FittuneError(f"{path / STATE_FILE} is corrupt ({e}): resume from another checkpoint "
                           f"(--resume {path.parent}/step-N) or start a new output_dir") from None
    if not isinstance(state, dict):
        raise FittuneError(f"{path / STATE_FILE} is not a fittune trainer state (not a JSON object)")
    return state


def saved_under(path: Path) -> Strategy | None:
    """The strategy a fittune checkpoint was saved under, as its trainer state says (None: it has no readable
    trainer state, or one that names no strategy fittune knows: e.g. final/, or weights made elsewhere)."""
    try:
        name = read_state(path).get("strategy") if (path / STATE_FILE).is_file() else None
    except FittuneError:  # a damaged state: the weights may still be whole (the caller reads the files)
        return None
    return Strategy.named(name) if name in NAMES else None


_DATA_DIGESTS = {"source_sha256": "the data file's bytes", "train_sha256": "the training rows",
                 "heldout_sha256": "the held-out rows"}


def check_compatible(state: dict, fingerprint: dict, path: Path, world_size: int | None = None) -> None:
    """Refuse a checkpoint written for another model, adapter setup or batch plan, naming each difference (and,
    when the process count changed, how to keep the checkpoint's global batch)."""
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        when = "a newer" if isinstance(version, int) and version > FORMAT_VERSION else "an older"
        raise FittuneError(f"{path} was written by {when} fittune (checkpoint format {version}, this fittune reads "
                           f"format {FORMAT_VERSION}): resume it with the fittune version that wrote it, or start "
                           f"a new output_dir")
    saved = state.get("fingerprint", {})
    changed = [k for k, v in fingerprint.items() if saved.get(k) != v]
    if not changed:
        return
    # content hashes say only that something differs: named in words, not as two 64-digit numbers each
    diffs = [f"{_DATA_DIGESTS[k]} differ" if k in _DATA_DIGESTS else f"{k}: checkpoint {saved.get(k)!r} vs now "
             f"{fingerprint[k]!r}" for k in changed]
    how = "resume with the same recipe, or start a new output_dir"
    if "source_sha256" in changed:
        how = ("the data changed since the checkpoint (data.path or data.test_path): resume with the data it was "
               "trained on, or start a new output_dir")
    if set(changed) <= {"train_sha256", "heldout_sha256"}:
        # the file's bytes agree: the examples were made or split differently
        how = ("the data file is unchanged, so the data keys of the recipe (columns, system prompt, test split) "
               "differ, or the run began with a fittune from before 2026-11-30, whose split kept a class with one "
               "row out of stratification: resume with that recipe or version, or start a new output_dir")
    written_by = state.get("world_size")
    batch = saved.get("global_batch_size")
    if saved.get("global_batch_size") != fingerprint.get("global_batch_size") and world_size and written_by \
            and written_by != world_size:
        how = (f"it was written by {written_by} process(es), this launch has {world_size}: launch {written_by}, or "
               f"keep its global batch ({batch} = train.micro_batch_size x train.grad_accum x processes) with "
               f"--train.grad_accum")
    raise FittuneError(f"cannot resume from {path}: it belongs to a different run setup ({'; '.join(diffs)}); {how}")


# ---- trust: loading a sharded checkpoint unpickles it ------------------------------------------------------


def trust_problem(path: Path) -> str | None:
    """Why the checkpoint `path` is not one fittune saved right here under this account (None: it is): a
    `step-N` of a run's `checkpoints/`, both directories sealed (`rundir.sealed`). A directory unpacked into
    a trusted run's checkpoints/, or a run copied or received from elsewhere, is not."""
    real = Path(path).resolve()  # a symlink planted in a run's checkpoints/ is judged by where it points
    if real.parent.name != "checkpoints" or STEP_NAME.fullmatch(real.name) is None:
        return f"{real} is not a checkpoint of a fittune run (RUN/checkpoints/step-N)"
    run = RunLayout.of_checkpoint(real).root
    if not owned(run, "train") or not owned(real, "checkpoint"):
        return f"{real} or its run {run} has no {MARKER} marker of the right kind: fittune did not save it there"
    return seal_problem(run) or seal_problem(real)


def require_trusted(path: Path, trusted: bool, why: str) -> None:
    """Refuse to unpickle a checkpoint from outside fittune's own run directories unless the user said it is
    trusted (`--trust_checkpoint`): unpickling runs whatever code the file holds."""
    problem = None if trusted else trust_problem(path)
    if problem is None:
        return
    raise FittuneError(f"{path} is not a checkpoint that fittune saved here under your account ({problem}), and "
                       f"loading it unpickles {why}. A checkpoint is code-equivalent: unpickling runs any code it "
                       f"contains, so load only checkpoints from a trusted source; if you trust this one, pass "
                       f"--trust_checkpoint")


def _damaged(f: Path) -> str | None:
    """Why `f` is not a whole tensor file (None: it looks whole). Reads only the header / zip directory."""
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt"):  # checks the header covers the file exactly (a cut file fails)
                pass
        else:
            zipfile.ZipFile(f).close()  # torch.save's zip: a cut or overwritten file has no central directory
    except Exception as e:  # safetensors raises its own SafetensorError; zipfile BadZipFile; OSError
        return first_line(e)
    return None


def _load_fully(f: Path) -> None:
    """Read `f` as a resume would (tensors only: never unpickles code)."""
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        load_file(f)
    else:
        from accelerate.utils import load

        load(f, map_location="cpu", weights_only=True)  # torch.load + numpy's RNG state types, no code


def _why_unreadable(e: BaseException) -> str:
    """What a failed read says, in one line; never torch's advice to retry with weights_only=False (which would
    run whatever code the file holds)."""
    text = str(e)
    if "Weights only load failed" in text:
        # what it holds ("Unsupported global: GLOBAL numpy.x ...", "unsupported GLOBAL posix.mkdir whose module
        # posix is blocked"), without the advice
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text)
        what = f" ({found[1]})" if found else ""
        return (f"it holds a pickled object other than tensors{what}, which fittune never unpickles: the file was "
                f"replaced, or saved by other library versions than these")
    return first_line(e)


def _corrupt(path: Path, f: Path, reason: str, export: bool = False) -> FittuneError:
    fix = (f"export an older checkpoint ({path.parent}/step-N)" if export else
           f"resume from an older checkpoint (--resume {path.parent}/step-N) or start a new output_dir")
    return FittuneError(f"checkpoint {path} is damaged: {f.relative_to(path)} cannot be read ({reason}); {fix}")


def check_files(path: Path, export: bool = False) -> None:
    """Refuse a checkpoint with a cut or overwritten tensor file, naming it, before any of it is loaded."""
    for pattern in _TENSOR_FILES:
        for f in sorted(path.rglob(pattern)):
            reason = _damaged(f)
            if reason:
                raise _corrupt(path, f, reason, export)


def check_dcp_files(path: Path, export: bool = False, needs: tuple[str, ...] = ()) -> None:
    """Refuse torch.distributed.checkpoint shards (FSDP2's) under `path` with a file missing or shorter than
    the checkpoint's metadata records, naming it (torch would raise a zip error from inside its reader on
    every rank); `needs`: the folders that must hold such shards. Reads `.metadata`, a pickle: call it only
    for a checkpoint already trusted."""
    import torch.distributed.checkpoint as dcp

    for folder in needs:
        if not (path / folder / ".metadata").is_file():
            raise _corrupt(path, path / folder / ".metadata", "missing", export)
    for meta in sorted(path.rglob(".metadata")):
        try:
            storage = dcp.FileSystemReader(str(meta.parent)).read_metadata().storage_data
        except Exception as e:  # UnpicklingError, EOFError: a cut or overwritten .metadata
            reason = first_line(e)
            raise _corrupt(path, meta, reason, export) from None
        needed: dict[str, int] = {}  # file -> the end of its last record
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(needed.items()):
            f = meta.parent / name
            if not f.is_file():
                raise _corrupt(path, f, "missing", export)
            if f.stat().st_size < size:
                raise _corrupt(path, f, f"{f.stat().st_size} bytes, its metadata records {size}", export)


def _name_the_bad_file(path: Path, rank: int, error: BaseException) -> FittuneError:
    """A load failed: find the file that cannot be read (tensors only) and name it; else report the error."""
    files = sorted(path.glob("model*.safetensors")) + sorted(path.glob("optimizer*.bin"))
    files += [f for f in (path / "scaler.pt", path / f"random_states_{rank}.pkl") if f.is_file()]
    for f in files:
        try:
            _load_fully(f)
        except Exception as e:  # UnpicklingError, RuntimeError (zip), SafetensorError: what a bad file raises
            return _corrupt(path, f, _why_unreadable(e))
    if hasattr(error, "failures"):  # torch.distributed.checkpoint's CheckpointException: the first rank's error
        error = next(iter(error.failures.values()))[0]
    reason = _why_unreadable(error)
    return FittuneError(f"could not load checkpoint {path} ({type(error).__name__}: {reason}); resume from an "
                        f"older checkpoint or start a new output_dir")


# ---- save --------------------------------------------------------------------------------------------------


def _trainable_named(model) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _innermost(optimizer):
    """The torch optimizer holding the states (below accelerate's and DeepSpeed's wrappers)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _nbytes(t) -> int:
    return tensor_bytes(local_part(t))  # a torchao 8-/4-bit state counts its codes and scales, not its nominal dtype


def checkpoint_bytes(target: CheckpointTarget) -> int:
    """What this rank will write, known before the save: its parameters, the optimizer's own copies of them
    (ZeRO's fp32 partitions) and its states, plus the portable adapter copy on the main process. An estimate
    from below (RNG states and metadata are a few KiB)."""
    import torch

    params = list(target.model.parameters())
    total = sum(_nbytes(p) for p in params)
    inner = _innermost(target.optimizer)
    seen = {id(p) for p in params}
    for group in inner.param_groups:
        total += sum(_nbytes(p) for p in group["params"] if id(p) not in seen)  # master copies, not the params
    for st in inner.state.values():
        total += sum(_nbytes(v) for v in st.values() if isinstance(v, torch.Tensor))
    if target.lora and target.accelerator.is_main_process:  # adapter + its two moments, unsharded
        total += 3 * sum(p.numel() * p.element_size() for _, p in _trainable_named(target.model))
    return total


def _full_optimizer_state(target: CheckpointTarget, model) -> dict:
    """{param name -> {exp_avg, exp_avg_sq}} gathered whole, whatever the sharding (collective under ZeRO)."""
    import torch

    out = {}
    if target.strategy.deepspeed:
        from deepspeed.utils import safe_get_full_optimizer_state

        for name, p in _trainable_named(model):
            out[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in ("exp_avg", "exp_avg_sq")}
        return out

    inner = _innermost(target.optimizer)
    for name, p in _trainable_named(model):
        st = inner.state.get(p, {})
        if st:
            out[name] = {k: gathered_copy(st[k]) for k in ("exp_avg", "exp_avg_sq")}  # DTensors under FSDP2
        else:  # no step taken yet
            out[name] = {k: torch.zeros(p.shape, dtype=p.dtype) for k in ("exp_avg", "exp_avg_sq")}
    return out


def _prepare_tmp(target: CheckpointTarget, output_dir: Path, tmp: Path, intact: str) -> None:
    """Check the disk can hold this rank's share; the main process creates the empty, marked step-N.tmp."""
    try:
        check_free_space(output_dir, checkpoint_bytes(target), f"checkpoint {tmp.name[:-4]}")
    except FittuneError as e:
        raise FittuneError(f"{e}; {intact}") from None
    if target.accelerator.is_main_process:
        checkpoint_root(output_dir).mkdir(parents=True, exist_ok=True)
        final = tmp.with_name(tmp.name[:-4])
        # it would be replaced: only fittune's own, made here (a copied one is the user's, like rotation's rule)
        if final.is_symlink() or (final.exists() and not fittunes_own(final, "checkpoint")):
            raise FittuneError(f"could not write checkpoint {final}: it already exists and is not a checkpoint "
                               f"fittune made here; move it out of {final.parent}; {intact}")
        claim_build_dir(tmp, "checkpoint", f"could not write checkpoint {tmp}: it already exists and is not a "
                        f"fittune checkpoint; move it out of {tmp.parent}; {intact}")


# what torch.save's zip writer raises (as RuntimeError) when the disk fills up under it, e.g.
# "[enforce fail at inline_container.cc:672] . unexpected pos 1792 vs 1684" after "basic_ios::clear: iostream error"
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "iostream error", "file write failed")


@contextmanager
def _torch_write_failures_as_oserror():
    """Report torch.save's failed write as the OSError it is (a full disk), so write_guard recognises it."""
    try:
        yield
    except RuntimeError as e:
        text = f"{e} {e.__context__ or ''}"
        if not any(s in text for s in _TORCH_WRITE_FAILURES):
            raise
        raise OSError(f"torch.save could not write its file ({str(e).strip().splitlines()[0]}); the disk may be "
                      f"full") from e


def _write_tmp(target: CheckpointTarget, tmp: Path, state: dict, config_yaml: str) -> None:
    """accelerate's full state (every rank), the portable LoRA copy and trainer_state.json (main)."""
    from safetensors.torch import save_file

    acc = target.accelerator
    acc.save_state(str(tmp), safe_serialization=True)
    if target.lora:
        state_dict = acc.get_state_dict(target.model)  # gathered (collective under ZeRO-3)
        moments = _full_optimizer_state(target, acc.unwrap_model(target.model))  # collective under ZeRO / FSDP2
    if not acc.is_main_process:
        return
    if target.lora:  # save_pretrained keeps only the adapter's tensors of the gathered state dict
        (tmp / "adapter").mkdir()
        acc.unwrap_model(target.model).save_pretrained(tmp / "adapter", state_dict=state_dict)
        flat = {f"{name}::{k}": v.contiguous() for name, d in moments.items() for k, v in d.items()}
        save_file(flat, str(tmp / "adapter_optimizer.safetensors"))
    sched = {k: v for k, v in target.scheduler.state_dict().items() if k != "lr_lambdas"}
    atomic_write_text(tmp / "config.yaml", config_yaml)
    atomic_write_text(tmp / STATE_FILE, json.dumps({**state, "strategy": target.strategy.name, "scheduler": sched,
                                                    "format_version": FORMAT_VERSION}, indent=1))


def _publish(target: CheckpointTarget, output_dir: Path, tmp: Path, final: Path, keep: int, kept: list[Path]) -> None:
    """The main process durably puts step-N in place (fsync every file, rename, fsync checkpoints/), then
    drops the oldest, except those a resume is loading now (added to `kept`)."""
    if not target.accelerator.is_main_process:
        return
    publish_dir(tmp, final)
    kept += rotate_checkpoints(output_dir, keep)


def rotate_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` of the run's checkpoints (main process), except those a resume is
    loading now (`hold_checkpoint`): returns these, kept."""
    # only fittune's own count and go: a user's copy under a step-N name (the marker, not the directory, is
    # fittune's) is neither kept in place of one nor removed
    return [old for old in own_checkpoints(output_dir)[:-keep] if not remove_checkpoint(old)]


class SavedCheckpoint(NamedTuple):
    """What `save_checkpoint` did: the new checkpoint, and the old ones rotation would have removed but kept
    because a resume was loading them (a branch from this run: `hold_checkpoint`; a later save or the run's
    end removes them)."""

    path: Path
    kept: list[Path]


def save_checkpoint(target: CheckpointTarget, output_dir: str | Path, step: int, state: dict, config_yaml: str,
                    keep: int) -> SavedCheckpoint:
    """Write checkpoints/step-N whole or not at all: accelerate's full state (weights, optimizer, scaler,
    every rank's RNG) plus trainer_state.json; LoRA runs add an unsharded adapter + optimizer moments
    (portable across process counts and strategies). Built in step-N.tmp, fsynced and renamed once every
    rank has finished; then only the newest `keep` stay (and any older one another run is loading now). A
    failed write (full disk, permissions) on any rank is one FittuneError on every rank, and the previous
    checkpoint is left intact."""
    acc, output_dir = target.accelerator, Path(output_dir)
    final = checkpoint_root(output_dir) / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    previous = complete_checkpoints(output_dir)
    intact = f"the previous checkpoint is intact: {previous[-1] if previous else 'none was written yet'}"
    what, kept = f"checkpoint {tmp}", []
    phases = (lambda: _prepare_tmp(target, output_dir, tmp, intact), lambda: _write_tmp(target, tmp, state, config_yaml),
              lambda: _publish(target, output_dir, tmp, final, keep, kept))
    for phase in phases:  # the ranks agree after each phase, so a failure on one stops all before the next
        failure = None
        try:
            with write_guard(what, intact), _torch_write_failures_as_oserror():
                phase()
        except Exception as e:  # a failed write (now a FittuneError) or a bug: the ranks agree before raising
            failure = e
        agreed = agree_on_failure(acc, failure)
        if agreed is not None:
            if acc.is_main_process and tmp.is_dir() and owned(tmp, "checkpoint"):
                remove_owned(tmp, "checkpoint")  # the half-written step-N.tmp (ours); never the previous one
            raise agreed
    return SavedCheckpoint(final, kept)


# ---- load --------------------------------------------------------------------------------------------------


def _exact_restore(target: CheckpointTarget, path: Path, trusted: bool) -> None:
    """accelerate's `load_state`: every rank's weights, optimizer and RNG as they were."""
    acc, strategy = target.accelerator, target.strategy
    failure = None
    try:  # every rank checks; all stop if any is refused (e.g. a node without this account's trust key)
        if strategy.sharded:  # DeepSpeed's engine and FSDP2's distributed-checkpoint metadata use plain pickle
            require_trusted(path, trusted, f"{strategy.name} optimizer and model shards written with pickle")
        check_files(path)
        if strategy.sharded:  # trusted by now
            check_dcp_files(path)
        rng = path / f"random_states_{acc.process_index}.pkl"
        if not rng.is_file():  # accelerate skips a missing RNG file silently: the resume would not be exact
            raise FittuneError(f"checkpoint {path} is incomplete: {rng.name} is missing; resume from an older "
                               f"checkpoint or start a new output_dir")
        try:  # read here as accelerate reads it: it only logs a file it cannot load, and goes on inexactly
            _load_fully(rng)
        except Exception as e:  # UnpicklingError (a foreign pickle), RuntimeError (a cut zip)
            raise _corrupt(path, rng, _why_unreadable(e)) from None
    except FittuneError as e:
        failure = e
    raise_if_any_failed(acc, failure)  # before any collective inside load_state
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        acc.load_state(str(path))
    except FittuneError:
        raise
    except (Exception, CheckpointException) as e:  # a file cut or overwritten inside: UnpicklingError,
        # RuntimeError, SafetensorError; torch.distributed.checkpoint's CheckpointException is a BaseException
        failure = _name_the_bad_file(path, acc.process_index, e)
    raise_if_any_failed(acc, failure)


def _portable_restore(target: CheckpointTarget, path: Path, state: dict) -> None:
    """The unsharded adapter and AdamW moments (safetensors only), into one process or DDP."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if target.strategy.sharded:
        raise FittuneError(f"{path} was written with {state['world_size']} process(es) under {state['strategy']}; "
                           f"a LoRA checkpoint moves to another layout only into DDP or one process (not "
                           f"DeepSpeed or FSDP2), or resume with the original layout")
    unwrapped = target.accelerator.unwrap_model(target.model)
    files = [path / "adapter" / "adapter_model.safetensors", path / "adapter_optimizer.safetensors"]
    try:
        adapter, flat = (load_file(str(f)) for f in files)
    except Exception as e:  # SafetensorError (cut file), OSError (missing)
        bad = next((f for f in files if not f.is_file() or _damaged(f)), files[0])
        raise _corrupt(path, bad, str(e).strip().splitlines()[0]) from None
    set_peft_model_state_dict(unwrapped, adapter)
    inner = _innermost(target.optimizer)
    fused = inner.defaults.get("fused") or False
    for name, p in _trainable_named(unwrapped):
        inner.state[p] = {
            "step": torch.tensor(float(state["optimizer_steps"]), device=p.device if fused else "cpu"),
            "exp_avg": flat[f"{name}::exp_avg"].to(p.device, p.dtype),
            "exp_avg_sq": flat[f"{name}::exp_avg_sq"].to(p.device, p.dtype),
        }


class CheckpointHold:
    """A resume's hold on the checkpoint it loads (`hold_checkpoint`); `release` (idempotent) lets the run that
    wrote it remove it again."""

    def __init__(self, fd: int | None):
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def hold_checkpoint(path: Path) -> CheckpointHold:
    """Hold the checkpoint `path` while it loads (each rank, from before its first read to after its last): the
    run that wrote it skips it when it rotates (`rundir.remove_checkpoint`), so a branch (`--resume
    OTHER_RUN/checkpoints/step-N`) from a run still training is not cut off mid-load; any number of resumes
    hold one at once, and the run's own lock is not taken, so branching from a run in training stays possible.
    Raises `_removed` where that run is removing the checkpoint now, or has removed it."""
    try:
        hold = CheckpointHold(lock_marker(path, exclusive=False))
    except MarkerBusy:
        raise _removed(path) from None
    if not (path / STATE_FILE).is_file():  # its removal (which takes the state file first) came before the hold
        hold.release()
        raise _removed(path)
    return hold


def _removed(path: Path) -> FittuneError:
    return FittuneError(f"checkpoint {path} was removed by the run that holds it: it rotates its checkpoints "
                        f"(train.keep_checkpoints) and may still be training; resume from a newer checkpoint, or "
                        f"copy one elsewhere first (cp -r) and resume from the copy")


def _removed_while_loading(path: Path) -> FittuneError | None:
    """The error for a checkpoint that lost its state file while it loaded: a removal (which takes that file
    first) that no hold stopped (`hold_checkpoint`: a filesystem without locks)."""
    return None if (path / STATE_FILE).is_file() else _removed(path)


def load_checkpoint(target: CheckpointTarget, path: Path, state: dict, trusted: bool) -> str:
    """Restore a checkpoint into the prepared model/optimizer/scheduler. Returns how ("exact" or "portable").

    Same process count and strategy: accelerate's `load_state` (every rank's RNG included), an exact resume;
    under DeepSpeed or FSDP2 that unpickles, so the checkpoint must lie in a run directory fittune wrote or
    `trusted` (`--trust_checkpoint`) must be set. Otherwise a LoRA run restores its unsharded adapter and
    optimizer moments (safetensors; the data order is still exact: it depends only on the global batch);
    full fine-tuning refuses, naming what to change.
    """
    strategy = target.strategy
    exact = state["world_size"] == strategy.world_size and state["strategy"] == strategy.name
    if exact or (target.lora and (path / "adapter_optimizer.safetensors").is_file()):
        failure = None
        try:
            if exact:
                _exact_restore(target, path, trusted)
            else:
                _portable_restore(target, path, state)
        except FittuneError as e:  # a file gone or cut: say why, where the whole checkpoint is going
            failure = _removed_while_loading(path) or e
        # every rank, also where one read its files before they went: all stop, and the main one says why
        raise_if_any_failed(target.accelerator, failure)
        how = "exact" if exact else "portable"
    else:
        raise FittuneError(f"{path} was written with {state['world_size']} process(es) under {state['strategy']}, "
                           f"this run has {strategy.world_size} under {strategy.name}: full fine-tuning resumes "
                           f"only with the same layout (sharded optimizer states); relaunch with the original "
                           f"accelerate config and process count")
    scheduler = target.scheduler
    sched = dict(state["scheduler"])
    sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sched)
    # load_state_dict restores the schedule's position but not the optimizer's current lr (set by step())
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    return how
