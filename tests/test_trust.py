"""No foreign code by default: a checkpoint whose loading unpickles (DeepSpeed ZeRO shards, FSDP2's
distributed-checkpoint metadata) is read only from a run directory fittune wrote, or with
--trust_checkpoint; fittune's own torch.load calls never unpickle code. In-process, no launch."""

import ast
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from test_checkpoints import run_dir, save, small_target


def payload(evidence: Path):
    """An object whose unpickling creates `evidence` (stands for any code a foreign pickle could run)."""

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(evidence),)

    return Payload()


def test_sharded_resume_needs_a_fittune_run_or_the_flag(tmp_path, monkeypatch):
    from fittune.checkpoints import load_checkpoint, read_state
    from fittune.errors import FittuneError
    from fittune.strategy import Strategy

    # the decision is the strategy's (a ZeRO-2 resume goes through DeepSpeed's pickle loader); the files
    # themselves are an accelerate checkpoint this single process can read once trusted
    t = dataclasses.replace(small_target(), strategy=Strategy(1, zero_stage=2))
    out = run_dir(tmp_path)
    ours = save(t, out, 1)
    received = tmp_path / "received" / "step-00000001"  # the same files, from somewhere else
    shutil.copytree(ours, received)
    planted = out / "checkpoints" / "step-00000009"  # a link inside our run is judged by where it points
    planted.symlink_to(received)
    loads = []
    real_load = t.accelerator.load_state
    monkeypatch.setattr(t.accelerator, "load_state", lambda d: loads.append(d) or real_load(d))
    for path in (received, planted):
        with pytest.raises(FittuneError) as e:
            load_checkpoint(t, path, read_state(path), trusted=False)
        msg = str(e.value)
        assert "code-equivalent" in msg and "trusted source" in msg and "--trust_checkpoint" in msg
    assert loads == []  # refused before anything was read
    assert load_checkpoint(t, ours, read_state(ours), trusted=False) == "exact"  # fittune's own run
    assert load_checkpoint(t, received, read_state(received), trusted=True) == "exact"  # the user's word
    assert loads == [str(ours), str(received)]
    # a whole run received from elsewhere (a copy or an unpacked archive) carries its .fittune marker: its
    # seal is bound to the directory it was made in, so the copy is not trusted; a rename keeps it trusted
    copied = tmp_path / "copied-run"
    shutil.copytree(out, copied, symlinks=True)
    moved = tmp_path / "moved-run"
    out.rename(moved)
    for path, trusted in ((copied / "checkpoints" / ours.name, False), (moved / "checkpoints" / ours.name, True)):
        if trusted:
            assert load_checkpoint(t, path, read_state(path), trusted=False) == "exact"
        else:
            with pytest.raises(FittuneError, match="seal does not verify.*--trust_checkpoint"):
                load_checkpoint(t, path, read_state(path), trusted=False)
    # the same directory under another account (another key) is not trusted either
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "other-account"))
    with pytest.raises(FittuneError, match="--trust_checkpoint"):
        load_checkpoint(t, moved / "checkpoints" / ours.name, read_state(ours if ours.exists() else
                                                                           moved / "checkpoints" / ours.name), trusted=False)
    assert loads == [str(ours), str(received), str(moved / "checkpoints" / ours.name)]


def test_a_run_is_fittunes_by_its_marker_alone(tmp_path, tiny_model_dir):
    """A directory that merely looks like a run (config.yaml with a `run:` section, a train_log.jsonl), as a
    received one or a user's own project may, is neither trusted nor fittune's to replace or remove."""
    from fittune.errors import FittuneError
    from fittune.export import main
    from fittune.rundir import RunDir, inspect_output_dir, owned

    evidence = tmp_path / "pickle-ran"
    look_alike = tmp_path / "received"
    ckpt = fake_zero_checkpoint(look_alike, tiny_model_dir, evidence)
    (look_alike / "config.yaml").write_text("seed: 1\nrun:\n  model_path: x\n")
    (look_alike / "train_log.jsonl").write_text('{"step": 1}\n')
    (look_alike / "thesis.tex").write_text("mine")
    assert not owned(look_alike)
    with pytest.raises(FittuneError, match="code-equivalent.*--trust_checkpoint"):
        main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "model")])
    assert not evidence.exists()
    for overwrite in (False, True):
        with pytest.raises(FittuneError, match="was not created by fittune"):
            RunDir.claim(inspect_output_dir(look_alike, None, overwrite), None, overwrite, "train.py")
    assert (look_alike / "thesis.tex").read_text() == "mine"


def test_unsharded_resume_reads_tensors_only(tmp_path):
    """One process / DDP: accelerate's loader is weights_only, so no trust is needed and a foreign pickle
    planted in optimizer.bin never runs (one clear error instead)."""
    from fittune.checkpoints import load_checkpoint, read_state
    from fittune.errors import FittuneError

    t = small_target()
    received = tmp_path / "received" / "step-00000001"
    shutil.copytree(save(t, run_dir(tmp_path), 1), received)
    assert load_checkpoint(t, received, read_state(received), trusted=False) == "exact"
    evidence = tmp_path / "pickle-ran"
    torch.save({"state": payload(evidence)}, received / "optimizer.bin")
    with pytest.raises(FittuneError, match="optimizer.bin cannot be read") as refused:
        load_checkpoint(t, received, read_state(received), trusted=False)
    assert not evidence.exists()
    # what it holds, said; never torch's advice to load it again with weights_only=False (which runs the code)
    assert "a pickled object other than tensors (posix.mkdir), which fittune never unpickles" in str(refused.value)
    # the RNG state too, which accelerate only logs when it cannot load it (was: "exact" restore, RNG not restored)
    shutil.copy(received.parent.parent / "run" / "checkpoints" / "step-00000001" / "optimizer.bin", received)
    torch.save({"state": payload(evidence)}, received / "random_states_0.pkl")
    with pytest.raises(FittuneError, match=r"random_states_0.pkl cannot be read \(it holds a pickled object other "):
        load_checkpoint(t, received, read_state(received), trusted=False)
    assert not evidence.exists()
    assert "weights_only" not in str(refused.value)


def fake_zero_checkpoint(root: Path, model_dir: Path, evidence: Path) -> Path:
    """A checkpoint laid out like DeepSpeed's (pytorch_model/ shards) whose shards run code when unpickled."""
    ckpt = root / "checkpoints" / "step-00000004"
    (ckpt / "pytorch_model").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"x": payload(evidence)}, ckpt / "pytorch_model" / name)
    (root / "config.yaml").write_text(yaml.safe_dump({"run": {"model_path": str(model_dir)}}))
    return ckpt


def test_export_of_zero_shards_needs_a_fittune_run_or_the_flag(tmp_path, tiny_model_dir):
    from fittune.errors import FittuneError
    from fittune.export import main

    evidence = tmp_path / "pickle-ran"
    ckpt = fake_zero_checkpoint(tmp_path / "received", tiny_model_dir, evidence)
    with pytest.raises(FittuneError, match="code-equivalent.*--trust_checkpoint"):
        main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "model")])
    assert not evidence.exists() and not (tmp_path / "model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["received"]  # no half-written export left behind
    # with the flag the shards are read: DeepSpeed's own loader unpickles them (and so runs their code)
    with pytest.raises(Exception):
        main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "model"), "--trust_checkpoint"])
    assert evidence.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["pickle-ran", "received"]


def _load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            # dcp.load (torch.distributed.checkpoint) reads its tensors weights_only itself; its .metadata is a
            # pickle, read only after require_trusted (test_export: a received FSDP2 checkpoint is refused)
            if name == "load" and not (isinstance(node.func, ast.Attribute) and node.func.value is not None
                                       and getattr(node.func.value, "id", "") in ("json", "yaml", "dcp", "pickle")):
                yield node


def _pickle_calls(tree: ast.AST):
    """Calls into pickle (`pickle.load`, `pickle.loads`, `pickle.Unpickler`, `from pickle import load`): fittune
    never unpickles a file itself (the libraries that do are called only after require_trusted)."""
    local = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "pickle"
             for a in n.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "pickle"
                    or isinstance(f, ast.Name) and f.id in local):
                yield node


def test_fittunes_own_torch_loads_are_weights_only():
    """A guard: every `torch.load` / accelerate `load` call in fittune passes weights_only=True."""
    found = []
    for f in sorted((ROOT / "fittune").rglob("*.py")):
        for call in _load_calls(ast.parse(f.read_text())):
            kw = {k.arg: k.value for k in call.keywords}
            found.append(f.name)
            ok = "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value
            assert ok, f"{f}:{call.lineno}: a load without weights_only=True"
        for call in _pickle_calls(ast.parse(f.read_text())):
            raise AssertionError(f"{f}:{call.lineno}: fittune unpickles a file itself")
    assert found  # the scan sees fittune's own loads (checkpoints.py)
    bad = "import pickle\nfrom pickle import loads as L\npickle.load(f)\nL(b)\npickle.Unpickler(f).load()\n"
    assert len(list(_pickle_calls(ast.parse(bad)))) == 3  # the scan sees each way of calling it


def test_trust_needs_fittunes_own_sealed_save_and_an_owner_only_key(tmp_path, monkeypatch):
    """A directory unpacked into a trusted run's checkpoints/ is not fittune's save; a marker without a seal
    and a key others can read are each named as the reason."""
    import json

    from fittune.checkpoints import require_trusted
    from fittune.errors import FittuneError
    from fittune.rundir import MARKER, trust_key_path

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    t = small_target()
    out = run_dir(tmp_path)
    ours = save(t, out, 1)
    require_trusted(ours, False, "shards")  # fittune's own save, here
    unpacked = out / "checkpoints" / "step-00000002"
    shutil.copytree(ours, unpacked)  # its marker came along, its seal did not
    with pytest.raises(FittuneError, match="seal does not verify"):
        require_trusted(unpacked, False, "shards")
    plain = out / "checkpoints" / "received"
    plain.mkdir()
    with pytest.raises(FittuneError, match="not a checkpoint of a fittune run"):
        require_trusted(plain, False, "shards")
    marker = json.loads((ours / MARKER).read_text())
    (ours / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "seal"}))
    with pytest.raises(FittuneError, match="carries no seal"):
        require_trusted(ours, False, "shards")
    (ours / MARKER).write_text(json.dumps(marker))
    trust_key_path().chmod(0o644)  # readable by others: anyone could forge seals with it
    with pytest.raises(FittuneError, match="no usable trust key"):
        require_trusted(ours, False, "shards")
    trust_key_path().chmod(0o600)
    require_trusted(ours, False, "shards")


def test_flash_attention_without_its_package_never_fetches_a_hub_kernel(tmp_path, monkeypatch):
    """Without flash-attn installed (and with the `kernels` package), transformers would download and run
    kernels-community's flash-attn code for `flash_attention_2`: refused before loading, unless
    model.trust_remote_code; attention transformers ships (sdpa, eager) never asks."""
    import transformers.utils
    from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX

    from fittune.config import build_config
    from fittune.errors import FittuneError
    from fittune.model import hub_kernel_fallback, load_model

    monkeypatch.setattr(transformers.utils, "is_kernels_available", lambda: True)
    monkeypatch.setitem(FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check", lambda: False)
    assert hub_kernel_fallback("flash_attention_2") == "kernels-community/flash-attn2"
    assert hub_kernel_fallback("sdpa") is None and hub_kernel_fallback("eager") is None
    cfg = build_config(None, {"model.attn_implementation": "flash_attention_2"})
    with pytest.raises(FittuneError, match="flash_attention_2: transformers would download and run the Hub kernel "
                                           "kernels-community/flash-attn2 for it"):
        load_model(str(tmp_path / "nowhere"), cfg, torch.float32)
    assert hub_kernel_fallback("paged|flash_attention_2") == "kernels-community/flash-attn2"  # prefix dropped
    monkeypatch.setitem(FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check", lambda: True)
    assert hub_kernel_fallback("flash_attention_2") is None  # the installed package is what runs

    class OwnKernel:  # a model class that names its own flash attention: transformers switches to it
        _compatible_flash_implementations = ["kernels-community/vllm-flash-attn3"]

    assert hub_kernel_fallback("flash_attention_2", OwnKernel) == "kernels-community/vllm-flash-attn3"
    assert hub_kernel_fallback("sdpa", OwnKernel) is None


def test_the_commands_run_no_code_from_the_current_directory(tmp_path):
    """Found by a review: `python -m fittune.export`, run from inside a received model directory, imported its
    yaml.py (python -m puts the current directory first on the import path) before any check could run. The
    installed commands (pyproject's [project.scripts], what the README shows) do not look there."""
    evidence = tmp_path / "code-ran"
    received = tmp_path / "received"
    received.mkdir()
    (received / "yaml.py").write_text(f"import pathlib\npathlib.Path({str(evidence)!r}).write_text('ran')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for command in ("fittune-export", "fittune-plan"):
        path = shutil.which(command)
        assert path is not None, f"{command} is not installed: pip install -e . (make install-test) installs it"
        proc = subprocess.run([path, "--help"], cwd=received, env=env, capture_output=True, text=True)
        assert proc.returncode == 0 and command in proc.stdout and not evidence.exists(), proc.stderr[-2000:]
    # what they avoid: the same program as `python -m` runs the directory's code
    subprocess.run([sys.executable, "-m", "fittune.export", "--help"], cwd=received, env=env, capture_output=True)
    assert evidence.read_text() == "ran"
