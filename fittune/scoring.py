"""The scoring engine: every rank scores its share of the examples, results are gathered and merged by id.

How a row is scored (one forward pass per row, whatever its number of choices):
  * the row is one packed sequence: its prompt (cut from the left exactly as `data.tokenize_examples` cut it),
    then every candidate answer one after the other; a 4-D attention mask lets each candidate see the prompt
    and its own earlier tokens only, and each candidate's positions continue from the prompt's end, so every
    candidate gets the log-probability it would get as `prompt + candidate` alone (equal within fp rounding);
  * the output head runs only at the columns after the prompt (`logits_to_keep`), and the fp32 log-softmax
    one row at a time: no prompt-length x vocabulary logits ever exist;
  * the gold candidate's pass also gives the answer's NLL and token accuracy (no separate answer pass), unless
    the answer was cut to another prompt length than the candidates (then the answer is a row of its own);
  * attention kernels that take no 4-D mask (flash attention) score each candidate as its own row.

Guarantees (tested with 1, 2 and 3 processes, several batch sizes, ZeRO-3 and FSDP2):
  * no duplicated or missing examples: every rank plans the same global batches from the same examples and
    takes every world-th one; the merged ids are checked against the evaluated set;
  * no hang under ZeRO-3 / FSDP2: every rank makes the same number of forward (or generate) calls (ranks with
    fewer batches repeat a one-row dummy whose result is dropped), and generation runs with synced ranks there;
  * the same numbers for any process count and batch size: per-example sums, merged on every rank.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from fittune.batches import TokExample
from fittune.placement import batch_device
from fittune.strategy import Strategy

MASKED_KERNELS = ("sdpa", "eager")  # attention implementations that take a custom 4-D mask
# candidate tokens packed after one prompt: a row's attention mask is (prompt + these)^2 and its logits these x
# vocabulary, so hundreds of classes (968 took a 54 GB mask) go into several rows of this many tokens at most
PACKED_CANDIDATE_TOKENS = 2048


@dataclass
class Unit:
    """One sequence to score: a prompt and the continuations scored against it."""

    example: int
    """Index of the example in the evaluated list."""
    prompt: list[int]
    segments: list[list[int]]
    """Continuations, each scored as if it alone followed the prompt."""
    choices: list[int | None]
    """Per segment: the candidate index it scores, or None (the answer only)."""
    answer_seg: int | None
    """The segment whose NLL and token accuracy are the answer's (None: this unit gives no answer loss)."""

    @property
    def cont_len(self) -> int:
        return sum(len(s) for s in self.segments)

    def __len__(self) -> int:
        return len(self.prompt) + self.cont_len


def make_units(examples: list[TokExample], loss_only: bool, packed: bool) -> list[Unit]:
    """The sequences that score every example: one per row when the answer is one of its candidates (the
    gold candidate's scores are the answer's), plus an answer row when the answer was cut differently."""
    units = []
    for i, e in enumerate(examples):
        if loss_only or not e.candidates:
            units.append(Unit(i, e.prompt_ids, [e.answer_ids], [None], 0))
            continue
        # the gold candidate is the answer when both see the same (left-cut) prompt and the same tokens
        shared = e.cand_prompt_ids == e.prompt_ids and e.candidates[e.gold] == e.answer_ids
        if not shared:
            units.append(Unit(i, e.prompt_ids, [e.answer_ids], [None], 0))
        ks = list(range(len(e.candidates)))
        for group in (_groups(e.candidates, PACKED_CANDIDATE_TOKENS) if packed else [[k] for k in ks]):
            answer = group.index(e.gold) if shared and e.gold in group else None
            units.append(Unit(i, e.cand_prompt_ids, [e.candidates[k] for k in group], list(group), answer))
    return units


def _groups(candidates: list[list[int]], budget: int) -> list[list[int]]:
    """Candidate indexes in consecutive groups of at most `budget` tokens (a longer candidate alone)."""
    groups, cur, size = [], [], 0
    for k, c in enumerate(candidates):
        if cur and size + len(c) > budget:
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += len(c)
    return groups + [cur]


def plan_batches(units: list[Unit], batch_size: int, max_batch_tokens: int | None) -> list[list[Unit]]:
    """Longest first, at most `batch_size` rows and (when set) `max_batch_tokens` padded tokens a batch
    (a row longer than the budget goes alone). The same plan on every rank."""
    order = sorted(units, key=lambda u: (-len(u), u.example, u.choices[0] if u.choices[0] is not None else -1))
    batches: list[list[Unit]] = []
    cur: list[Unit] = []
    width = (0, 0)  # (longest prompt, longest continuation block) of `cur`
    for u in order:
        grown = (max(width[0], len(u.prompt)), max(width[1], u.cont_len))
        over = max_batch_tokens is not None and (len(cur) + 1) * sum(grown) > max_batch_tokens
        if cur and (len(cur) >= batch_size or over):
            batches.append(cur)
            cur, grown = [], (len(u.prompt), u.cont_len)
        cur.append(u)
        width = grown
    return batches + ([cur] if cur else [])


@dataclass
class PackedBatch:
    """Model inputs for a batch of units, and where each scored token's log-probability is read."""

    inputs: dict[str, torch.Tensor]
    row: torch.Tensor
    """Per scored token: its batch row (ascending: collate_packed lays the rows out one after the other)."""
    col: torch.Tensor
    """Per scored token: the kept logits column that predicts it."""
    target: torch.Tensor
    """Per scored token: its id."""
    slot: torch.Tensor
    """Per scored token: its (unit, segment) output slot, numbered unit by unit."""
    n_slots: int


def collate_packed(units: list[Unit], pad_id: int, mask: str) -> PackedBatch:
    """Left-padded prompts ending at column P, then each unit's segments one after the other.

    `mask`: `bool` (a 4-D mask for sdpa), `float` (additive, for eager attention) or `2d` (padding only:
    every unit must have one segment)."""
    P = max(len(u.prompt) for u in units)
    width = P + max(u.cont_len for u in units)
    B = len(units)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    seg = torch.full((B, width), -1, dtype=torch.long)  # -1 padding, 0 prompt, s + 1 segment s
    pos = torch.zeros((B, width), dtype=torch.long)
    row, col, target, slot = [], [], [], []
    n_slots = 0
    for b, u in enumerate(units):
        n = len(u.prompt)
        ids[b, P - n:P] = torch.tensor(u.prompt)
        seg[b, P - n:P] = 0
        pos[b, P - n:P] = torch.arange(n)  # positions count real tokens: a left-padded row sees its own
        start = P
        for s, c in enumerate(u.segments):
            ids[b, start:start + len(c)] = torch.tensor(c)
            seg[b, start:start + len(c)] = s + 1
            pos[b, start:start + len(c)] = torch.arange(n, n + len(c))  # each candidate follows the prompt
            # token 0 is predicted by the prompt's last column (P - 1), token j by the segment's column j - 1;
            # kept columns start at P - 1
            col += [0] + list(range(start - P + 1, start - P + len(c)))
            row += [b] * len(c)
            target += c
            slot += [n_slots] * len(c)
            n_slots += 1
            start += len(c)
    inputs = {"input_ids": ids, "attention_mask": _attention_mask(seg, mask), "position_ids": pos,
              "logits_to_keep": torch.arange(P - 1, width - 1)}
    return PackedBatch(inputs, torch.tensor(row), torch.tensor(col), torch.tensor(target), torch.tensor(slot), n_slots)


def _attention_mask(seg: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "2d":
        return (seg >= 0).long()
    q, k = seg[:, :, None], seg[:, None, :]
    idx = torch.arange(seg.size(1))
    causal = idx[None, :] <= idx[:, None]
    # a key is seen if it is real, not in the future, and in the prompt or the query's own segment; every
    # query sees itself, so padding rows never become all-masked (NaN) rows
    visible = (causal & (k >= 0) & ((k == 0) | (k == q))) | torch.eye(seg.size(1), dtype=torch.bool)
    visible = visible[:, None]
    if kind == "bool":
        return visible
    return torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)


@dataclass
class SlotScores:
    """Per (unit, segment) slot: summed log-probability, token count, argmax-correct tokens."""

    logprob: list[float]
    n_tokens: list[int]
    n_correct: list[int]


def score_batch(model, batch: PackedBatch, device) -> SlotScores:
    """One forward pass; the fp32 log-softmax one row at a time (at most kept columns x vocabulary)."""
    logits = model(**{k: v.to(device) for k, v in batch.inputs.items()}).logits
    dev = logits.device  # the head's device (a device map may put it elsewhere than the inputs)
    col, target = batch.col.to(dev), batch.target.to(dev)
    lp = torch.empty(target.numel(), dtype=torch.float32, device=dev)
    correct = torch.empty(target.numel(), dtype=torch.bool, device=dev)
    # collate_packed lays the kept tokens out row after row: each row's span is counted on the CPU, so the loop
    # waits on no GPU result
    start = 0
    for b, n in enumerate(torch.bincount(batch.row, minlength=logits.size(0)).tolist()):
        span = slice(start, start + n)
        rows = logits[b, col[span]]
        lp[span] = rows.float().log_softmax(-1).gather(1, target[span, None]).squeeze(1)
        correct[span] = rows.argmax(-1) == target[span]
        start += n
    slot = batch.slot.to(dev)
    sums = torch.zeros(batch.n_slots, dtype=torch.float64, device=dev).index_add_(0, slot, lp.double())
    counts = torch.zeros(batch.n_slots, dtype=torch.long, device=dev).index_add_(0, slot, torch.ones_like(slot))
    hits = torch.zeros(batch.n_slots, dtype=torch.long, device=dev).index_add_(0, slot, correct.long())
    return SlotScores(sums.tolist(), counts.tolist(), hits.tolist())


def _generate(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, device, synced: bool) -> list[str]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # left padding: generation continues every row from its last token
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    eos = [t for t in {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
           if isinstance(t, int) and t != tokenizer.unk_token_id]
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                         use_cache=True, synced_gpus=synced)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def mask_kind(model) -> str:
    """How to tell the model which tokens a candidate may see (see `collate_packed`)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if impl not in MASKED_KERNELS:
        return "2d"
    return "bool" if impl == "sdpa" else "float"


class Share(NamedTuple):
    """This rank's part of a list of batches."""

    mine: list
    """Every world-th batch, from this rank's index."""
    calls: int
    """How many calls every rank makes (a rank out of batches repeats a dummy one, in step with the others)."""


def _my_share(batches: list, world: int, rank: int) -> Share:
    return Share(batches[rank::world], math.ceil(len(batches) / world))


def _generation_batches(examples: list[TokExample], batch_size: int) -> list[list[int]]:
    """Open rows (no candidates), longest prompt first, `batch_size` a batch; the same on every rank."""
    open_rows = sorted((i for i, e in enumerate(examples) if not e.candidates),
                       key=lambda i: (-len(examples[i].prompt_ids), examples[i].id))
    return [open_rows[s:s + batch_size] for s in range(0, len(open_rows), batch_size)]


def _record_units(records: dict[str, dict], examples: list[TokExample], units: list[Unit], scores: SlotScores,
                  length_normalize: bool) -> None:
    slot = 0
    for u in units:
        ex_id = examples[u.example].id
        rec = records.setdefault(ex_id, {"id": ex_id})
        for s, k in enumerate(u.choices):
            lp, n_tok, n_corr = scores.logprob[slot], scores.n_tokens[slot], scores.n_correct[slot]
            slot += 1
            if s == u.answer_seg:
                rec.update(nll=-lp, n_tokens=n_tok, n_correct=n_corr)
            if k is not None:
                rec.setdefault("scores", {})[k] = lp / max(1, n_tok) if length_normalize else lp


def _merge(examples: list[TokExample], records: dict[str, dict], with_scores: bool) -> list[dict]:
    """Every rank's records, merged by id (an example's rows may have been scored on several ranks)."""
    merged: dict[str, dict] = {}
    for part in gather_object([list(records.values())]):
        for rec in part:
            into = merged.setdefault(rec["id"], {"id": rec["id"]})
            into.update({k: v for k, v in rec.items() if k != "scores"})
            if "scores" in rec:
                into.setdefault("scores", {}).update(rec["scores"])
    out = []
    for e in examples:
        rec = merged.get(e.id, {})
        complete = "nll" in rec and (not (with_scores and e.candidates) or len(rec.get("scores", {})) == len(e.candidates))
        if not complete or len(merged) != len(examples):
            raise RuntimeError(f"evaluation gathered {len(merged)} examples for a set of {len(examples)} "
                               f"(example {e.id} incomplete)")
        if "scores" in rec:
            rec["scores"] = [rec["scores"][k] for k in range(len(e.candidates))]
        out.append(rec)
    return out


# no_grad, not inference_mode: FSDP2 keeps the gathered parameters it makes here, and inference tensors
# cannot be updated in place by the next training step
@torch.no_grad()
def score_examples(model, accelerator, strategy: Strategy, examples: list[TokExample], tokenizer, batch_size: int,
                   max_new_tokens: int, length_normalize: bool, loss_only: bool = False,
                   max_batch_tokens: int | None = None) -> list[dict]:
    """Score every example (each rank its share); returns the merged per-example records on every rank:
    `nll`, `n_tokens`, `n_correct` (the answer), `scores` (per candidate), `generated` (open rows).

    `batch_size`: rows a forward pass; `max_batch_tokens`: also at most this many padded tokens a pass (None:
    no token budget); `loss_only` skips choice scoring and generation (the periodic validation loss)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    unwrapped = accelerator.unwrap_model(model)
    device = batch_device(model, accelerator, strategy)
    kind = mask_kind(unwrapped)
    batches = plan_batches(make_units(examples, loss_only, kind != "2d"), batch_size, max_batch_tokens)
    mine, n_calls = _my_share(batches, world, rank)
    gen = [] if loss_only or max_new_tokens <= 0 else _generation_batches(examples, batch_size)
    my_gen, n_gen = _my_share(gen, world, rank)
    # generate() stops early on rows that finished; with weights gathered by collectives every rank must
    # keep stepping until all are done
    synced = strategy.forwards_in_lockstep
    # a bar only on a terminal: in a log file its redraws pile up into one line (fittune/progress.py)
    quiet = loss_only or not accelerator.is_main_process or not sys.stderr.isatty()
    bar = tqdm(total=n_calls + n_gen, unit="pass", leave=False, disable=quiet,
               desc=f"evaluating {len(examples)} rows on {world} process(es)")
    was_training = model.training
    model.eval()
    records: dict[str, dict] = {}
    try:
        for b in range(n_calls):  # the same count on every rank: a rank out of work scores a dummy row
            units = mine[b] if b < len(mine) else batches[-1][:1]
            with accelerator.autocast():
                scores = score_batch(model, collate_packed(units, tokenizer.pad_token_id, kind), device)
            if b < len(mine):
                _record_units(records, examples, units, scores, length_normalize)
            bar.update(1)
        for b in range(n_gen):
            rows = my_gen[b] if b < len(my_gen) else gen[-1][:1]
            with accelerator.autocast():
                texts = _generate(unwrapped, [examples[i].prompt_ids for i in rows], tokenizer, max_new_tokens,
                                  device, synced)
            for i, text in zip(rows, texts) if b < len(my_gen) else ():
                records.setdefault(examples[i].id, {"id": examples[i].id})["generated"] = text.strip()
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return _merge(examples, records, not loss_only)
