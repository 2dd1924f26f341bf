"""Data pipeline: reading, column mapping, chat prompts, answer-only labels, truncation, split, batch plan."""

import json
from collections import Counter

import pytest

from fittune.batches import (
    IGNORE_INDEX,
    micro_batches_for_rank,
    padding_fraction,
    plan_global_batches,
    render_prompt,
    tokenize_examples,
)
from fittune.columns import map_columns
from fittune.config import DataConfig
from fittune.errors import FittuneError
from fittune.sources import read_rows
from fittune.splits import load_splits, split_heldout


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from fittune.builtin_models import build_tiny_model_dir
    from fittune.config import TinyModelConfig

    d = build_tiny_model_dir(tmp_path_factory.mktemp("tok") / "m", TinyModelConfig(vocab_size=512), 0)
    return AutoTokenizer.from_pretrained(d)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_builtin_demo_set_shape():
    rows = read_rows("builtin:ai-research-qa", DataConfig())
    assert len(rows) >= 300
    for r in rows:
        assert r["answer"] in r["choices"] and len(r["choices"]) == 4 and r["topic"] and r["question"]
    assert len({r["id"] for r in rows}) == len(rows)


def test_chat_template_and_answer_only_labels(tokenizer):
    cfg = DataConfig(system_prompt="Be brief.")
    ex = map_columns([{"question": "What is dropout?", "answer": "randomly zeroing units"}], cfg, "mem")
    assert ex[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is dropout?"}]
    prompt = render_prompt(tokenizer, ex[0].messages)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is dropout?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    (tok,), stats = tokenize_examples(ex, tokenizer, cfg)
    assert stats.truncated == stats.dropped == 0
    assert tok.question == "What is dropout?"  # what predictions.jsonl shows beside the answer
    labels = tok.labels
    n_prompt = len(tok.prompt_ids)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # no loss on the prompt
    assert labels[n_prompt:] == tok.answer_ids
    assert tokenizer.decode(tok.answer_ids) == "randomly zeroing units<|im_end|>"
    assert tok.n_targets == len(tok.answer_ids)
    # train_on_prompt puts every token but the first under the loss
    (tok2,), _ = tokenize_examples(ex, tokenizer, DataConfig(system_prompt="Be brief.", train_on_prompt=True))
    assert tok2.labels == tok2.input_ids and tok2.n_targets == len(tok2) - 1


def test_chatml_fallback_without_template(tokenizer):
    class NoTemplate:
        chat_template = None

    msgs = [{"role": "user", "content": "hi"}]
    assert render_prompt(NoTemplate(), msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tokenizer, msgs) == render_prompt(NoTemplate(), msgs)  # same ChatML as the template


def test_messages_column(tokenizer):
    cfg = DataConfig(messages_column="messages", answer_column=None)
    rows = [{"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c?"}, {"role": "assistant", "content": "d"}]}]
    (ex,) = map_columns(rows, cfg, "mem")
    assert ex.answer == "d" and len(ex.messages) == 3
    with pytest.raises(FittuneError, match="row 1: the last message must be the assistant"):
        map_columns([{"messages": [{"role": "user", "content": "a"}]}], cfg, "mem")


def test_truncation_keeps_answer_and_counts(tokenizer):
    cfg = DataConfig(max_length=24)
    long_q = "word " * 60
    rows = [{"question": long_q, "answer": "short"}, {"question": "q?", "answer": "x " * 80}, {"question": "q", "answer": "a"}]
    toks, stats = tokenize_examples(map_columns(rows, cfg, "mem"), tokenizer, cfg)
    assert stats.truncated == 1 and stats.dropped == 1 and stats.dropped_ids == ["1"]
    assert len(toks) == 2 and all(len(t) <= 24 for t in toks)
    assert tokenizer.decode(toks[0].answer_ids) == "short<|im_end|>"
    assert tokenizer.decode(toks[0].prompt_ids).endswith("<|im_start|>assistant\n")  # cut from the left


def test_split_deterministic_and_stratified():
    cfg = DataConfig(label_column="topic", choices_column="choices")
    examples = map_columns(read_rows("builtin:ai-research-qa", cfg), cfg, "demo")
    tr1, te1 = split_heldout(examples, 0.1, seed=3)
    tr2, te2 = split_heldout(examples, 0.1, seed=3)
    _, te3 = split_heldout(examples, 0.1, seed=4)
    assert [e.id for e in te1] == [e.id for e in te2] and [e.id for e in te1] != [e.id for e in te3]
    assert len(te1) == 40 and not {e.id for e in tr1} & {e.id for e in te1}
    per_topic = Counter(e.label for e in te1)
    assert set(per_topic.values()) == {5}  # 8 topics x 50 rows: exactly 5 of each held out


def test_csv_without_header_and_letter_answers(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text('What is 2+2?,3,4,5,6,B\n"Pick, the first",x,y,z,w,A\n')
    cfg = DataConfig(path=str(path), csv_header=False, column_names=["question", "A", "B", "C", "D", "answer"],
                     choices_column=["A", "B", "C", "D"], answer_format="letter")
    ex = map_columns(read_rows(str(path), cfg), cfg, str(path))
    assert ex[0].choices == ["3", "4", "5", "6"] and ex[0].gold == 1 and ex[0].answer == "4"
    assert ex[1].messages[-1]["content"] == "Pick, the first"
    bad = tmp_path / "bad.csv"
    bad.write_text("q,1,2,3,4,E\n")
    with pytest.raises(FittuneError, match="row 1: answer 'E' is not a choice letter"):
        map_columns(read_rows(str(bad), cfg), cfg, str(bad))
    bad.write_text("q,1,2,3,4,3\n")  # MMLU-Redux's answers are indexes
    with pytest.raises(FittuneError, match="answer '3' is not a choice letter .* set data.answer_format index"):
        map_columns(read_rows(str(bad), cfg), cfg, str(bad))


def test_class_label_task():
    cfg = DataConfig(question_column="text", answer_column=None, label_column="label")
    rows = [{"text": "t1", "label": "Uses"}, {"text": "t2", "label": "Background"}, {"text": "t3", "label": "Uses"}]
    ex = map_columns(rows, cfg, "mem")
    assert ex[0].choices == ["Background", "Uses"] and ex[0].gold == 1 and ex[0].answer == "Uses"


@pytest.mark.parametrize("content, message", [
    ('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n', r"bad.jsonl:2: malformed JSON"),
    # a raw tab inside a string: said once "at column" (was "Invalid control character at at column 16")
    ('{"question": "a\tb", "answer": "c"}\n', r"bad.jsonl:1: malformed JSON \(Invalid control character at column 16\)"),
    ("", "holds no rows"),
    ('{"question": "a", "response": "b"}\n', r"column 'answer' \(data.answer_column\) not found; the columns are: question, response"),
    ('{"question": "a", "answer": ""}\n', "row 1: empty answer"),
    ('{"question": "a", "answer": "b", "choices": ["x", "y"]}\n', "row 1: answer 'b' is not among the choices"),
])
def test_bad_input_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    cfg = DataConfig(path=str(path), choices_column="choices" if "choices" in content else None)
    with pytest.raises(FittuneError, match=message):
        load_splits(cfg, 0)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FittuneError, match="data file not found"):
        read_rows(str(tmp_path / "nope.jsonl"), DataConfig())
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(FittuneError, match="cannot tell the format"):
        read_rows(str(tmp_path / "x.txt"), DataConfig())


def test_parquet_and_disk_sources(tmp_path):
    import datasets
    import pandas as pd

    rows = [{"question": f"q{i}", "answer": f"a{i}", "choices": [f"a{i}", "z"]} for i in range(5)]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(choices_column="choices")
    for src in (str(tmp_path / "d.parquet"), str(tmp_path / "ds")):
        ex = map_columns(read_rows(src, cfg), cfg, src)
        assert [e.answer for e in ex] == [r["answer"] for r in rows] and ex[3].choices == ["a3", "z"]


def test_global_batches_do_not_depend_on_the_split():
    lengths = [5 + (i * 7) % 23 for i in range(50)]
    plan = plan_global_batches(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert len(plan) == 6 and all(len(b) == 8 for b in plan)
    assert len({i for b in plan for i in b}) == 48
    assert plan != plan_global_batches(lengths, 8, seed=1, epoch=1, group_by_length=True)
    for micro, accum, world in [(8, 1, 1), (4, 2, 1), (1, 8, 1), (2, 2, 2), (4, 1, 2)]:
        got = sorted(j for r in range(world) for m in micro_batches_for_rank(plan[0], lengths, micro, accum, world, r)
                     for j in m)
        assert got == sorted(plan[0])  # every split covers exactly the same global batch
    # length grouping wastes less padding than random batches
    grouped = [[lengths[j] for j in m] for b in plan for m in micro_batches_for_rank(b, lengths, 2, 4, 1, 0)]
    rand = plan_global_batches(lengths, 8, seed=1, epoch=0, group_by_length=False)
    random_ = [[lengths[j] for j in m] for b in rand for m in micro_batches_for_rank(b, lengths, 2, 4, 1, 0)]
    assert padding_fraction(grouped) <= padding_fraction(random_)


def test_held_out_rows_that_do_not_fit_are_said_apart_from_training_rows():
    """Was one count for both ("dropped 39 rows"): held-out rows left out bias the metrics, so they are said
    with the share of the split the metrics cover."""
    from fittune.recipe import DataFit

    notes = DataFit(["3", "8"], ["5"], 0, 17).notes()
    # a row id, said as one (was "(e.g. 3)", which read as a length)
    assert notes[0] == "dropped from training, their answer does not fit data.max_length: 2 rows (e.g. row id 3)"
    assert notes[1].startswith("NOTE: 1 of the 17 held-out rows do not fit data.max_length (e.g. row id 5)")
    assert DataFit(["3"], [], 1, 17).notes() == [
        "dropped from training, their answer does not fit data.max_length: 1 row (e.g. row id 3)",
        "1 row had the start of its prompt cut to fit data.max_length (raise it to keep it whole)"]
    assert "which cover the other 16" in notes[1] and len(notes) == 2
    assert DataFit([], [], 0, 17).notes() == []
