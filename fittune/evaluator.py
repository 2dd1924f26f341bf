"""What the training recipe and evaluate.py call: score a held-out set, compute its metrics, write its report."""

from __future__ import annotations

import os
import time

from fittune.data import TokExample
from fittune.distributed import on_main_then_agree
from fittune.metrics import build_predictions, compute_metrics
from fittune.reports import write_eval_outputs
from fittune.scoring import score_examples
from fittune.strategy import Strategy


def evaluate_and_report(model, accelerator, strategy: Strategy, cfg, tokenizer, examples: list[TokExample],
                        class_task: bool, out_dir: str | os.PathLike, title: str,
                        compare: dict[str, dict] | None = None, about: dict | None = None) -> dict:
    """Evaluate on `examples` (every rank its share), write `out_dir` on the main process (metrics.json,
    predictions.jsonl, report.md, confusion_matrix.png, evaluation.json) and return the metrics on every rank.

    `compare`: earlier columns of the report table (e.g. the majority baseline, the untrained model). A pass
    holds at most `eval.batch_size` rows and `eval.max_batch_tokens` padded tokens (None: no token budget).
    `about`: what was evaluated (the model, the data), kept in evaluation.json with the settings that change
    the numbers, so two evaluations can be told apart."""
    records = score_examples(model, accelerator, strategy, examples, tokenizer, cfg.eval.batch_size,
                             cfg.eval.max_new_tokens, cfg.eval.length_normalize,
                             max_batch_tokens=cfg.eval.max_batch_tokens)
    predictions = build_predictions(examples, records, class_task)
    metrics = compute_metrics(predictions)
    # the other ranks wait for the reports: a failed write fails every rank, and none leaves early
    settings = {**(about or {}), "examples": len(examples), "processes": accelerator.num_processes,
                "strategy": strategy.name, "eval": cfg.eval.model_dump(mode="json"),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    on_main_then_agree(accelerator, lambda: write_eval_outputs(out_dir, metrics, predictions, title,
                                                                {**(compare or {}), title: metrics}, settings))
    return metrics


def validation_loss(model, accelerator, strategy: Strategy, examples: list[TokExample], tokenizer,
                    batch_size: int, max_batch_tokens: int | None = None) -> float:
    """Mean answer-token NLL of `examples` over all ranks (the periodic validation loss; no choice scoring,
    no generation, no progress bar). The same on every rank."""
    records = score_examples(model, accelerator, strategy, examples, tokenizer, batch_size, 0, False,
                             loss_only=True, max_batch_tokens=max_batch_tokens)
    return sum(r["nll"] for r in records) / max(1, sum(r["n_tokens"] for r in records))
