"""evaluate.py: the same numbers for any process count and batch size, metrics that match an independent
scikit-learn computation, adapters that reproduce the in-memory model, one clear error for bad input."""

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, TINY_SHAPE, launch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from fittune.config import DEMO_DATA as DEMO_ROWS
from fittune.config import DataConfig
from fittune.sources import read_rows


def train_here(args: list, capsys) -> None:
    """`python train.py ARGS` in this process (faster than a launch); it must exit 0."""
    import runpy
    import sys

    from conftest import ROOT

    argv, sys.argv = sys.argv, [str(ROOT / "train.py")] + [str(a) for a in args]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0, capsys.readouterr().err[-3000:]
    finally:
        sys.argv = argv


def load_preds(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A short LoRA run whose held-out split has 37 rows (prime: never divisible by processes x batch)."""
    run = tmp_path_factory.mktemp("eval") / "run"
    launch("train.py", ["--output_dir", run, "--log_with", "none", "--seed", "3",
                        "--model.name_or_path", tiny_model_dir, "--data.test_size", "0.0925", "--data.max_length", "128",
                        "--lora.enabled", "true", "--lora.r", "8", "--lora.dropout", "0.0",
                        "--train.max_steps", "40", "--train.micro_batch_size", "8", "--train.lr", "1e-2",
                        "--train.eval_every", "0", "--eval.before_training", "false", "--eval.batch_size", "5"])
    return run


# every process count and every batch size, each where the 37 rows split unevenly: one process with a short last
# batch (8), two ranks of 19 and 18 rows in batches of 3, three ranks of 13, 12 and 12 one at a time and in a
# full and a short batch (8); the full 3 x 3 grid added no case of its own and cost four more launches
GRID = [(1, 1), (1, 8), (2, 3), (3, 1), (3, 8)]


@pytest.fixture(scope="module")
def grid(lora_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    out = {}
    for nproc, bs in GRID:
        d = root / f"p{nproc}-b{bs}"
        launch("evaluate.py", ["--checkpoint", lora_run, "--output_dir", d, "--eval.batch_size", bs], nproc=nproc)
        out[(nproc, bs)] = d
    return out


def test_same_results_for_any_process_count_and_batch_size(grid):
    ref = load_preds(grid[(1, 1)])
    ref_metrics = json.loads((grid[(1, 1)] / "metrics.json").read_text())
    assert len(ref) == ref_metrics["num_examples"] == 37
    assert len({p["id"] for p in ref}) == 37
    for key, d in grid.items():
        preds = load_preds(d)
        metrics = json.loads((d / "metrics.json").read_text())
        assert [p["id"] for p in preds] == [p["id"] for p in ref], key  # no duplicate, none missing
        assert [p["pred"] for p in preds] == [p["pred"] for p in ref], key
        for m in ("accuracy", "f1_weighted", "f1_macro", "num_examples", "confusion_matrix", "per_class"):
            assert metrics[m] == ref_metrics[m], (key, m)
        assert metrics["loss"] == pytest.approx(ref_metrics["loss"], abs=1e-6), key
        for p, r in zip(preds, ref):
            assert p["nll"] == pytest.approx(r["nll"], abs=1e-4, rel=1e-6)


def test_metrics_equal_independent_recomputation(grid):
    d = grid[(2, 3)]
    preds = load_preds(d)
    metrics = json.loads((d / "metrics.json").read_text())
    # gold from the data file itself: the letter of the answer among the row's choices
    raw = [json.loads(x) for x in (ROOT / "fittune/demo/ai_research_qa.jsonl").read_text().splitlines()]
    gold = ["ABCD"[raw[int(p["id"])]["choices"].index(raw[int(p["id"])]["answer"])] for p in preds]
    assert gold == [p["gold"] for p in preds]
    # the prediction is the best-scoring choice: recompute it from the scores too
    pred = ["ABCD"[max(range(4), key=lambda k: p["scores"][k])] for p in preds]
    assert pred == [p["pred"] for p in preds]
    assert all(p["labels"] == list("ABCD") for p in preds)  # each score's name, in the order of the scores
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert metrics["f1_weighted"] == pytest.approx(f1_score(gold, pred, average="weighted", zero_division=0))
    assert metrics["f1_macro"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))
    labels = list("ABCD")  # every choice letter, gold or predicted or neither (not fittune's own list)
    assert metrics["confusion_matrix"]["labels"] == labels
    assert metrics["confusion_matrix"]["matrix"] == confusion_matrix(gold, pred, labels=labels).tolist()
    prec, rec, f1, sup = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    for i, c in enumerate(labels):
        assert metrics["per_class"][c] == pytest.approx({"precision": prec[i], "recall": rec[i], "f1": f1[i],
                                                         "support": sup[i]})
    n_tok = sum(p["n_tokens"] for p in preds)
    assert metrics["loss"] == pytest.approx(sum(p["nll"] for p in preds) / n_tok)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["token_accuracy"] == pytest.approx(sum(p["n_correct_tokens"] for p in preds) / n_tok)
    assert (d / "report.md").is_file() and (d / "confusion_matrix.png").stat().st_size > 1000
    # each row reads on its own: the question as written in the data (ids are row numbers without data.id_column)
    questions = {str(i): r["question"] for i, r in enumerate(read_rows("builtin:ai-research-qa", DataConfig()))}
    assert all(p["question"] == questions[p["id"]] for p in preds)


def test_saved_adapter_matches_in_memory_model(lora_run, grid):
    """Predictions of the in-memory model at the end of training == the saved adapter's (evaluate.py)."""
    in_memory = load_preds(lora_run / "eval")
    reloaded = load_preds(grid[(1, 8)])
    by_id = {p["id"]: p for p in reloaded}
    assert len(in_memory) == 37
    for p in in_memory:
        q = by_id[p["id"]]
        assert q["pred"] == p["pred"]
        assert q["scores"] == pytest.approx(p["scores"], abs=1e-4)


def test_open_answers_generate_the_same_text_on_two_processes(lora_run, tmp_path):
    """Rows without choices are answered by greedy generation: exact_match / token_f1, same on 1 and 2 ranks."""
    outs = []
    for nproc in (1, 2):
        d = tmp_path / f"gen{nproc}"
        # no choices and no label: open answers (a label column alone would make it classification)
        launch("evaluate.py", ["--checkpoint", lora_run, "--output_dir", d, "--data.choices_column", "null",
                               "--data.label_column", "null", "--data.test_size", "0.0925", "--eval.max_new_tokens", "8", "--eval.batch_size", "3"],
               nproc=nproc)
        outs.append(d)
    a, b = load_preds(outs[0]), load_preds(outs[1])
    assert len(a) == 37 and [p["pred"] for p in a] == [p["pred"] for p in b]
    m = json.loads((outs[0] / "metrics.json").read_text())
    assert m["num_open"] == 37 and 0.0 <= m["token_f1"] <= 1.0 and "exact_match" in m and "accuracy" not in m


@pytest.mark.parametrize("case", ["missing", "corrupt", "other_base", "label_not_in_choices"])
def test_bad_checkpoint_or_data_one_clear_error(lora_run, tmp_path, case):
    args = ["--output_dir", tmp_path / "ev"]
    if case == "missing":
        args = ["--checkpoint", tmp_path / "nope"] + args
        expect = "checkpoint not found"
    elif case == "corrupt":
        broken = tmp_path / "broken"
        shutil.copytree(lora_run, broken, ignore=shutil.ignore_patterns("eval*", "base_model"))
        weights = broken / "final/adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        args = ["--checkpoint", broken] + args
        expect = "cannot load adapter"
    elif case == "other_base":
        from fittune.builtin_models import build_tiny_model_dir
        from fittune.config import TinyModelConfig

        other = build_tiny_model_dir(tmp_path / "wide", TinyModelConfig(**{**TINY_SHAPE, "hidden_size": 64}), 0)
        args = ["--checkpoint", lora_run, "--model.name_or_path", other] + args
        expect = "does not fit base model"
    else:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question": "q", "answer": "z", "choices": ["x", "y"], "topic": "t"}\n')
        # the run was trained on the built-in set: with the user's own file the mapping starts from the
        # defaults (as in train.py), so the file's choices column is named
        args = ["--checkpoint", lora_run, "--data.path", bad, "--data.choices_column", "choices"] + args
        expect = "row 1: answer 'z' is not among the choices"
    proc = launch("evaluate.py", args, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fittune: error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "ev" / "metrics.json").exists()


def assert_same_evaluation(ref_dir: Path, got_dir: Path, what) -> None:
    """Same ids, predictions, label metrics; per-choice scores within 1e-4 (fp32, other batch shapes)."""
    ref, got = load_preds(ref_dir), load_preds(got_dir)
    rm, gm = (json.loads((d / "metrics.json").read_text()) for d in (ref_dir, got_dir))
    assert [p["id"] for p in got] == [p["id"] for p in ref], what
    assert [p["pred"] for p in got] == [p["pred"] for p in ref], what
    for p, r in zip(got, ref):
        assert p["scores"] == pytest.approx(r["scores"], abs=1e-4), what
        assert p["nll"] == pytest.approx(r["nll"], abs=1e-4, rel=1e-6) and p["n_tokens"] == r["n_tokens"], what
    for m in ("accuracy", "f1_weighted", "f1_macro", "confusion_matrix", "per_class", "token_accuracy"):
        assert gm[m] == rm[m], (what, m)
    assert gm["loss"] == pytest.approx(rm["loss"], abs=1e-6), what


@pytest.mark.parametrize("accel", ["deepspeed_zero3", "fsdp2"])
def test_sharded_engines_score_like_one_process(lora_run, grid, tmp_path, accel):
    """ZeRO-3 / FSDP2 on 2 CPU ranks (weights gathered by collectives in every packed forward pass)."""
    d = tmp_path / accel
    launch("evaluate.py", ["--checkpoint", lora_run, "--output_dir", d, "--eval.batch_size", 3], nproc=2,
           config_file=f"accelerate_configs/{accel}.yaml")
    assert_same_evaluation(grid[(1, 1)], d, accel)


def test_classification_same_on_one_and_three_processes_and_fsdp2(tmp_path, tiny_model_dir, capsys):
    """An 8-class set (every topic a candidate of every row) of a full model: in this process, on 3 ranks and
    under FSDP2 on 2 ranks."""
    from test_evaluate_safety import evaluate, make_run

    run = make_run(tmp_path, tiny_model_dir, **{"data.choices_column": None, "data.answer_column": None,
                                                "data.label_column": "topic", "data.test_size": 0.0925})
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "p1", "--eval.batch_size", 4], capsys)
    assert code == 0, err[-3000:]
    ref = load_preds(tmp_path / "p1")
    assert len(ref) == 37 and all(len(p["scores"]) == 8 for p in ref)
    for p in ref:  # a class task's scores are named by its classes: the best one is the prediction
        assert p["labels"][max(range(8), key=lambda k: (p["scores"][k], -k))] == p["pred"] and p["gold"] in p["labels"]
    launch("evaluate.py", ["--checkpoint", run, "--output_dir", tmp_path / "p3", "--eval.batch_size", 3], nproc=3)
    assert_same_evaluation(tmp_path / "p1", tmp_path / "p3", "3 processes")
    launch("evaluate.py", ["--checkpoint", run, "--output_dir", tmp_path / "fsdp2"], nproc=2,
           config_file="accelerate_configs/fsdp2.yaml")
    assert_same_evaluation(tmp_path / "p1", tmp_path / "fsdp2", "fsdp2")


def test_a_slice_of_the_data_is_scored_against_the_runs_classes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Was: evaluate.py --data.path took the classes from the file it scored, so a file holding two of the
    eight topics was a two-way choice (accuracy 0.84 for a model that got those rows 0/31 right at training).
    Also: a run trained with a relative data path could not be evaluated from another directory."""

    import yaml
    from test_evaluate_safety import evaluate

    data, elsewhere, run = tmp_path / "data", tmp_path / "elsewhere", tmp_path / "run"
    data.mkdir(), elsewhere.mkdir()
    shutil.copy(DEMO_ROWS, data / "qa.jsonl")
    mapping = ["--data.label_column", "topic", "--data.answer_column", "null", "--data.choices_column", "null",
               "--data.id_column", "id"]
    args = ["--output_dir", "../run", "--log_with", "none", "--model.name_or_path", tiny_model_dir, "--data.path",
            "qa.jsonl", *mapping, "--data.test_size", "0.0925", "--train.max_steps", "2", "--eval.before_training",
            "false"]
    monkeypatch.chdir(data)  # trained with paths relative to here
    train_here(args, capsys)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["output_dir"] == str(run)  # absolute: `--config RUN/config.yaml --resume` works from anywhere
    saved = saved["data"]
    trained = {p["id"]: p for p in load_preds(run / "eval")}
    assert saved["path"] == str(data / "qa.jsonl") and len(saved["classes"]) == 8
    assert all(len(p["scores"]) == 8 for p in trained.values())
    monkeypatch.chdir(elsewhere)
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "again"], capsys)  # its held-out rows
    assert code == 0 and {p["id"]: p["pred"] for p in load_preds(tmp_path / "again")} == \
        {k: p["pred"] for k, p in trained.items()}, err[-3000:]
    rows = {r["id"]: r for r in map(json.loads, (data / "qa.jsonl").read_text().splitlines()) if r["id"] in trained}
    two = sorted({r["topic"] for r in rows.values()})[:2]
    piece = tmp_path / "two_topics.jsonl"
    piece.write_text("".join(json.dumps(r) + "\n" for r in rows.values() if r["topic"] in two))
    code, _, err = evaluate(["--checkpoint", run, "--data.path", piece, *mapping, "--output_dir", tmp_path / "slice"],
                            capsys)
    assert code == 0, err[-3000:]
    sliced = load_preds(tmp_path / "slice")
    assert len(sliced) == sum(r["topic"] in two for r in rows.values()) and all(len(p["scores"]) == 8 for p in sliced)
    assert {p["id"]: p["pred"] for p in sliced} == {p["id"]: trained[p["id"]]["pred"] for p in sliced}


def test_answers_longer_than_the_generation_limit_are_said():
    """Was: exact_match 0.0000 beside token_accuracy 1.0000 on 82-token answers, the generation silently cut at
    the default eval.max_new_tokens 64."""
    from fittune.batches import TokExample
    from fittune.evaluator import generation_cut

    rows = [TokExample(str(i), [1, 2], list(range(n)) + [99]) for i, n in enumerate((82, 10, 70))]
    rows.append(TokExample("c", [1, 2], [5, 99], candidates=[[5], [6]]))  # scored by likelihood: never generated
    assert generation_cut(rows, 64) == (
        "2 of 3 reference answers are longer than eval.max_new_tokens (64 tokens; the longest has 82): generation "
        "stops there, so their exact_match is 0 and token F1 is capped whatever the model learned; raise "
        "eval.max_new_tokens to at least 82")
    assert generation_cut(rows, 82) is None and generation_cut(rows, 0) is None


def test_a_grouped_run_holds_out_whole_abstracts_and_scores_other_files(tmp_path, tiny_model_dir, capsys):
    """train.py with data.group_column: held out whole abstracts (said at the start), evaluated on exactly
    those rows by training and by evaluate.py; another file without the group column is scored whole."""

    from test_evaluate_safety import evaluate

    labels = ["background", "method", "result"]
    rows = [{"sentence": f"abstract {a} sentence {k}.", "label": labels[(a + k) % 3], "abstract_id": f"a{a}"}
            for a in range(12) for k in range(3 + a % 3)]
    data, run = tmp_path / "sentences.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--output_dir", run, "--log_with", "none", "--model.name_or_path", tiny_model_dir, "--data.path", data,
            "--data.question_column", "sentence", "--data.answer_column", "null", "--data.label_column", "label",
            "--data.group_column", "abstract_id", "--data.test_size", "0.25", "--train.max_steps", "2",
            "--eval.before_training", "false"]
    train_here(args, capsys)
    out = capsys.readouterr().out
    held = json.loads((run / "heldout_ids.json").read_text())["ids"]
    abstracts = {rows[int(i)]["abstract_id"] for i in held}
    assert len(abstracts) == 3 and sorted(map(int, held)) == [i for i, r in enumerate(rows) if r["abstract_id"] in abstracts]
    assert f"held out {len(held)} of 48 rows: 3 of the 12 groups of data.group_column 'abstract_id', whole" in out
    assert json.loads((run / "eval/metrics.json").read_text())["num_examples"] == len(held)
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "again"], capsys)
    assert code == 0, err[-3000:]
    assert sorted(p["id"] for p in load_preds(tmp_path / "again")) == sorted(held)
    other = tmp_path / "other.jsonl"  # new sentences, no abstract ids: every row scored, no split to group
    other.write_text("".join(json.dumps({"sentence": f"new {k}.", "label": labels[k % 3]}) + "\n" for k in range(5)))
    code, _, err = evaluate(["--checkpoint", run, "--data.path", other, "--output_dir", tmp_path / "other"], capsys)
    assert code == 0, err[-3000:]
    assert len(load_preds(tmp_path / "other")) == 5
    # a test file is scored whole too (was: refused, "data.group_column ... with data.test_path nothing is split",
    # for a group column the command never named: it came from the run's config.yaml)
    code, _, err = evaluate(["--checkpoint", run, "--data.test_path", other, "--output_dir", tmp_path / "file"], capsys)
    assert code == 0, err[-3000:]
    assert len(load_preds(tmp_path / "file")) == 5
    # fewer candidates than the run's classes: easier, and said (was: a higher accuracy without a word)
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps({"sentence": f"two {k}.", "label": labels[k % 2]}) + "\n" for k in range(4)))
    code, out, err = evaluate(["--checkpoint", run, "--data.path", two, "--data.classes", "[background, method]",
                               "--output_dir", tmp_path / "two"], capsys)
    assert code == 0, err[-3000:]
    assert ("NOTE: scoring against the classes ['background', 'method'] given, not the run's own ['background', "
            "'method', 'result']") in out
    # as a test file too (was: refused, naming a row of the run's TRAINING file whose label is not among them),
    # and with the run's training file gone (was: refused, "data file not found"; the majority column goes)
    code, out, err = evaluate(["--checkpoint", run, "--data.test_path", two, "--data.classes", "[background, method]",
                               "--output_dir", tmp_path / "two-file"], capsys)
    assert code == 0 and len(load_preds(tmp_path / "two-file")) == 4, err[-3000:]
    data.rename(tmp_path / "elsewhere.jsonl")
    code, out, err = evaluate(["--checkpoint", run, "--data.test_path", other, "--output_dir", tmp_path / "gone"],
                              capsys)
    assert code == 0 and len(load_preds(tmp_path / "gone")) == 5, err[-3000:]
    assert "no majority baseline for these rows" in out
