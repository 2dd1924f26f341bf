"""The tests' warm start (tests/warm_start.py through conftest's WARM) behaves as `python script args` would:
the same output, exit code, arguments, environment, stdin and exit steps, compared with a cold subprocess."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, WARM, child_env

SCRIPT = """
import atexit, os, sys, threading, time
print("argv", sys.argv[1:], "path0", sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
print("cwd", os.getcwd(), "var", os.environ.get("FITTUNE_WARM_PROBE"), "stdin", repr(sys.stdin.read()))
print("main", __name__, "fittune imported", "fittune" in sys.modules)
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined"))).start()
print("to stderr", file=sys.stderr)
mode = sys.argv[1]
if mode == "code":
    sys.exit(3)
if mode == "message":
    sys.exit("fatal: a message")
if mode == "raise":
    raise ValueError("boom")
if mode == "sleep":
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("warm") / "probe.py"
    path.write_text(SCRIPT)
    return path


COLD = os.environ.get("FITTUNE_TESTS_COLD") == "1"


def _warm(cmd: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    if COLD:
        pytest.skip("FITTUNE_TESTS_COLD=1: every command starts cold")
    warm = WARM.run(cmd, env, timeout)
    assert warm is not None, "the warm start did not run this command (tests/warm_start.py did not start?)"
    return warm


def _both(cmd: list[str]) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    env = child_env(2)
    env["FITTUNE_WARM_PROBE"] = "set"
    warm = _warm(cmd, env)
    cold = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return warm, cold


@pytest.mark.parametrize("mode", ["ok", "code", "message", "raise"])
def test_a_warm_run_is_what_a_cold_one_would_be(script, mode):
    cmd = [sys.executable, str(script), mode, "two words"]
    warm, cold = _both(cmd)
    assert warm.returncode == cold.returncode == {"ok": 0, "code": 3, "message": 1, "raise": 1}[mode]
    assert warm.stdout == cold.stdout
    assert "fittune imported False" in warm.stdout and "atexit ran" in warm.stdout
    assert "thread joined" in warm.stdout and "stdin ''" in warm.stdout and "var set" in warm.stdout
    assert warm.stderr.splitlines()[0] == "to stderr"
    # a traceback's frames differ (runpy's against the interpreter's), its last line does not
    assert warm.stderr.splitlines()[-1] == cold.stderr.splitlines()[-1]


def test_a_warm_run_past_its_timeout_is_killed_and_the_next_one_runs(script):
    env = child_env(2)
    _warm([sys.executable, str(script), "ok"], env)
    with pytest.raises(subprocess.TimeoutExpired):
        _warm([sys.executable, str(script), "sleep"], env, timeout=2)
    assert _warm([sys.executable, str(script), "code"], env).returncode == 3


def test_a_change_to_this_workers_environment_starts_a_new_warm_process(script, monkeypatch):
    """An in-process test may run code that sets a variable for good (fittune's progress bars set
    HF_HUB_DISABLE_PROGRESS_BARS, DeepSpeed's import DS_ACCELERATOR): later commands still start warm, from a
    process started under it (was: every later command of that pytest worker started cold)."""
    _warm([sys.executable, str(script), "ok"], child_env(2))
    before = WARM.proc.pid
    monkeypatch.setenv("WARM_START_PROBE", os.urandom(4).hex())  # as a library's setting would, e.g. DS_ACCELERATOR
    out = _warm([sys.executable, str(script), "ok"], child_env(2))
    assert out.returncode == 0 and WARM.proc.pid != before


def test_a_command_with_other_library_settings_starts_cold(script):
    env = child_env(2)
    env["OMP_NUM_THREADS"] = "1"  # torch reads it at import: a process that imported it already cannot honour it
    assert WARM.run([sys.executable, str(script), "ok"], env, timeout=60) is None
