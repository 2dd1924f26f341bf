"""Signals sent to the launcher alone reach the workers (checkpoint, no orphan); a launch that asked for more
processes than it got is refused. Fast checks first (no training), then real `accelerate launch` runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, child_env, free_port, read_log

from fittune.errors import FittuneError
from fittune.launch import (
    LaunchRequest,
    accelerate_launch_args,
    check_world_size,
    is_launcher,
    launch_request,
)
from fittune.rundir import STATE_FILE

LINUX = sys.platform.startswith("linux")
SIMPLE = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


# ---- the launcher's command line ---------------------------------------------------------------------------

def test_accelerate_launch_args_in_every_spelling():
    py = sys.executable
    rest = ["--num_processes", "2", "train.py", "--x", "1"]
    assert accelerate_launch_args([py, "-m", "accelerate.commands.launch"] + rest) == rest
    assert accelerate_launch_args([py, "/usr/local/bin/accelerate", "launch"] + rest) == rest
    assert accelerate_launch_args([py, "-m", "accelerate.commands.accelerate_cli", "launch"] + rest) == rest
    assert accelerate_launch_args([py, "/usr/bin/accelerate-launch"] + rest) == rest
    assert accelerate_launch_args([py, "/usr/local/bin/accelerate", "config"]) is None
    assert accelerate_launch_args(["bash", "-c", "accelerate launch --num_processes 2 train.py"]) is None
    assert is_launcher([py, "/usr/bin/torchrun", "--nproc-per-node", "2", "train.py"])
    assert is_launcher([py, "-m", "torch.distributed.run", "train.py"])
    assert not is_launcher(["-bash"]) and not is_launcher([py, "train.py", "--data.path", "torchrun"])


def test_launch_request_from_flags_and_config_files(tmp_path):
    assert launch_request(["--num_processes", "2", "train.py"], str(tmp_path)) == LaunchRequest(2, "--num_processes 2")
    assert launch_request(["--num-processes=3", "train.py"], str(tmp_path)).num_processes == 3
    # the flag wins over the file (as in accelerate); a relative file is read from the launcher's directory
    cfg = "accelerate_configs/cpu_2proc.yaml"
    assert launch_request(["--config_file", cfg, "--num_processes", "4", "x.py"], str(ROOT)).num_processes == 4
    assert launch_request(["--config_file", cfg, "x.py"], str(ROOT)) == LaunchRequest(2, f"num_processes: 2 in {cfg}")
    (tmp_path / "c.json").write_text('{"distributed_type": "NO", "num_processes": 2}')
    assert launch_request(["--config_file", "c.json", "x.py"], str(tmp_path)).num_processes == 2
    assert launch_request(["--config_file", "missing.yaml", "x.py"], str(tmp_path)) is None
    assert launch_request(["--no-such-flag", "x.py"], str(tmp_path)) is None  # unparseable: never a false alarm


def test_check_world_size_refuses_fewer_processes_than_asked():
    with pytest.raises(FittuneError) as e:
        check_world_size(1, LaunchRequest(2, "--num_processes 2"))
    msg = str(e.value)
    assert "2 processes were asked for (--num_processes 2) but 1 started" in msg and "\n" not in msg
    assert "accelerate_configs/cpu_2proc.yaml" in msg and "accelerate_configs/multi_gpu.yaml" in msg
    check_world_size(2, LaunchRequest(2, "--num_processes 2"))  # what was asked for
    check_world_size(16, LaunchRequest(16, "num_processes: 16 in multi_node_zero3.yaml"))  # all nodes together
    check_world_size(1)  # the parent here is pytest's, not an accelerate launch: nothing to compare


# ---- how an entry point exits ------------------------------------------------------------------------------

EXIT = textwrap.dedent("""
    import atexit, sys
    from fittune.entry import run_cli
    from fittune.errors import FittuneError
    atexit.register(lambda: print("interpreter teardown ran", flush=True))
    def main():
        print("work done")  # still in the buffer (stdout is a pipe): the exit must flush it
        if sys.argv[1] == "error":
            raise FittuneError("bad input")
        if sys.argv[1] == "ctrl-c":  # while loading, before the training steps' stop handler
            raise KeyboardInterrupt
        return int(sys.argv[1])
    run_cli(main)
""")


@pytest.mark.parametrize("world", ["1", "2"])
@pytest.mark.parametrize("outcome, code", [("0", 0), ("143", 143), ("error", 2), ("ctrl-c", 130)])
def test_exit_code_and_teardown(world, outcome, code):
    """The entry point's code reaches the launcher. One rank of several skips the interpreter's teardown, where
    the communication threads' C++ destructors can abort a rank whose work is done; a lone process does not."""
    proc = subprocess.run([sys.executable, "-c", EXIT, outcome], cwd=ROOT, capture_output=True, text=True,
                          env={**child_env(1), "WORLD_SIZE": world, "RANK": "0", "PYTHONUNBUFFERED": ""}, timeout=60)
    assert proc.returncode == code and "work done" in proc.stdout, proc.stderr
    assert ("interpreter teardown ran" in proc.stdout) == (world == "1")
    assert ("fittune: error: bad input" in proc.stderr) == (outcome == "error")
    # Ctrl-C: one line, no traceback (was: KeyboardInterrupt's traceback through the model loading)
    assert ("fittune: interrupted (Ctrl-C)" in proc.stderr) == (outcome == "ctrl-c") and "Traceback" not in proc.stderr


# ---- the parent death signal and the second signal, on small scripts (no training) -----------------------

@dataclass
class Family:
    """A fake parent process (its name decides whether it counts as a launcher) and its child's pid."""

    parent: subprocess.Popen
    child: psutil.Process


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from fittune.launch import install_parent_death_signal
    signal.signal(signal.SIGTERM, lambda *a: (print("child got SIGTERM", flush=True), os._exit(0)))
    time.sleep(float(sys.argv[1]))  # > 0: the parent is gone before the call (the start-up race)
    install_parent_death_signal()
    print("armed", os.getpid(), flush=True)
    time.sleep(60)
""")


def start_family(tmp_path: Path, parent_name: str, delay: float = 0.0, env: dict | None = None,
                 child: str = CHILD) -> Family:
    """`parent_name` runs the child script, prints its pid and sleeps (or exits at once when delay > 0)."""
    (tmp_path / "child.py").write_text(child)
    parent = tmp_path / parent_name
    parent.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, {str(tmp_path / 'child.py')!r}, "{delay}"])
        print(child.pid, flush=True)
        time.sleep(0 if {delay} else 60)
    """))
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True,
                            env={**child_env(1), **(env or {})}, start_new_session=True)
    return Family(proc, psutil.Process(int(proc.stdout.readline())))


def read_until_exit(family: Family) -> str:
    out = family.parent.stdout.read()  # EOF once both have exited (the child holds the pipe too)
    family.parent.wait()
    return out


def alive(procs: list[psutil.Process]) -> list[int]:
    found = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.skipif(not LINUX, reason="prctl(PR_SET_PDEATHSIG) is Linux-only")
def test_launcher_death_sends_sigterm_but_a_shell_death_does_not(tmp_path):
    fam = start_family(tmp_path, "torchrun")
    assert fam.parent.stdout.readline().startswith("armed")
    fam.parent.kill()  # SIGKILL: the launcher can forward nothing; only the kernel can tell the child
    assert "child got SIGTERM" in read_until_exit(fam)
    (tmp_path / "b").mkdir()
    fam = start_family(tmp_path / "b", "myshell")  # not a launcher: `nohup python train.py &` keeps running
    try:
        assert fam.parent.stdout.readline().startswith("armed")
        fam.parent.kill()
        time.sleep(1.0)
        assert alive([fam.child]) == [fam.child.pid]
    finally:
        fam.child.kill()
    assert "child got SIGTERM" not in read_until_exit(fam)


@pytest.mark.skipif(not LINUX, reason="prctl(PR_SET_PDEATHSIG) is Linux-only")
def test_launcher_gone_before_the_call_stops_the_worker(tmp_path):
    # the launcher died while the worker was still starting: the kernel will send nothing, so the call must see it
    fam = start_family(tmp_path, "torchrun", delay=1.0, env={"TORCHELASTIC_RUN_ID": "none"})
    out = read_until_exit(fam)
    assert "the launcher that started this process has already exited" in out and "armed" not in out
    assert "child got SIGTERM" in out


@pytest.mark.skipif(not LINUX, reason="prctl(PR_SET_PDEATHSIG) is Linux-only")
def test_a_late_launcher_death_signal_is_not_a_second_request(tmp_path):
    """Ctrl-C reaches the worker, and kills the launcher, whose death the kernel signals to the worker; on a
    loaded machine that SIGTERM came after the grace and the worker exited at once, without its checkpoint.
    It is the same request, however late; a signal sent to the orphaned worker after it still exits at once."""
    worker = textwrap.dedent("""
        import os, time
        from fittune.launch import install_parent_death_signal
        from fittune.signals import StopRequest
        install_parent_death_signal()
        stop = StopRequest(grace_s=0.3)
        print("armed", os.getpid(), flush=True)
        time.sleep(2.5)
        print("still running", stop.requested, stop.exit_code, flush=True)
        time.sleep(30)
    """)
    fam = start_family(tmp_path, "torchrun", child=worker)
    assert fam.parent.stdout.readline().startswith("armed")
    fam.child.send_signal(signal.SIGINT)  # Ctrl-C's copy to the worker
    time.sleep(1.0)  # well past the grace
    fam.parent.kill()  # the launcher dies: the kernel sends the worker SIGTERM now
    assert fam.parent.stdout.readline().startswith("fittune: got SIGINT: finishing this step")
    assert fam.parent.stdout.readline().strip() == f"still running {int(signal.SIGINT)} 130"
    fam.child.send_signal(signal.SIGTERM)  # the user means it: gone at once, not after its 30 s sleep
    fam.child.wait(timeout=10)  # (not our child: psutil gives no exit code; TimeoutExpired if it kept on)
    assert read_until_exit(fam) == ""
    # started from a shell, nothing was armed: after the shell is gone, a second request is the user's at once
    (tmp_path / "b").mkdir()
    fam = start_family(tmp_path / "b", "myshell", child=worker.replace("time.sleep(2.5)", "time.sleep(30)"))
    assert fam.parent.stdout.readline().startswith("armed")
    fam.parent.kill()
    time.sleep(0.5)
    fam.child.send_signal(signal.SIGINT)
    assert fam.parent.stdout.readline().startswith("fittune: got SIGINT")
    time.sleep(0.5)
    fam.child.send_signal(signal.SIGTERM)
    fam.child.wait(timeout=10)
    assert read_until_exit(fam) == ""


def test_second_signal_after_the_grace_exits_at_once():
    code = textwrap.dedent("""
        import os, signal, time
        from fittune.signals import StopRequest
        stop = StopRequest(grace_s=0.3)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # a copy within the grace (launcher + kernel): still one request
        time.sleep(0.05)
        print("requested", stop.requested, stop.exit_code, flush=True)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # the user means it
        time.sleep(5)
        print("still running", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(1), capture_output=True,
                          text=True, timeout=60)
    assert f"requested {int(signal.SIGINT)} 130" in proc.stdout and "still running" not in proc.stdout
    assert proc.returncode == 128 + signal.SIGTERM


# ---- real launches -----------------------------------------------------------------------------------------

@dataclass
class Stopped:
    code: int
    out: str
    err: str
    left_alive: list[int]


# The launch starts with SIGINT at its default, as in a terminal: a background job of a non-interactive shell
# (`make test &` in a script) inherits SIGINT *ignored*, and Python keeps an inherited ignore, so the launcher
# would never see the Ctrl-C this test sends. exec keeps a default disposition; only an ignore is inherited.
DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.argv[1], sys.argv[1:])"]


def signal_launcher(cmd: list[str], log: Path, sig: int, at_row: int = 2) -> Stopped:
    """Start a launch; once `at_row` steps are logged, send `sig` to the launcher process alone."""
    proc = subprocess.Popen(DEFAULT_SIGINT + cmd, cwd=ROOT, env=child_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if log.is_file() and len([x for x in log.read_text().splitlines() if x.strip()]) >= at_row:
                workers = psutil.Process(proc.pid).children(recursive=True)
                proc.send_signal(sig)
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=300)  # EOF once the workers, which share the pipes, are gone too
        end = time.time() + 30
        while alive(workers) and time.time() < end:
            time.sleep(0.2)
        assert workers, f"the launcher ended before step {at_row} was logged:\n{err[-3000:]}"
        return Stopped(proc.returncode, out, err, alive(workers))
    finally:
        for p in workers:  # never leave a worker behind, whatever the test found
            if alive([p]):
                p.kill()


def launcher_cmd(accel: list[str], cfg: Path, run: Path) -> list[str]:
    return ([sys.executable, "-m", "accelerate.commands.launch"] + accel
            + ["--main_process_port", str(free_port()), str(ROOT / "train.py"), "--config", str(cfg),
               "--output_dir", str(run)])


def saved_step(run: Path, result: Stopped) -> int:
    """The one complete checkpoint the stop wrote, checked against the worker's own last words."""
    (ckpt,) = [p for p in (run / "checkpoints").iterdir() if not p.name.endswith(".tmp")]
    step = int(ckpt.name.split("-")[1])
    assert f"stopped by signal after step {step}: checkpoint {ckpt}" in result.out, result.out[-2000:]
    assert "(exit code 143)" in result.out  # the worker's code: the kernel's death signal is a SIGTERM
    assert step >= 2 and step == read_log(run)[-1]["step"] and not (run / "final").exists()
    assert json.loads((ckpt / STATE_FILE).read_text())["step"] == step  # complete: its state file is there
    return step


LONG = {"max_steps": 400, "save_steps": 0, "micro_batch_size": 2}  # never finishes before the signal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_single_process_launcher_saves_and_leaves_no_orphan(tmp_path, tiny_config, sig):
    run = tmp_path / "run"
    result = signal_launcher(launcher_cmd(SIMPLE, tiny_config(train=LONG), run), run / "train_log.jsonl", sig)
    # the launcher (accelerate's, not ours) dies of the signal: a shell reports 128 + sig (143 / 130)
    assert result.code == -sig, result.out[-3000:] + result.err[-3000:]
    assert "got SIGTERM" in result.out  # the kernel's parent death signal: this launcher forwards nothing
    saved_step(run, result)
    assert result.left_alive == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_to_two_process_launcher_saves_and_leaves_no_orphan(tmp_path, tiny_config, sig):
    run = tmp_path / "run"
    accel = ["--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"), "--num_processes", "2"]
    result = signal_launcher(launcher_cmd(accel, tiny_config(train=LONG), run), run / "train_log.jsonl", sig)
    if sig == signal.SIGTERM:
        # torch elastic forwards it, waits for the workers, then raises SignalException: exit 1 (torch's code)
        assert result.code == 1 and "SignalException" in result.err, result.out[-3000:] + result.err[-3000:]
    else:  # nothing forwarded: the kernel's parent death signal alone tells both ranks
        assert result.code == -sig and "got SIGTERM" in result.out, result.out[-3000:] + result.err[-3000:]
    assert result.out.count("fittune: got SIG") == 1  # said by the main process (was: once per rank)
    saved_step(run, result)
    assert result.left_alive == []


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_two_processes_asked_one_started_is_refused(tmp_path, tiny_config, tiny_model_dir, script):
    run = tmp_path / "run"
    accel = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cfg = tiny_config()
    cmd = launcher_cmd(accel, cfg, run)
    if script == "evaluate.py":  # a model and its data: the refusal comes before it is loaded or anything written
        cmd = cmd[:cmd.index(str(ROOT / "train.py"))] + [str(ROOT / "evaluate.py"), "--checkpoint",
                                                          str(tiny_model_dir), "--config", str(cfg),
                                                          "--output_dir", str(run)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(2), capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fittune: error:")]
    assert len(errors) == 1 and "2 processes were asked for (--num_processes 2) but 1 started" in errors[0], \
        proc.stderr[-3000:]
    # the worker exits 2; accelerate's single-process launcher turns any failure into its own exit 1
    assert "returned non-zero exit status 2" in proc.stderr and proc.returncode == 1
    assert not run.exists()
