"""Metrics over gathered predictions: accuracy / F1 / confusion matrix for labelled rows (scikit-learn),
exact match and token F1 for open answers, loss and token accuracy over answer tokens, the majority baseline."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

from fittune.batches import TokExample


def class_name(example: TokExample, index: int, class_task: bool) -> str:
    """Label used by the label metrics: the class itself, or the choice letter for multiple choice."""
    return example.choices[index] if class_task else string.ascii_uppercase[index]


def _normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred: str, gold: str) -> float:
    """SQuAD-style token F1 after normalisation."""
    p, g = _normalize(pred).split(), _normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def build_predictions(examples: list[TokExample], records: list[dict], class_task: bool) -> list[dict]:
    """One row per example: id, the question, gold, pred, correct, and the choice scores (`scores`, named in
    `labels`: the classes, or the choices' letters) or generated text."""
    rows = []
    for e, rec in zip(examples, records):
        row = {"id": e.id, "question": e.question, "nll": rec["nll"], "n_tokens": rec["n_tokens"], "n_correct_tokens": rec["n_correct"]}
        if e.candidates and "scores" in rec:
            best = max(range(len(rec["scores"])), key=lambda k: (rec["scores"][k], -k))
            if e.choices[best] == e.choices[e.gold]:  # a row listing the answer's text twice: the model chose that
                best = e.gold  # text, and the tie between the copies (first wins) is not its error
            row.update(gold=class_name(e, e.gold, class_task), pred=class_name(e, best, class_task),
                       correct=best == e.gold, gold_text=e.choices[e.gold], pred_text=e.choices[best],
                       scores=rec["scores"], labels=[class_name(e, k, class_task) for k in range(len(rec["scores"]))])
        elif "generated" in rec:
            row.update(gold=e.answer, pred=rec["generated"], correct=_normalize(rec["generated"]) == _normalize(e.answer))
        rows.append(row)
    return rows


def compute_metrics(predictions: list[dict]) -> dict:
    """Loss, perplexity, token accuracy; label metrics (scikit-learn) and open-answer metrics when present."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    n_tok = sum(p["n_tokens"] for p in predictions)
    loss = sum(p["nll"] for p in predictions) / max(1, n_tok)
    metrics = {
        "num_examples": len(predictions),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "token_accuracy": sum(p["n_correct_tokens"] for p in predictions) / max(1, n_tok),
    }
    labeled = [p for p in predictions if "scores" in p]
    if labeled:
        gold = [p["gold"] for p in labeled]
        pred = [p["pred"] for p in labeled]
        classes = sorted(set(gold) | set(pred))
        prec, rec, f1, support = precision_recall_fscore_support(gold, pred, labels=classes, zero_division=0)
        metrics.update(
            accuracy=accuracy_score(gold, pred),
            f1_weighted=f1_score(gold, pred, average="weighted", zero_division=0),
            f1_macro=f1_score(gold, pred, average="macro", zero_division=0),
            num_labeled=len(labeled),
            per_class={c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                           "support": int(support[i])} for i, c in enumerate(classes)},
            confusion_matrix={"labels": classes,
                              "matrix": confusion_matrix(gold, pred, labels=classes).tolist()},
        )
    open_rows = [p for p in predictions if "scores" not in p and "pred" in p]
    if open_rows:
        metrics.update(
            exact_match=sum(p["correct"] for p in open_rows) / len(open_rows),
            token_f1=sum(token_f1(p["pred"], p["gold"]) for p in open_rows) / len(open_rows),
            num_open=len(open_rows),
        )
    return metrics


def majority_baseline(train_classes: list[str], test_gold: list[str]) -> dict:
    """Accuracy and F1 of always predicting the training split's most frequent class. Of classes tied for
    most frequent, the first in sorted order (as scikit-learn's DummyClassifier picks), never the one met first
    in the data; the tie is recorded (`majority_ties`) for `majority_note` to say."""
    from sklearn.metrics import accuracy_score, f1_score

    if not train_classes or not test_gold:
        return {}
    counts = Counter(train_classes)
    most = max(counts.values())
    top, *ties = sorted(c for c, n in counts.items() if n == most)
    pred = [top] * len(test_gold)
    return {"majority_class": top, "majority_count": most, "majority_of": len(train_classes), "majority_ties": ties,
            "accuracy": accuracy_score(test_gold, pred),
            "f1_weighted": f1_score(test_gold, pred, average="weighted", zero_division=0),
            "f1_macro": f1_score(test_gold, pred, average="macro", zero_division=0)}


def majority_of(train: list[TokExample], test: list[TokExample], class_task: bool) -> dict:
    """`majority_baseline` over the rows that have candidates (classes, or choices): the training rows' gold
    classes against the held-out rows' ({}: no such rows)."""
    return majority_baseline([class_name(x, x.gold, class_task) for x in train if x.candidates],
                             [class_name(x, x.gold, class_task) for x in test if x.candidates])


def majority_note(baseline: dict) -> str | None:
    """Which class the majority baseline always predicts, and a tie if there was one (None: no baseline)."""
    if not baseline:
        return None
    note = (f"the majority baseline always predicts {baseline['majority_class']!r} ({baseline['majority_count']} of "
            f"the {baseline['majority_of']} training rows)")
    if baseline["majority_ties"]:
        others = ", ".join(repr(c) for c in baseline["majority_ties"])
        note += (f"; tied with {others}: the first in sorted order is taken, so on rows of a tied class it "
                 f"would score otherwise")
    return note
