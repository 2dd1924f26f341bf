"""Evaluation speed and memory: the previous scoring method against fittune's, in one process, on the same
model and the same rows; predictions, per-choice scores and metrics compared.

    python bench/eval_bench.py                                     # CPU: 6-class set (120 rows) from the demo data
    python bench/eval_bench.py --set mc                            # the demo's 4-choice questions
    python bench/eval_bench.py --set ../shared/data/acl-arc-citation-intent/test.jsonl   # a real 6-label set
    python bench/eval_bench.py --shape qwen2.5-3b --set synthetic --rows 16 --prompt_len 1019  # GPU: 8 x 1024

Previous method (kept here only, for this comparison): one forward pass for the answer and one per candidate,
each `prompt + candidate` as its own row. fittune's (fittune/scoring.py): one packed pass per row, the prompt
once, every candidate after it behind a 4-D mask, the answer's loss from the gold candidate.

Model: `--shape small` (default) is a random Qwen2 of 6 layers, hidden 256 and a 49,152-token vocabulary
(SmolLM-135M's) so the output head costs what it costs in a real small model; the demo tokenizer writes the
ids. `--model DIR` evaluates a saved model instead. Peak memory of the scoring pass: torch.cuda.max_memory_allocated
above what was allocated before it, on a GPU; on the CPU the peak of the tensor memory the pass allocates, from
the torch profiler's allocation records (a separate, untimed pass).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fittune.batches import IGNORE_INDEX, TokExample, tokenize_examples  # noqa: E402
from fittune.columns import Example, map_columns  # noqa: E402
from fittune.config import DataConfig  # noqa: E402
from fittune.metrics import build_predictions, compute_metrics  # noqa: E402
from fittune.scoring import score_examples  # noqa: E402
from fittune.sources import read_rows, resolve_data_path  # noqa: E402
from fittune.strategy import Strategy  # noqa: E402

SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=49152),
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
}


# ---- the previous method (fittune before the shared-prompt engine), single process ----------------------


def collate_aligned(prompts: list[list[int]], conts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """The previous evaluator's batching, kept here as this benchmark's baseline: batch (prompt, continuation)
    pairs so every continuation starts at the same column.

    Prompts are left-padded to a common end P and continuations right-padded, so the logits needed to score
    the continuations are exactly the columns P-1 .. P+C-2: the model computes only those (`logits_to_keep`),
    never a full-vocabulary row for every prompt position.
    """
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in conts)
    B = len(prompts)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + C), dtype=torch.long)
    targets = torch.full((B, C), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(c)] = torch.tensor(c)
        mask[i, P - len(p):P + len(c)] = 1
        targets[i, :len(c)] = torch.tensor(c)
    # positions count real tokens only, so a left-padded row sees the positions it would see alone
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids,
            "logits_to_keep": torch.arange(P - 1, P + C - 1), "targets": targets}


def _old_score(model, prompts, conts, pad_id, device):
    batch = collate_aligned(prompts, conts, pad_id)
    targets = batch.pop("targets").to(device)
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    valid = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & valid
    return -nll.sum(-1).double().cpu(), valid.sum(-1).cpu(), correct.sum(-1).cpu()


@torch.no_grad()
def old_score_examples(model, examples, tokenizer, batch_size, length_normalize, device):
    """The previous engine's answer and candidate jobs (its `_make_jobs` + `_score`), one process."""
    records = {e.id: {"id": e.id} for e in examples}
    by_len = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    for s in range(0, len(by_len), batch_size):
        chunk = by_len[s:s + batch_size]
        lp, ntok, ncorr = _old_score(model, [examples[i].prompt_ids for i in chunk],
                                     [examples[i].answer_ids for i in chunk], tokenizer.pad_token_id, device)
        for r, i in enumerate(chunk):
            records[examples[i].id].update(nll=-lp[r].item(), n_tokens=int(ntok[r]), n_correct=int(ncorr[r]))
    pairs = [(i, k) for i in by_len if examples[i].candidates for k in range(len(examples[i].candidates))]
    pairs.sort(key=lambda p: -(len(examples[p[0]].cand_prompt_ids) + len(examples[p[0]].candidates[p[1]])))
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        lp, ntok, _ = _old_score(model, [examples[i].cand_prompt_ids for i, _ in chunk],
                                 [examples[i].candidates[k] for i, k in chunk], tokenizer.pad_token_id, device)
        for r, (i, k) in enumerate(chunk):
            score = lp[r].item() / max(1, int(ntok[r])) if length_normalize else lp[r].item()
            records[examples[i].id].setdefault("scores", {})[k] = score
    out = []
    for e in examples:
        rec = records[e.id]
        if "scores" in rec:
            rec["scores"] = [rec["scores"][k] for k in range(len(e.candidates))]
        out.append(rec)
    return out


# ---- model and rows ------------------------------------------------------------------------------------------


def build_model(args, device):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from fittune.model import load_tokenizer
    from fittune.model_shapes import builtin_config
    from fittune.tiny import build_tokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval(), load_tokenizer(args.model)
    shape = SHAPES[args.shape]
    config = builtin_config(shape) if isinstance(shape, str) else Qwen2Config(**shape, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    return model, build_tokenizer(512)


def six_class_rows(n: int) -> list[Example]:
    """From the demo questions: 6 topics as classes, each prompt padded with two related answers (60+ tokens)."""
    rows = [json.loads(x) for x in Path(resolve_data_path("builtin:ai-research-qa")).read_text().splitlines()]
    topics = sorted({r["topic"] for r in rows})[:6]
    rows = [r for r in rows if r["topic"] in topics]
    # round-robin over the topics, so any prefix holds every class
    rows = sorted(rows, key=lambda r: (sum(x["topic"] == r["topic"] for x in rows[:rows.index(r)]), r["topic"]))
    out = []
    for i, r in enumerate(rows[:n]):
        notes = " ".join(rows[(i + j * 37) % len(rows)]["answer"] for j in (1, 2))
        text = f"Question: {r['question']}\nNotes: {notes}.\nWhich research topic does the question belong to?"
        out.append(Example(str(i), [{"role": "system", "content": "Answer with the topic only."},
                                      {"role": "user", "content": text}], r["topic"], topics,
                             topics.index(r["topic"]), r["topic"]))
    return out


def load_rows(args, tokenizer) -> list[TokExample]:
    cfg = DataConfig(max_length=args.max_length)
    if args.set == "synthetic":  # random ids: the shape of a long-prompt, 6-choice set without a tokenizer
        g = torch.Generator().manual_seed(0)
        ids = lambda n: torch.randint(10, 500, (n,), generator=g).tolist()  # noqa: E731
        out = []
        for i in range(args.rows):
            p, cands = ids(args.prompt_len), [ids(3 + k % 3) for k in range(6)]
            out.append(TokExample(str(i), p, cands[i % 6], cands, i % 6, choices=[f"c{k}" for k in range(6)],
                                    cand_prompt_ids=p))
        return out
    if args.set == "six":
        examples = six_class_rows(args.rows)
    elif args.set == "mc":
        cfg = DataConfig(choices_column="choices", max_length=args.max_length, system_prompt="You are a helpful assistant.")
        examples = map_columns(read_rows(cfg.path, cfg), cfg, "demo")[:args.rows]
    else:  # a JSONL file of {"text", "label"} rows, read by path
        cfg = DataConfig(path=args.set, question_column="text", answer_column=None, label_column="label",
                         max_length=args.max_length)
        examples = map_columns(read_rows(cfg.path, cfg), cfg, args.set)[:args.rows]
    tokenized, _ = tokenize_examples(examples, tokenizer, cfg)
    return tokenized


# ---- measuring -------------------------------------------------------------------------------------------------


def measure(fn, device) -> tuple[list[dict], float, float]:
    """(records, seconds, peak MiB of the pass above what was allocated before it; CUDA only, else 0)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    records = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else 0.0
    return records, seconds, peak


def cpu_peak_mib(fn) -> float:
    """Peak of the tensor memory a CPU pass allocates (torch profiler: each op's own allocations and the
    frees, in time order), in MiB; run apart from the timed pass (the profiler slows it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def compare(examples, old, new, class_task: bool) -> dict:
    po, pn = build_predictions(examples, old, class_task), build_predictions(examples, new, class_task)
    mo, mn = compute_metrics(po), compute_metrics(pn)
    diffs = [abs(a - b) for o, n in zip(old, new) for a, b in zip(o.get("scores", []), n.get("scores", []))]
    return {"same_predictions": [p.get("pred") for p in po] == [p.get("pred") for p in pn],
            "max_abs_score_diff": max(diffs, default=0.0),
            "max_abs_nll_diff": max(abs(o["nll"] - n["nll"]) for o, n in zip(old, new)),
            **{f"{m}_old": mo.get(m) for m in ("accuracy", "f1_macro", "loss")},
            **{f"{m}_new": mn.get(m) for m in ("accuracy", "f1_macro", "loss")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="six", help="six | mc | synthetic | a JSONL file with text/label")
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--model", help="a saved model directory instead of a random --shape")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_batch_tokens", type=int, default=None)
    ap.add_argument("--max_length", type=int, default=1024)
    ap.add_argument("--prompt_len", type=int, default=1019, help="--set synthetic: prompt tokens per row")
    ap.add_argument("--skip_old", action="store_true", help="only fittune's method (e.g. the old one does not fit)")
    args = ap.parse_args()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    model, tokenizer = build_model(args, device)
    examples = load_rows(args, tokenizer)
    class_task = args.set != "mc"
    prompt_lens = [len(e.cand_prompt_ids or e.prompt_ids) for e in examples]
    new_fn = lambda: score_examples(model, accelerator, Strategy(), examples, tokenizer, args.batch_size, 0,  # noqa: E731
                                    False, max_batch_tokens=args.max_batch_tokens)
    old_fn = lambda: old_score_examples(model, examples, tokenizer, args.batch_size, False, device)  # noqa: E731
    warm = examples[:2]
    score_examples(model, accelerator, Strategy(), warm, tokenizer, 2, 0, False)
    old_score_examples(model, warm, tokenizer, 2, False, device)
    new, t_new, m_new = measure(new_fn, device)
    if device.type == "cpu":
        m_new = cpu_peak_mib(new_fn)
    row = {"set": args.set, "rows": len(examples), "choices": len(examples[0].candidates or []),
           "prompt_tokens_min": min(prompt_lens), "prompt_tokens_mean": round(sum(prompt_lens) / len(examples), 1),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "model": args.model or args.shape, "batch_size": args.batch_size,
           "new_rows_per_s": round(len(examples) / t_new, 2), "new_peak_mib": round(m_new, 1)}
    if not args.skip_old:
        old, t_old, m_old = measure(old_fn, device)
        if device.type == "cpu":
            m_old = cpu_peak_mib(old_fn)
        row.update(old_rows_per_s=round(len(examples) / t_old, 2), old_peak_mib=round(m_old, 1),
                   speedup=round(t_old / t_new, 2), **compare(examples, old, new, class_task))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
