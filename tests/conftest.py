"""Shared helpers: run the real entry points (`accelerate launch train.py / evaluate.py`) on tiny models."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

# The suite runs one pytest worker per core, and each launches multi-threaded runs: OpenMP threads that spin
# while they wait for work then burn the core the other worker needs (two demo runs side by side on 2 cores:
# 73 s each spinning, 45 s passive; 29 s alone). Set before torch loads its OpenMP runtime; every launched
# process inherits it. Thread counts, hence every reduction's order and every number, stay as they were.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "vocab_size": 512}


# seconds each slow file took in `make test` on 2 CPU cores (its tests' times in pytest's --junitxml, a shared
# run counted where it is first built): pytest-xdist hands the files out longest first, so the two workers finish
# together; a file not listed comes after these
FILE_SECONDS = {"test_checkpoints.py": 323, "test_train.py": 270, "test_real_model.py": 264, "test_evaluate.py": 179,
                "test_deepspeed.py": 164, "test_oom.py": 112, "test_run_safety.py": 96, "test_export.py": 91,
                "test_signals.py": 64, "test_multinode.py": 64, "test_optim.py": 52, "test_plan.py": 41,
                "test_qwen_tokenizer.py": 23, "test_evaluate_safety.py": 18, "test_layout.py": 17, "test_fsdp.py": 15}


def pytest_collection_modifyitems(config, items):
    """Slow files first (see FILE_SECONDS); `@pytest.mark.gpu` tests skip cleanly on a machine without CUDA
    (CI), and run where there is one."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: the order within a file stays
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    return env


def launch(script: str, args: list[str], nproc: int = 1, config_file: str | None = None, check: bool = True,
           timeout: int = 600, extra_env: dict | None = None, launcher: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch [--config_file F] script args` as a subprocess, from the repo root.

    One process without a config file runs `python script args`, what accelerate's single-process launcher
    would start, without the launcher's own start-up (~3 s of CPU per run, 40 runs: a minute of CI on 2 cores);
    `launcher=True` keeps it (the README's demo command). The launcher's own part (signals, its death, the
    process count it asked for) is tested through it in test_signals and test_checkpoints."""
    if nproc == 1 and not config_file and not launcher:
        return _run([sys.executable, str(ROOT / script)] + [str(a) for a in args], 2, check, timeout, extra_env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", str(ROOT / config_file)] + (["--num_processes", str(nproc)] if nproc > 1 else [])
    elif nproc > 1:
        cmd += ["--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"), "--num_processes", str(nproc)]
    else:
        cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), str(ROOT / script)] + [str(a) for a in args]
    return _run(cmd, 1 if nproc > 1 else 2, check, timeout, extra_env)


def _run(cmd: list[str], threads: int, check: bool, timeout: int, extra_env: dict | None) -> subprocess.CompletedProcess:
    env = child_env(threads)
    env.update(extra_env or {})
    proc = WARM.run(cmd, env, timeout) or subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                                         timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode})\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def run_python(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python script args` (no launcher), for the quick bad-input checks."""
    return _run([sys.executable, str(ROOT / script)] + [str(a) for a in args], 2, False, timeout, None)


class WarmStart:
    """One-process commands (`python script args`) forked from tests/warm_start.py, a process of this pytest
    worker that has imported torch, transformers, PEFT, accelerate, scikit-learn and matplotlib once: each
    run is still a new process running the script as `__main__` (see there), without ~4 s of imports (a tiny
    run's own work is well under a second). The 60-odd such runs took about a fifth of the suite's CPU time.

    A command runs as a plain subprocess instead (`run` returns None) when its environment differs from the
    warm process's in more than fittune's own variables (FITTUNE_*; pytest's) -- libraries read theirs at
    import --, while another command of this worker is in flight (a test's own threads), or when the warm
    process could not start. Where this worker's own environment has changed since the warm process started
    (an in-process test ran code that sets a variable, e.g. HF_HUB_DISABLE_PROGRESS_BARS), a new one is
    started under it. FITTUNE_TESTS_COLD=1 runs every command as a plain subprocess."""

    SAME_ENV_EXCEPT = ("FITTUNE_", "PYTEST_")

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.env: dict = {}
        self.lock = threading.Lock()
        self.failed = os.environ.get("FITTUNE_TESTS_COLD") == "1"
        self.pending = b""

    def run(self, cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess | None:
        if len(cmd) < 2 or cmd[0] != sys.executable or not cmd[1].endswith(".py") or not self.lock.acquire(False):
            return None
        try:
            if not self._started() or self._differs(env):
                return None
            return self._fork(cmd, env, timeout)
        finally:
            self.lock.release()

    def _differs(self, env: dict) -> bool:
        keys = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return any(not k.startswith(self.SAME_ENV_EXCEPT) for k in keys)

    def _started(self) -> bool:
        now = {k: v for k, v in child_env(2).items() if not k.startswith(self.SAME_ENV_EXCEPT)}
        if self.proc is not None and now != self.env:  # its libraries were imported under another environment
            self.stop()
        if self.proc is None and not self.failed:
            self.env = now
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests/warm_start.py")], cwd=ROOT,
                                         env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, bufsize=0)
            try:
                self.failed = self._lines(1, 300) != ["ready"]
            except (OSError, subprocess.TimeoutExpired):
                self.failed = True
            if self.failed:
                self.stop()
        return not self.failed

    def _fork(self, cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="warm-run-") as out:
            request = {"argv": cmd[1:], "env": env, "cwd": str(ROOT), "stdout": f"{out}/stdout",
                       "stderr": f"{out}/stderr"}
            for name in ("stdout", "stderr"):
                Path(request[name]).touch()
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = int(self._lines(1, 60)[0])
            try:
                code = int(self._lines(1, timeout)[0])
            except subprocess.TimeoutExpired:
                os.kill(pid, 9)  # as subprocess.run does on a timeout
                self._lines(1, 60)
                raise subprocess.TimeoutExpired(cmd, timeout) from None
            text = {name: Path(request[name]).read_text(errors="replace") for name in ("stdout", "stderr")}
        return subprocess.CompletedProcess(cmd, code, text["stdout"], text["stderr"])

    def _lines(self, n: int, timeout: float) -> list[str]:
        """The next `n` lines the warm process answers, waiting at most `timeout` seconds."""
        import select
        import time

        deadline, fd = time.monotonic() + timeout, self.proc.stdout.fileno()
        while self.pending.count(b"\n") < n:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise subprocess.TimeoutExpired("tests/warm_start.py", timeout)
            chunk = os.read(fd, 4096)
            if not chunk:
                raise OSError("tests/warm_start.py exited")
            self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n", n)
        return [x.decode() for x in lines]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()  # at EOF it exits
            self.proc.wait(timeout=60)
            self.proc = None


WARM = WarmStart()


@pytest.fixture(scope="session", autouse=True)
def _stop_warm_start():
    yield
    WARM.stop()


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines() if line]


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def shared_root(tmp_path_factory) -> Path:
    """A directory every pytest-xdist worker of this session sees (the session's own tmp dir without xdist)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_once(root: Path, name: str, build: Callable[[Path], object]) -> Path:
    """`root/name`, made by `build(path)` once per session by whichever worker asks first; the others wait
    for it (a file lock) and reuse it. A build that failed is retried by the next caller."""
    from filelock import FileLock

    target, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.build-once-lock")):
        if not done.exists():
            if target.exists():
                shutil.rmtree(target)
            build(target)
            done.touch()
    return target


@pytest.fixture(scope="session", autouse=True)
def fittune_cache(tmp_path_factory):
    """One built-in model cache for the session ($FITTUNE_CACHE, inherited by every launched process; shared by
    the xdist workers: fittune locks a model while it builds it); a FITTUNE_CACHE already set (e.g. a
    directory CI keeps between runs) is used as is."""
    if os.environ.get("FITTUNE_CACHE"):
        yield Path(os.environ["FITTUNE_CACHE"])
        return
    path = shared_root(tmp_path_factory) / "fittune-cache"
    path.mkdir(exist_ok=True)
    os.environ["FITTUNE_CACHE"] = str(path)
    yield path
    os.environ.pop("FITTUNE_CACHE", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 model + tokenizer saved with save_pretrained, as a user's local model directory."""
    from fittune.builtin_models import build_tiny_model_dir
    from fittune.config import TinyModelConfig

    # one build for every xdist worker: fittune builds it under its own lock and verifies it (a manifest)
    return build_tiny_model_dir(shared_root(tmp_path_factory) / "tiny-qwen2", TinyModelConfig(**TINY_SHAPE), 0)


def write_tiny_recipe(directory: Path, model_dir: Path, name: str = "tiny.yaml", **sections) -> Path:
    """A tiny fp32 recipe on the built-in data in `directory` (output_dir: `directory`/run); `sections` update
    the recipe's sections (a dict) or replace a top-level key."""
    tree = {
        "output_dir": str(directory / "run"),
        "seed": 0,
        "log_with": "none",
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": "builtin:ai-research-qa", "choices_column": "choices", "label_column": "topic",
                 "max_length": 96},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "max_steps": 6, "lr": 1e-3, "warmup_ratio": 0.0,
                  "log_every": 1},
        "eval": {"batch_size": 8},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return write_config(directory / name, tree)


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """Write a tiny fp32 recipe on the built-in data; returns a function(name, overrides...) -> config path."""

    def make(name: str = "tiny.yaml", **sections) -> Path:
        return write_tiny_recipe(tmp_path, tiny_model_dir, name, **sections)

    return make


STRATEGY_STEPS = 16  # checkpoints at 4, 8, 12, 16: the SIGKILL tests resume these runs' recipe mid-way


def strategy_recipe(directory: Path, model_dir: Path) -> Path:
    """The tiny recipe every sharding strategy (DDP, ZeRO, FSDP2) is run with and compared on."""
    path = Path(directory) / "recipe.yaml"
    return write_config(path, {
        "seed": 0, "log_with": "none", "model": {"name_or_path": str(model_dir)},
        "data": {"path": "builtin:ai-research-qa", "choices_column": "choices", "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        # the last checkpoint is at the end: test_export consolidates each strategy's shards and compares with
        # final/; test_checkpoints kills the same recipe after a checkpoint and resumes it
        "train": {"micro_batch_size": 2, "grad_accum": 2, "max_steps": STRATEGY_STEPS, "lr": 5e-3,
                  "log_every": 1, "warmup_ratio": 0.2, "save_steps": 4, "keep_checkpoints": 2},
        "eval": {"batch_size": 8}})


STRATEGY_CONFIGS = {"ddp": "accelerate_configs/cpu_2proc.yaml", "fsdp2": "accelerate_configs/fsdp2.yaml",
                    **{z: f"accelerate_configs/deepspeed_{z}.yaml"
                       for z in ("zero2", "zero2_offload", "zero3", "zero3_offload")}}


@pytest.fixture(scope="session")
def shared_strategy_recipe(tmp_path_factory, tiny_model_dir) -> Path:
    """The strategy recipe, written once per session (every strategy run below trains it)."""
    root = build_once(shared_root(tmp_path_factory), "strategy-recipe",
                      lambda d: (d.mkdir(), strategy_recipe(d, tiny_model_dir)))
    return root / "recipe.yaml"


@pytest.fixture(scope="session")
def strategy_extensions(tmp_path_factory) -> Path:
    """TORCH_EXTENSIONS_DIR of the strategy runs: where DeepSpeed would put an op it compiles on first use."""
    return shared_root(tmp_path_factory) / "torch-extensions"


@pytest.fixture(scope="session")
def strategy_run(tmp_path_factory, shared_strategy_recipe, strategy_extensions):
    """(strategy, "lora"|"full") -> the finished run of the strategy recipe on 2 processes, only --config_file
    differing; each is trained once per session (DDP is the reference of both the ZeRO and the FSDP2 tests)."""
    root = shared_root(tmp_path_factory)

    def get(strategy: str, method: str) -> Path:
        return build_once(root, f"strategy-run-{strategy}-{method}", lambda d: launch(
            "train.py", ["--config", shared_strategy_recipe, "--output_dir", d,
                         "--lora.enabled", str(method == "lora").lower()],
            nproc=2, config_file=STRATEGY_CONFIGS[strategy],
            extra_env={"TORCH_EXTENSIONS_DIR": str(strategy_extensions)}))

    return get


def independent_nll(model, tokenizer, run_dir: Path) -> dict[str, float]:
    """Per held-out example: summed NLL of the answer given the chat prompt, computed here with plain
    transformers on each unpadded sequence (no fittune code involved)."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = {str(i): json.loads(line) for i, line in
            enumerate((ROOT / "fittune/demo/ai_research_qa.jsonl").read_text().splitlines())}
    out = {}
    for ex_id in json.loads((run_dir / "heldout_ids.json").read_text())["ids"]:
        row = rows[ex_id]
        msgs = ([{"role": "system", "content": cfg["data"]["system_prompt"]}] if cfg["data"]["system_prompt"] else [])
        msgs.append({"role": "user", "content": row["question"]})
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(row["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([p + a])).logits[0].float().log_softmax(-1)
        out[ex_id] = -sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(a))
    return out
