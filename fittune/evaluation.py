"""Transitional: the old evaluation API with its old signatures, for fittune/train_loop.py only.

The evaluator now lives in fittune/scoring.py (engine), fittune/metrics.py (metrics), fittune/evaluator.py
(`evaluate_and_report`, `validation_loss`: what a training recipe calls) and fittune/evaluate_cli.py
(evaluate.py). Delete this module once the training recipe (fittune/recipe.py) calls those directly.
"""

from __future__ import annotations

from fittune.evaluator import evaluate_and_report as _evaluate_and_report
from fittune.metrics import build_predictions, class_name, compute_metrics, majority_baseline
from fittune.scoring import score_examples
from fittune.strategy import strategy_of

__all__ = ["build_predictions", "class_name", "compute_metrics", "evaluate_and_report", "majority_baseline",
           "run_evaluation"]


def run_evaluation(model, accelerator, examples, tokenizer, batch_size: int, max_new_tokens: int,
                   length_normalize: bool, loss_only: bool = False) -> list[dict]:
    """`fittune.scoring.score_examples` with the strategy read from the accelerator (train_loop.py's call)."""
    strategy = strategy_of(accelerator, "auto" if _device_mapped(accelerator, model) else "none")
    return score_examples(model, accelerator, strategy, examples, tokenizer, batch_size, max_new_tokens,
                          length_normalize, loss_only)


def evaluate_and_report(model, accelerator, cfg, tokenizer, examples, class_task: bool, out_dir, title: str,
                        compare: dict | None = None) -> dict:
    """`fittune.evaluator.evaluate_and_report` with the strategy read from the accelerator (train_loop.py's call)."""
    strategy = strategy_of(accelerator, cfg.model.parallel)
    return _evaluate_and_report(model, accelerator, strategy, cfg, tokenizer, examples, class_task, out_dir, title,
                                compare)


def _device_mapped(accelerator, model) -> bool:
    return bool(getattr(accelerator.unwrap_model(model), "hf_device_map", None))
