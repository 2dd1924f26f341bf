"""The scoring engine in this process: every candidate's log-probability from the shared-prompt packed pass
equals scoring `prompt + candidate` alone with plain transformers (no fittune code), for multiple choice and
classification, cut prompts, LoRA, sdpa / eager attention and the one-candidate-per-row fallback, any batch
size or token budget; the gold candidate's pass gives the answer loss; no prompt x vocabulary logits."""

from __future__ import annotations

import pytest
import torch

from fittune.batches import TokExample, tokenize_examples
from fittune.columns import map_columns
from fittune.config import DataConfig
from fittune.scoring import collate_packed, make_units, plan_batches, score_examples
from fittune.sources import read_rows
from fittune.strategy import Strategy

TOL = 2e-4  # fp32: summed log-probabilities of a few tokens, packed pass vs separate passes


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from fittune.model import load_tokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def tokenized(tokenizer, classes: bool, max_length: int, n: int = 12, start: int = 0) -> list[TokExample]:
    cfg = DataConfig(choices_column=None if classes else "choices", label_column="topic" if classes else None,
                     answer_column=None if classes else "answer", max_length=max_length,
                     system_prompt="You are a helpful assistant.")
    rows = read_rows(cfg.path, cfg)
    examples = map_columns(rows, cfg, "demo")[start::17][:n]
    out, _ = tokenize_examples(examples, tokenizer, cfg)
    return out


def reference(model, e: TokExample) -> dict:
    """Each `prompt + continuation` as its own sequence from position 0 (right-padded in one batch: causal
    attention never looks at the pads after a sequence): the answer's NLL / correct tokens, each candidate's
    log-prob."""
    seqs = [(e.prompt_ids, e.answer_ids)] + [(e.cand_prompt_ids, c) for c in e.candidates or []]
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (p, c) in enumerate(seqs):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
    with torch.no_grad():
        lp = model(input_ids=ids).logits.float().log_softmax(-1)
    sums, hits = [], []
    for r, (p, c) in enumerate(seqs):
        rows = lp[r, len(p) - 1:len(p) - 1 + len(c)]
        sums.append(rows.gather(1, torch.tensor(c)[:, None]).sum().item())
        hits.append(int((rows.argmax(-1) == torch.tensor(c)).sum()))
    out = {"nll": -sums[0], "n_correct": hits[0], "n_tokens": len(e.answer_ids)}
    if e.candidates:
        out["scores"] = sums[1:]
    return out


def check(records: list[dict], refs: list[dict], examples: list[TokExample], length_normalize: bool = False):
    for rec, ref, e in zip(records, refs, examples):
        assert rec["nll"] == pytest.approx(ref["nll"], abs=TOL) and rec["n_tokens"] == ref["n_tokens"]
        assert rec["n_correct"] == ref["n_correct"]
        want = ref.get("scores")
        if want and length_normalize:
            want = [s / len(c) for s, c in zip(want, e.candidates)]
        assert rec.get("scores") == (None if want is None else pytest.approx(want, abs=TOL))
        if want:  # the same choice wins
            assert max(range(len(want)), key=lambda k: (want[k], -k)) == max(
                range(len(want)), key=lambda k: (rec["scores"][k], -k))


@pytest.mark.parametrize("classes", [False, True], ids=["multiple-choice", "classification"])
def test_packed_scores_equal_separate_passes(tiny, accelerator, classes):
    model, tok = tiny
    # max_length 48 cuts prompts from the left, some further for the longest candidate; 512 cuts none
    examples = tokenized(tok, classes, max_length=48, n=8) + tokenized(tok, classes, max_length=512, n=6, start=5)
    assert any(e.cand_prompt_ids != e.prompt_ids for e in examples) and any(
        e.cand_prompt_ids == e.prompt_ids for e in examples)
    refs = [reference(model, e) for e in examples]
    for batch_size, budget in ((1, None), (8, 200)):
        records = score_examples(model, accelerator, Strategy(), examples, tok, batch_size, 0, False,
                                 max_batch_tokens=budget)
        check(records, refs, examples)
    check(score_examples(model, accelerator, Strategy(), examples, tok, 4, 0, True), refs, examples, True)


def test_many_candidates_go_into_several_rows_with_the_same_scores(tiny, accelerator, monkeypatch):
    """A row packs at most PACKED_CANDIDATE_TOKENS candidate tokens (its mask grows with their square: 968
    classes asked for 54 GB); the candidates beyond go into further rows after the same prompt."""
    model, tok = tiny
    examples = tokenized(tok, classes=True, max_length=512, n=4)
    monkeypatch.setattr("fittune.scoring.PACKED_CANDIDATE_TOKENS", 7)
    units = make_units(examples, loss_only=False, packed=True)
    assert len(units) > 2 * len(examples) and all(u.cont_len <= 7 or len(u.segments) == 1 for u in units)
    assert sorted(k for u in units if u.example == 0 for k in u.choices) == list(range(8))
    check(score_examples(model, accelerator, Strategy(), examples, tok, 3, 0, False),
          [reference(model, e) for e in examples], examples)


def test_lora_eager_and_unpacked_fallback(tiny, accelerator, monkeypatch, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, tok = tiny
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    examples = tokenized(tok, classes=True, max_length=64, n=6)
    refs = [reference(model, e) for e in examples]
    check(score_examples(model, accelerator, Strategy(), examples, tok, 3, 0, False), refs, examples)
    # an attention kernel without 4-D masks: one candidate per row, the same numbers
    monkeypatch.setattr("fittune.scoring.mask_kind", lambda m: "2d")
    check(score_examples(model, accelerator, Strategy(), examples, tok, 3, 0, False), refs, examples)


def test_one_pass_per_row_and_head_only_after_the_prompt(tiny, accelerator, monkeypatch):
    """A 6-candidate row costs one row of one forward pass (the gold candidate is the answer); the head sees
    only the columns after the prompt."""
    model, tok = tiny
    examples = [e for e in tokenized(tok, classes=True, max_length=512) if e.cand_prompt_ids == e.prompt_ids][:6]
    units = make_units(examples, loss_only=False, packed=True)
    assert len(units) == len(examples) and all(len(u.segments) == 8 for u in units)
    calls = []
    real_forward = type(model).forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        out = real_forward(self, *args, **kwargs)
        calls.append(out.logits.shape)
        return out

    monkeypatch.setattr(type(model), "forward", spy)
    score_examples(model, accelerator, Strategy(), examples, tok, 8, 0, False)
    (rows, width), (_, kept, vocab) = calls
    longest_prompt = max(len(e.prompt_ids) for e in examples)
    assert rows == len(examples) and kept == width - longest_prompt
    assert kept <= max(sum(len(c) for c in e.candidates) for e in examples) < longest_prompt


def test_token_budget_batches():
    e = [TokExample(str(i), [1] * (10 + i), [2, 3], candidates=[[2, 3], [4]], gold=0, cand_prompt_ids=[1] * (10 + i))
         for i in range(6)]
    units = make_units(e, loss_only=False, packed=True)
    plan = plan_batches(units, batch_size=4, max_batch_tokens=40)
    assert [len(b) for b in plan] == [2, 2, 2]  # 18-19 tokens a row: two rows fit 40
    assert sorted(u.example for b in plan for u in b) == list(range(6))
    assert [len(b) for b in plan_batches(units, batch_size=4, max_batch_tokens=None)] == [4, 2]
    assert [len(b) for b in plan_batches(units, batch_size=4, max_batch_tokens=5)] == [1] * 6  # too long: alone
    batch = collate_packed(plan[0], pad_id=0, mask="bool")
    assert batch.inputs["attention_mask"].shape == (2, 1, 18, 18) and batch.n_slots == 4


def test_a_row_listing_the_answer_twice_counts_the_chosen_text(tiny, accelerator):
    """Choices `none, all, none, some` with the answer C: the two `none` tie (the same text after the same
    prompt), and the first of a tie was the prediction, so a model that chose `none` was counted wrong. The
    copies are one answer: the letters stay as the data gives them, and choosing that text is correct."""
    from fittune.metrics import build_predictions

    model, tok = tiny
    cfg = DataConfig(choices_column=["A", "B", "C", "D"], answer_format="letter", max_length=96)
    rows = [{"question": "Which regularizer?", "A": "none", "B": "all", "C": "none", "D": "some", "answer": "C"}]
    examples, _ = tokenize_examples(map_columns(rows, cfg, "mem"), tok, cfg)
    (rec,) = score_examples(model, accelerator, Strategy(), examples, tok, 1, 0, False)
    scores = rec["scores"]
    assert scores[0] == pytest.approx(scores[2], abs=TOL)  # the tie: the same continuation after the same prompt
    (row,) = build_predictions(examples, [{**rec, "scores": [1.0, 0.0, 1.0, 0.0]}], class_task=False)
    assert (row["gold"], row["pred"], row["correct"], row["labels"]) == ("C", "C", True, ["A", "B", "C", "D"])
    (row,) = build_predictions(examples, [{**rec, "scores": [0.0, 1.0, 0.0, 0.0]}], class_task=False)
    assert (row["pred"], row["correct"]) == ("B", False)  # another text is still wrong
