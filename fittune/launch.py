"""Checks on how this process was launched: a launcher's death reaches the worker; no silent single process.

Signals. `accelerate launch` without a multi-process config runs the script as a plain child process and does
not forward signals: a SIGTERM sent to the launcher alone (`kill PID`, a scheduler that signals only the
job's main process) killed the launcher and left the worker training, orphaned. `install_parent_death_signal`
asks the Linux kernel to send the worker SIGTERM when its launcher dies (`prctl(PR_SET_PDEATHSIG)`), so the
graceful stop in fittune/signals.py runs: finish the step, save a checkpoint, exit 143. The multi-process
launch (torch's elastic agent inside `accelerate launch`) forwards SIGTERM/SIGINT itself and this adds the
case of a launcher killed with SIGKILL. The kernel sends the signal when the launcher's thread that started
the worker ends; both launchers start workers from their main thread, so that is the launcher's exit.

World size. On a machine without a GPU, `accelerate launch --num_processes 2 train.py` (no config file) starts
ONE process and nothing in the worker's environment says that two were asked for. `check_world_size` reads
the request from the launcher's own command line (the parent process) and refuses the mismatch.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from fittune.errors import FittuneError

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# launchers whose death leaves their workers orphaned: `-m` modules and console-script names
LAUNCHER_MODULES = ("accelerate.commands.launch", "torch.distributed.run", "torch.distributed.launch",
                    "deepspeed.launcher.launch")
LAUNCHER_SCRIPTS = ("accelerate-launch", "torchrun")
# set by the launchers in every worker's environment (torch elastic; accelerate's single-process launcher)
ELASTIC_MARKER = "TORCHELASTIC_RUN_ID"
ACCELERATE_MARKERS = ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_MODE")
FIX = ("use --config_file accelerate_configs/cpu_2proc.yaml on a machine without a GPU, or "
       "--config_file accelerate_configs/multi_gpu.yaml (one process per GPU)")


@dataclass(frozen=True)
class LaunchRequest:
    """How many processes the launch command asked for, and where that number came from (for the message)."""

    num_processes: int
    source: str


def accelerate_launch_args(cmdline: list[str]) -> list[str] | None:
    """The arguments after `accelerate launch` in a process's command line; None when it is not that command."""
    for i, arg in enumerate(cmdline):
        name, following = os.path.basename(arg), cmdline[i + 1] if i + 1 < len(cmdline) else ""
        if arg == "-m" and following == "accelerate.commands.launch":
            return cmdline[i + 2:]
        if arg == "-m" and following == "accelerate.commands.accelerate_cli" and cmdline[i + 2:i + 3] == ["launch"]:
            return cmdline[i + 3:]
        if name == "accelerate" and following == "launch":  # the `accelerate` console script
            return cmdline[i + 2:]
        if name == "accelerate-launch" or arg.endswith(os.path.join("accelerate", "commands", "launch.py")):
            return cmdline[i + 1:]
    return None


def is_launcher(cmdline: list[str]) -> bool:
    """True for a launcher that starts training workers as its children (accelerate, torchrun, DeepSpeed's)."""
    if accelerate_launch_args(cmdline) is not None:
        return True
    modules = {cmdline[i + 1] for i, arg in enumerate(cmdline[:-1]) if arg == "-m"}
    return bool(modules & set(LAUNCHER_MODULES)) or any(os.path.basename(a) in LAUNCHER_SCRIPTS for a in cmdline[:3])


def _cmdline(pid: int) -> list[str]:
    import psutil

    try:
        return psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):  # gone, or another user's process
        return []


def _started_by_launcher() -> bool:
    return ELASTIC_MARKER in os.environ or all(k in os.environ for k in ACCELERATE_MARKERS)


def _launcher_among_ancestors() -> bool:
    import psutil

    try:
        return any(is_launcher(_cmdline(p.pid)) for p in psutil.Process().parents())
    except psutil.Error:
        return False


def _stop_now(reason: str) -> None:
    print(f"fittune: {reason}: stopping (nothing trained yet in this process, so nothing to save)", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # what the kernel would have sent; the default action ends the process


def install_parent_death_signal() -> None:
    """When started by a launcher, have the kernel send this process SIGTERM if that launcher dies.

    Only under a launcher: a `python train.py` started from a shell keeps running when the shell exits (nohup).
    Linux only (prctl); on other systems nothing changes. Call it early: a launcher that died before the call
    is caught by the checks below (the parent changed, or no launcher is left above this process), and then
    the process ends at once with SIGTERM, as the kernel would have done.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    if not is_launcher(_cmdline(parent)):
        if _started_by_launcher() and not _launcher_among_ancestors():
            _stop_now("the launcher that started this process has already exited")
        return  # a shell, a wrapper script or a scheduler's step daemon: its death is not ours to act on
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        print(f"fittune: warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}): "
              f"this process will not be told if its launcher dies", file=sys.stderr, flush=True)
        return
    if os.getppid() != parent:  # the launcher died between the check above and prctl: no signal will come
        _stop_now("the launcher that started this process has exited")
    global _armed_for
    _armed_for = parent


_armed_for: int | None = None  # the launcher's pid whose death the kernel will signal (None: not armed)


def parent_death_signal_armed() -> bool:
    """Whether the kernel sends this process SIGTERM when its launcher dies (`install_parent_death_signal`)."""
    return _armed_for is not None


def launch_request(args: list[str], cwd: str) -> LaunchRequest | None:
    """The process count asked for by `accelerate launch ARGS` run in `cwd`: `--num_processes`, else the
    config file's (given, or accelerate's default one); None when unknown or not parseable."""
    from accelerate.commands.config import default_config_file
    from accelerate.commands.launch import launch_command_parser

    try:  # accelerate's own parser: the same spellings, abbreviations and defaults as the launcher
        with contextlib.redirect_stderr(io.StringIO()):
            ns = launch_command_parser().parse_args(args)
    except SystemExit:
        return None
    if ns.num_processes is not None:
        return LaunchRequest(ns.num_processes, f"--num_processes {ns.num_processes}")
    # the launcher reads the default config file only without --cpu (accelerate's _validate_launch_command)
    config = ns.config_file or (default_config_file if os.path.isfile(default_config_file) and not ns.cpu else None)
    if config is None:
        return None
    path = Path(cwd, config)  # relative to where the launcher was started; an absolute path stays as it is
    try:
        import yaml

        n = (yaml.safe_load(path.read_text()) or {}).get("num_processes")  # JSON configs parse as YAML too
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return LaunchRequest(n, f"num_processes: {n} in {config}") if isinstance(n, int) and n > 0 else None


def parent_launch_request() -> LaunchRequest | None:
    """The request of the `accelerate launch` process that started this one; None for any other parent."""
    import psutil

    try:
        parent = psutil.Process().parent()
        if parent is None:
            return None
        cmdline, cwd = parent.cmdline(), parent.cwd()
    except (psutil.Error, OSError):
        return None
    args = accelerate_launch_args(cmdline)
    return None if args is None else launch_request(args, cwd)


def check_world_size(actual: int, request: LaunchRequest | None = None) -> None:
    """Refuse a run that got fewer processes than its launch command asked for (FittuneError).

    `request` defaults to the parent `accelerate launch` command's; other launchers (python, torchrun, srun,
    mpirun, DeepSpeed's runner) are not checked: their process count is the world size they set.
    """
    request = request if request is not None else parent_launch_request()
    if request is not None and request.num_processes > actual:
        raise FittuneError(f"{request.num_processes} processes were asked for ({request.source}) but "
                           f"{actual} started: without a multi-process config, accelerate launch starts a single "
                           f"process on a machine with fewer than 2 GPUs; {FIX}")
