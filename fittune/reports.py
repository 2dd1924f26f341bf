"""Files people read and plot: metrics.json, predictions.jsonl, report.md, PNG plots, the printed table."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from fittune.evaldir import EvalDir, check_eval_dir, tmp_of
from fittune.rundir import atomic_write_bytes, atomic_write_text, claim_build_dir, publish_dir, write_guard

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


def write_eval_outputs(out_dir: str | os.PathLike | EvalDir, metrics: dict, predictions: list[dict], title: str,
                       compare: dict[str, dict] | None = None, settings: dict | None = None) -> Path:
    """Write metrics.json, predictions.jsonl, report.md (+ confusion_matrix.png; + comparison.json, every
    column of the report's table, when it compares with baselines; + evaluation.json, `settings`: what was
    evaluated and how) to `out_dir`: built in
    `<out_dir>.tmp` (a reserved one, `reserve_eval_dir`: in its own build directory), fsynced, then swapped in
    whole (`rundir.publish_dir`). Only a directory fittune created is ever replaced; a user's non-empty
    directory is refused, never emptied."""
    reserved = out_dir if isinstance(out_dir, EvalDir) else None
    # unreserved: the training run's own eval/ (evaluate.py reserves its --output_dir, checked under that name)
    out = check_eval_dir(reserved.out if reserved else out_dir, "the run's" if reserved is None else "--output_dir",
                         run_writes=reserved is None)
    tmp = reserved.build if reserved else tmp_of(out)
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
