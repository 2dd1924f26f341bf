"""The scoring engine: every rank scores its share of the examples, results are gathered and merged by id.

Guarantees (tested with 1, 2 and 3 processes and several batch sizes):
  * no duplicated or missing examples: work is split by whole batches, ranks that run out of work repeat a
    dummy job whose results are thrown away, and the merged ids are checked against the evaluated set;
  * no hang under ZeRO-3 / FSDP2: every rank makes the same number of forward (or generate) calls, agreed
    through one all-reduce before scoring, and generation runs with synced GPUs there;
  * the same numbers for any process count: per-example sums are gathered and reduced on the main process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object

from fittune.data import IGNORE_INDEX, TokExample, collate_aligned
from fittune.placement import input_device
from fittune.strategy import Strategy


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
def score_examples(model, accelerator, strategy: Strategy, examples: list[TokExample], tokenizer, batch_size: int,
                   max_new_tokens: int, length_normalize: bool, loss_only: bool = False) -> list[dict]:
    """Score every example on every rank's share; returns the merged per-example records (on all ranks).

    `loss_only` skips choice scoring and generation (the quick periodic validation loss).
    """
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if strategy.device_map:  # inputs go where the embeddings are
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
    # generate() stops early on rows that finished; with weights gathered by collectives every rank must
    # keep stepping until all are done
    synced = strategy.gathers_weights and strategy.distributed
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
