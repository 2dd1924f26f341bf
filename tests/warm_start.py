"""A Python process that imports the heavy third-party libraries once, then forks one fresh process per
command it is sent: the tests' one-process runs of train.py / evaluate.py without paying the ~4 s of imports
each (a tiny run's own work takes well under a second of that).

Each forked child is what `python SCRIPT ARGS` would be, run in a new process: its own working directory,
environment, stdin (/dev/null), stdout and stderr (files), `sys.argv`, `sys.path[0]` (the script's directory),
freshly drawn random seeds, the script run as `__main__`, the interpreter's exit steps (non-daemon threads
joined, atexit handlers, streams flushed) and its exit code. fittune itself is never imported here: every
child imports it fresh. What differs from a cold start is only that the libraries below were imported in
this environment (tests/conftest.py `WarmStart`), so settings they read at import time are this process's.

Protocol (one command at a time): a JSON line on stdin {argv, env, cwd, stdout, stderr}; the answer on the
reply stream is the child's pid, then its exit code as `subprocess` gives it (-N for signal N). "ready" is
written once the libraries are imported; stdin at EOF ends this process.
"""

import importlib
import json
import os
import sys

PRELOAD = ("torch", "numpy", "yaml", "safetensors.torch", "transformers", "transformers.models.qwen2.modeling_qwen2",
           "transformers.models.llama.modeling_llama", "peft", "accelerate", "sklearn.model_selection",
           "sklearn.metrics", "matplotlib.pyplot")


def _redirect(fd: int, path: str, flags: int) -> None:
    new = os.open(path, flags)
    os.dup2(new, fd)
    os.close(new)


def _exit_code(e: SystemExit) -> int:
    """What the interpreter makes of `sys.exit(x)`."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def run_child(request: dict) -> None:
    """In the forked child: become `python argv[0] argv[1:]` and exit as it would."""
    import atexit
    import ctypes
    import random
    import runpy
    import threading
    import traceback

    import numpy
    import torch

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _redirect(0, os.devnull, os.O_RDONLY)
    _redirect(1, request["stdout"], os.O_WRONLY | os.O_APPEND)
    _redirect(2, request["stderr"], os.O_WRONLY | os.O_APPEND)
    random.seed()  # a new process draws new seeds; a fork would share this process's
    numpy.random.seed()
    torch.seed()
    script = os.path.abspath(request["argv"][0])
    sys.argv = [script] + list(request["argv"][1:])
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # the interpreter's exit: join non-daemon threads, then atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)  # C libraries' buffered output, which os._exit would drop
    os._exit(code)


def main() -> None:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    _redirect(1, os.devnull, os.O_WRONLY)  # what the imports print must not reach the reply stream
    import matplotlib

    matplotlib.use("Agg")
    for name in PRELOAD:
        importlib.import_module(name)
    reply.write("ready\n")
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            reply.close()
            run_child(json.loads(line))
        reply.write(f"{pid}\n")
        _, status = os.waitpid(pid, 0)
        reply.write(f"{os.waitstatus_to_exitcode(status)}\n")


if __name__ == "__main__":
    main()
