"""Kill-anywhere soak: SIGKILL a training run at random moments, resume it with `--resume auto`, repeat.

A resume that was not itself killed must end with exit 0 and log steps 1..max_steps exactly once. The test
suite kills at fixed steps; this soak hunts the rare windows between them (a kill mid-save, mid-removal,
mid-log-append), which is why it saves every step. It is a soak, not a test: minutes per strategy, random.

    python bench/kill_soak.py --runs 12                                         # one process
    python bench/kill_soak.py --runs 6 --nproc 2 --accelerate_config accelerate_configs/fsdp2.yaml
    python bench/kill_soak.py --runs 2 --nproc 2 --accelerate_config accelerate_configs/deepspeed_zero3.yaml
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the suite's launch helpers and tiny model shape

from conftest import TINY_SHAPE, child_env  # noqa: E402
from test_checkpoints import launch_cmd  # noqa: E402

STEPS = 40


def recipe(base: Path) -> Path:
    from fittune.builtin_models import build_tiny_model_dir
    from fittune.config import TinyModelConfig

    model = build_tiny_model_dir(base / "tiny", TinyModelConfig(**TINY_SHAPE), 0)
    tree = {"seed": 0, "log_with": "none", "model": {"name_or_path": str(model)},
            "data": {"path": "builtin:ai-research-qa", "max_length": 96}, "lora": {"enabled": False},
            "train": {"micro_batch_size": 2, "grad_accum": 1, "max_steps": STEPS, "lr": 2e-3, "log_every": 1,
                      "save_steps": 1, "keep_checkpoints": 2}, "eval": {"batch_size": 8}}
    path = base / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def logged_steps(out: Path) -> list[int]:
    log = out / "train_log.jsonl"
    return [json.loads(x)["step"] for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []


def kill_tree(pid: int) -> None:
    root = psutil.Process(pid)
    for p in [root] + root.children(recursive=True):  # the launcher's workers live in their own sessions
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def launch_maybe_kill(cmd: list[str], out: Path, at_row: int | None, extra_s: float) -> tuple[bool, int, str]:
    """Run `cmd`; with `at_row`, SIGKILL it `extra_s` after that many steps are logged. (killed, code, stderr)"""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    killed = False
    while at_row is not None and proc.poll() is None:
        if len(logged_steps(out)) >= at_row:
            time.sleep(extra_s)
            kill_tree(proc.pid)
            killed = True
            break
        time.sleep(0.005)
    _, err = proc.communicate()
    if killed:
        time.sleep(0.3)  # let the kernel reap the workers before the resume looks at their files
    return killed and proc.returncode != 0, proc.returncode, err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--kills", type=int, default=3, help="kills per run before it is left to finish")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--accelerate_config", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a new temporary one)")
    args = ap.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="fittune-kill-soak-"))
    base.mkdir(parents=True, exist_ok=True)
    cfg, rng, failures, kills = recipe(base), random.Random(args.seed), 0, 0
    for r in range(args.runs):
        out, done = base / f"run{r}", 0
        while True:
            cmd = launch_cmd(args.nproc, args.accelerate_config, ["--config", cfg, "--output_dir", out]
                             + (["--resume", "auto"] if out.exists() else []))
            at = rng.randint(1, STEPS - 10) if done < args.kills else None
            killed, code, err = launch_maybe_kill(cmd, out, at, rng.random() * 0.3)
            if killed:
                done += 1
                continue
            ok = code == 0 and logged_steps(out) == list(range(1, STEPS + 1))
            failures += not ok
            print(f"run {r}: {'ok' if ok else f'FAILED (exit {code})'} after {done} kills", flush=True)
            if not ok:
                print(err[-3000:], flush=True)
            break
        kills += done
    print(f"{args.runs - failures}/{args.runs} runs resumed to the end after {kills} kills in all ({base})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
