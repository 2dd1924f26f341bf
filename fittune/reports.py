"""Files people read and plot: metrics.json, predictions.jsonl, report.md, PNG plots, the printed table."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path

from fittune.errors import FittuneError
from fittune.rundir import (
    RUN_NAMES,
    DirInUse,
    DirLock,
    atomic_write_bytes,
    atomic_write_text,
    check_not_inside_fittune_dir,
    check_writable_dir,
    claim_build_dir,
    claim_dir,
    interrupted_claim,
    marker_kind,
    missing_parents,
    owned,
    publish_dir,
    remove_if_empty,
    remove_owned,
    write_guard,
)

TABLE_METRICS = ["num_examples", "loss", "perplexity", "token_accuracy", "accuracy", "f1_weighted", "f1_macro",
                 "exact_match", "token_f1"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4f}"


def metrics_table(columns: dict[str, dict]) -> str:
    """A compact text table: one row per metric, one column per model (or baseline)."""
    names = [m for m in TABLE_METRICS if any(m in c for c in columns.values())]
    head = ["metric"] + list(columns)
    rows = [[m] + [_fmt(c.get(m)) for c in columns.values()] for m in names]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(columns: dict[str, dict]) -> str:
    """One column per model (majority, untrained, fine-tuned ...), one row per metric any of them has."""
    names = [m for m in TABLE_METRICS if any(m in c for c in columns.values())]
    out = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    out += [f"| {m} | " + " | ".join(_fmt(c.get(m)) for c in columns.values()) + " |" for m in names]
    return "\n".join(out)


def plot_confusion(cm: dict, path: Path, title: str) -> None:
    """The confusion matrix (`{"labels": [...], "matrix": [[...]]}`) as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    labels = [lb if len(lb) <= 24 else lb[:21] + "..." for lb in cm["labels"]]
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.array(cm["matrix"]), display_labels=labels).plot(ax=ax, colorbar=False,
                                                                              xticks_rotation=45)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_eval_dir(out_dir: str | os.PathLike, flag: str = "--output_dir", run_writes: bool = False) -> Path:
    """Refuse an evaluation output directory fittune may not replace: an existing non-empty directory that
    fittune did not create (no `.fittune` marker; `eval/` inside a fittune run directory counts as fittune's),
    or a file. `run_writes`: the training run writes its own eval/ (evaluate.py may not replace it, nor
    eval_untrained/). Read-only, so it can run on every rank before any work."""
    out = Path(out_dir)
    if out.is_symlink():  # results are published by swapping directories: never through a link
        raise FittuneError(f"{flag} {out} is a symbolic link: give the directory's own path, or a new one")
    check_not_inside_fittune_dir(out, flag, evaluation=True)  # RUN/eval-* beside a run's own eval/ is fine
    if not run_writes and out.name in RUN_NAMES and owned(out.parent, "train"):
        raise FittuneError(f"{flag} {out} is the run's own {out.name}/, what its training wrote: name it "
                           f"eval-SOMETHING there, or choose a directory outside the run")
    if out.is_dir() and not _ours(out) and any(out.iterdir()):
        check_writable_dir(out, flag)  # raises: not empty, not fittune's
        # fittune's, but not an evaluation output (a run directory, a checkpoint): never replaced by results
        raise FittuneError(f"{flag} {out} is a fittune {marker_kind(out) or 'run'} directory, not an evaluation "
                           f"output: choose a new or empty directory (e.g. {out / 'eval-other'})")
    if out.exists() and not out.is_dir():
        raise FittuneError(f"{flag} {out} is a file, not a directory: choose another path")
    tmp = _tmp_of(out)
    if tmp.exists() and not _ours(tmp) and not interrupted_claim(tmp):  # the last is adopted when writing
        raise FittuneError(f"{tmp} exists and was not created by fittune: move it away (fittune builds "
                           f"{out.name}/ next to it before replacing the old one)")
    return out


def _ours(path: Path) -> bool:
    """An evaluation output fittune wrote: its marker says `eval` (never a symbolic link)."""
    return owned(path, "eval")


def _tmp_of(out: Path) -> Path:
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


def _builds_of(out: Path) -> list[Path]:
    """The build directories of evaluations into `out` (live ones, or a killed one's leftovers)."""
    if not out.parent.is_dir():
        return []
    return [d for d in out.parent.glob(f".{glob_escape(out.name)}.tmp-*") if owned(d, "eval")]


def _clear_builds(out: Path, program: str, mine: Path | None = None) -> None:
    """Refuse if another evaluation is writing `out` (its build directory is locked); remove a killed one's
    build (its lock is free). A build with no lock file yet is one starting now: left alone, since it looks
    again once locked and then sees ours."""
    for other in _builds_of(out):
        if other == mine:
            continue
        try:
            left = DirLock(other).acquire(program, record=False, create=False)
        except DirInUse as e:
            raise FittuneError(f"{out} is being written by {e.holder}: wait for it to finish, or pass another "
                               f"--output_dir") from None
        if left is not None:
            try:
                remove_owned(other, "eval")
            finally:
                left.release()


def reserve_eval_dir(out_dir: str | os.PathLike, program: str) -> EvalDir:
    """Check the evaluation output directory (`check_eval_dir`) and reserve it (`EvalDir`); a killed
    evaluation's build directory is removed (its lock is free)."""
    out = check_eval_dir(out_dir)
    _clear_builds(out, program)  # refused here, before anything is created, in the common case
    made = missing_parents(out)
    try:
        with write_guard(f"the evaluation's build directory beside {out}", "nothing was written"):
            build = claim_dir(out.with_name(f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"), "eval")
    except BaseException:
        remove_if_empty(made)
        raise
    reserved = EvalDir(out, build, DirLock(build).acquire(program), made)
    try:
        # a second look once ours is locked: of two evaluations started at the same instant, the later to
        # lock sees the other's locked build, so they never both write (both may be refused, nothing lost)
        _clear_builds(out, program, mine=build)
    except BaseException:
        reserved.release()
        raise
    return reserved


def write_eval_outputs(out_dir: str | os.PathLike | EvalDir, metrics: dict, predictions: list[dict], title: str,
                       compare: dict[str, dict] | None = None, settings: dict | None = None) -> Path:
    """Write metrics.json, predictions.jsonl, report.md (+ confusion_matrix.png; + comparison.json, every
    column of the report's table, when it compares with baselines; + evaluation.json, `settings`: what was
    evaluated and how) to `out_dir`: built in
    `<out_dir>.tmp` (a reserved one, `reserve_eval_dir`: in its own build directory), fsynced, then swapped in
    whole (`rundir.publish_dir`). Only a directory fittune created is ever replaced; a user's non-empty
    directory is refused, never emptied."""
    reserved = out_dir if isinstance(out_dir, EvalDir) else None
    out = check_eval_dir(reserved.out if reserved else out_dir, run_writes=reserved is None)
    tmp = reserved.build if reserved else _tmp_of(out)
    if reserved is None:
        claim_build_dir(tmp, "eval", f"{tmp} exists and was not created by fittune: move it away")  # refused above
    lines = "".join(json.dumps(row) + "\n" for row in predictions)
    with write_guard(f"evaluation results to {out}", "nothing in place of the old results was changed"):
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        atomic_write_text(tmp / "predictions.jsonl", lines)
        if settings:
            atomic_write_text(tmp / "evaluation.json", json.dumps(settings, indent=2) + "\n")
        if compare and len(compare) > 1:  # the majority baseline, the untrained model ... as numbers to plot
            atomic_write_text(tmp / "comparison.json", json.dumps(compare, indent=2) + "\n")
        about = [f"- {k}: {settings[k]}" for k in ("model", "data", "written") if k in (settings or {})]
        report = [f"# {title}", "", *about, *([""] if about else []), markdown_table(compare or {"model": metrics}), ""]
        if "per_class" in metrics:
            report += ["## Per class", "", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
            report += [f"| {c} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
                       for c, v in metrics["per_class"].items()]
            report += ["", "![confusion matrix](confusion_matrix.png)", ""]
            plot_confusion(metrics["confusion_matrix"], tmp / "confusion_matrix.png", title)
        atomic_write_text(tmp / "report.md", "\n".join(report))
        publish_dir(tmp, out)
    if reserved is not None:
        reserved.published = True
    return out


def plot_loss_curve(log_path: Path, out_path: Path) -> None:
    """Training (and validation) loss against step, from train_log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:  # with a marker: a run that logged one step still shows its point
        ax.plot(*zip(*train), marker="." if len(train) > 1 else "o", label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per answer token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out_path, png.getvalue())  # whole or not at all, and never through a link there
