"""From examples to batches: the chat prompt, tokenization with answer-only labels, and the length-grouped
global batch plan every rank computes alike (no communication), its micro-batches and the step count.

Rows are small Python dicts: fine-tuning sets are thousands to a few hundred thousand rows, and keeping them
as plain lists lets every rank compute the same batch plan (and the global target-token count used to
normalise the loss) without any communication."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from fittune.columns import Example
from fittune.config import DataConfig
from fittune.errors import FittuneError

IGNORE_INDEX = -100


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat prompt up to the start of the assistant's answer.

    Uses the tokenizer's chat template (Qwen's ChatML for Qwen). Fallback for tokenizers without one:
    ChatML written out (`<|im_start|>role\\ncontent<|im_end|>\\n` per turn, then `<|im_start|>assistant\\n`).
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def end_of_turn(tokenizer) -> str:
    """Text that closes the assistant's answer: ChatML's <|im_end|>, or the tokenizer's EOS."""
    if getattr(tokenizer, "chat_template", None) and "<|im_end|>" not in tokenizer.chat_template:
        return tokenizer.eos_token or ""
    return "<|im_end|>"


@dataclass
class TokExample:
    """A tokenized example: prompt ids, answer ids (with the end-of-turn token) and candidate ids."""

    id: str
    prompt_ids: list[int]
    answer_ids: list[int]
    candidates: list[list[int]] | None = None
    gold: int | None = None
    label: str | None = None
    choices: list[str] | None = None
    answer: str = ""
    train_on_prompt: bool = False
    cand_prompt_ids: list[int] | None = None  # the prompt cut further, if needed, to fit the longest choice
    question: str = ""  # the last user turn as written, so predictions.jsonl can be read without the data file

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids

    @property
    def labels(self) -> list[int]:
        prompt_labels = self.prompt_ids if self.train_on_prompt else [IGNORE_INDEX] * len(self.prompt_ids)
        return prompt_labels + self.answer_ids

    @property
    def n_targets(self) -> int:
        # the first token is never a target (nothing predicts it)
        return len(self.answer_ids) + (len(self.prompt_ids) - 1 if self.train_on_prompt else 0)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


@dataclass
class TokenizeStats:
    """What tokenizing a split did to its rows."""

    rows: int = 0
    """Rows kept."""
    truncated: int = 0
    """Rows kept with the start of their prompt cut to fit data.max_length."""
    dropped: int = 0
    """Rows left out: their answer (or longest choice) does not fit."""
    dropped_ids: list[str] = field(default_factory=list)
    """The ids of the dropped rows."""


def _last_user_turn(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


class Tokenized(NamedTuple):
    """Tokenized rows and what fitting them into max_length did (unpacks as `examples, stats`)."""

    examples: list[TokExample]
    stats: TokenizeStats


def tokenize_examples(examples: list[Example], tokenizer, cfg: DataConfig) -> Tokenized:
    """Tokenize prompts and answers; cut prompts from the left to fit `max_length`, drop rows that cannot fit.

    A row counts as truncated when its prompt had to be cut to fit the answer; scoring a longer choice may
    cut the prompt further (`cand_prompt_ids`) without touching what the model trains on.
    """
    end = end_of_turn(tokenizer)
    prompts = tokenizer([render_prompt(tokenizer, e.messages) for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.answer + end for e in examples], add_special_tokens=False)["input_ids"]
    out, stats = [], TokenizeStats(rows=len(examples))
    for e, p, a in zip(examples, prompts, answers):
        cands = None
        if e.choices is not None:
            cands = tokenizer([c + end for c in e.choices], add_special_tokens=False)["input_ids"]
        budget = cfg.max_length - len(a)
        cand_budget = cfg.max_length - max([len(c) for c in cands or []] + [len(a)])
        if cand_budget < 1:
            stats.dropped += 1
            stats.dropped_ids.append(e.id)
            continue
        if len(p) > budget:
            stats.truncated += 1
        # keep the end of the prompt, next to the answer
        out.append(TokExample(e.id, p[-budget:], a, cands, e.gold, e.label, e.choices, e.answer,
                              cfg.train_on_prompt, p[-cand_budget:], _last_user_turn(e.messages)))
    return Tokenized(out, stats)


def plan_global_batches(lengths: list[int], global_size: int, seed: int, epoch: int,
                        group_by_length: bool) -> list[list[int]]:
    """Split one epoch into global batches (one optimizer step each) of `global_size` example indices.

    The plan depends only on the global batch size, never on how it is split into micro-batches, processes
    or accumulation steps; that is what makes 4x1, 2x2 and 1x4 (and 1 vs 2 processes) the same update.
    Length grouping sorts within windows of 32 global batches, then shuffles the batch order.
    The incomplete last global batch is dropped (a different one each epoch, as the order changes).
    """
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    n_batches = len(perm) // global_size
    if group_by_length:
        window = global_size * 32
        grouped = []
        for i in range(0, len(perm), window):
            grouped += sorted(perm[i:i + window], key=lambda j: -lengths[j])
        batches = [grouped[b * global_size:(b + 1) * global_size] for b in range(n_batches)]
        order = torch.randperm(n_batches, generator=g).tolist()
        return [batches[i] for i in order]
    return [perm[b * global_size:(b + 1) * global_size] for b in range(n_batches)]


def micro_batches_for_rank(global_batch: list[int], lengths: list[int], micro: int, accum: int,
                           world: int, rank: int) -> list[list[int]]:
    """The `accum` micro-batches this rank runs for one global batch.

    Sorted by length so each micro-batch holds similar lengths; micro-batch m goes to rank m % world at
    accumulation step m // world, so the ranks get similar work at every step.
    """
    ordered = sorted(global_batch, key=lambda j: (-lengths[j], j))
    return [ordered[(a * world + rank) * micro:(a * world + rank + 1) * micro] for a in range(accum)]


def collate_train(items: list[TokExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels for a training micro-batch."""
    width = max(len(x) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x)
        ids[i, :n] = torch.tensor(x.input_ids)
        labels[i, :n] = torch.tensor(x.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_fraction(batch_lengths: list[list[int]]) -> float:
    """Share of padded slots over micro-batches given as lists of example lengths."""
    slots = sum(max(b) * len(b) for b in batch_lengths if b)
    real = sum(sum(b) for b in batch_lengths)
    return 0.0 if slots == 0 else 1.0 - real / slots


class StepCount(NamedTuple):
    total: int
    """Optimizer steps of the whole run."""
    per_epoch: int
    """Optimizer steps in one pass over the training split."""


def count_steps(n_examples: int, global_size: int, max_steps: int, epochs: float, dropped: int = 0,
                max_length: int = 0) -> StepCount:
    """The optimizer steps of the run and of one epoch; `dropped` rows of the split did not fit `max_length`."""
    per_epoch = n_examples // global_size
    if per_epoch < 1:
        if dropped and n_examples + dropped >= global_size:  # the rows exist: the length limit dropped them
            raise FittuneError(f"only {n_examples} training examples fit data.max_length {max_length} ({dropped} "
                               f"rows were dropped: their answer or longest choice does not fit), fewer than one "
                               f"global batch ({global_size}); raise data.max_length")
        raise FittuneError(f"the training split has {n_examples} examples, fewer than one global batch "
                           f"({global_size} = micro_batch_size x grad_accum x processes); lower them or add data")
    total = max_steps if max_steps > 0 else max(1, math.ceil(per_epoch * epochs))
    return StepCount(total, per_epoch)
