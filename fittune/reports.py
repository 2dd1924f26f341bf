"""Files people read and plot: metrics.json, predictions.jsonl, report.md, PNG plots, the printed table."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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
    names = [m for m in TABLE_METRICS if any(m in c for c in columns.values())]
    out = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    out += [f"| {m} | " + " | ".join(_fmt(c.get(m)) for c in columns.values()) + " |" for m in names]
    return "\n".join(out)


def plot_confusion(cm: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay
    import numpy as np

    labels = [lb if len(lb) <= 24 else lb[:21] + "..." for lb in cm["labels"]]
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.array(cm["matrix"]), display_labels=labels).plot(ax=ax, colorbar=False,
                                                                              xticks_rotation=45)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_eval_outputs(out_dir: str | os.PathLike, metrics: dict, predictions: list[dict], title: str,
                       compare: dict[str, dict] | None = None) -> Path:
    """Write metrics.json, predictions.jsonl, report.md (+ confusion_matrix.png) atomically to `out_dir`."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(tmp / "predictions.jsonl", "w") as f:
        for row in predictions:
            f.write(json.dumps(row) + "\n")
    report = [f"# {title}", "", markdown_table(compare or {"model": metrics}), ""]
    if "per_class" in metrics:
        report += ["## Per class", "", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        report += [f"| {c} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
                   for c, v in metrics["per_class"].items()]
        report += ["", "![confusion matrix](confusion_matrix.png)", ""]
        plot_confusion(metrics["confusion_matrix"], tmp / "confusion_matrix.png", title)
    (tmp / "report.md").write_text("\n".join(report))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
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
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per answer token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
