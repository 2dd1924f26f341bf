"""Bad inputs are one clear error; the task type is explicit; own data gets neutral defaults; data identity."""

import hashlib
import json
import typing
from collections import Counter

import pytest
import yaml
from conftest import ROOT
from pydantic import BaseModel

from fittune.batches import count_steps
from fittune.cli import DEMO_RECIPE, parse_args
from fittune.columns import describe_task, is_class_task, map_columns, similar_classes_note, untrained_classes_note
from fittune.config import DATA_MAPPING_KEYS, DEMO_DATA, Config, DataConfig, build_config, help_text
from fittune.errors import FittuneError
from fittune.sources import absolute_path, read_rows, same_file, source_digest
from fittune.splits import examples_digest, groups_note, leaked_rows_note, load_splits, other_splits_note, split_heldout


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps writes NaN for float("nan")
    return str(path)


CLASS = {"question_column": "text", "answer_column": None, "label_column": "label"}


# ---------------------------------------------------------------------------------------------------------
# Missing values and missing columns: one error naming the row, the column and the config key


@pytest.mark.parametrize("rows, cfg, message", [
    # a NaN / null label used to become a class of its own ('nan', 'None')
    ([{"text": "a", "label": "x"}, {"text": "b", "label": float("nan")}], CLASS,
     r"row 2: empty label in column 'label' \(data.label_column\): the cell is NaN; fill it in or remove the row"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": None}], CLASS,
     r"row 2: empty label in column 'label' \(data.label_column\): the cell is null"),
    # a label that is only stratifying a multiple-choice set must be there too
    ([{"text": "a", "answer": "p", "choices": ["p", "q"], "label": "x"},
      {"text": "a", "answer": "p", "choices": ["p", "q"], "label": None}],
     {"question_column": "text", "choices_column": "choices", "label_column": "label"},
     r"row 2: empty label in column 'label' \(data.label_column\)"),
    ([{"question": "a", "answer": "b"}, {"question": "a", "answer": float("nan")}], {},
     r"row 2: empty answer in column 'answer' \(data.answer_column\)"),
    ([{"question": None, "answer": "b"}], {}, r"row 1: empty question in column 'question' \(data.question_column\)"),
    ([{"question": 3, "answer": "b"}], {}, r"row 1: the question in column 'question' .* is a int \(3\), not text; fix the row"),
    # a row without a configured column used to be a KeyError traceback
    ([{"question": "a", "answer": "b"}, {"question": "c"}], {},
     r"row 2 has no column 'answer' \(data.answer_column\); this row's columns are: question"),
    ([{"text": "a", "label": "x"}, {"text": "b"}], CLASS, r"row 2 has no column 'label' \(data.label_column\)"),
    ([{"i": "1", "question": "a", "answer": "b"}, {"i": None, "question": "c", "answer": "d"}], {"id_column": "i"},
     r"row 2: empty id in column 'i' \(data.id_column\)"),
    ([{"question": "a", "answer": "p", "choices": ["p", "q"]}, {"question": "a", "answer": "p", "choices": ["p", None]}],
     {"choices_column": "choices"}, r"row 2: choice 2 in column 'choices' \(data.choices_column\) is null"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
      {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]}],
     {"messages_column": "messages", "answer_column": None}, r"row 2: message 2 \(assistant\) has no content \(null\)"),
])
def test_missing_values_and_columns(tmp_path, rows, cfg, message):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(FittuneError, match=message) as err:
        load_splits(DataConfig(path=path, **cfg), 0)
    assert path in str(err.value)  # names the file too


def test_csv_missing_label_names_the_label_column(tmp_path):
    """Was 'empty answer in column 'None'' (the answer comes from the label when answer_column is null)."""
    path = tmp_path / "d.csv"
    path.write_text("text,label\nq1,A\nq2,\nq3,B\n")
    with pytest.raises(FittuneError, match=r"d.csv row 2: empty label in column 'label' \(data.label_column\): "
                                           r"the cell is blank"):
        load_splits(DataConfig(path=str(path), **CLASS), 0)
    # a blank choice cell of an MMLU-style CSV is a row error too, not an empty candidate
    mc = tmp_path / "mc.csv"
    mc.write_text("q,x,,A\n")
    cfg = DataConfig(path=str(mc), csv_header=False, column_names=["question", "A", "B", "answer"],
                     choices_column=["A", "B"], answer_format="letter")
    with pytest.raises(FittuneError, match=r"row 1: empty choice in column 'B' \(data.choices_column\)"):
        load_splits(cfg, 0)


def test_parquet_gaps_are_missing_values(tmp_path):
    import pandas as pd

    pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", None, "y"]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(FittuneError, match=r"row 2: empty label in column 'label'"):
        load_splits(DataConfig(path=str(tmp_path / "d.parquet"), **CLASS), 0)


def test_valid_labels_still_make_the_classes(tmp_path):
    rows = [{"text": f"t{i}", "label": lb} for i, lb in enumerate([1, 2, 1, 2, 1, 2])]  # numbers are labels too
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), **CLASS)
    train, test = load_splits(cfg, 0)
    assert {tuple(e.choices) for e in train + test} == {("1", "2")}


def test_one_class_and_list_labels_are_refused_and_data_classes_names_the_candidates(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "Background"} for i in range(6)])
    with pytest.raises(FittuneError, match=r"the label column 'label' \(data.label_column\) has one class, "
                                           r"'Background': with one candidate every prediction is right"):
        load_splits(DataConfig(path=one, **CLASS), 0)
    train, test = load_splits(DataConfig(path=one, classes=["Uses", "Background"], **CLASS), 0)
    assert all(e.choices == ["Uses", "Background"] and e.gold == 1 for e in train + test)  # the given order
    with pytest.raises(FittuneError, match=r"row 1: label 'Background' is not one of the classes \['Uses', 'Extends'\]"
                                           r" \(data.classes.*add the class to data.classes"):
        load_splits(DataConfig(path=one, classes=["Uses", "Extends"], **CLASS), 0)
    # csabstruct's shape: a list of labels (one per sentence) is not one class; was 57 classes like "['background', ..."
    lists = write_jsonl(tmp_path / "lists.jsonl", [{"text": "a. b.", "label": ["background", "method"]},
                                                   {"text": "c.", "label": ["result"]}])
    with pytest.raises(FittuneError, match=r"lists.jsonl row 1: the label in column 'label' \(data.label_column\) is "
                                           r"a list \(\['background', 'method'\]\), not one class: .*one row per item"):
        load_splits(DataConfig(path=lists, **CLASS), 0)
    assert DataConfig(classes=[3, 1], **CLASS).classes == ["3", "1"]  # YAML numbers are the labels' text
    with pytest.raises(ValueError, match="data.classes names a class twice"):
        DataConfig(classes=["a", "a"], **CLASS)
    with pytest.raises(ValueError, match="data.classes are the candidates of a classification task"):
        DataConfig(classes=["a", "b"], choices_column="choices", label_column="label")  # multiple choice
    sentences = write_jsonl(tmp_path / "s.jsonl", [{"question": ["a.", "b."], "answer": "x"}] * 3)
    with pytest.raises(FittuneError, match=r"is a list \(\['a.', 'b.'\]\), not text; write one row per item"):
        load_splits(DataConfig(path=sentences), 0)


def test_choices_in_prompt_lists_them_and_scores_the_letters(tmp_path):
    rows = [{"q": "2 + 2?", "choices": "['3', '4', '5']", "answer": 1}, {"q": "1 + 1?", "choices": "['2', '3']",
                                                                          "answer": 0}]
    cfg = DataConfig(path=write_jsonl(tmp_path / "m.jsonl", rows), question_column="q", choices_column="choices",
                     answer_format="index", choices_in_prompt=True, system_prompt="Answer with the letter.")
    first, second = map_columns(read_rows(cfg.path, cfg), cfg, cfg.path)
    assert first.messages == [{"role": "system", "content": "Answer with the letter."},
                              {"role": "user", "content": "2 + 2?\n\nA. 3\nB. 4\nC. 5"}]
    assert (first.choices, first.gold, first.answer) == (["A", "B", "C"], 1, "B")
    assert (second.choices, second.gold, second.answer) == (["A", "B"], 0, "A")
    with pytest.raises(ValueError, match="data.choices_in_prompt lists a row's choices: set data.choices_column"):
        DataConfig(choices_in_prompt=True)
    many = write_jsonl(tmp_path / "many.jsonl", [{"question": "?", "choices": [str(i) for i in range(27)], "answer": "0"}])
    with pytest.raises(FittuneError, match="27 choices, more than letters A-Z for data.choices_in_prompt"):
        load_splits(DataConfig(path=many, choices_column="choices", choices_in_prompt=True), 0)


def test_a_class_with_one_row_trains_and_the_rest_stay_stratified(tmp_path):
    """Was: one Future row among 40 + 40 turned stratification off: 7 Background and 1 Uses held out."""
    rows = [{"text": f"t{i}", "label": lb} for i, lb in enumerate(["Background"] * 40 + ["Uses"] * 40 + ["Future"])]
    train, test = load_splits(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), **CLASS), 0)
    held = [e.label for e in test]
    assert len(test) == 8 and held.count("Background") == held.count("Uses") == 4
    classes = train[0].choices
    assert "Future" in {e.label for e in train} and untrained_classes_note(classes, train, test) is None
    # a class only held out (4 rows), and one named in data.classes that no row has: both said, with counts
    note = untrained_classes_note(classes + ["Motivation"], [e for e in train if e.label != "Uses"], test)
    assert note == ("classes with no training row: 'Uses' (4 held-out rows), 'Motivation' (no row): they are "
                    "candidates the model was never trained to choose")
    assert similar_classes_note(classes) is None  # and classes written two ways are said (was: silently two)
    assert similar_classes_note(["no", "no ", "yes", "No", "maybe"]) == (
        "NOTE: classes that differ only in case or spaces: 'no' / 'no ' / 'No': they are scored as different "
        "classes; if each is one class, write it one way in the data (or name the classes in data.classes)")
    # too few rows a class to stratify (more classes than held-out rows): one-row classes still train
    rows = [{"text": f"p{i}", "label": f"pair{i // 2}"} for i in range(20)] + [
        {"text": f"s{i}", "label": f"solo{i}"} for i in range(5)]
    for seed in range(8):
        train, test = load_splits(DataConfig(path=write_jsonl(tmp_path / "p.jsonl", rows), **CLASS), seed)
        assert len(test) == 2 and not any(e.label.startswith("solo") for e in test)


def test_a_data_path_is_the_same_file_relative_absolute_or_linked(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "d.jsonl")
    monkeypatch.chdir(tmp_path)
    assert same_file("d.jsonl", str(tmp_path / "d.jsonl")) and same_file("link.jsonl", "d.jsonl")
    assert absolute_path("d.jsonl") == str(tmp_path / "d.jsonl")
    assert absolute_path("allenai/sciq") == "allenai/sciq" and absolute_path("builtin:ai-research-qa") == \
        "builtin:ai-research-qa"
    assert not same_file("d.jsonl", "missing.jsonl") and same_file(None, None)


def test_too_few_rows_after_the_length_limit_names_the_limit():
    with pytest.raises(FittuneError, match=r"only 8 training examples fit data.max_length 40 \(129 rows were dropped"
                                           r": their answer or longest choice does not fit\), fewer than one global batch \(16\); "
                                           r"raise data.max_length"):
        count_steps(8, 16, 0, 1.0, dropped=129, max_length=40)
    with pytest.raises(FittuneError, match="the training split has 8 examples, fewer than one global batch"):
        count_steps(8, 16, 0, 1.0, dropped=2, max_length=40)


# ---------------------------------------------------------------------------------------------------------
# Encodings


@pytest.mark.parametrize("name, content, line, byte", [
    ("d.jsonl", b'{"question": "a", "answer": "b"}\n{"question": "\xff", "answer": "c"}\n', 2, 47),
    ("d.json", b'[{"question": "a", "answer": "b"},\n {"question": "c\xe9", "answer": "c"}]', 2, 51),
    ("d.csv", b"question,answer\na,b\nc\xe9,d\n", 3, 21),
])
def test_invalid_utf8_names_file_line_and_byte(tmp_path, name, content, line, byte):
    path = tmp_path / name
    path.write_bytes(content)
    assert content.index(b"\xff" if b"\xff" in content else b"\xe9") == byte  # the offset we expect is right
    with pytest.raises(FittuneError, match=rf"{name}:{line}: not valid UTF-8 \(byte {byte} of the file.*save the "
                                           rf"file as UTF-8"):
        read_rows(str(path), DataConfig())


def test_bom_and_unicode_line_separator_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    # a byte-order mark (Excel, Notepad) and U+2028 inside a string (not a line end for JSON Lines)
    path.write_bytes(b"\xef\xbb\xbf" + '{"question": "a\u2028b", "answer": "c"}\r\n'.encode())
    (row,) = read_rows(str(path), DataConfig())
    assert row == {"question": "a\u2028b", "answer": "c"}


# ---------------------------------------------------------------------------------------------------------
# Task type


@pytest.mark.parametrize("cfg, kind, words", [
    ({"choices_column": "choices", "label_column": "topic"}, "multiple_choice",
     ["data.choices_column 'choices' is set", "data.label_column 'topic' only stratifies"]),
    ({"label_column": "topic", "answer_column": None}, "classification",
     ["data.label_column 'topic' is set and there are no choices: the classes are the candidates"]),
    ({"label_column": "topic"}, "classification", ["data.answer_column 'answer' must equal the label in every row"]),
    ({"label_column": "topic", "answer_column": "topic"}, "classification", ["the classes are the candidates"]),
    ({"messages_column": "m", "answer_column": None}, "chat", ["data.messages_column 'm' is set"]),
    ({}, "open_generation", ["data.answer_column 'answer' is set, with no choices or label column"]),
])
def test_describe_task(cfg, kind, words):
    task = describe_task(DataConfig(**cfg))
    assert task.kind == kind and all(w in task.reason for w in words), task
    assert is_class_task(DataConfig(**cfg)) == (kind == "classification")
    assert str(task).startswith(f"task: {kind.replace('_', ' ')}: ")


def test_answer_and_label_both_set_is_classification(tmp_path):
    """Was scored as open generation (exact match) without a word; now classification, or one error."""
    rows = [{"question": f"q{i}", "answer": lb, "topic": lb} for i, lb in enumerate("ABAB")]
    cfg = DataConfig(label_column="topic")
    ex = map_columns(rows, cfg, "mem")
    assert [e.choices for e in ex] == [["A", "B"]] * 4 and [e.gold for e in ex] == [0, 1, 0, 1]
    rows[2]["answer"] = "something else"
    with pytest.raises(FittuneError, match=r"mem row 3: the answer in column 'answer' \(data.answer_column\) is "
                                           r"'something else' but the label in column 'topic' .* is 'A'.*drop "
                                           r"data.answer_column \(--data.answer_column null\), or drop "
                                           r"data.label_column"):
        map_columns(rows, cfg, "mem")


# ---------------------------------------------------------------------------------------------------------
# Neutral defaults for the user's own data; where a setting came from


def test_own_data_without_config_starts_from_neutral_data_defaults(tmp_path, capsys):
    """Was: the demo recipe's choices/label mapping applied, "column 'choices' (data.choices_column) not found"."""
    path = tmp_path / "my.csv"
    path.write_text("prompt,response\n" + "".join(f"q{i},a{i}\n" for i in range(10)))
    cfg = parse_args(["--data.path", str(path), "--data.question_column", "prompt",
                      "--data.answer_column", "response"], prog="train.py")
    train, test = load_splits(cfg.data, cfg.seed)  # passes the column stage
    out = capsys.readouterr().out
    assert "the column mapping starts from the defaults" in out and str(DEMO_RECIPE) in out
    mapping = {k: getattr(cfg.data, k) for k in DATA_MAPPING_KEYS}
    assert mapping == {**{k: getattr(DataConfig(), k) for k in DATA_MAPPING_KEYS}, "question_column": "prompt",
                       "answer_column": "response"}
    assert cfg.train.epochs == 20 and cfg.data.max_length == 128  # the rest of the demo recipe still applies
    assert len(train) == 9 and test[0].answer == f"a{test[0].id}"
    assert describe_task(cfg.data).kind == "open_generation"



def test_own_data_with_a_recipe_for_the_builtin_set_drops_only_its_column_mapping(tmp_path, capsys, monkeypatch):
    """Was: the README's own-data example (`--config configs/qwen2.5-3b-lora.yaml --data.path my_qa.jsonl`)
    failed on "column 'topic'" then "column 'choices'": the recipe maps the built-in set's columns."""
    data = write_jsonl(tmp_path / "my_qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)])
    cfg = parse_args(["--config", str(ROOT / "configs/qwen2.5-3b-lora.yaml"), "--data.path", data,
                      "--data.label_column", "answer"], prog="train.py")
    assert "which it does not all have: the column mapping starts from the defaults" in capsys.readouterr().out
    assert cfg.data.choices_column is None and cfg.data.label_column == "answer"  # the user's own key stays
    assert cfg.data.max_length == 1024 and cfg.lora.r == 16  # the recipe's other settings apply
    train, test = load_splits(cfg.data, cfg.seed)
    assert len(train) + len(test) == 10
    # a file in the built-in set's own format keeps the mapping (found by a walkthrough: an MMLU file in that
    # format was scored as open answers, without its choices)
    write_jsonl(tmp_path / "same_format.jsonl", [json.loads(x) for x in DEMO_DATA.read_text().splitlines()[:30]])
    monkeypatch.setenv("HOME", str(tmp_path))  # `--data.path=~/...`: no shell expands it, fittune does
    cfg = parse_args(["--config", str(ROOT / "configs/qwen2.5-3b-lora.yaml"), "--data.path=~/same_format.jsonl"],
                     prog="train.py")
    assert "that column mapping is kept" in capsys.readouterr().out
    assert (cfg.data.choices_column, cfg.data.label_column) == ("choices", "topic")
    own = tmp_path / "own.yaml"
    own.write_text(f"data:\n  path: {data}\n  label_column: answer\n")
    cfg = parse_args(["--config", str(own), "--data.path", data], prog="train.py")
    assert cfg.data.label_column == "answer"  # a recipe for the user's own data keeps its mapping


def test_resume_without_config_continues_with_the_runs_own_recipe(tmp_path, capsys):
    """Was: `train.py --output_dir RUN --resume auto` read the demo recipe and refused the run as "a different
    run setup". The run's saved config.yaml is the recipe; what a command grants itself is not taken from it."""
    from fittune.config import to_yaml
    from fittune.rundir import claim_dir

    run = claim_dir(tmp_path / "run", "train")
    saved = build_config(None, {"output_dir": str(run), "train.lr": 0.123, "model.trust_remote_code": True,
                                "trust_checkpoint": True, "overwrite": True})
    # as an older run saved it (the command's own keys in it; to_yaml leaves them out now)
    tree = yaml.safe_load(to_yaml(saved, {"world_size": 1})) | {"trust_checkpoint": True, "overwrite": True}
    tree["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    cfg = parse_args(["--output_dir", str(run), "--resume", "auto", "--train.max_steps", "7"], prog="train.py")
    assert "continuing with the run's own recipe" in capsys.readouterr().out
    assert cfg.train.lr == 0.123 and cfg.train.max_steps == 7 and cfg.resume == "auto"
    assert not cfg.model.trust_remote_code and not cfg.trust_checkpoint and not cfg.overwrite
    # no run there (a typo in a requeue script): refused, not the demo recipe trained there (was: 440 steps)
    with pytest.raises(FittuneError, match=r"--resume without --config continues the run in .*new, and there is "
                                           r"none there .*pass --config RECIPE to start a run there"):
        parse_args(["--output_dir", str(tmp_path / "new"), "--resume", "auto"], prog="train.py")
    assert not (tmp_path / "new").exists()
    fresh = parse_args(["--resume", "auto"], prog="train.py")  # the demo's own run, in its own output_dir
    assert fresh.train.lr != 0.123 and "offline demo recipe" in capsys.readouterr().out

def test_demo_recipe_is_said_and_keeps_its_mapping(capsys):
    cfg = parse_args([], prog="train.py")
    assert f"running the offline demo recipe {DEMO_RECIPE}" in capsys.readouterr().out
    assert cfg.data.choices_column == "choices" and cfg.data.label_column == "topic"
    assert describe_task(cfg.data).kind == "multiple_choice"
    assert f"({'set in ' + str(DEMO_RECIPE)})" in describe_task(cfg.data).reason


def test_column_error_says_where_the_key_came_from(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  choices_column: choices\n  label_column: topic\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b", "topic": "t"}])
    cfg = build_config(str(recipe), {"data.path": data, "data.label_column": "topic"})
    assert cfg.data.origin("choices_column") == f"set in {recipe}" and cfg.data.origin("label_column") == ""
    with pytest.raises(FittuneError, match=rf"column 'choices' \(data.choices_column, set in {recipe}\) not found; "
                                           r"the columns are: question, answer, topic; set "
                                           r"--data.choices_column to one of the columns, or null"):
        load_splits(cfg.data, 0)
    assert build_config(str(recipe), {}) == build_config(None, {"data.choices_column": "choices",
                                                                "data.label_column": "topic"})


# ---------------------------------------------------------------------------------------------------------
# Config bounds: every numeric field


# (key, a value out of bounds, the message, a value on the edge that is allowed)
BOUNDS = [
    ("seed", -1, r"seed must be in \[0, 4294967295\]", 0),
    ("seed", 2**32, r"seed must be in \[0, 4294967295\]", 2**32 - 1),
    ("model.tiny.hidden_size", 0, "model.tiny.hidden_size must be >= 1", 8),
    ("model.tiny.intermediate_size", 0, "model.tiny.intermediate_size must be >= 1", 1),
    ("model.tiny.num_layers", 0, "model.tiny.num_layers must be >= 1", 1),
    ("model.tiny.num_heads", 0, "model.tiny.num_heads must be >= 1", 2),
    ("model.tiny.num_kv_heads", -2, "model.tiny.num_kv_heads must be >= 1", 1),
    ("model.tiny.vocab_size", 0, "model.tiny.vocab_size must be >= 1", 1),
    ("lora.r", 0, "lora.r must be >= 1 .*lora.enabled: false", 1),
    ("lora.alpha", 0, "lora.alpha must be > 0", 1),
    ("lora.dropout", 1.0, r"lora.dropout must be in \[0, 1\)", 0.0),
    ("lora.dropout", -0.1, r"lora.dropout must be in \[0, 1\)", 0.99),
    ("data.max_length", 7, "data.max_length must be >= 8", 8),
    ("data.test_size", 0.0, r"data.test_size must be in \(0, 1\)", 0.01),
    ("data.test_size", 1.0, r"data.test_size must be in \(0, 1\)", 0.99),
    ("train.micro_batch_size", 0, "train.micro_batch_size must be >= 1", 1),
    ("train.grad_accum", 0, "train.grad_accum must be >= 1", 1),
    ("train.max_steps", -1, "train.max_steps must be >= 0.*0 runs train.epochs", 0),
    ("train.epochs", -1.0, "train.epochs must be >= 0", 0.5),
    ("train.lr", 0.0, "train.lr must be > 0", 1e-9),
    ("train.lr", "inf", r"train.lr must be a finite number \(got inf\)", 10.0),
    ("train.weight_decay", -0.01, "train.weight_decay must be >= 0", 0.0),
    ("train.betas", [0.9, 1.0], r"train.betas must be in \[0, 1\) \(got 1.0\)", [0.0, 0.999]),
    ("train.betas", [-0.1, 0.9], r"train.betas must be in \[0, 1\) \(got -0.1\)", [0.5, 0.5]),
    ("train.warmup_ratio", 1.0, r"train.warmup_ratio must be in \[0, 1\)", 0.0),
    ("train.max_grad_norm", -1.0, "train.max_grad_norm must be >= 0.*0 turns clipping off", 0.0),
    ("train.max_grad_norm", "nan", "train.max_grad_norm must be a finite number", 0.5),
    ("train.loss_chunk_size", -1, "train.loss_chunk_size must be >= 0", 0),
    ("train.log_every", 0, "train.log_every must be >= 1", 1),
    ("train.eval_every", -1, r"train.eval_every must be >= 0 \(got -1\); 0 turns the periodic validation off", 0),
    ("train.val_examples", -3, r"train.val_examples must be >= 1 \(got -3\)", 1),
    ("train.save_steps", -1, "train.save_steps must be >= 0", 0),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints must be >= 1", 1),
    ("train.max_bad_steps", 0, "train.max_bad_steps must be >= 1", 1),
    ("train.cpu_threads", -1, "train.cpu_threads must be >= 0", 0),
    ("eval.batch_size", 0, "eval.batch_size must be >= 1", 1),
    ("eval.max_new_tokens", -5, r"eval.max_new_tokens must be >= 0 \(got -5\); 0 turns generation off", 0),
    ("eval.max_batch_tokens", 0, r"eval.max_batch_tokens must be >= 1 \(got 0\)", 1),
]


@pytest.mark.parametrize("key, bad, message, edge", BOUNDS, ids=[f"{b[0]}={b[1]}" for b in BOUNDS])
def test_numeric_bounds(key, bad, message, edge):
    used = {"lora.enabled": True} if key.startswith("lora.") else {}  # a LoRA flag without LoRA is refused
    with pytest.raises(FittuneError, match=f"^invalid config: {message}"):
        build_config(None, {key: bad, **used})
    cfg = build_config(None, {key: edge, **used})  # the edge of the range is allowed
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == (tuple(edge) if isinstance(edge, list) else edge)


def _optional_number(ann) -> bool:
    """`int | None` (possibly with its Bound annotation)."""
    args = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in typing.get_args(ann)]
    return type(None) in args and bool({int, float} & set(args))


def _numeric_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _numeric_keys(ann, f"{prefix}{name}.")
        elif ann in (int, float) or typing.get_origin(ann) is tuple or _optional_number(ann):
            keys.append(prefix + name)
    return keys


def test_every_numeric_field_is_bounded_and_tested():
    numeric = _numeric_keys()
    assert set(numeric) == {b[0] for b in BOUNDS}, "a numeric config field without a bounds case"
    for key in numeric:  # independent of the table: a far-off value is refused for every field
        value = [-1e9, 0.5] if key == "train.betas" else -10**9
        with pytest.raises(FittuneError, match=f"invalid config: {key} must be"):
            build_config(None, {key: value})
    assert "--train.eval_every (default: 0, >= 0)" in help_text()


@pytest.mark.parametrize("shape, message", [
    ({"hidden_size": 130}, r"model.tiny.hidden_size \(130\) must be a multiple of model.tiny.num_heads \(4\)"),
    ({"hidden_size": 20}, "the head size model.tiny.hidden_size / num_heads = 5 must be even"),
    ({"num_kv_heads": 3}, r"model.tiny.num_heads \(4\) must be a multiple of model.tiny.num_kv_heads \(3\)"),
])
def test_tiny_model_shape(shape, message):
    with pytest.raises(FittuneError, match=message):
        build_config(None, {f"model.tiny.{k}": v for k, v in shape.items()})


# ---------------------------------------------------------------------------------------------------------
# Data identity


def test_examples_digest(tmp_path):
    cfg = DataConfig(label_column="topic", choices_column="choices")
    rows = read_rows("builtin:ai-research-qa", cfg)
    train, test = split_heldout(map_columns(rows, cfg, "demo"), 0.1, seed=0)
    again_train, again_test = split_heldout(map_columns([dict(r) for r in rows], cfg, "demo"), 0.1, seed=0)
    assert examples_digest(test) == examples_digest(again_test)
    assert examples_digest(train) == examples_digest(again_train) != examples_digest(test)
    # one changed answer in one held-out row changes the held-out digest only
    k = int(test[3].id)  # no id column: the id is the row number
    changed = [dict(r) for r in rows]
    other = next(c for c in changed[k]["choices"] if c != changed[k]["answer"])
    changed[k]["answer"] = other
    tr2, te2 = split_heldout(map_columns(changed, cfg, "demo"), 0.1, seed=0)
    assert [e.id for e in te2] == [e.id for e in test]
    assert examples_digest(te2) != examples_digest(test) and examples_digest(tr2) == examples_digest(train)
    # documented: the order counts
    assert examples_digest(test[::-1]) != examples_digest(test)
    # an independent computation of the documented canonical form
    h = hashlib.sha256()
    for e in test:  # keys written in sorted order by hand, nested ones too
        messages = [{"content": m["content"], "role": m["role"]} for m in e.messages]
        h.update(json.dumps({"answer": e.answer, "choices": e.choices, "gold": e.gold, "id": e.id, "label": e.label,
                             "messages": messages}, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
    assert examples_digest(test) == h.hexdigest()


def test_source_digest(tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    write_jsonl(a, [{"question": "q", "answer": "x"}])
    write_jsonl(b, [{"question": "q2", "answer": "y"}])
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)}
    assert source_digest(DataConfig(path=str(a))) == sha[a]  # what sha256sum prints
    both = source_digest(DataConfig(path=str(a), test_path=str(b)))
    assert both == hashlib.sha256(f"train:{sha[a]}\ntest:{sha[b]}\n".encode()).hexdigest()
    moved = tmp_path / "sub" / "moved.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(a.read_bytes())
    assert source_digest(DataConfig(path=str(moved))) == sha[a]  # the bytes count, not the path
    write_jsonl(b, [{"question": "q2", "answer": "z"}])  # a changed held-out file
    assert source_digest(DataConfig(path=str(a), test_path=str(b))) != both
    assert source_digest(DataConfig()) == hashlib.sha256(DEMO_DATA.read_bytes()).hexdigest()
    assert source_digest(DataConfig(path="someone/dataset")) is None  # a hub dataset has no local bytes


def test_source_digest_of_a_saved_dataset(tmp_path):
    import datasets

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    first = source_digest(DataConfig(path=str(tmp_path / "ds")))
    assert first == source_digest(DataConfig(path=str(tmp_path / "ds")))
    rows[2]["answer"] = "changed"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds2"))
    assert source_digest(DataConfig(path=str(tmp_path / "ds2"))) != first


def test_a_dataset_dicts_test_split_is_used_when_named_and_never_its_training_split(tmp_path):
    """Was: data.test_path read at data.hub_split, so a DatasetDict (or a hub dataset) given as its own test
    path scored its training rows, and its test split could not be used; nothing said it went unused."""
    import datasets

    ds = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"question": f"q{i}", "answer": f"a{i}"}
                                                               for i in range(8)]),
                          "test": datasets.Dataset.from_list([{"question": "t", "answer": "u"}])}).save_to_disk(ds)
    train, test = load_splits(DataConfig(path=str(ds), test_path=str(ds), test_split="test"), 0)
    assert len(train) == 8 and [e.answer for e in test] == ["u"]
    with pytest.raises(FittuneError, match=r"data.test_path is data.path .*read at the same split 'train': every "
                                           r"held-out row would be a training row; set data.test_split"):
        load_splits(DataConfig(path=str(ds), test_path=str(ds)), 0)
    with pytest.raises(FittuneError, match=r"has splits \['train', 'test'\], not 'dev': set data.test_split"):
        load_splits(DataConfig(path=str(ds), test_path=str(ds), test_split="dev"), 0)
    assert other_splits_note(DataConfig(path=str(ds))) == (
        f"NOTE: {ds} also has the split(s) test, not used: the held-out rows are 0.1 of 'train'; to evaluate on "
        f"one, pass --data.test_path {ds} --data.test_split test")
    assert other_splits_note(DataConfig(path=str(ds), test_path=str(ds), test_split="test")) is None
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"question": "q", "answer": "a"}]),
                          "dev": datasets.Dataset.from_list([{"question": "d", "answer": "e"}]),
                          "test": datasets.Dataset.from_list([{"question": "t", "answer": "u"}])}).save_to_disk(
        tmp_path / "three")
    three = str(tmp_path / "three")  # its dev split, unused beside the test split named: said (was: nothing)
    assert other_splits_note(DataConfig(path=three, test_path=three, test_split="test")) == (
        f"NOTE: {three} also has the split(s) dev, not used: training on 'train', the held-out rows are 'test'")
    with pytest.raises(ValueError, match="data.test_split names a split of data.test_path: set data.test_path too"):
        DataConfig(path=str(ds), test_split="test")
    one = write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "answer": "a"}] * 3)  # a file as its own test set
    with pytest.raises(FittuneError, match=r"data.test_path .*one.jsonl is a file, which has none: remove "
                                           r"data.test_split"):  # a split of a file would be ignored
        load_splits(DataConfig(path=str(ds), test_path=one, test_split="test"), 0)
    datasets.Dataset.from_list([{"question": "t", "answer": "u"}]).save_to_disk(tmp_path / "single")
    with pytest.raises(FittuneError, match="single is one dataset, not a DatasetDict with splits: remove data.test_split"):
        load_splits(DataConfig(path=str(ds), test_path=str(tmp_path / "single"), test_split="test"), 0)
    with pytest.raises(FittuneError, match=r"data.test_path is data.path \(.*one.jsonl\): every held-out row would "
                                           r"be a training row; point data.test_path at another file"):
        load_splits(DataConfig(path=one, test_path=one), 0)
    # data.hub_split chosen for data that has no splits (was: ignored, every row read)
    with pytest.raises(FittuneError, match=r"data.path .*one.jsonl is a file, which has none: set data.hub_split "
                                           r"back to train"):
        load_splits(DataConfig(path=one, hub_split="validation"), 0)
    with pytest.raises(FittuneError, match=r"single is one dataset, not a DatasetDict with splits: data.hub_split "
                                           r"'validation' picks nothing there"):
        load_splits(DataConfig(path=str(tmp_path / "single"), hub_split="validation"), 0)
    assert len(read_rows(str(tmp_path / "single"), DataConfig(path=str(tmp_path / "single")))) == 1  # default: read
    train, test = load_splits(DataConfig(path=str(ds), hub_split="test", test_path=one), 0)  # a dict's split: used
    assert [e.answer for e in train] == ["u"] and len(test) == 3


def test_one_lora_target_module_name_is_a_list_of_one(tiny_model_dir):
    """Was: `--lora.target_modules q_proj` failed "Target modules q_proj not found" (PEFT reads a bare string
    as a regular expression over the whole module path)."""
    from transformers import AutoModelForCausalLM

    from fittune.model import apply_lora

    cfg = build_config(None, {"lora.enabled": True, "lora.target_modules": "q_proj"})
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj"}
    assert build_config(None, {}).lora.target_modules == "all-linear"
    on = {"lora.enabled": True}
    for kept in ("All-Linear", r".*\.(q_proj|v_proj)"):  # PEFT's special value and a regular expression stay
        assert build_config(None, {"lora.target_modules": kept, **on}).lora.target_modules == kept
    # names with commas are the list (was: one regular expression that matched nothing)
    assert build_config(None, {"lora.target_modules": "q_proj, v_proj", **on}).lora.target_modules == ["q_proj",
                                                                                                        "v_proj"]
    # a broken list is one error (was: re.error's traceback), and a typo in a list is refused (was: dropped)
    with pytest.raises(FittuneError, match=r"lora.target_modules '\[q_proj,v_proj' is neither a list of names nor a "
                                           r"regular expression \(unterminated character set.*\): write a list as"):
        build_config(None, {"lora.target_modules": "[q_proj,v_proj", **on})
    # without LoRA a LoRA flag would be ignored (was: a full fine-tuning run, without a word)
    with pytest.raises(FittuneError, match=r"--lora.target_modules sets the LoRA adapter, but lora.enabled is false "
                                           r"\(all weights are trained\): add --lora.enabled true, or remove"):
        build_config(None, {"lora.target_modules": "q_proj"})
    with pytest.raises(FittuneError, match=r"--data.test_size is the fraction of data.path held out, but "
                                           r"data.test_path is the held-out set"):
        build_config(None, {"data.test_size": 0.2, "data.test_path": "x.jsonl"})
    typo = build_config(None, {"lora.enabled": True, "lora.target_modules": ["q_proj", "v_porj"]})
    with pytest.raises(FittuneError, match=r"names 'v_porj', which no module of the model is called; its linear "
                                           r"layers are: .*q_proj.*v_proj"):
        apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), typo)


def test_csv_and_classification_mistakes_get_the_fix_named(tmp_path):
    """A headerless CSV read with its first row as the header, data.column_names of the wrong length (pandas
    would shift every column), and a classification mapping that keeps the default answer column."""
    csv = tmp_path / "mmlu.csv"
    csv.write_text("What is 1+1?,1,2,3,4,B\nWhat is 2+2?,2,3,4,5,C\n")
    cfg = DataConfig(path=str(csv), choices_column=["A", "B", "C", "D"], answer_format="letter")
    with pytest.raises(FittuneError, match="no header row .* set data.csv_header false and name the fields with "
                                           "data.column_names"):
        map_columns(read_rows(str(csv), cfg), cfg, str(csv))
    plain = DataConfig(path=str(csv), question_column="What is 1+1?", csv_header=True)  # only 'answer' is missing
    with pytest.raises(FittuneError, match="no header row .* set data.csv_header false"):  # was: no hint for it
        map_columns(read_rows(str(csv), plain), plain, str(csv))
    five = DataConfig(path=str(csv), csv_header=False, column_names=["question", "A", "B", "C", "answer"])
    with pytest.raises(FittuneError, match=r"its rows have 6 fields but data.column_names names 5 .*name every field"):
        read_rows(str(csv), five)
    data = write_jsonl(tmp_path / "cites.jsonl", [{"text": "we use X", "label": "Uses"}])
    cls = DataConfig(path=data, question_column="text", label_column="label")
    with pytest.raises(FittuneError, match="column 'answer' .* set data.answer_column null"):
        map_columns(read_rows(data, cls), cls, data)
    unnamed = DataConfig(path=data, question_column="text")  # the label column not named yet
    with pytest.raises(FittuneError, match=r"columns are: text, label; for a classification set name its label "
                                           r"column \(data.label_column COLUMN, data.answer_column null\)"):
        map_columns(read_rows(data, unnamed), unnamed, data)


def test_an_empty_config_file_is_refused(tmp_path):
    """Was: accepted, and every default trained (open generation on the built-in set) without a word."""
    empty = tmp_path / "recipe.yaml"
    empty.write_text("# nothing here yet\n")
    with pytest.raises(FittuneError, match=r"config file .*recipe.yaml is empty"):
        build_config(str(empty), {})


def test_config_errors_show_the_value_and_the_file(tmp_path):
    with pytest.raises(FittuneError, match=r"train.max_steps: Input should be a valid integer.*\(got 'abc'\)"):
        build_config(None, {"train.max_steps": "abc"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lerning_rate: 0.1\n")
    with pytest.raises(FittuneError, match=rf"unknown config key 'train.lerning_rate' in {recipe}; did you mean "
                                           r"'train.lr'\?"):
        build_config(str(recipe), {})


def test_help_names_the_planner_and_survives_a_closed_pipe():
    """`python train.py --help | head -1` was a BrokenPipeError traceback; --help did not mention --plan."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader has left (as `head` does) before the help is printed: every write fails
    err = proc.stderr.read().decode()
    assert proc.wait() == 1 and "Traceback" not in err, err
    full = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert full.returncode == 0 and "train.py --plan" in full.stdout


def _sentences(tmp_path, abstracts: int = 12) -> str:
    """csabstruct's shape written one sentence per row (as fittune asks): each row names its abstract."""
    rows = [{"sentence": f"abstract {a} sentence {k}.", "label": ["background", "method", "result"][(a + k) % 3],
             "abstract_id": f"a{a}"} for a in range(abstracts) for k in range(3 + a % 3)]
    return write_jsonl(tmp_path / "sentences.jsonl", rows)


def test_a_grouped_split_holds_out_whole_groups(tmp_path):
    """data.group_column: the sentences of one abstract are never on both sides of the held-out split (the
    stratified split put them there); round(test_size x groups) groups, by seed."""
    cfg = DataConfig(path=_sentences(tmp_path), question_column="sentence", answer_column=None, label_column="label",
                     group_column="abstract_id", test_size=0.25)
    train, test = load_splits(cfg, 0)
    held, trained = {e.group for e in test}, {e.group for e in train}
    assert len(held) == 3 and len(trained) == 9 and not held & trained
    assert len(train) + len(test) == 12 * 4 and sorted(e.id for e in train + test) == sorted(map(str, range(48)))
    assert [e.id for e in load_splits(cfg, 0)[1]] == [e.id for e in test]  # by seed
    assert {e.group for e in load_splits(cfg, 1)[1]} != held
    assert groups_note("abstract_id", train, test).endswith("3 of the 12 groups of data.group_column "
                                                               "'abstract_id', whole (0 on both sides)")
    # what it fixes: the stratified split of the same rows puts abstracts on both sides
    abstract = {str(i): json.loads(line)["abstract_id"] for i, line in enumerate(open(cfg.path))}
    plain_train, plain_test = load_splits(DataConfig(**{**cfg.model_dump(), "group_column": None}), 0)
    assert {abstract[e.id] for e in plain_train} & {abstract[e.id] for e in plain_test}


def test_a_grouped_split_keeps_the_label_mix(tmp_path):
    """Was: one seeded draw of groups, blind to labels, so a class found in few groups was often missing from the
    held-out rows. Now, of several seeded draws, the one whose held-out label mix is closest to the data's."""
    from sklearn.model_selection import GroupShuffleSplit

    # 40 abstracts of one label each, 4 of them the rare class: one draw of 10 misses it about 30% of the time
    rows = [{"sentence": f"abstract {a} sentence {k}.", "label": "rare" if a % 10 == 0 else ["a", "b"][a % 2],
             "abstract_id": f"g{a}"} for a in range(40) for k in range(3)]
    cfg = DataConfig(path=write_jsonl(tmp_path / "s.jsonl", rows), question_column="sentence", answer_column=None,
                     label_column="label", group_column="abstract_id", test_size=0.25)
    groups = [r["abstract_id"] for r in rows]
    one_draw_missed = 0
    for seed in range(10):
        train, test = load_splits(cfg, seed)
        held = Counter(e.label for e in test)
        assert len({e.group for e in test}) == 10 and not {e.group for e in test} & {e.group for e in train}
        assert held["rare"] == 3 and abs(held["a"] - held["b"]) <= 3  # one rare abstract of 10, as in the data
        first = next(GroupShuffleSplit(1, test_size=10, random_state=seed).split(rows, groups=groups))[1]
        one_draw_missed += not any(rows[i]["label"] == "rare" for i in first)
    assert one_draw_missed  # what it fixes: the single draw left the rare class out for some of these seeds


def test_held_out_rows_that_are_also_training_rows_are_said(tmp_path):
    """Was: a duplicated row split to both sides (ACL-ARC's training file: 54 of 169 held-out rows), or a test
    file repeating training rows, gave inflated held-out scores without a word."""
    rows = [{"text": f"cite {i % 20}", "label": ["Uses", "Background"][i % 2]} for i in range(80)]  # 4 copies each
    data = write_jsonl(tmp_path / "dups.jsonl", rows)
    cfg = DataConfig(path=data, **CLASS)
    train, test = load_splits(cfg, 0)
    trained = {(rows[int(e.id)]["text"], rows[int(e.id)]["label"]) for e in train}  # counted from the file
    leaked = sum((rows[int(t.id)]["text"], rows[int(t.id)]["label"]) in trained for t in test)
    note = leaked_rows_note(train, test, cfg)
    assert leaked == len(test) == 8 and note.startswith("NOTE: 8 of the 8 held-out rows are also training rows")
    assert note.endswith("hold out identical rows together with --data.group_column text")
    grouped = DataConfig(path=data, **CLASS, group_column="text")  # the fix it names: no row on both sides
    assert leaked_rows_note(*load_splits(grouped, 0), grouped) is None
    # grouped by another column already (abstracts): the same text in two groups; regrouping by the text would
    # split the abstracts again, so the note does not advise it
    rows2 = [{**r, "doc": f"d{i}"} for i, r in enumerate(rows)]
    by_doc = DataConfig(path=write_jsonl(tmp_path / "docs.jsonl", rows2), **CLASS, group_column="doc")
    note = leaked_rows_note(*load_splits(by_doc, 0), by_doc)
    assert note.endswith("remove the duplicates from the data (the same text in two doc groups)")
    other = write_jsonl(tmp_path / "test.jsonl", rows[:3] + [{"text": "new", "label": "Uses"}])
    with_file = DataConfig(path=data, test_path=other, **CLASS)
    note = leaked_rows_note(*load_splits(with_file, 0), with_file)
    assert note.startswith("NOTE: 3 of the 4 held-out rows") and note.endswith("rows that are not in data.path")
    said = leaked_rows_note(*load_splits(with_file, 0), with_file, evaluation=True)  # evaluate.py: no split to fix
    assert said.startswith("NOTE: 3 of the 4 rows scored are also rows the run trained on")
    assert said.endswith("score rows the run did not train on for a measure of generalisation")


def test_grouped_split_mistakes_are_named(tmp_path):
    path = _sentences(tmp_path)
    base = {"path": path, "question_column": "sentence", "answer_column": None, "label_column": "label"}
    with pytest.raises(FittuneError, match=r"column 'paper' \(data.group_column\) not found; the columns are: "
                                           r"sentence, label, abstract_id"):
        load_splits(DataConfig(**base, group_column="paper"), 0)
    with pytest.raises(FittuneError, match="data.group_column 'label' has one value in every row"):
        one = write_jsonl(tmp_path / "one.jsonl", [{"sentence": "s", "label": "x"}] * 4)
        load_splits(DataConfig(**{**base, "path": one, "label_column": None, "answer_column": "label"},
                                 group_column="label"), 0)
    lists = write_jsonl(tmp_path / "lists.jsonl", [{"sentence": "s", "label": "x", "abstract_id": ["a", "b"]}] * 3)
    with pytest.raises(FittuneError, match=r"row 1: the group in column 'abstract_id' \(data.group_column\) is a "
                                           r"list \(\['a', 'b'\]\): name one group per row"):
        load_splits(DataConfig(**{**base, "path": lists}, group_column="abstract_id"), 0)
    with pytest.raises(ValueError, match="with data.test_path nothing is split: remove one of them"):
        DataConfig(**base, group_column="abstract_id", test_path=path)


Q = {"question_column": "question", "answer_column": "answer"}


@pytest.mark.parametrize("rows, data, message", [
    ([{"id": "a", "question": "q", "answer": "x"}, {"id": "a", "question": "r", "answer": "y"}],
     {**Q, "id_column": "id"}, "mem row 2: duplicate id 'a' in column 'id'; ids must be unique"),
    ([{"question": "q", "answer": "x", "choices": ["x"]}], {**Q, "choices_column": "choices"},
     "mem row 1: needs at least 2 choices, got 1"),
    ([{"question": "q", "answer": 5, "choices": ["x", "y"]}], {**Q, "choices_column": "choices", "answer_format": "index"},
     "mem row 1: answer index 5 is out of range for 2 choices"),
])
def test_a_bad_row_is_one_error_naming_the_row(rows, data, message):
    with pytest.raises(FittuneError) as e:
        map_columns(rows, DataConfig(**data), "mem")
    assert str(e.value) == message


def test_other_bad_settings_are_one_error_naming_the_fix(tmp_path, monkeypatch):
    """Refusals no other test reached: each names what is wrong and how to fix it."""
    import torch

    from fittune.checkpoints import FORMAT_VERSION, check_compatible
    from fittune.plan import make_plan
    from fittune.precision import Precision, check_device_precision

    one = write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(FittuneError, match=r"only 1 row: too few to hold out 0.5 of them and train on the rest; add "
                                           r"data or lower data.test_size"):
        load_splits(DataConfig(path=one, test_size=0.5), 0)
    with pytest.raises(FittuneError, match="invalid config: train.max_steps is 0 and train.epochs is 0: set one of them"):
        build_config(None, {"train.max_steps": 0, "train.epochs": 0})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4, say
    with pytest.raises(FittuneError, match="this GPU has no bf16: use --train.mixed_precision fp16"):
        check_device_precision(Precision("bf16"), torch.device("cuda", 0))
    check_device_precision(Precision("fp16"), torch.device("cuda", 0))
    with pytest.raises(FittuneError, match=rf"written by a newer fittune .*format {FORMAT_VERSION + 1}"):
        check_compatible({"format_version": FORMAT_VERSION + 1}, {}, tmp_path)
    with pytest.raises(FittuneError, match="GPU count, GPU memory and CPU memory must be positive"):
        make_plan(build_config(None, {}), gpus=0, gpu_mem_gib=16, cpu_mem_gib=16)
