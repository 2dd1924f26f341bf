"""What the training recipe and evaluate.py call: score a held-out set, compute its metrics, write its report."""

from __future__ import annotations

import os
import time

from fittune.batches import TokExample
from fittune.distributed import Launched, on_main_then_agree
from fittune.evaldir import EvalDir
from fittune.metrics import build_predictions, compute_metrics
from fittune.reports import write_eval_outputs
from fittune.scoring import score_examples


def evaluate_and_report(model, launched: Launched, cfg, tokenizer, examples: list[TokExample],
                        class_task: bool, out_dir: str | os.PathLike | EvalDir, title: str,
                        compare: dict[str, dict] | None = None, about: dict | None = None) -> dict:
    """Evaluate on `examples` (every rank its share), write `out_dir` on the main process (metrics.json,
    predictions.jsonl, report.md, confusion_matrix.png, evaluation.json) and return the metrics on every rank.
    `out_dir` may be reserved already on the main process (`evaldir.reserve_eval_dir`).

    `compare`: earlier columns of the report table (e.g. the majority baseline, the untrained model). A pass
    holds at most `eval.batch_size` rows and `eval.max_batch_tokens` padded tokens (None: no token budget).
    `about`: what was evaluated (the model, the data), kept in evaluation.json with the settings that change
    the numbers, so two evaluations can be told apart."""
    accelerator, strategy = launched.accelerator, launched.strategy
    cut = generation_cut(examples, cfg.eval.max_new_tokens)
    if cut:
        accelerator.print(f"fittune: NOTE: {cut}", flush=True)
    records = score_examples(model, accelerator, strategy, examples, tokenizer, cfg.eval.batch_size,
                             cfg.eval.max_new_tokens, cfg.eval.length_normalize,
                             max_batch_tokens=cfg.eval.max_batch_tokens)
    predictions = build_predictions(examples, records, class_task)
    metrics = compute_metrics(predictions)
    # the other ranks wait for the reports: a failed write fails every rank, and none leaves early
    settings = {**(about or {}), "examples": len(examples), "processes": accelerator.num_processes,
                "strategy": strategy.name,
                "eval": cfg.eval.model_dump(mode="json", exclude={"before_training"}),  # says nothing of this one
                "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    on_main_then_agree(accelerator, lambda: write_eval_outputs(out_dir, metrics, predictions, title,
                                                                {**(compare or {}), title: metrics}, settings))
    return metrics


def generation_cut(examples: list[TokExample], max_new_tokens: int) -> str | None:
    """What it means when generated answers are cut before the reference answers end: exact_match is 0 for
    those rows whatever the model learned. None when every open answer fits (or nothing is generated)."""
    lengths = [len(e.answer_ids) - 1 for e in examples if e.candidates is None]  # without the end-of-turn token
    longer = [n for n in lengths if n > max_new_tokens]
    if max_new_tokens <= 0 or not longer:
        return None
    return (f"{len(longer)} of {len(lengths)} reference answers are longer than eval.max_new_tokens "
            f"({max_new_tokens} tokens; the longest has {max(longer)}): generation stops there, so their "
            f"exact_match is 0 and token F1 is capped whatever the model learned; raise eval.max_new_tokens to "
            f"at least {max(longer)}")


def validation_loss(model, launched: Launched, examples: list[TokExample], tokenizer, batch_size: int,
                    max_batch_tokens: int | None = None) -> float:
    """Mean answer-token NLL of `examples` over all ranks (the periodic validation loss; no choice scoring,
    no generation, no progress bar). The same on every rank."""
    records = score_examples(model, launched.accelerator, launched.strategy, examples, tokenizer, batch_size, 0, False,
                             loss_only=True, max_batch_tokens=max_batch_tokens)
    return sum(r["nll"] for r in records) / max(1, sum(r["n_tokens"] for r in records))
