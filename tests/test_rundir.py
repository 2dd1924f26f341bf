"""fittune.rundir in-process: ownership marker, the directory lock (also across processes and after kill -9),
atomic writes, the atomic directory swap, torn log lines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fittune import runlog
from fittune.errors import FittuneError
from fittune.rundir import (
    MARKER,
    STATE_FILE,
    DirInUse,
    DirLock,
    RunDir,
    atomic_write_text,
    check_writable_dir,
    claim_dir,
    foreign_entries,
    inspect_output_dir,
    publish_dir,
    remove_owned,
    write_guard,
)


def _user_dir(tmp_path) -> Path:
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "thesis.tex").write_text("my thesis")
    (d / "sub" / "data.csv").write_text("a,b\n")
    return d


def test_foreign_non_empty_directory_is_refused_and_never_deleted(tmp_path):
    d = _user_dir(tmp_path)
    with pytest.raises(FittuneError, match="not empty and was not created by fittune"):
        check_writable_dir(d, "--output_dir")
    with pytest.raises(FittuneError, match="refusing to delete"):
        remove_owned(d, "train")
    assert (d / "thesis.tex").read_text() == "my thesis" and (d / "sub" / "data.csv").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    check_writable_dir(empty, "--output_dir")  # an empty directory may be adopted
    claim_dir(empty, "eval")
    assert json.loads((empty / MARKER).read_text())["created_by"] == "fittune"


def test_a_directory_holding_a_run_needs_resume_or_overwrite(tmp_path):
    out = claim_dir(tmp_path / "run", "train")
    atomic_write_text(out / "config.yaml", "x: 1\n")
    with pytest.raises(FittuneError, match="already holds a started run.*--resume auto.*--overwrite"):
        inspect_output_dir(out, None, False)
    (out / "final").mkdir()
    # finished without checkpoints: nothing to continue, so --resume is not offered
    with pytest.raises(FittuneError, match="finished run: it has no checkpoint to continue from.*--overwrite"):
        inspect_output_dir(out, None, False)
    with pytest.raises(FittuneError, match="stopped while finishing, without checkpoints.*evaluate.py --checkpoint"):
        inspect_output_dir(out, "auto", False)  # final/ but no eval/: the evaluation is what is left
    step = claim_dir(out / "checkpoints" / "step-00000002", "checkpoint")
    atomic_write_text(step / STATE_FILE, "{}")
    with pytest.raises(FittuneError, match="already holds a finished run: continue it with --resume auto"):
        inspect_output_dir(out, None, False)
    assert not inspect_output_dir(out, "auto", False).complete  # its evaluation is not written yet
    claim_dir(out / "eval", "eval")
    atomic_write_text(out / "eval" / "metrics.json", "{}")
    with pytest.raises(FittuneError, match="finished run: evaluate it with evaluate.py --checkpoint"):
        inspect_output_dir(out, None, False)
    assert inspect_output_dir(out, "auto", False).complete
    assert inspect_output_dir(out, "auto", False).holds_run
    with pytest.raises(FittuneError, match="contradict"):
        inspect_output_dir(out, "auto", True)


def test_overwrite_moves_the_old_run_aside_until_finish(tmp_path):
    out = claim_dir(tmp_path / "run", "train")
    atomic_write_text(out / "config.yaml", "old\n")
    check = inspect_output_dir(out, None, True)
    lock = RunDir.lock_existing(check.path, "test")
    run = RunDir.claim(check, lock, True, "test")
    assert run.aside is not None and (run.aside / "config.yaml").read_text() == "old\n"
    assert not (out / "config.yaml").exists() and (out / MARKER).is_file()
    aside = run.aside
    assert run.finish().removed == [aside] and not run.aside and not list(tmp_path.glob("run.replaced-*"))
    run.release()


def _claim(out, overwrite: bool, resume: str | None = None) -> RunDir:
    check = inspect_output_dir(out, resume, overwrite)
    return RunDir.claim(check, RunDir.lock_existing(check.path, "test"), overwrite, "test")


def test_a_replaced_run_is_removed_by_whichever_run_finishes_the_replacement(tmp_path):
    """Was: an --overwrite stopped part-way (Ctrl-C, then --resume auto, or a second --overwrite) left the old
    run at <dir>.replaced-* for good. The replacing run records it; the run that finishes removes it, and
    nothing else the record may name."""
    out = claim_dir(tmp_path / "run", "train")
    atomic_write_text(out / "config.yaml", "first\n")
    other = claim_dir(tmp_path / "other", "train")
    first = _claim(out, overwrite=True)  # stopped before it finished: no finish()
    first.release()
    assert [p.read_text() for p in (r / "config.yaml" for r in first.replaced())] == ["first\n"]
    atomic_write_text(out / "config.yaml", "second\n")
    with pytest.raises(FittuneError, match=r"already holds a started run \(the run it is replacing is kept aside in "
                                           r".*run\.replaced-.* until it finishes\)"):  # was: not said
        inspect_output_dir(out, None, False)
    resumed = _claim(out, overwrite=False, resume="auto")  # --resume auto of the replacing run
    assert resumed.replaced() == first.replaced()
    resumed.release()
    second = _claim(out, overwrite=True)  # or yet another --overwrite: it carries the first one along
    assert len(second.replaced()) == 2
    records = json.loads((out / ".fittune.replaced").read_text()) + ["other", "../other"]
    atomic_write_text(out / ".fittune.replaced", json.dumps(records))
    held = DirLock(second.replaced()[0]).acquire("evaluate.py")  # someone evaluates the replaced run
    cleanup = second.finish()
    assert len(cleanup.removed) == 1 and "in use by evaluate.py" in cleanup.kept[0] and held.path.is_dir()
    held.release()
    assert second.finish().removed == [held.path]  # the record stayed: a later finish removes it
    second.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "run"]
    assert other.is_dir() and not (out / ".fittune.replaced").exists()


_HOLD = """
import sys, time
from pathlib import Path
from fittune.rundir import DirLock
DirLock(Path(sys.argv[1])).acquire("holder.py")
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path):
    out = claim_dir(tmp_path / "run", "train")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FittuneError, match=rf"{out} is in use by holder.py \(pid {holder.pid} on "):
            DirLock(out).acquire("second")
        # a run training there now: said to be in use (was: offered --resume auto and --overwrite, both refused)
        from conftest import run_python

        atomic_write_text(out / "config.yaml", "output_dir: x\n")
        err = run_python("train.py", ["--output_dir", out]).stderr
        assert f"{out} is in use by holder.py" in err and "already holds" not in err, err[-2000:]
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the kernel drops the lock
        holder.wait()
    lock = DirLock(out).acquire("third")
    assert json.loads((out / ".fittune.lock").read_text())["program"] == "third"
    lock.release()


def test_publish_dir_swaps_atomically_and_keeps_no_old_copy(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "w").write_text("old")
    tmp = tmp_path / "final.tmp"
    tmp.mkdir()
    (tmp / "w").write_text("new")
    publish_dir(tmp, final)
    assert (final / "w").read_text() == "new" and not tmp.exists() and not (tmp_path / "final.old").exists()


def test_a_removal_cut_short_leaves_a_directory_still_marked_ours(tmp_path, monkeypatch):
    """fittune removes its directories marker last: a kill part-way through (here: the second file's unlink
    fails) leaves the rest still marked, so the next run removes it instead of refusing it as foreign."""
    d = claim_dir(tmp_path / "step-00000004.tmp", "checkpoint")
    for name in "abc":
        (d / name).write_text(name)
    (d / "sub").mkdir()
    (d / "sub" / "x").write_text("x")
    real_unlink, calls = Path.unlink, []

    def dying_unlink(self, missing_ok=False):
        calls.append(self.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the kill
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with pytest.raises(KeyboardInterrupt):
        remove_owned(d, "checkpoint")
    monkeypatch.undo()
    assert MARKER not in calls and (d / MARKER).is_file()
    remove_owned(d, "checkpoint")  # the next run's sweep
    assert not d.exists()


def test_a_claim_cut_short_is_adopted_but_a_users_file_beside_it_is_not(tmp_path):
    """A kill while `claim_dir` writes the marker leaves only the marker's temporary file: the next run adopts
    the directory (not "not created by fittune") and drops that file; one user file more and it is refused."""
    run = tmp_path / "run"
    run.mkdir()
    (run / f".{MARKER}.tmp-4242").write_text('{"created_by": "fitt')
    check_writable_dir(run, "output_dir")
    claim_dir(run, "train")
    assert [p.name for p in run.iterdir()] == [MARKER]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / f".{MARKER}.tmp-4242").write_text("")
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FittuneError, match="not empty and was not created by fittune"):
        check_writable_dir(mine, "output_dir")


def test_a_link_to_a_fittune_directory_is_never_emptied(tmp_path):
    """A user's link (e.g. checkpoints/step-N -> an archived checkpoint) is refused, and the target kept."""
    archive = claim_dir(tmp_path / "archive", "checkpoint")
    (archive / "model.safetensors").write_text("weights")
    link = tmp_path / "step-00000001"
    link.symlink_to(archive, target_is_directory=True)
    with pytest.raises(FittuneError, match="symbolic link"):
        remove_owned(link, "checkpoint")
    assert (archive / "model.safetensors").read_text() == "weights" and link.is_symlink()


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old\n")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FittuneError, match="could not write config.yaml .*No space left.*old one is intact"):
        with write_guard("config.yaml", "the old one is intact"):
            atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_torn_last_log_line_is_dropped_and_said(tmp_path):
    log = tmp_path / "train_log.jsonl"
    for step in (1, 2, 3):
        runlog.append(log, {"step": step, "loss": 1.0})
    with open(log, "a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-append
    repair = runlog.truncate_after(log, 2)
    assert (repair.kept, repair.dropped_after_checkpoint, repair.torn_line) == (2, 1, '{"step": 4, "lo')
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(FittuneError, match="is not the last line"):
        runlog.read_rows(tmp_path / "bad.jsonl")


def test_lock_is_released_by_a_finished_holder(tmp_path):
    out = claim_dir(tmp_path / "run", "train")
    DirLock(out).acquire("a").release()
    t0 = time.monotonic()
    DirLock(out).acquire("b").release()
    assert time.monotonic() - t0 < 1.0


def test_output_dir_is_never_inside_a_fittune_directory_nor_another_kind_of_one(tmp_path):
    """A run inside another (its checkpoints/, final/, eval/ or anywhere below) could be replaced or removed by
    that run's own saves, and a fittune directory made for something else (an evaluation, a checkpoint) is not a
    run to resume or replace: each is refused before anything is written, with one line."""
    run = claim_dir(tmp_path / "run", "train")
    ckpt = claim_dir(run / "checkpoints/step-00002000", "checkpoint")
    evaluation = claim_dir(tmp_path / "eval-dev", "eval")
    (evaluation / "metrics.json").write_text("{}")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for inside in (ckpt, run / "final", run / "eval" / "sub", run / "new"):
        for resume, overwrite in ((None, False), (None, True), ("auto", False)):
            with pytest.raises(FittuneError, match=rf"output_dir .* is inside {run}, a fittune train directory"):
                inspect_output_dir(inside, resume, overwrite)
    for resume, overwrite in ((None, False), (None, True), ("auto", False)):
        with pytest.raises(FittuneError, match="is a fittune eval directory, not a training run"):
            inspect_output_dir(evaluation, resume, overwrite)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert not inspect_output_dir(tmp_path / "beside", None, False).exists  # a sibling is fine


def test_removal_checks_what_fittune_made_the_directory_for(tmp_path):
    checkpoint = claim_dir(tmp_path / "step-00000001", "checkpoint")
    nested_run = claim_dir(tmp_path / "step-00000002", "train")
    with pytest.raises(FittuneError, match="it is a fittune train directory, not the checkpoint directory"):
        remove_owned(nested_run, "checkpoint")
    assert nested_run.is_dir()
    remove_owned(checkpoint, "checkpoint")
    assert not checkpoint.exists()


def test_published_files_are_readable_like_any_new_file(tmp_path):
    """safetensors writes owner-only files (0600): a published directory gets the umask's permissions."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        tmp = tmp_path / "final.tmp"
        tmp.mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text("{}")
        (tmp / "zero_to_fp32.py").write_text("print()")
        (tmp / "zero_to_fp32.py").chmod(0o700)  # DeepSpeed makes its recovery script executable
        publish_dir(tmp, tmp_path / "final")
    finally:
        os.umask(old)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "final").iterdir()} == {
        "model.safetensors": 0o644, "config.json": 0o644, "zero_to_fp32.py": 0o755}


def test_overwrite_never_deletes_what_fittune_did_not_write_inside_a_run(tmp_path):
    """Was: --overwrite removed the whole old run, notes and data files a user had put in it included. Now the
    run is replaced only when everything in it is fittune's; otherwise the names are listed and nothing moves."""
    out = claim_dir(tmp_path / "run", "train")
    for name in ("config.yaml", "train_log.jsonl", "ranks.json", f".config.yaml.tmp-{os.getpid()}"):
        atomic_write_text(out / name, "x\n")
    claim_dir(out / "eval-mmlu-1234abcd", "eval")  # evaluate.py's output inside the run: fittune's
    (out / "eval-heldout.tmp").mkdir()  # an evaluate.py killed before it marked its build directory
    claim_dir(out / "checkpoints" / "step-00000004", "checkpoint")
    assert foreign_entries(out) == []
    (out / "checkpoints" / "step-best").mkdir()  # a checkpoint copied aside by the user
    assert foreign_entries(out) == ["checkpoints/step-best"]
    (out / "checkpoints" / "step-best").rmdir()
    # copies under fittune's own names carry its marker, not the directory's identity: the user's (was: deleted
    # by --overwrite with the run), as are names that only look like fittune's temporary ones
    for copy in ("checkpoints/step-00000001", "checkpoints/.step-best", "eval-mine", ".eval-x.tmp-1-0123abcd"):
        shutil.copytree(out / ("checkpoints/step-00000004" if "step" in copy else "eval-mmlu-1234abcd"), out / copy)
    (out / ".notes.tmp-old").mkdir()
    (out / ".plan.old-1").write_text("mine")
    assert foreign_entries(out) == [".eval-x.tmp-1-0123abcd/", ".notes.tmp-old/", ".plan.old-1", "eval-mine/",
                                    "checkpoints/.step-best", "checkpoints/step-00000001"]
    with pytest.raises(FittuneError, match=r"also holds .*checkpoints/step-00000001, which fittune did not write"):
        _claim(out, overwrite=True)
    assert (out / "checkpoints/step-00000001").is_dir() and (out / ".plan.old-1").read_text() == "mine"
    for copy in ("checkpoints/step-00000001", "checkpoints/.step-best", "eval-mine", ".eval-x.tmp-1-0123abcd",
                 ".notes.tmp-old", ".plan.old-1"):
        shutil.rmtree(out / copy) if (out / copy).is_dir() else (out / copy).unlink()
    assert foreign_entries(out) == []
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    with pytest.raises(FittuneError, match=r"also holds data/, notes.txt, which fittune did not write: move them out"):
        _claim(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and not list(tmp_path.glob("run.replaced-*"))
    assert _claim(out, overwrite=False, resume="auto").path == out  # resuming leaves them where they are


def test_a_file_added_to_a_replaced_run_keeps_it(tmp_path):
    out = claim_dir(tmp_path / "run", "train")
    atomic_write_text(out / "config.yaml", "old\n")
    run = _claim(out, overwrite=True)
    aside = run.aside
    (aside / "notes.txt").write_text("written after it was moved aside")
    cleanup = run.finish()
    assert cleanup.removed == [] and "notes.txt" in cleanup.kept[0] and (aside / "notes.txt").is_file()
    run.release()


def test_links_in_a_run_are_refused_before_fittune_writes_through_them(tmp_path):
    """A link where fittune writes (final/, eval/, its lock file) would have fittune replace, mark or truncate
    what it points to: each is refused with the link named, and the target is unchanged."""
    mine = _user_dir(tmp_path)
    out = claim_dir(tmp_path / "run", "train")
    atomic_write_text(out / "config.yaml", "x\n")
    (out / "eval").symlink_to(mine, target_is_directory=True)
    for resume, overwrite in (("auto", False), (None, True)):
        with pytest.raises(FittuneError, match=r"symbolic links \(eval@\)"):
            inspect_output_dir(out, resume, overwrite)
    (out / "eval").unlink()
    emptied = claim_dir(tmp_path / "emptied", "train")  # a run removed but for its marker: no run, a link
    (emptied / "tensorboard").symlink_to(mine, target_is_directory=True)
    for resume, overwrite in ((None, False), ("auto", False), (None, True)):  # was: written through
        with pytest.raises(FittuneError, match=r"symbolic links \(tensorboard@\)"):
            inspect_output_dir(emptied, resume, overwrite)
    tmp = claim_dir(tmp_path / "final.tmp", "final")
    (tmp_path / "final").symlink_to(mine, target_is_directory=True)
    with pytest.raises(FittuneError, match="is a symbolic link"):
        publish_dir(tmp, tmp_path / "final")
    victim = mine / "thesis.tex"
    lock_dir = claim_dir(tmp_path / "locked", "train")
    (lock_dir / ".fittune.lock").symlink_to(victim)
    with pytest.raises(FittuneError, match="symbolic link"):
        DirLock(lock_dir).acquire("test")
    assert victim.read_text() == "my thesis" and not (mine / MARKER).exists()
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == ["sub", "sub/data.csv", "thesis.tex"]


def test_a_kill_right_after_the_swap_leaves_a_tmp_fittune_removes(tmp_path, monkeypatch):
    """publish_dir marks the old directory before swapping it out (final/ carries no marker once published):
    killed right after the swap, <name>.tmp holds the old one, still fittune's, removed by the next attempt."""
    from fittune import rundir
    from fittune.rundir import claim_build_dir

    final = tmp_path / "final"
    final.mkdir()
    (final / "w").write_text("old")  # a published final/: no marker
    tmp = claim_dir(tmp_path / "final.tmp", "final")
    (tmp / "w").write_text("new")

    def killed(path):
        raise KeyboardInterrupt  # stands for the kill between the swap and the removal

    monkeypatch.setattr(rundir, "remove_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        publish_dir(tmp, final)
    monkeypatch.undo()
    assert (final / "w").read_text() == "new" and (tmp / "w").read_text() == "old"
    again = claim_build_dir(tmp, "final", "refused")  # the next save: the leftover is fittune's
    assert [p.name for p in again.iterdir()] == [MARKER]


def test_only_fittunes_step_names_are_checkpoints(tmp_path):
    from fittune.rundir import STATE_FILE, complete_checkpoints

    out = claim_dir(tmp_path / "run", "train")
    for name in ("step-00000002", "step-00000010", "step-best", "step-00000004.bak"):
        (out / "checkpoints" / name).mkdir(parents=True)
        (out / "checkpoints" / name / STATE_FILE).write_text("{}")
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002", "step-00000010"]


def test_seal_verifies_here_and_not_in_a_copy_or_under_another_key(tmp_path, monkeypatch):
    import shutil

    from fittune.rundir import sealed

    run = claim_dir(tmp_path / "run", "train")
    assert sealed(run)
    moved = tmp_path / "moved"
    run.rename(moved)
    assert sealed(moved)  # same filesystem, same directory
    shutil.copytree(moved, tmp_path / "copy")
    assert not sealed(tmp_path / "copy")
    other = tmp_path / "other"
    other.mkdir()
    (other / MARKER).write_text((moved / MARKER).read_text())  # a marker copied into another directory
    assert not sealed(other)
    # a new directory in the place of a deleted one (often with the same inode number) does not inherit it
    again = claim_dir(tmp_path / "again", "train")
    inode, marker = again.stat().st_ino, (again / MARKER).read_text()  # a marker once shared
    (again / MARKER).unlink()
    again.rmdir()
    again.mkdir()
    (again / MARKER).write_text(marker)
    assert not sealed(again), f"inode reused: {again.stat().st_ino == inode}"
    from fittune import rundir

    born = rundir._birth_time(moved)
    if born is not None:  # the filesystem records birth times: the seal depends on it, not on the inode alone
        monkeypatch.setattr(rundir, "_birth_time", lambda path: [born[0], born[1] + 1])
        assert not sealed(moved)
        monkeypatch.undo()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "elsewhere"))
    assert not sealed(moved)  # another account's key


def test_a_link_loop_is_one_clear_error(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for path in (loop, loop / "sub"):
        with pytest.raises(FittuneError, match="cannot be resolved.*symbolic link"):
            inspect_output_dir(path, None, False)


def test_a_linked_output_dir_is_named_as_a_link(tmp_path):
    """Was: a link to the user's own run was refused as "not created by fittune (no .fittune marker)"."""
    run = claim_dir(tmp_path / "run", "train")
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    with pytest.raises(FittuneError, match=f"is a symbolic link \\(to {run}\\): give that directory's own path"):
        inspect_output_dir(tmp_path / "link", "auto", False)


def test_readers_share_the_lock_and_a_writer_is_told_who_holds_it(tmp_path):
    """Evaluations and exports of one run go on at once (shared locks); a run resumed meanwhile is refused and
    told that readers hold it (not a dead writer's stale note); a reader is refused by a writer, named."""
    out = claim_dir(tmp_path / "run", "train")
    writer = DirLock(out).acquire("train.py")
    with pytest.raises(DirInUse, match=r"in use by train\.py \(pid "):
        DirLock(out).acquire("evaluate.py", shared=True)
    writer.release()
    note = json.dumps({"program": "train.py", "pid": 1, "host": "h", "since": "t"})
    (out / ".fittune.lock").write_text(note)  # as a writer killed by kill -9 leaves its note
    readers = [DirLock(out).acquire("evaluate.py", shared=True) for _ in range(2)]
    with pytest.raises(DirInUse) as refused:
        DirLock(out).acquire("train.py")
    assert refused.value.holder == "another fittune process that reads it (an evaluate.py or an export)"
    readers[0].release()
    assert (out / ".fittune.lock").read_text() == note  # a reader writes nothing, and erases nothing
    with pytest.raises(DirInUse):
        DirLock(out).acquire("train.py")  # the second reader still holds it
    readers[1].release()
    DirLock(out).acquire("train.py").release()


def test_rename_noreplace_never_replaces_what_appeared(tmp_path):
    """The export's last step: an empty directory that appeared at the destination meanwhile is not replaced
    (a plain rename would replace it)."""
    from fittune.rundir import rename_noreplace

    (tmp_path / "built").mkdir()
    (tmp_path / "built" / "model.safetensors").write_text("weights")
    (tmp_path / "appeared").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "built", tmp_path / "appeared")
    assert list((tmp_path / "appeared").iterdir()) == [] and (tmp_path / "built" / "model.safetensors").is_file()
    assert rename_noreplace(tmp_path / "built", tmp_path / "new")  # renameat2 is there on Linux
    assert (tmp_path / "new" / "model.safetensors").read_text() == "weights" and not (tmp_path / "built").exists()


def test_the_current_directory_and_names_too_long_to_build_beside_are_refused_at_once(tmp_path, monkeypatch):
    """Found by a review: `--output_dir .` was a ValueError traceback (a path with no name to build beside), and
    a 220-byte run name trained, then failed on --overwrite or evaluate.py ("free disk space"). Only what is
    built beside itself is refused: a new run in the current directory, or a resume there, goes on."""
    from fittune.evaldir import check_eval_dir

    monkeypatch.chdir(tmp_path)
    for check in (lambda p: inspect_output_dir(p, None, True), check_eval_dir):
        with pytest.raises(FittuneError, match=r" \. is the current directory, which this would replace"):
            check(Path("."))
        with pytest.raises(FittuneError, match=r"its name is 220 bytes long; .* at most 207 bytes"):
            check(tmp_path / ("r" * 220))
    assert list(tmp_path.iterdir()) == []
    assert inspect_output_dir(Path("."), None, False).path == Path(".")  # a new run here
    long = claim_dir(tmp_path / ("r" * 220), "train")  # a run of an earlier fittune with such a name resumes
    assert inspect_output_dir(long, "auto", False).path == long


def test_a_replaced_directory_keeps_its_permissions_and_group(tmp_path):
    """Found by a review: a user's empty `chmod 2750` directory, replaced by the results, came back 0755."""
    import stat

    final = tmp_path / "ev"
    final.mkdir()
    final.chmod(0o2750)
    group = next(g for g in (100, 1, 2, 3) if g != final.stat().st_gid)
    os.chown(final, -1, group)  # a shared group's setgid directory (as root here: any group)
    build = claim_dir(tmp_path / ".ev.tmp-1-0123abcd", "eval")
    (build / "metrics.json").write_text("{}")
    publish_dir(build, final)
    assert stat.S_IMODE(final.stat().st_mode) == 0o2750 and (final / "metrics.json").is_file()
    # its files are the group's too, as files made in it would be (was: the build's group, beside it)
    assert {p.stat().st_gid for p in [final, *final.iterdir()]} == {group}
    out = claim_dir(tmp_path / "run", "train")
    atomic_write_text(out / "config.yaml", "old\n")
    out.chmod(0o700)
    _claim(out, overwrite=True)  # the old run moved aside, a new directory in its place
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_a_checkpoint_removal_cut_short_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    """Found by a review: a kill during rotation's removal could leave a step-N/ with its trainer_state.json and
    without its weights, listed as complete (resumable). Its state file goes first now."""
    from fittune.rundir import complete_checkpoints, remove_partial_checkpoints, remove_tree

    out = claim_dir(tmp_path / "run", "train")
    step = claim_dir(out / "checkpoints" / "step-00000002", "checkpoint")
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "config.yaml",
                 "adapter_optimizer.safetensors", "a.bin", "b.bin", "trainer_state.json"):
        (step / name).write_bytes(b"x")
    assert complete_checkpoints(out) == [step]
    real_unlink = Path.unlink

    def killed_after_the_state_file(self, *args, **kwargs):
        if self.name != "trainer_state.json":
            raise KeyboardInterrupt  # the kill, at the first weights file
        real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_after_the_state_file)
    with pytest.raises(KeyboardInterrupt):
        remove_tree(step)
    monkeypatch.undo()
    assert complete_checkpoints(out) == [] and (step / "model.safetensors").is_file()
    assert remove_partial_checkpoints(out) == [step] and not step.exists()  # the next run's start removes it


def test_a_run_copied_whole_is_still_fittunes_to_replace(tmp_path):
    """From a review of the copy rule: a run copied or moved whole (cp -r, rsync to another disk) has a new
    identity in every directory; its checkpoints and evaluations are still fittune's (--overwrite replaces the
    copy), and a copy made inside it is still told apart (it shares the original's marker)."""
    out = claim_dir(tmp_path / "run", "train")
    atomic_write_text(out / "config.yaml", "x\n")
    claim_dir(out / "eval-heldout", "eval")
    claim_dir(out / "checkpoints" / "step-00000004", "checkpoint")
    copy = shutil.copytree(out, tmp_path / "run2")
    assert foreign_entries(copy) == []
    shutil.copytree(copy / "checkpoints/step-00000004", copy / "checkpoints/step-00000001")
    assert foreign_entries(copy) == ["checkpoints/step-00000001", "checkpoints/step-00000004"]
    shutil.rmtree(copy / "checkpoints/step-00000001")
    assert _claim(copy, overwrite=True).aside is not None


def test_an_overwrite_that_fails_puts_the_old_run_back(tmp_path, monkeypatch):
    """From a review: a failure between moving the old run aside and recording it left it at
    <dir>.replaced-* with nothing pointing to it; a read-only run's mode made the new directory unwritable."""
    import stat

    from fittune import rundir

    out = claim_dir(tmp_path / "run", "train")
    atomic_write_text(out / "config.yaml", "old\n")
    out.chmod(0o555)  # a run made read-only: the new one keeps its group and other bits, and the owner's rwx
    real_claim = rundir.claim_dir

    def full_disk(path, kind):
        real_claim(path, kind)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir, "claim_dir", full_disk)
    check = inspect_output_dir(out, None, True)
    with pytest.raises(OSError):
        RunDir.claim(check, RunDir.lock_existing(out, "test"), True, "test")
    monkeypatch.undo()
    assert (out / "config.yaml").read_text() == "old\n" and not list(tmp_path.glob("run.replaced-*"))
    run = _claim(out, overwrite=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and run.aside is not None


def test_a_build_claim_cut_before_its_marker_is_cleared_by_the_next_build(tmp_path, monkeypatch):
    """A command killed between its build directory's mkdir and its marker left `.<out>.tmp-PID-HEX/` holding
    only a lock file, unmarked, so no later command removed it (was: litter, kept for good). The next build
    for the same output removes it once it is older than any live claim can be; a fresh one, a held one, one
    without a lock file (nothing says a command is done with it), one it cannot open, and a directory of a
    similar name with anything else in it stay, and none of them stops the build."""
    import os
    import time

    from fittune.rundir import CUT_CLAIM_AGE_S, LOCK_INFO, MARKER, DirLock, remove_owned, reserve_build

    out = tmp_path / "eval-x"
    old = time.time() - CUT_CLAIM_AGE_S - 5

    def leftover(name: str, files=(LOCK_INFO,), age=old) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).write_text("")
        os.utime(d, (age, age))
        return d

    cut = leftover(".eval-x.tmp-4242-0123abcd", files=(LOCK_INFO, f".{MARKER}.tmp-77"))
    empty = leftover(".eval-x.tmp-4243-0123abce", files=())
    fresh = leftover(".eval-x.tmp-4244-0123abcf", age=time.time())
    held = leftover(".eval-x.tmp-4245-0123abd0")
    holder = DirLock(held).acquire("evaluate.py", record=False)
    os.utime(held, (old, old))
    users = [leftover(".eval-x.tmp-4246-0123abd1", files=(LOCK_INFO, "notes.txt")),
             leftover(".eval-x.tmp-mine", files=(LOCK_INFO,))]
    closed = leftover(".eval-x.tmp-4247-0123abd2")
    (closed / LOCK_INFO).chmod(0o000)
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda f, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied"))
                        if str(f) == str(closed / LOCK_INFO) else real_open(f, *a, **k))  # root opens anything
    build = reserve_build(out, ".tmp-", "eval", "evaluate.py", busy=lambda h: f"busy: {h}")
    monkeypatch.undo()
    try:
        assert not cut.exists()
        assert all(d.is_dir() for d in (empty, fresh, held, closed, *users))
    finally:
        remove_owned(build.path, "eval")
        build.lock.release()
        holder.release()
