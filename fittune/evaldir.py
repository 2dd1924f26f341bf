"""Evaluation output directories: which directory an evaluation may write (new, empty, or an evaluation of
fittune's; never a run's own names, never a user's folder), which results it may replace (the same model's;
another model's only with --overwrite; inside a training run, only that run's models'), and the reservation
that keeps two evaluations out of one directory. `reports.write_eval_outputs` fills what is reserved here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fittune.errors import FittuneError
from fittune.rundir import (
    LOCK_INFO,
    MARKER,
    RUN_NAMES,
    DirLock,
    check_name_room,
    check_not_cwd,
    check_not_inside_fittune_dir,
    check_writable_dir,
    foreign_names,
    interrupted_claim,
    marker_kind,
    missing_parents,
    owned,
    owning_run,
    remove_if_empty,
    remove_owned,
    reserve_build,
    resolved,
    write_guard,
)

# what an evaluation writes (reports.write_eval_outputs); replacing one removes these and nothing else
EVAL_FILES = frozenset({"metrics.json", "predictions.jsonl", "evaluation.json", "comparison.json", "report.md",
                        "confusion_matrix.png", MARKER, LOCK_INFO})


def check_eval_dir(out_dir: str | os.PathLike, flag: str = "--output_dir", run_writes: bool = False) -> Path:
    """Refuse an evaluation output directory fittune may not replace: an existing non-empty directory that
    fittune did not create (no `.fittune` marker; `eval/` inside a fittune run directory counts as fittune's),
    or a file. `run_writes`: the training run writes its own eval/ (evaluate.py may not replace it, nor
    eval_untrained/). Read-only, so it can run on every rank before any work."""
    out = Path(out_dir)
    if out.is_symlink():  # results are published by swapping directories: never through a link
        raise FittuneError(f"{flag} {out} is a symbolic link: give the directory's own path, or a new one")
    check_not_inside_fittune_dir(out, flag, evaluation=True)  # RUN/eval-* beside a run's own eval/ is fine
    check_not_cwd(out, flag)
    check_name_room(out, flag)
    real = resolved(out)  # a link above it (latest -> RUN) or a `..` names the same place
    if not run_writes and real.name in RUN_NAMES and owned(real.parent, "train"):
        raise FittuneError(f"{flag} {out} is the run's own {real.name}/, what its training wrote: name it "
                           f"eval-SOMETHING there, or choose a directory outside the run")
    foreign = foreign_names(out, EVAL_FILES) if _ours(out) else []  # not an evaluation's own files
    if foreign:  # e.g. notes.md, or a copy of the very model being scored: replacing the results deletes them
        raise FittuneError(f"{flag} {out} also holds {', '.join(foreign)}, which fittune did not write and "
                           f"replacing the evaluation there would delete: move them out first, or choose another "
                           f"directory")
    if out.is_dir() and not _ours(out) and any(out.iterdir()):
        check_writable_dir(out, flag)  # raises: not empty, not fittune's
        # fittune's, but not an evaluation output (a run directory, a checkpoint): never replaced by results
        raise FittuneError(f"{flag} {out} is a fittune {marker_kind(out) or 'run'} directory, not an evaluation "
                           f"output: choose a new or empty directory (e.g. {out / 'eval-other'})")
    if out.exists() and not out.is_dir():
        raise FittuneError(f"{flag} {out} is a file, not a directory: choose another path")
    tmp = tmp_of(out)
    if tmp.exists() and not _ours(tmp) and not interrupted_claim(tmp):  # the last is adopted when writing
        raise FittuneError(f"{tmp} exists and was not created by fittune: move it away (fittune builds "
                           f"{out.name}/ next to it before replacing the old one)")
    return out


def _ours(path: Path) -> bool:
    """An evaluation output fittune wrote: its marker says `eval` (never a symbolic link)."""
    return owned(path, "eval")


def tmp_of(out: Path) -> Path:
    """Where `write_eval_outputs` builds the results of an unreserved `out` (training's own eval/)."""
    return out.with_name(out.name + ".tmp")


@dataclass
class EvalDir:
    """An evaluation's output directory, reserved by the process that writes it: its results are built in a
    directory of its own beside it (`.<name>.tmp-<pid>-<hex>`, marked and locked from the start, which no
    other process touches), then swapped in whole. A second evaluation into the same directory sees the
    first one's locked build directory and is refused at once, not after its scoring; of two started at the same
    moment, at least one is refused (each looks again once its own build is locked). `reserve_eval_dir` makes one;
    `write_eval_outputs` fills and publishes it."""

    out: Path
    build: Path
    lock: DirLock
    made: list[Path] = field(default_factory=list)
    """The directories above `out` that reserving it created (removed again, while empty, if it fails)."""
    published: bool = False

    def release(self) -> None:
        """Let go of the reservation; an evaluation that ended without results removes its build directory,
        and the directories it created for it."""
        try:
            if not self.published:
                remove_owned(self.build, "eval")
                remove_if_empty(self.made)
        finally:
            self.lock.release()


def reserve_eval_dir(out_dir: str | os.PathLike, program: str) -> EvalDir:
    """Check the evaluation output directory (`check_eval_dir`) and reserve it (`EvalDir`); a killed
    evaluation's build directory is removed (its lock is free)."""
    out = check_eval_dir(out_dir)
    made = missing_parents(out)
    try:
        with write_guard(f"the evaluation's build directory beside {out}", "nothing was written"):
            build = reserve_build(out, ".tmp-", "eval", program, busy=lambda holder: (
                f"{out} is being written by {holder}: wait for it to finish, or pass another --output_dir"))
    except BaseException:
        remove_if_empty(made)
        raise
    return EvalDir(out, build.path, build.lock, made)


def check_in_own_run(out: Path, weights: Path, weights_run: Path | None, flag: str) -> None:
    """An output directory inside a training run holds evaluations of that run's own models (its final/, a
    checkpoint's adapter; `weights_run`: the run `weights` lie in): another model's results there would read
    as the run's."""
    run = owning_run(out.parent)
    if run is not None and run != weights_run:
        raise FittuneError(f"{flag} {out} is inside the training run {run}, but {weights} is not that "
                           f"run's model: its evaluation would read as the run's own; choose a directory outside "
                           f"that run")


def evaluated_model(out: Path) -> str | None:
    """The model whose evaluation `out` holds, as its evaluation.json says (None: unknown)."""
    try:
        model = json.loads((out / "evaluation.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def check_replaces_same_model(out: Path, weights: Path, weights_run: Path | None, overwrite: bool, flag: str) -> None:
    """Results in `out` are replaced by an evaluation of the same model (the same command again) or with
    --overwrite; another model's, or results that do not say whose they are, are never replaced by accident.
    Inside the run the weights lie in (`weights_run`), the same place in the run is the same model: a run
    moved elsewhere re-evaluates into its own folders."""
    if overwrite or not (out / "metrics.json").is_file():
        return
    before, now = evaluated_model(out), weights.resolve()
    if before == str(now) or before is not None and _same_place_in_run(Path(before), now, out, weights_run):
        return
    whose = f"of {before}" if before else "that does not say which model it scored (no evaluation.json)"
    raise FittuneError(f"{flag} {out} holds an evaluation {whose}, not of {now}: choose another directory, or "
                       f"pass --overwrite to replace it")


def _same_place_in_run(before: Path, now: Path, out: Path, weights_run: Path | None) -> bool:
    """`before` (a recorded path) ends as `now` does in its run (`final`, `checkpoints/step-N/adapter`), the run
    `out` lies in: the run was moved or renamed since, with its evaluations (only that run's models' evaluations
    are written inside it)."""
    if weights_run is None or owning_run(out.parent) != weights_run:
        return False
    inside = now.relative_to(weights_run).parts
    return bool(inside) and before.parts[-len(inside):] == inside
