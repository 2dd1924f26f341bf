"""A user's work is never lost (issue: trustworthy output directory), through the real train.py:

* a rerun into a finished run, a refused resume (another seed, changed data) and a foreign directory change
  nothing, byte for byte; --overwrite replaces the old run only once the new one has finished;
* two runs on one directory: the second is refused at once with one line naming the holder; the log has no
  duplicated step; the moved run, its log torn by a crash, resumes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, child_env, read_log, run_python, write_config


def _tree(d: Path) -> dict[str, str]:
    """Every file below d with the sha256 of its bytes (the byte-for-byte state of a run directory)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture
def recipe(tmp_path, tiny_model_dir):
    """A 2-step tiny run on a data file of its own (so the test can change a row)."""
    data = tmp_path / "qa.jsonl"
    shutil.copy(ROOT / "fittune/demo/ai_research_qa.jsonl", data)

    def make(out: Path, steps: int = 2, **train) -> Path:
        return write_config(tmp_path / f"{out.name}.yaml", {
            "output_dir": str(out), "seed": 0, "log_with": "none", "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"path": str(data), "choices_column": "choices", "max_length": 96},
            "train": {"micro_batch_size": 4, "max_steps": steps, "lr": 1e-3, "warmup_ratio": 0.0, **train},
            "eval": {"batch_size": 16, "max_new_tokens": 0}})

    make.data = data
    return make


def _refused(proc, pattern: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("fittune: error:")]
    assert len(errors) == 1 and pattern in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_reruns_and_refused_resumes_change_nothing_and_overwrite_replaces(tmp_path, recipe):
    out = tmp_path / "run"
    cfg = recipe(out, save_steps=1)
    first = run_python("train.py", ["--config", cfg])
    assert first.returncode == 0, first.stderr[-3000:]
    before = _tree(out)
    assert "final/adapter_config.json" in before or "final/model.safetensors" in before

    _refused(run_python("train.py", ["--config", cfg]), "already holds a finished run")
    _refused(run_python("train.py", ["--config", cfg, "--resume", "auto", "--seed", "7"]), "cannot resume")
    lines = recipe.data.read_text().splitlines()
    row = json.loads(lines[5])
    row["question"] = row["question"] + " (edited)"
    recipe.data.write_text("\n".join(lines[:5] + [json.dumps(row)] + lines[6:]) + "\n")
    _refused(run_python("train.py", ["--config", cfg, "--resume", "auto"]), "the data file's bytes differ; the training "
             "rows differ); the data changed since the checkpoint")
    assert _tree(out) == before  # byte for byte, no file added or removed

    again = run_python("train.py", ["--config", cfg, "--overwrite"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the previous run was moved to" in again.stdout and "removed the replaced run" in again.stdout
    assert not list(tmp_path.glob("run.replaced-*"))
    assert _tree(out)["config.yaml"] != before["config.yaml"]  # the new run (edited data) replaced the old

    # the run's config.yaml, reused as a recipe, never replaces it (was: it saved `overwrite: true`, so
    # `--config RUN/config.yaml --train.lr X` replaced and removed the finished run), nor does a recipe's line
    saved = (out / "config.yaml").read_text()
    assert not any(line.startswith(("overwrite:", "resume:", "trust_checkpoint:")) for line in saved.splitlines())
    after = _tree(out)
    _refused(run_python("train.py", ["--config", out / "config.yaml", "--train.lr", "1e-2"]),
             "already holds a finished run")
    asks = tmp_path / "asks.yaml"
    asks.write_text(saved + "overwrite: true\n")
    _refused(run_python("train.py", ["--config", asks]), f"{asks} sets overwrite: True, which only the command line "
             f"may ask for (--overwrite)")
    assert _tree(out) == after and not list(tmp_path.glob("run.replaced-*"))


def test_foreign_directory_is_refused_untouched(tmp_path, recipe):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("chapter 1")
    (mine / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = _tree(mine)
    for extra in ([], ["--overwrite"]):
        _refused(run_python("train.py", ["--config", recipe(mine)] + extra), "not created by fittune")
    assert _tree(mine) == before and sorted(p.name for p in mine.iterdir()) == ["sub", "thesis.tex"]


def _wait_for_log(path: Path, proc, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.is_file() and path.read_text().strip():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError("the first run never logged a step")


def test_one_run_per_directory_then_a_moved_torn_run_resumes(tmp_path, recipe):
    out = tmp_path / "run"
    # long enough (the tiny model runs ~140 steps/s) that the run is still in its loop, with its signal
    # handler, when it is suspended after its first logged step
    cfg = recipe(out, steps=600)
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg)], cwd=ROOT,
                             env=child_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_log(out / "train_log.jsonl", first)
        psutil.Process(first.pid).suspend()  # hold it mid-run while the second one tries
        second = run_python("train.py", ["--config", cfg, "--resume", "auto"])
        _refused(second, f"{out} is in use by train.py (pid {first.pid} on ")
        psutil.Process(first.pid).resume()
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err[-3000:]

    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    out.rename(moved)
    log = moved / "train_log.jsonl"
    good = log.read_text()
    log.write_text(good.replace("\n", "\nnot json\n", 1))  # damaged, not torn: refused before any write
    before = _tree(moved)  # (was: config.yaml rewritten, partial checkpoints removed, then the refusal)
    _refused(run_python("train.py", ["--config", cfg, "--output_dir", moved, "--resume", "auto"]),
             "train_log.jsonl:2 is not valid JSON and is not the last line")
    assert _tree(moved) == before
    log.write_text(good)
    with open(moved / "train_log.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 0.')  # a crash mid-append
    resumed = run_python("train.py", ["--config", cfg, "--output_dir", moved, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dropped a last line torn by a crash" in resumed.stdout
    assert [r["step"] for r in read_log(moved)] == list(range(1, 601))  # no duplicated or missing step


def test_resume_auto_of_a_finished_run_without_checkpoints_changes_nothing(tmp_path, recipe):
    """train.save_steps 0 (the default): a requeue loop's --resume auto of the finished run exits 0 and
    changes nothing (was: an error, exit 2, that a scheduler counts as a failed job)."""
    out = tmp_path / "run"
    cfg = recipe(out)
    assert run_python("train.py", ["--config", cfg]).returncode == 0
    before = _tree(out)
    again = run_python("train.py", ["--config", cfg, "--resume", "auto"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{out} has finished (final/ and eval/ are written): nothing to resume" in again.stdout
    assert _tree(out) == before
