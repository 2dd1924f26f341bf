"""Distributed evaluation: every rank scores its share, results are gathered and merged by example id.

Guarantees (tested with 1, 2 and 3 processes and several batch sizes):
  * no duplicated or missing examples: work is split by whole batches, ranks that run out of work repeat a
    dummy job whose results are thrown away, and the merged ids are checked against the evaluated set;
  * no hang under ZeRO-3 / FSDP: every rank makes the same number of forward (or generate) calls, agreed
    through one all-reduce before scoring, and generation runs with synced GPUs;
  * the same numbers for any process count: per-example sums are gathered and reduced on the main process.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fittune.data import IGNORE_INDEX, TokExample, collate_aligned
from fittune.errors import FittuneError


@dataclass
class _Job:
    kind: str  # "answer" | "cands" | "gen"
    keys: list[tuple[int, int]]  # (example index, candidate index or -1)
    prompts: list[list[int]]
    conts: list[list[int]]


def _make_jobs(examples: list[TokExample], idx: list[int], batch_size: int, generate: bool,
               loss_only: bool) -> list[_Job]:
    jobs = []
    by_len = sorted(idx, key=lambda i: -len(examples[i]))
    for s in range(0, len(by_len), batch_size):
        chunk = by_len[s:s + batch_size]
        jobs.append(_Job("answer", [(i, -1) for i in chunk], [examples[i].prompt_ids for i in chunk],
                         [examples[i].answer_ids for i in chunk]))
    if loss_only:
        return jobs
    pairs = [(i, k) for i in idx if examples[i].candidates for k in range(len(examples[i].candidates))]
    pairs.sort(key=lambda p: -(len(examples[p[0]].cand_prompt_ids) + len(examples[p[0]].candidates[p[1]])))
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        jobs.append(_Job("cands", chunk, [examples[i].cand_prompt_ids for i, _ in chunk],
                         [examples[i].candidates[k] for i, k in chunk]))
    if generate:
        open_idx = [i for i in by_len if not examples[i].candidates]
        for s in range(0, len(open_idx), batch_size):
            chunk = open_idx[s:s + batch_size]
            jobs.append(_Job("gen", [(i, -1) for i in chunk], [examples[i].prompt_ids for i in chunk], []))
    return jobs


def _shard_examples(examples: list[TokExample], batch_size: int, world: int, rank: int) -> list[int]:
    """This rank's example indices: whole length-sorted batches dealt round-robin."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), examples[i].id))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    return [i for b in batches[rank::world] for i in b]


def _score(model, job: _Job, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed log-prob of the continuation, its token count, and argmax-correct tokens."""
    batch = collate_aligned(job.prompts, job.conts, pad_id)
    targets = batch.pop("targets").to(device)
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    valid = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & valid
    return -nll.sum(-1).double().cpu(), valid.sum(-1).cpu(), correct.sum(-1).cpu()


def _generate(model, job: _Job, tokenizer, max_new_tokens: int, device, synced: bool) -> list[str]:
    width = max(len(p) for p in job.prompts)
    ids = torch.full((len(job.prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(job.prompts):  # left padding: generation continues every row from its last token
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    eos = [t for t in {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
           if isinstance(t, int) and t != tokenizer.unk_token_id]
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                         use_cache=True, synced_gpus=synced)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


# no_grad, not inference_mode: FSDP2 keeps the gathered parameters it makes here, and inference tensors
# cannot be updated in place by the next training step
@torch.no_grad()
def run_evaluation(model, accelerator, strategy, examples: list[TokExample], tokenizer, batch_size: int,
                   max_new_tokens: int, length_normalize: bool, loss_only: bool = False) -> list[dict]:
    """Score every example on every rank's share; returns the merged per-example records (on all ranks).

    `loss_only` skips choice scoring and generation (the quick periodic validation loss).
    """
    from accelerate.utils import gather_object

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if strategy.device_map:
        from fittune.placement import input_device

        device = input_device(accelerator.unwrap_model(model))
    jobs = _make_jobs(examples, _shard_examples(examples, batch_size, world, rank), batch_size,
                      generate=max_new_tokens > 0, loss_only=loss_only)
    # agree on the number of calls of each kind, so collective engines (ZeRO-3, FSDP) never wait forever
    counts = torch.tensor([sum(j.kind == k for j in jobs) for k in ("answer", "cands", "gen")], device=device)
    if world > 1:
        counts = accelerator.reduce(counts, reduction="max")
    dummy = _Job("answer", [(0, -1)], [examples[0].prompt_ids], [examples[0].answer_ids])
    dummy_gen = _Job("gen", [(0, -1)], [examples[0].prompt_ids], [])
    padded = []
    for kind, n in zip(("answer", "cands", "gen"), counts.tolist()):
        mine = [j for j in jobs if j.kind == kind]
        filler = dummy_gen if kind == "gen" else dummy
        padded += [(j, True) for j in mine] + [(filler, False)] * (int(n) - len(mine))

    was_training = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    synced = strategy.distributed and strategy.gathers_weights
    records: dict[str, dict] = {}
    for job, real in padded:
        with accelerator.autocast():
            if job.kind == "gen":
                texts = _generate(unwrapped, job, tokenizer, max_new_tokens, device, synced)
            else:
                lp, ntok, ncorr = _score(model, job, tokenizer.pad_token_id, device)
        if not real:
            continue
        for r, (i, k) in enumerate(job.keys):
            rec = records.setdefault(examples[i].id, {"id": examples[i].id})
            if job.kind == "answer":
                rec.update(nll=-lp[r].item(), n_tokens=int(ntok[r]), n_correct=int(ncorr[r]))
            elif job.kind == "cands":
                score = lp[r].item() / max(1, int(ntok[r])) if length_normalize else lp[r].item()
                rec.setdefault("scores", {})[k] = score
            else:
                rec["generated"] = texts[r].strip()
    model.train(was_training)

    merged: dict[str, dict] = {}
    for part in gather_object([list(records.values())]):
        for rec in part:
            merged.setdefault(rec["id"], rec)  # a repeated id is a padded duplicate: keep one
    if len(merged) != len(examples) or set(merged) != {e.id for e in examples}:
        raise RuntimeError(f"evaluation gathered {len(merged)} examples for a set of {len(examples)}")
    out = []
    for e in examples:
        rec = merged[e.id]
        if e.candidates and "scores" in rec:
            rec["scores"] = [rec["scores"][k] for k in range(len(e.candidates))]
        out.append(rec)
    return out


def validation_loss(model, accelerator, strategy, examples: list[TokExample], tokenizer, batch_size: int) -> float:
    """Mean NLL per answer token on `examples` (no choice scoring, no generation)."""
    records = run_evaluation(model, accelerator, strategy, examples, tokenizer, batch_size, 0, False, loss_only=True)
    return sum(r["nll"] for r in records) / max(1, sum(r["n_tokens"] for r in records))


def evaluate_and_report(model, accelerator, strategy, cfg, tokenizer, examples: list[TokExample], class_task: bool,
                        out_dir, title: str, compare: dict | None = None) -> dict:
    """Evaluate on `examples`, write eval files (main process), return the metrics (all ranks)."""
    records = run_evaluation(model, accelerator, strategy, examples, tokenizer, cfg.eval.batch_size,
                             cfg.eval.max_new_tokens, cfg.eval.length_normalize)
    predictions = build_predictions(examples, records, class_task)
    metrics = compute_metrics(predictions)
    if accelerator.is_main_process:
        columns = dict(compare or {})
        columns[title] = metrics
        from fittune.reports import write_eval_outputs

        write_eval_outputs(out_dir, metrics, predictions, title, columns)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Metrics


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
    """One row per example: id, gold, pred, correct, and the choice scores or generated text."""
    rows = []
    for e, rec in zip(examples, records):
        row = {"id": e.id, "nll": rec["nll"], "n_tokens": rec["n_tokens"], "n_correct_tokens": rec["n_correct"]}
        if e.candidates and "scores" in rec:
            best = max(range(len(rec["scores"])), key=lambda k: (rec["scores"][k], -k))
            row.update(gold=class_name(e, e.gold, class_task), pred=class_name(e, best, class_task),
                       correct=best == e.gold, gold_text=e.choices[e.gold], pred_text=e.choices[best],
                       scores=rec["scores"])
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
    """Accuracy and F1 of always predicting the training split's most frequent class."""
    from sklearn.metrics import accuracy_score, f1_score

    if not train_classes or not test_gold:
        return {}
    top = Counter(train_classes).most_common(1)[0][0]
    pred = [top] * len(test_gold)
    return {"majority_class": top, "accuracy": accuracy_score(test_gold, pred),
            "f1_weighted": f1_score(test_gold, pred, average="weighted", zero_division=0),
            "f1_macro": f1_score(test_gold, pred, average="macro", zero_division=0)}


# ---------------------------------------------------------------------------------------------------------
# evaluate.py


def evaluate_checkpoint(checkpoint: str, cfg, out_dir: str | None, info=None) -> dict:
    """Evaluate a saved model/adapter on the run's held-out rows (or on the configured data); write reports."""
    from pathlib import Path

    from fittune import data as D
    from fittune.distributed import configure_deepspeed, make_accelerator
    from fittune.model import load_tokenizer, load_trained_model, resolve_model_path, weights_dtype
    from fittune.reports import metrics_table
    from fittune.launch import check_world_size
    from fittune.precision import run_precision
    from fittune.strategy import strategy_of

    mixed = run_precision(cfg.train.mixed_precision)
    accelerator = make_accelerator(mixed, 1, None, cfg.output_dir)
    check_world_size(accelerator.num_processes)  # before anything is written
    strategy = strategy_of(accelerator, cfg.model.parallel)
    weights = info.weights_dir
    out = Path(out_dir) if out_dir else (info.run_dir or weights) / "eval"

    # the run's own held-out rows while the source and split are the run's (column mappings may change);
    # an explicit test file; or every row of another data file
    saved = _saved_config(info)
    split_keys = ("path", "test_path", "test_size")
    same_source = saved is not None and saved.get("seed") == cfg.seed and all(
        saved.get("data", {}).get(k) == getattr(cfg.data, k) for k in split_keys)
    heldout = info.heldout_ids if same_source else None
    if heldout is not None and not cfg.data.test_path:
        rows = D.read_rows(cfg.data.path, cfg.data)
        examples = D.map_columns(rows, cfg.data, D.resolve_data_path(cfg.data.path))
        test_examples = D.select_ids(examples, heldout, cfg.data.path)
        held = set(heldout)
        train_examples = [e for e in examples if e.id not in held]
    elif same_source or cfg.data.test_path:
        train_examples, test_examples = D.load_splits(cfg.data, cfg.seed)
    else:
        rows = D.read_rows(cfg.data.path, cfg.data)
        train_examples, test_examples = [], D.map_columns(rows, cfg.data, D.resolve_data_path(cfg.data.path))
    class_task = D.is_class_task(cfg.data)

    tok_dir = weights if (weights / "tokenizer_config.json").is_file() else resolve_model_path(cfg)
    tokenizer = load_tokenizer(str(tok_dir), cfg.model.trust_remote_code)
    test_set, stats = D.tokenize_examples(test_examples, tokenizer, cfg.data)
    if stats.dropped:
        accelerator.print(f"fittune: {stats.dropped} rows do not fit data.max_length and are not evaluated")
    if not test_set:
        raise FittuneError("no example to evaluate fits data.max_length")
    model = load_trained_model(weights, cfg, weights_dtype(cfg, mixed))
    if strategy.device_map:
        from fittune.placement import place_model

        place_model(model, cfg.model.max_memory, weights_dtype(cfg, mixed), training=False)
    if strategy.deepspeed:
        # ZeRO-3 loaded the weights partitioned: only the engine's hooks gather them for a forward pass
        configure_deepspeed(accelerator, cfg.eval.batch_size, 1, 0.0)
        model = accelerator.prepare(model)
    else:
        # a device map placed the model already (even all on one device): accelerate must not move it
        model = accelerator.prepare_model(model, device_placement=not strategy.device_map, evaluation_mode=True)

    compare = {}
    if train_examples and any(x.candidates for x in test_set):
        train_set, _ = D.tokenize_examples(train_examples, tokenizer, cfg.data)
        compare["majority"] = majority_baseline([class_name(x, x.gold, class_task) for x in train_set if x.candidates],
                                                [class_name(x, x.gold, class_task) for x in test_set if x.candidates])
    metrics = evaluate_and_report(model, accelerator, strategy, cfg, tokenizer, test_set, class_task, out, "model", compare)
    accelerator.print(f"fittune: evaluated {weights} on {len(test_set)} examples "
                      f"with {accelerator.num_processes} process(es)\n" + metrics_table({**compare, "model": metrics}))
    accelerator.print(f"fittune: wrote {out}/ (metrics.json, predictions.jsonl, report.md)")
    accelerator.end_training()
    return metrics


def _saved_config(info) -> dict | None:
    import yaml

    if info.config_file is None:
        return None
    return yaml.safe_load(info.config_file.read_text()) or {}


def evaluate_main(argv: list[str]) -> None:
    """evaluate.py: `--checkpoint DIR [--config FILE] [--output_dir DIR] [--key value ...]`."""
    from fittune.checkpoints import resolve_checkpoint
    from fittune.cli import split_flag
    from fittune.config import build_config, parse_overrides

    if "-h" in argv or "--help" in argv:
        print("usage: accelerate launch evaluate.py --checkpoint DIR [--config FILE] [--output_dir DIR] "
              "[--section.key VALUE ...]\n  DIR: a training output dir, its final/, or a model/adapter dir.\n"
              "  Without --config the run's saved config.yaml and held-out ids are used.")
        return
    checkpoint, rest = split_flag(argv, "checkpoint")
    if checkpoint is None:
        raise FittuneError("--checkpoint DIR is required (a training output dir, its final/, or a model dir)")
    out_dir, rest = split_flag(rest, "output_dir")
    config_file, rest = split_flag(rest, "config")
    info = resolve_checkpoint(checkpoint)
    if config_file is None:
        if info.config_file is None:
            raise FittuneError(f"{checkpoint} has no saved fittune config: pass --config FILE describing the data")
        config_file = str(info.config_file)
    cfg = build_config(config_file, parse_overrides(rest))
    evaluate_checkpoint(checkpoint, cfg, out_dir, info)
