"""Shared helpers: run the real entry points (`accelerate launch train.py / evaluate.py`) on tiny models."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "vocab_size": 512}


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip cleanly on a machine without CUDA (CI), and run where there is one."""
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
           timeout: int = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch [--config_file F] script args` as a subprocess, from the repo root."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", str(ROOT / config_file)] + (["--num_processes", str(nproc)] if nproc > 1 else [])
    elif nproc > 1:
        cmd += ["--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"), "--num_processes", str(nproc)]
    else:
        cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), str(ROOT / script)] + [str(a) for a in args]
    env = child_env(1 if nproc > 1 else 2)
    env.update(extra_env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # A CPU rank under DeepSpeed + gloo very rarely aborts in C++ with this message after its work is
        # done (once in ~60 launches here, not reproducible on demand). Only that exact abort is retried,
        # once, and it is reported; any other failure fails the test.
        print(f"retrying once after a C++ abort (std::terminate) in: {' '.join(cmd)}", file=sys.stderr)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode})\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def run_python(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python script args` (no launcher), for the quick bad-input checks."""
    return subprocess.run([sys.executable, str(ROOT / script)] + [str(a) for a in args], cwd=ROOT,
                          env=child_env(2), capture_output=True, text=True, timeout=timeout)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines() if line]


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="session", autouse=True)
def fittune_cache(tmp_path_factory):
    """One built-in model cache for the session ($FITTUNE_CACHE, inherited by every launched process);
    a FITTUNE_CACHE already set (e.g. a directory CI keeps between runs) is used as is."""
    if os.environ.get("FITTUNE_CACHE"):
        yield Path(os.environ["FITTUNE_CACHE"])
        return
    path = tmp_path_factory.mktemp("fittune-cache")
    os.environ["FITTUNE_CACHE"] = str(path)
    yield path
    os.environ.pop("FITTUNE_CACHE", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 model + tokenizer saved with save_pretrained, as a user's local model directory."""
    from fittune.builtin_models import build_tiny_model_dir
    from fittune.config import TinyModelConfig

    return build_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-qwen2", TinyModelConfig(**TINY_SHAPE), 0)


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """Write a tiny fp32 recipe on the built-in data; returns a function(overrides...) -> config path."""

    def make(name: str = "tiny.yaml", **sections) -> Path:
        tree = {
            "output_dir": str(tmp_path / "run"),
            "seed": 0,
            "log_with": "none",
            "model": {"name_or_path": str(tiny_model_dir)},
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
        return write_config(tmp_path / name, tree)

    return make


STRATEGY_STEPS = 6


def strategy_recipe(directory: Path, model_dir: Path) -> Path:
    """The tiny recipe every sharding strategy (DDP, ZeRO, FSDP2) is run with and compared on."""
    path = Path(directory) / "recipe.yaml"
    return write_config(path, {
        "seed": 0, "log_with": "none", "model": {"name_or_path": str(model_dir)},
        "data": {"path": "builtin:ai-research-qa", "choices_column": "choices", "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"micro_batch_size": 2, "grad_accum": 2, "max_steps": STRATEGY_STEPS, "lr": 5e-3,
                  "log_every": 1, "warmup_ratio": 0.2},
        "eval": {"batch_size": 8}})


def strategy_runs(recipe: Path, root: Path, accel_configs: dict[str, str]) -> dict:
    """{(strategy, "lora"|"full"): run dir}: the same command on 2 processes, only --config_file differs."""
    out = {}
    for method in ("lora", "full"):
        for strategy, accel in accel_configs.items():
            d = Path(root) / f"{strategy}-{method}"
            launch("train.py", ["--config", recipe, "--output_dir", d, "--lora.enabled", str(method == "lora").lower()],
                   nproc=2, config_file=accel)
            out[(strategy, method)] = d
    return out


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
