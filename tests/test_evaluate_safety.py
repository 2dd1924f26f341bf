"""evaluate.py never loses a user's files, never runs a received checkpoint's code, never evaluates a run that
is being trained, and never scores changed rows as the run's held-out set (issue #11's evaluator findings).

Most checks run evaluate.py in this process (fast); one launches two ranks to prove a refusal reaches both."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, launch

from fittune.config import DEMO_DATA, build_config, to_yaml
from fittune.rundir import MARKER, OWN_CONFIG, OWN_HELDOUT_IDS, DirLock, claim_dir
from fittune.sources import source_digest
from fittune.splits import examples_digest, load_splits


def make_run(root: Path, model_dir: Path, hashed: bool = True, **overrides) -> Path:
    """A finished fittune run directory as the training recipe leaves it: marker, config.yaml, final/ (here the
    untrained tiny model), heldout_ids.json with the held-out rows' content hash; data in a file of its own."""
    data = root / "qa.jsonl"
    shutil.copy(DEMO_DATA, data)
    run = claim_dir(root / "run", "train")
    shutil.copytree(model_dir, run / "final")
    split = {} if "data.test_path" in overrides else {"data.test_size": 0.05}  # a test file is not split
    cfg = build_config(None, {"output_dir": str(run), "seed": 1, "model.name_or_path": str(model_dir),
                              "data.path": str(data), "data.choices_column": "choices", **split,
                              "data.max_length": 96, "eval.batch_size": 8, **overrides})
    train, test = load_splits(cfg.data, cfg.seed)
    facts = {"world_size": 1, **({"train_sha256": examples_digest(train)} if hashed else {})}
    (run / "config.yaml").write_text(to_yaml(cfg, facts))
    record = {"ids": [e.id for e in test]}
    if hashed:  # as training writes it
        record |= {"examples_sha256": examples_digest(test), "source_sha256": source_digest(cfg.data)}
    (run / "heldout_ids.json").write_text(json.dumps(record))
    return run


def evaluate(args: list, capsys) -> tuple[int, str, str]:
    """Run evaluate.py in this process as `python evaluate.py ARGS`: (exit code, stdout, stderr)."""
    argv = sys.argv
    sys.argv = [str(ROOT / "evaluate.py")] + [str(a) for a in args]
    code = 0
    try:
        runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("fittune: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def test_missing_checkpoint_flag_is_one_clear_error(capsys):
    code, _, err = evaluate([], capsys)
    assert code == 2 and "--checkpoint DIR is required" in one_error(err)


def test_a_refused_evaluation_leaves_no_directory_it_made(tmp_path, tiny_model_dir, capsys):
    """Was: the output directory's missing parents stayed after the refusal (they were made when it was
    reserved, before the data was read)."""
    run = make_run(tmp_path, tiny_model_dir)
    (tmp_path / "results").mkdir()
    out = tmp_path / "results" / "new" / "deep" / "eval"
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", out, "--data.path", tmp_path / "gone.jsonl"], capsys)
    assert code == 2 and "gone.jsonl" in one_error(err)
    assert list((tmp_path / "results").iterdir()) == []


def test_foreign_output_dir_is_refused_and_kept(tmp_path, tiny_model_dir, capsys):
    run = make_run(tmp_path, tiny_model_dir)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("\\chapter{Results}")
    (mine / "sub/data.csv").write_text("a,b\n1,2\n")
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", mine], capsys)
    assert code == 2 and "not created by fittune" in one_error(err) and str(mine) in one_error(err)
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == ["sub", "sub/data.csv", "thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "\\chapter{Results}" and (mine / "sub/data.csv").read_text() == "a,b\n1,2\n"

    fresh = tmp_path / "new" / "eval-here"
    for _ in range(2):  # a directory fittune made is fittune's: the second evaluation replaces it whole
        code, out, err = evaluate(["--checkpoint", run, "--output_dir", fresh], capsys)
        assert code == 0, err[-3000:]
        assert (fresh / MARKER).is_file() and (fresh / "metrics.json").is_file()
        assert not fresh.with_name("eval-here.tmp").exists()
    metrics = json.loads((fresh / "metrics.json").read_text())
    assert metrics["num_examples"] == len(json.loads((run / "heldout_ids.json").read_text())["ids"])


def test_write_eval_outputs_never_replaces_a_foreign_directory(tmp_path):
    from fittune.errors import FittuneError
    from fittune.reports import write_eval_outputs

    metrics = {"num_examples": 1, "loss": 1.0, "perplexity": 2.7, "token_accuracy": 0.0}
    rows = [{"id": "0", "nll": 1.0, "n_tokens": 1, "n_correct_tokens": 0}]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    with pytest.raises(FittuneError, match="not created by fittune"):
        write_eval_outputs(theirs, metrics, rows, "model")
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    # a user's folder that happens to be called <out>.tmp is not a leftover of ours either
    (tmp_path / "ev.tmp").mkdir()
    (tmp_path / "ev.tmp" / "draft.md").write_text("keep")
    with pytest.raises(FittuneError, match="not created by fittune"):
        write_eval_outputs(tmp_path / "ev", metrics, rows, "model")
    assert (tmp_path / "ev.tmp" / "draft.md").read_text() == "keep" and not (tmp_path / "ev").exists()
    (tmp_path / "ours.tmp").mkdir()  # a write killed between creating <out>.tmp and marking it: adopted
    ours = write_eval_outputs(tmp_path / "ours", metrics, rows, "model")
    assert json.loads((ours / "metrics.json").read_text()) == metrics and not (tmp_path / "ours.tmp").exists()
    assert (ours / "predictions.jsonl").read_text() == json.dumps(rows[0]) + "\n" and (ours / MARKER).is_file()
    # was: an eval/ folder of the user's inside a directory that looked like a run (config.yaml with a run:
    # section and a train_log.jsonl), or a link named eval in a run, counted as fittune's and was emptied
    look_alike = tmp_path / "project"
    (look_alike / "eval").mkdir(parents=True)
    (look_alike / "config.yaml").write_text("run:\n  name: mine\n")
    (look_alike / "train_log.jsonl").write_text("{}\n")
    (look_alike / "eval" / "results.csv").write_text("keep")
    link = tmp_path / "link-to-theirs"
    link.symlink_to(theirs, target_is_directory=True)
    for out, why in ((look_alike / "eval", "not created by fittune"), (link, "symbolic link")):
        with pytest.raises(FittuneError, match=why):
            write_eval_outputs(out, metrics, rows, "model")
    assert (look_alike / "eval" / "results.csv").read_text() == "keep"
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


def test_run_being_trained_is_refused(tmp_path, tiny_model_dir, capsys):
    run = make_run(tmp_path, tiny_model_dir)
    lock = DirLock(run).acquire("train.py")  # another open file description: conflicts like another process
    try:
        start = time.monotonic()
        code, _, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev"], capsys)
    finally:
        lock.release()
    line = one_error(err)
    assert code == 2 and str(run) in line and "train.py (pid" in line, line
    assert time.monotonic() - start < 30 and not (tmp_path / "ev").exists()



def test_a_run_without_final_says_why_and_what_to_evaluate(tmp_path, tiny_model_dir, capsys):
    """A run still training (no final/ yet) is refused for its lock, not as "holds no model"; a run stopped
    before its end says how to finish it and which saved adapter can be evaluated now."""
    run = make_run(tmp_path, tiny_model_dir)
    shutil.rmtree(run / "final")
    lock = DirLock(run).acquire("train.py")
    try:
        code, _, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev"], capsys)
    finally:
        lock.release()
    assert code == 2 and "is in use by train.py (pid" in one_error(err)
    adapter = claim_dir(run / "checkpoints/step-00000004", "checkpoint") / "adapter"
    (adapter.parent / "trainer_state.json").write_text("{}")
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev"], capsys)
    line = one_error(err)
    assert code == 2 and "has no final/ yet" in line and f"--output_dir {run} --resume auto" in line
    assert f"--checkpoint {adapter} --output_dir DIR" in line and not (tmp_path / "ev").exists()
    code, _, err = evaluate(["--checkpoint", adapter.parent], capsys)  # the checkpoint itself: not a model
    assert code == 2 and f"is a fittune training checkpoint (resumable state, not a model): evaluate its " \
                         f"adapter: --checkpoint {adapter}" in one_error(err)
    from fittune.checkpoints import resolve_checkpoint
    from fittune.evaluate_cli import DataChoice, EvalRequest, SavedRun, default_eval_dir

    shutil.copy(run / "config.yaml", adapter.parent / "config.yaml")  # as a checkpoint holds its recipe
    lock = DirLock(run).acquire("train.py")  # a checkpoint's adapter is read under its run's lock (was: the
    try:                                     # checkpoint's own, so a run being trained was not refused)
        code, _, err = evaluate(["--checkpoint", adapter, "--output_dir", tmp_path / "ev"], capsys)
    finally:
        lock.release()
    assert code == 2 and f"cannot evaluate now: {run} is in use by train.py (pid" in one_error(err)
    assert not (adapter.parent / ".fittune.lock").exists()
    saved = SavedRun.read(resolve_checkpoint(str(adapter)))
    choice = DataChoice(saved, build_config(str(run / "config.yaml"), {}), given=False)
    assert default_eval_dir(choice, EvalRequest(str(adapter), None, None)) == run / "eval-step-00000004-heldout"

def test_a_config_yaml_beside_a_copied_model_is_not_its_recipe(tmp_path, tiny_model_dir, capsys):
    """Was: a model copied out of its run (with its own fittune_config.yaml) into a folder that also held a
    config.yaml was scored with that file: another tool's was "unknown config key", another recipe's data
    was scored without a word. Only a config.yaml in a folder fittune made is a run's recipe."""
    from fittune.checkpoints import resolve_checkpoint

    run = make_run(tmp_path, tiny_model_dir)
    project = tmp_path / "project"
    shutil.copytree(run / "final", project / "model")
    shutil.copy(run / "config.yaml", project / "model" / OWN_CONFIG)
    shutil.copy(run / "heldout_ids.json", project / "model" / OWN_HELDOUT_IDS)
    (project / "config.yaml").write_text("database: postgres\n")
    assert resolve_checkpoint(str(project / "model")).config_file == project / "model" / OWN_CONFIG
    code, out, err = evaluate(["--checkpoint", project / "model", "--output_dir", tmp_path / "ev"], capsys)
    assert code == 0 and "(the run's held-out rows)" in out, err[-3000:]
    other = build_config(None, {"output_dir": str(project), "data.path": str(DEMO_DATA), "data.test_size": 0.5})
    (project / "config.yaml").write_text(to_yaml(other, {"world_size": 1}))  # another recipe, not the model's
    assert resolve_checkpoint(str(project / "model")).config_file == project / "model" / OWN_CONFIG
    assert resolve_checkpoint(str(run / "final")).config_file == run / "config.yaml"  # in its run: the run's


def test_run_being_trained_is_refused_on_every_rank(tmp_path, tiny_model_dir):
    """Two ranks: only the main one takes the lock; the other learns of the refusal and exits too (no hang)."""
    run = make_run(tmp_path, tiny_model_dir)
    lock = DirLock(run).acquire("train.py")
    try:
        proc = launch("evaluate.py", ["--checkpoint", run, "--output_dir", tmp_path / "ev"], nproc=2, check=False,
                      timeout=240)
    finally:
        lock.release()
    assert proc.returncode != 0
    assert "is in use by train.py" in one_error(proc.stderr)
    assert not (tmp_path / "ev").exists()


def test_checkpoint_cannot_grant_itself_remote_code(tmp_path, tiny_model_dir, capsys):
    """A received run: final/config.json maps to its own .py and its saved config.yaml trusts remote code."""
    run = make_run(tmp_path, tiny_model_dir, **{"model.trust_remote_code": True})
    ran = tmp_path / "code-ran"
    (run / "final" / "evil.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n")
    config = json.loads((run / "final/config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (run / "final/config.json").write_text(json.dumps(config))
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev"], capsys)
    assert not ran.exists(), "the checkpoint's own code ran"
    assert code == 0, err[-3000:]
    notice = [line for line in out.splitlines() if "auto_map" in line]
    assert len(notice) == 1 and "NOT run" in notice[0] and "--model.trust_remote_code true" in notice[0]


def _change_heldout_row(run: Path) -> None:
    cfg = build_config(str(run / "config.yaml"), {})
    first = json.loads((run / "heldout_ids.json").read_text())["ids"][0]
    path = Path(cfg.data.path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[int(first)]["question"] += " (edited after training)"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_changed_heldout_rows_are_refused_or_said_loudly(tmp_path, tiny_model_dir, capsys):
    run = make_run(tmp_path, tiny_model_dir)
    _change_heldout_row(run)
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev"], capsys)
    assert code == 2 and "changed since training" in one_error(err)
    assert not (tmp_path / "ev").exists()
    data = build_config(str(run / "config.yaml"), {}).data.path
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev", "--data.path", data], capsys)
    assert code == 0, err[-3000:]
    assert sum("changed since training" in line and "NOTE" in line for line in out.splitlines()) == 1


def test_other_data_is_said_loudly_and_old_runs_warn_once(tmp_path, tiny_model_dir, capsys):
    run = make_run(tmp_path, tiny_model_dir, hashed=False)
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev"], capsys)
    assert code == 0, err[-3000:]
    assert sum("no content hash" in line for line in (out + err).splitlines()) == 1
    other = tmp_path / "other.jsonl"
    other.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:12]))
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev2", "--data.path", other], capsys)
    assert code == 0, err[-3000:]
    assert sum("NOT the held-out split" in line for line in out.splitlines()) == 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # what the run used, in words (was: a raw dict with its None values)
    assert f"the run used data path {saved['data']['path']}, test_size {saved['data']['test_size']}, " \
           f"seed {saved['seed']})" in out and "None" not in out
    assert json.loads((tmp_path / "ev2/metrics.json").read_text())["num_examples"] == 12
    # the run's own file given as --data.path: its held-out rows, said (was: silently, in a folder named after
    # the file as if all of it had been scored)
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev3", "--data.path",
                               tmp_path / "qa.jsonl"], capsys)
    held = len(json.loads((run / "heldout_ids.json").read_text())["ids"])
    assert code == 0 and f"--data.path is the run's own data (its content hash): scoring its {held} held-out rows, " \
                         f"not all 400" in out


def test_the_runs_moved_data_is_found_by_its_content_hash(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Was: after the data file moved, "data file not found" with no way on, and --data.path NEW scored every row
    (training rows too) as other data. Now the error says how, and NEW (the same bytes) gives the held-out rows."""
    run = make_run(tmp_path, tiny_model_dir)
    code, _, _ = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "before"], capsys)
    assert code == 0
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    (tmp_path / "qa.jsonl").rename(moved)
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev"], capsys)
    assert code == 2 and "qa.jsonl" in one_error(err) and "if the run's data moved, pass --data.path NEW_PATH" in err
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev", "--data.path", moved], capsys)
    assert code == 0 and "--data.path is the run's own data (its content hash)" in out, err[-2000:]
    ids = [json.loads(x)["id"] for x in (tmp_path / "ev/predictions.jsonl").read_text().splitlines()]
    assert ids == [json.loads(x)["id"] for x in (tmp_path / "before/predictions.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(json.loads((run / "heldout_ids.json").read_text())["ids"])
    # without --output_dir, its held-out rows and the same file scored whole (another --seed: not the run's split)
    # get a folder each (was: one folder, the whole file's evaluation replacing the held-out rows')
    # (the held-out rows in eval-heldout, as of the data where it was)
    code, _, _ = evaluate(["--checkpoint", run, "--data.path", moved], capsys)
    from fittune import sources

    real_digest, hashed = sources._file_digest, []  # the files whose bytes are hashed: each once (was: the moved file three times)
    monkeypatch.setattr(sources, "_file_digest", lambda path, h: hashed.append(path) or real_digest(path, h))
    code2, out2, _ = evaluate(["--checkpoint", run, "--data.path", moved, "--seed", "2"], capsys)
    assert hashed == [moved]
    monkeypatch.undo()
    folders = [run / "eval-heldout", *run.glob("eval-renamed-*")]
    assert code == code2 == 0 and len(folders) == 2 and "replacing the previous evaluation" not in out2
    counts = [json.loads((f / "metrics.json").read_text())["num_examples"] for f in folders]
    assert counts[0] == len(ids) < counts[1]
    # the whole moved file is compared with the run's majority baseline too: its training rows are made again
    # from the moved bytes (was: looked for at the old path, "no majority baseline for these rows")
    assert "no majority baseline" not in out2 and "majority" in json.loads((folders[1] / "comparison.json").read_text())
    # a recipe naming the moved file scores every row of it; with --data.path naming it too, the held-out rows:
    # two folders again (the recipe's own -HASH is the same for both)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((run / "config.yaml").read_text().replace(str(tmp_path / "qa.jsonl"), str(moved)))
    for extra in ([], ["--data.path", moved]):
        code, _, err = evaluate(["--checkpoint", run, "--config", recipe, *extra], capsys)
        assert code == 0, err[-2000:]
    assert len(list(run.glob("eval-renamed-*"))) == 2 and len(list(run.glob("eval-heldout-*"))) == 1
    changed = tmp_path / "changed.jsonl"  # other bytes: other data, every row scored
    changed.write_text(moved.read_text().replace("?", "? "))
    code, out, _ = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev2", "--data.path", changed], capsys)
    assert code == 0 and "NOT the held-out split" in out


def test_data_path_is_scored_even_when_the_run_had_a_test_file(tmp_path, tiny_model_dir, capsys):
    """--data.path names the data to score: the run's own data.test_path (kept in its config.yaml) must not
    silently take its place."""
    rows = DEMO_DATA.read_text().splitlines(keepends=True)
    (tmp_path / "test.jsonl").write_text("".join(rows[-20:]))
    run = make_run(tmp_path, tiny_model_dir, **{"data.test_path": str(tmp_path / "test.jsonl")})
    other = tmp_path / "other.jsonl"
    other.write_text("".join(rows[:12]))
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev", "--data.path", other], capsys)
    assert code == 0, err[-3000:]
    assert sum("NOT the held-out split" in line for line in out.splitlines()) == 1
    assert json.loads((tmp_path / "ev/metrics.json").read_text())["num_examples"] == 12
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev"], capsys)  # the run's own
    assert code == 0 and json.loads((tmp_path / "ev/metrics.json").read_text())["num_examples"] == 20
    recipe = tmp_path / "recipe.yaml"  # an explicit --config with its own test file: --data.path still wins
    recipe.write_text((run / "config.yaml").read_text())
    code, out, err = evaluate(["--checkpoint", run, "--config", recipe, "--output_dir", tmp_path / "ev",
                               "--data.path", other], capsys)
    assert code == 0 and json.loads((tmp_path / "ev/metrics.json").read_text())["num_examples"] == 12


def test_default_output_is_beside_the_training_report_and_never_outside_a_run(tmp_path, tiny_model_dir, capsys):
    """Without --output_dir the results go next to the eval/ that training wrote (its majority / untrained /
    fine-tuned report is never replaced by default), named after what was scored; for a model directory that
    is not a fittune run nothing is written into it (--output_dir is asked for); and no evaluation is written
    inside a checkpoint, where the run's own saves would replace it."""
    run = make_run(tmp_path, tiny_model_dir)
    report = claim_dir(run / "eval", "eval") / "report.md"
    report.write_text("| majority | untrained | fine-tuned |")
    code, _, err = evaluate(["--checkpoint", run], capsys)
    assert code == 0, err[-3000:]
    assert report.read_text() == "| majority | untrained | fine-tuned |"
    assert json.loads((run / "eval-heldout/metrics.json").read_text())["num_examples"] > 0
    table = json.loads((run / "eval-heldout/comparison.json").read_text())  # the report's columns, to plot
    # named as in training's own report (was: "model"), so the two tables join on their keys
    assert list(table) == ["majority", "fine-tuned"]
    # the table's fine-tuned column is the evaluation's own numbers, and the report shows them
    assert table["fine-tuned"] == json.loads((run / "eval-heldout/metrics.json").read_text())
    assert f"{table['fine-tuned']['accuracy']:.4f}" in (run / "eval-heldout/report.md").read_text()
    about = json.loads((run / "eval-heldout/evaluation.json").read_text())  # what was evaluated, and how
    assert about["model"] == str(run / "final") and about["data"] == "the run's held-out rows"
    assert about["processes"] == 1 and about["eval"]["batch_size"] == 8 and about["examples"] > 0
    # scored another way (a flag that changes the numbers): its own folder (was: it replaced eval-heldout)
    first = (run / "eval-heldout/evaluation.json").read_text()
    code, out, _ = evaluate(["--checkpoint", run, "--eval.length_normalize", "true"], capsys)
    [normalised] = run.glob("eval-heldout-*")
    assert code == 0 and (run / "eval-heldout/evaluation.json").read_text() == first
    about = json.loads((normalised / "evaluation.json").read_text())
    assert about["eval"]["length_normalize"] is True and about["data_config"]["max_length"] == 96
    assert about["data_sha256"] == source_digest(build_config(str(run / "config.yaml"), {}).data)
    code, out, _ = evaluate(["--checkpoint", run, "--eval.length_normalize", "true"], capsys)  # the same again
    assert code == 0 and f"replacing the previous evaluation in {normalised}" in out
    assert evaluate(["--checkpoint", run, "--data.max_length", "64"], capsys)[0] == 0
    assert len(list(run.glob("eval-heldout-*"))) == 2
    # batched otherwise, scored alike: the same folder as the run's own settings (was: a new eval-heldout-HASH)
    code, out, _ = evaluate(["--checkpoint", run, "--eval.batch_size", "4"], capsys)
    assert code == 0 and f"replacing the previous evaluation in {run / 'eval-heldout'}" in out
    assert len(list(run.glob("eval-heldout-*"))) == 2
    other = tmp_path / "other.jsonl"
    other.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:12]))
    code, _, err = evaluate(["--checkpoint", run, "--data.path", other], capsys)
    [named] = run.glob("eval-other-*")  # the file's name and a hash of its path: two test.jsonl never collide
    assert code == 0 and json.loads((named / "metrics.json").read_text())["num_examples"] == 12
    (tmp_path / "b").mkdir()
    (tmp_path / "b/other.jsonl").write_text(other.read_text())
    assert evaluate(["--checkpoint", run, "--data.path", tmp_path / "b/other.jsonl"], capsys)[0] == 0
    assert len(list(run.glob("eval-other-*"))) == 2
    # the run's recipe scoring other rows (a test file, another seed): not its held-out results (was: written
    # into eval-heldout, replacing them), and each its own folder
    heldout = (run / "eval-heldout/metrics.json").read_text()
    assert evaluate(["--checkpoint", run, "--data.test_path", other], capsys)[0] == 0
    assert evaluate(["--checkpoint", run, "--seed", "2"], capsys)[0] == 0
    assert evaluate(["--checkpoint", run, "--data.test_size", "0.1"], capsys)[0] == 0
    assert (run / "eval-heldout/metrics.json").read_text() == heldout
    assert len(list(run.glob("eval-other-*"))) == 3  # the split's seed or size changed: every row of qa scored
    [every] = run.glob("eval-qa-*")
    assert json.loads((every / "evaluation.json").read_text())["data"].startswith("all rows of")
    for reserved in ("final", "checkpoints", "eval.tmp"):  # the run's own names are not evaluation outputs
        code, _, err = evaluate(["--checkpoint", run, "--output_dir", run / reserved], capsys)
        assert code == 2 and "name it eval-SOMETHING there" in one_error(err)

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    code, _, err = evaluate(["--checkpoint", model, "--config", run / "config.yaml"], capsys)
    assert code == 2 and "pass --output_dir DIR" in one_error(err)
    assert sorted(p.name for p in model.iterdir()) == before
    inside = claim_dir(run / "checkpoints/step-00000002", "checkpoint") / "ev"
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", inside], capsys)
    assert code == 2 and "is inside" in one_error(err) and "fittune checkpoint directory" in one_error(err)
    assert not inside.exists()


def test_the_loss_plot_replaces_a_link_never_its_target(tmp_path):
    """Was: loss_curve.png was saved through whatever was at that name (a link to a user's photo)."""
    from fittune.reports import plot_loss_curve

    photo = tmp_path / "photo.png"
    photo.write_bytes(b"my photo")
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "val_loss": 1.7}\n')
    (tmp_path / "loss_curve.png").symlink_to(photo)
    plot_loss_curve(log, tmp_path / "loss_curve.png")
    assert photo.read_bytes() == b"my photo" and not (tmp_path / "loss_curve.png").is_symlink()
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_own_data_for_a_run_on_the_builtin_set_starts_from_the_default_mapping(tmp_path, tiny_model_dir, capsys):
    """Was: evaluate.py --data.path FILE on a run trained on the built-in set kept that set's column mapping
    (choices, topic) and failed on the user's question/answer file; train.py already started from the default
    mapping there. A run on the user's own data keeps its mapping (test_data_path_is_scored_even_when...)."""
    run = make_run(tmp_path, tiny_model_dir, **{"data.path": "builtin:ai-research-qa"})
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"question": f"what is {i}?", "answer": f"{i}"}) + "\n" for i in range(5)))
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev", "--data.path", mine,
                               "--eval.max_new_tokens", "3"], capsys)
    assert code == 0, err[-3000:]
    assert sum("which it does not all have: the column mapping starts from the defaults" in line
               for line in out.splitlines()) == 1
    metrics = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert metrics["num_examples"] == 5 and metrics["num_open"] == 5  # open answers: no choices column applied
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev2", "--data.path", mine,
                               "--data.choices_column", "nope"], capsys)  # a key the user gives is kept
    assert code == 2 and "column 'nope' (data.choices_column) not found" in one_error(err)
    # the built-in set itself at another place keeps the run's mapping: its held-out rows, as multiple choice,
    # in eval-heldout (found by a walkthrough: scored as open answers, replacing the run's own evaluation there)
    copy = shutil.copy(DEMO_DATA, tmp_path / "same.jsonl")
    code, out, err = evaluate(["--checkpoint", run, "--data.path", copy], capsys)
    assert code == 0 and "that column mapping is kept" in out and "the run's own data (its content hash)" in out, \
        err[-3000:]
    metrics = json.loads((run / "eval-heldout/metrics.json").read_text())
    assert metrics["num_examples"] == len(json.loads((run / "heldout_ids.json").read_text())["ids"])
    assert "accuracy" in metrics and "majority" in json.loads((run / "eval-heldout/comparison.json").read_text())


def test_two_evaluations_started_at_one_instant_never_both_write(tmp_path, monkeypatch):
    """Each evaluation looks for another's build again once its own is locked: of two that reserve one output
    at the same instant, the later to lock is refused and removes its build (they both wrote, the last
    results winning)."""
    from fittune import evaldir, rundir
    from fittune.errors import FittuneError

    out, real_claim, other = tmp_path / "ev", rundir._claim_locked_build, {}

    def claim_then_other_starts(path, kind, program):
        mine = real_claim(path, kind, program)
        other["build"] = out.with_name(".ev.tmp-99-other")  # it passed its first look too, and locked its build
        other["lock"] = real_claim(other["build"], kind, program)
        return mine

    # the other locks first: this one is refused at its second look and leaves nothing
    monkeypatch.setattr(rundir, "_claim_locked_build", claim_then_other_starts)
    with pytest.raises(FittuneError, match=r"ev is being written by evaluate.py \(pid"):
        evaldir.reserve_eval_dir(out, "evaluate.py")
    assert [p.name for p in tmp_path.iterdir()] == [".ev.tmp-99-other"]
    other["lock"].release()  # then killed: its build, lock free, is removed by the next evaluation
    monkeypatch.undo()
    mine = evaldir.reserve_eval_dir(out, "evaluate.py")
    assert [p.name for p in tmp_path.iterdir()] == [mine.build.name]
    with pytest.raises(FittuneError, match="ev is being written by evaluate.py"):  # a second one while it writes
        evaldir.reserve_eval_dir(out, "evaluate.py")
    mine.release()
    assert list(tmp_path.iterdir()) == []


def test_evaluations_of_one_run_go_on_at_once_but_never_into_one_directory(tmp_path, tiny_model_dir, capsys):
    """Two evaluations of one run share its lock; one whose output another is writing is refused at once
    (not after scoring), and an evaluation that fails removes its reserved build directory."""
    from fittune.evaldir import reserve_eval_dir

    run = make_run(tmp_path, tiny_model_dir)
    other = DirLock(run).acquire("evaluate.py", shared=True)  # another evaluation of this run, going on now
    busy = reserve_eval_dir(run / "eval-heldout", "evaluate.py")  # ... and writing the held-out results
    try:
        code, _, err = evaluate(["--checkpoint", run], capsys)
        assert code == 2 and f"{run / 'eval-heldout'} is being written by evaluate.py (pid" in one_error(err)
        code, out, err = evaluate(["--checkpoint", run, "--output_dir", run / "eval-again"], capsys)
        assert code == 0, err
        held_out = json.loads((run / "heldout_ids.json").read_text())["ids"]
        assert json.loads((run / "eval-again" / "metrics.json").read_text())["num_examples"] == len(held_out)
    finally:
        busy.release()
        other.release()
    # a killed evaluation's build directory (its lock free) is removed by the next one into the same place
    from fittune.rundir import claim_dir as claim

    left = claim(run / ".eval-heldout.tmp-1-dead", "eval")
    DirLock(left).acquire("evaluate.py").release()
    _change_heldout_row(run)  # refused after its output was reserved: the reservation is removed
    code, _, err = evaluate(["--checkpoint", run], capsys)
    assert code == 2 and "content hash differs" in one_error(err)
    assert sorted(p.name for p in run.iterdir() if "eval" in p.name) == ["eval-again"]
    # the run's own eval/ is what its training wrote: never replaced by evaluate.py (was: replaced)
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", run / "eval"], capsys)
    assert code == 2 and f"{run / 'eval'} is the run's own eval/" in one_error(err)
    # under a file: one clear error, and the run's lock is let go (was: a traceback on the main rank)
    (tmp_path / "afile").write_text("")
    code, _, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "afile" / "ev"], capsys)
    assert code == 2 and "could not write the evaluation's build directory" in one_error(err), err[-2000:]
    DirLock(run).acquire("train.py").release()


def test_a_linked_default_output_is_named_as_the_default(tmp_path, tiny_model_dir, capsys):
    """Was "--output_dir RUN/eval-heldout is a symbolic link" to a user who gave no --output_dir."""
    run = make_run(tmp_path, tiny_model_dir)
    (tmp_path / "elsewhere").mkdir()
    (run / "eval-heldout").symlink_to(tmp_path / "elsewhere")
    code, _, err = evaluate(["--checkpoint", run], capsys)
    assert code == 2 and (f"the default output directory (--output_dir chooses another) {run / 'eval-heldout'} is a "
                          f"symbolic link") in one_error(err)
    assert not any((tmp_path / "elsewhere").iterdir())


def test_another_models_evaluation_is_replaced_only_with_overwrite(tmp_path, tiny_model_dir, capsys):
    """The same evaluation again replaces its own results; results of another model are replaced only with
    --overwrite (was: replaced, said in one line), and never by another model inside a training run (was:
    run A's scores written into run B/eval-heldout, read as B's)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = make_run(tmp_path / "a", tiny_model_dir), make_run(tmp_path / "b", tiny_model_dir)
    assert evaluate(["--checkpoint", b], capsys)[0] == 0
    theirs = (b / "eval-heldout/evaluation.json").read_text()
    for out in (b / "eval-heldout", b / "eval-new"):  # inside run b: b's own models only, even with --overwrite
        code, _, err = evaluate(["--checkpoint", a, "--output_dir", out, "--overwrite"], capsys)
        assert code == 2 and f"is inside the training run {b}" in one_error(err) and not out.with_name("eval-new").exists()
    assert (b / "eval-heldout/evaluation.json").read_text() == theirs

    out = tmp_path / "results"
    assert evaluate(["--checkpoint", a, "--output_dir", out], capsys)[0] == 0
    code, out_text, _ = evaluate(["--checkpoint", a, "--output_dir", out], capsys)  # the same command again
    assert code == 0 and f"replacing the previous evaluation in {out}" in out_text
    first = (out / "evaluation.json").read_text()
    code, _, err = evaluate(["--checkpoint", b, "--output_dir", out], capsys)
    assert code == 2 and f"holds an evaluation of {a / 'final'}, not of {b / 'final'}" in one_error(err)
    assert "pass --overwrite" in one_error(err) and (out / "evaluation.json").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "results"]  # no build directory left
    assert evaluate(["--checkpoint", b, "--output_dir", out, "--overwrite"], capsys)[0] == 0
    assert json.loads((out / "evaluation.json").read_text())["model"] == str(b / "final")
    (out / "evaluation.json").unlink()  # results that do not say whose they are: not replaced by accident
    code, _, err = evaluate(["--checkpoint", b, "--output_dir", out], capsys)
    assert code == 2 and "does not say which model it scored" in one_error(err)
    moved = b.rename(b.with_name("moved"))  # a run moved with its evaluations re-evaluates into its own folder
    code, out_text, err = evaluate(["--checkpoint", moved], capsys)
    assert code == 0 and f"replacing the previous evaluation in {moved / 'eval-heldout'}" in out_text, err[-2000:]
    assert json.loads((moved / "eval-heldout/evaluation.json").read_text())["model"] == str(moved / "final")


def test_an_evaluation_is_never_replaced_with_files_it_did_not_write(tmp_path, tiny_model_dir, capsys):
    """Replacing an evaluation removes its folder whole: a folder that also holds the user's notes or a copy of
    the model being scored is refused, even with --overwrite (was: both deleted); a link above a run or a `..`
    never makes the run's own eval/ or eval_untrained/ another evaluation's (was: latest/eval replaced it)."""
    run = make_run(tmp_path, tiny_model_dir)
    out = tmp_path / "results"
    assert evaluate(["--checkpoint", run, "--output_dir", out], capsys)[0] == 0
    (out / "notes.md").write_text("mine")
    shutil.copytree(run / "final", out / "mymodel")
    for args in (["--checkpoint", run], ["--checkpoint", out / "mymodel", "--config", run / "config.yaml", "--overwrite"]):
        code, _, err = evaluate([*args, "--output_dir", out], capsys)
        assert code == 2 and "also holds mymodel/, notes.md, which fittune did not write" in one_error(err)
    assert (out / "notes.md").read_text() == "mine" and (out / "mymodel" / "config.json").is_file()
    (run / "eval").mkdir(exist_ok=True)
    (tmp_path / "latest").symlink_to(run)
    for given in (tmp_path / "latest" / "eval", run / "nothere" / ".." / "eval_untrained"):
        code, _, err = evaluate(["--checkpoint", run, "--output_dir", given, "--overwrite"], capsys)
        assert code == 2 and f"is the run's own {given.name}/" in one_error(err)
    assert not (run / "nothere").exists()


@pytest.mark.parametrize(("flag", "says"), [
    (["--train.lr", "1e-3"], "--train.lr is a training setting that evaluate.py does not read"),
    (["--lora.r", "4"], "--lora.r is a training setting that evaluate.py does not read"),
    (["--log_with", "none"], "--log_with is a training setting"),
    (["--eval.before_training", "true"], "--eval.before_training is a training setting"),
    (["--data.group_by_length", "false"], "--data.group_by_length is a training setting"),
    (["--resume", "auto"], "evaluate.py has no --resume"),
    (["--trust_checkpoint"], "evaluate.py has no --trust_checkpoint"),
    (["--overwrite", "maybe"], "--overwrite takes true or false"),
])
def test_a_flag_evaluation_does_not_read_is_refused(tmp_path, tiny_model_dir, capsys, flag, says):
    """Was: accepted and ignored (e.g. --train.micro_batch_size for --eval.batch_size)."""
    run = make_run(tmp_path, tiny_model_dir)
    code, _, err = evaluate(["--checkpoint", run, *flag], capsys)
    assert code == 2 and says in one_error(err)
    assert sorted(p.name for p in run.iterdir()) == sorted([".fittune", "config.yaml", "final", "heldout_ids.json"])


def test_other_data_is_compared_with_the_runs_training_majority(tmp_path, tiny_model_dir, capsys):
    """Was: no majority column for --data.path (no training rows). The baseline is the run's own: the most
    frequent answer letter among the rows it trained on (counted here from the file and heldout_ids.json),
    always predicted on the other rows; when the run's data changed, no baseline, said."""
    run = make_run(tmp_path, tiny_model_dir)
    rows = [json.loads(line) for line in (tmp_path / "qa.jsonl").read_text().splitlines()]
    held = set(json.loads((run / "heldout_ids.json").read_text())["ids"])  # row numbers (no data.id_column)
    letter = {r["id"]: "ABCD"[r["choices"].index(r["answer"])] for r in rows}
    trained = Counter(letter[r["id"]] for i, r in enumerate(rows) if str(i) not in held)
    top = min(c for c, n in trained.items() if n == max(trained.values()))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "id": f"o{r['id']}"}) + "\n" for r in rows[-30:]))
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev", "--data.path", other], capsys)
    assert code == 0 and "NOT the held-out split" in out, err[-3000:]
    majority = json.loads((tmp_path / "ev/comparison.json").read_text())["majority"]
    expected = sum(letter[r["id"]] == top for r in rows[-30:]) / 30
    assert majority["majority_class"] == top and majority["accuracy"] == pytest.approx(expected)

    (tmp_path / "qa.jsonl").write_text((tmp_path / "qa.jsonl").read_text().replace("?", "? "))
    code, out, _ = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev2", "--data.path", other], capsys)
    assert code == 0 and "no majority baseline for these rows: the run's data" in out and "changed" in out
    assert not (tmp_path / "ev2/comparison.json").exists()
    # a run with a test file: its held-out rows unchanged, its training file edited (the file's bytes tell)
    (tmp_path / "t").mkdir()
    (tmp_path / "t/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    with_test = make_run(tmp_path / "t", tiny_model_dir, **{"data.test_path": str(tmp_path / "t/test.jsonl")})
    (tmp_path / "t/qa.jsonl").write_text((tmp_path / "t/qa.jsonl").read_text().replace("?", "? "))
    code, out, _ = evaluate(["--checkpoint", with_test, "--output_dir", tmp_path / "ev3", "--data.path", other], capsys)
    assert code == 0 and "no majority baseline for these rows: the run's data" in out


def test_the_majority_baseline_is_the_runs_own_training_rows_as_they_were(tmp_path, tiny_model_dir, capsys):
    """The baseline's training rows are the run's training split as it trained on them (their saved digest):
    an edited training row leaves the run's held-out evaluation without a baseline, said (was: the edited
    file's majority, which flipped the verdict); a test file's baseline counts the run's training split, not
    the whole training file (was: its held-out rows too)."""
    run = make_run(tmp_path, tiny_model_dir, **{"data.max_length": 512})  # every row fits: all are counted
    rows = [json.loads(line) for line in (tmp_path / "qa.jsonl").read_text().splitlines()]
    held = set(json.loads((run / "heldout_ids.json").read_text())["ids"])  # row numbers (no data.id_column)
    trained = Counter("ABCD"[r["choices"].index(r["answer"])] for i, r in enumerate(rows) if str(i) not in held)
    top = min(c for c, n in trained.items() if n == max(trained.values()))  # ties: the first in sorted order
    test_file = tmp_path / "test.jsonl"  # rows of the run's own file: held out and trained alike
    test_file.write_text("".join(json.dumps({**r, "id": f"t{r['id']}"}) + "\n" for r in rows[:40]))
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev", "--data.test_path", test_file],
                              capsys)
    assert code == 0, err[-3000:]
    majority = json.loads((tmp_path / "ev/comparison.json").read_text())["majority"]
    assert majority["majority_class"] == top and majority["majority_of"] == sum(trained.values())
    assert f"the majority baseline always predicts '{top}' ({trained[top]} of the" in out

    edited = next(r for i, r in enumerate(rows) if str(i) not in held)  # a training row's answer: none held out
    edited["answer"] = next(c for c in edited["choices"] if c != edited["answer"])
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = evaluate(["--checkpoint", run, "--output_dir", tmp_path / "ev2"], capsys)
    assert code == 0 and "no majority baseline for these rows: the run's data" in out and "changed" in out, err[-2000:]
    assert "majority" not in json.loads((tmp_path / "ev2/metrics.json").read_text()) and \
        not (tmp_path / "ev2/comparison.json").exists()


def test_a_run_with_a_hub_attention_kernel_keeps_its_majority_baseline(tmp_path, tiny_model_dir):
    """The run's training rows are only read: its saved Hub kernel (which needs trust to load a model) does not
    cost the baseline (the review found "saved config cannot be read ... pass --model.trust_remote_code")."""
    from fittune.checkpoints import resolve_checkpoint
    from fittune.evaluate_cli import SavedRun, run_training_rows

    run = make_run(tmp_path, tiny_model_dir, **{"model.attn_implementation": "kernels-community/flash-attn2",
                                               "model.trust_remote_code": True})
    said = []
    train = run_training_rows(SavedRun.read(resolve_checkpoint(str(run))), False, said.append)
    assert said == [] and len(train) == 380  # the demo's 400 rows, 20 held out


def test_a_model_without_a_run_is_compared_with_its_recipes_training_rows(tmp_path, tiny_model_dir, capsys):
    """A model of no fittune run, scored on a recipe's test file: the baseline is the recipe's training file's
    majority (the review found it dropped, unsaid, once baselines came from runs)."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    test = tmp_path / "test.jsonl"
    test.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:20]))
    cfg = build_config(None, {"model.name_or_path": str(model), "data.path": str(DEMO_DATA), "data.test_path": str(test),
                              "data.choices_column": "choices", "data.max_length": 96, "eval.batch_size": 8})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(to_yaml(cfg))
    code, out, err = evaluate(["--checkpoint", model, "--config", recipe, "--output_dir", tmp_path / "ev"], capsys)
    assert code == 0, err[-3000:]
    assert "the majority baseline always predicts" in out
    assert "majority" in json.loads((tmp_path / "ev/comparison.json").read_text())


def test_a_tie_for_the_majority_is_broken_by_name_and_said():
    """Was: the class met first in the data (Counter order), unsaid; on these rows A or B gives 0.75 or 0.25."""
    from fittune.metrics import majority_baseline, majority_note

    for train in (["B", "A", "B", "A", "C"], ["A", "B", "A", "B", "C"]):
        base = majority_baseline(train, ["A", "A", "A", "B"])
        assert (base["majority_class"], base["majority_ties"], base["accuracy"]) == ("A", ["B"], 0.75)
    assert "always predicts 'A' (2 of the 5 training rows); tied with 'B'" in majority_note(base)
    assert "tied" not in majority_note(majority_baseline(["A", "A", "B"], ["B"]))


def test_an_older_runs_saved_command_keys_do_not_stop_its_evaluation(tmp_path, tiny_model_dir, capsys):
    """A run saved before overwrite / resume / trust_checkpoint became command-only has them in config.yaml (a
    resumed one: `resume: auto`): evaluate.py, which never acts on them, scores it (the review found it refused,
    with no flag to get past); a typo is still the config's did-you-mean error, not a training setting."""
    run = make_run(tmp_path, tiny_model_dir)
    with open(run / "config.yaml", "a") as f:
        f.write("resume: auto\noverwrite: true\ntrust_checkpoint: true\n")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[-12:]))
    code, out, err = evaluate(["--checkpoint", run, "--data.path", other], capsys)
    assert code == 0, err[-3000:]
    [named] = run.glob("eval-other-*")
    assert "majority" in json.loads((named / "comparison.json").read_text())  # the run's training rows were read
    code, _, err = evaluate(["--checkpoint", run, "--train.mixed_precison", "no"], capsys)
    assert code == 2 and "did you mean" in one_error(err).lower() and "training setting" not in one_error(err)
