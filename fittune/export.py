"""Export trained weights as a standalone Hugging Face model directory.

    fittune-export --checkpoint DIR --output OUT [--merge] [--trust_checkpoint] [--trust_remote_code]

DIR may be:
  * a run's `final/` (or the run dir): an adapter is copied, or with `--merge` folded into its base model;
  * a training checkpoint `checkpoints/step-N/`: a LoRA checkpoint exports its unsharded adapter (merged with
    `--merge`); a full fine-tuning checkpoint is consolidated into one safetensors model, from DeepSpeed ZeRO
    shards (any stage), FSDP2's sharded torch.distributed.checkpoint files, or accelerate's single-file state.
The result loads with `AutoModelForCausalLM.from_pretrained(OUT)` (or PEFT for an unmerged adapter) without
fittune or DeepSpeed; tied input/output embeddings stay tied.

A run that is being trained is refused (its lock; its checkpoints rotate and its final/ is replaced while it
trains): export once it has finished. While exporting, the run is not resumed or replaced (several exports and
evaluations of it may run at once).

OUT must not exist, or be an empty directory: the export is built in a hidden directory next to it, fsynced
and renamed into place, so OUT is either complete or absent (or still empty). DeepSpeed shards are pickles (DeepSpeed reads them with
`torch.load(weights_only=False)`, which runs any code they hold), and so is FSDP2's checkpoint metadata: they
are read only from a checkpoint fittune saved on this machine under your account (its sealed marker), or with
`--trust_checkpoint` for a checkpoint from a source you trust. The base model's (and tokenizer's) own code,
which a `config.json` or `tokenizer_config.json` may name (`auto_map`), runs only with `--trust_remote_code`,
and attention is always transformers' own (never a Hub kernel a `config.json` names).
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from fittune.builtin_models import builtin_spec, ensure_builtin, is_builtin
from fittune.checkpoints import check_dcp_files, check_files, require_trusted, saved_under
from fittune.config import TinyModelConfig
from fittune.entry import run_cli
from fittune.errors import FittuneError, first_line
from fittune.rundir import (
    LOCK_INFO,
    MARKER,
    OWN_CONFIG,
    OWN_HELDOUT_IDS,
    DirLock,
    RunLayout,
    check_name_room,
    check_not_cwd,
    check_not_inside_fittune_dir,
    complete_checkpoints,
    fsync_dir,
    fsync_tree,
    hold_for_reading,
    keep_access,
    missing_parents,
    owned,
    owning_run,
    readable_like_umask,
    remove_if_empty,
    rename_noreplace,
    reserve_build,
    resolved,
    write_guard,
)

USAGE = "--checkpoint DIR --output OUT [--merge] [--trust_checkpoint] [--trust_remote_code]"
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's save_state under FSDP with SHARDED_STATE_DICT


def _run_config(d: Path) -> dict:
    """The recipe of the model in `d` (a run, its final/, a checkpoint's adapter/ or a copy of one): the model's
    own fittune_config.yaml, else the config.yaml of the fittune run or checkpoint that holds it, and only
    where neither exists a config.yaml in an unmarked folder around it (a run received without its marker:
    its pickled files still need --trust_checkpoint)."""
    around = (d, d.parent, d.parent.parent)
    ours = [h for h in around if owned(h, "train") or owned(h, "checkpoint")]
    for candidate in (d / OWN_CONFIG, *(h / "config.yaml" for h in ours + [h for h in around if h not in ours])):
        if candidate.is_file():
            try:
                return yaml.safe_load(candidate.read_text()) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise FittuneError(f"{candidate} is not valid YAML ({e}): restore the run's config.yaml") from None
    return {}


def _base_model_path(adapter_dir: Path, cfg: dict) -> str:
    model = cfg.get("model") or {}
    if is_builtin(str(model.get("name_or_path", ""))) and "seed" in cfg:
        # the run recorded a cache path, which may have been cleared or damaged since: checked, rebuilt
        tiny = TinyModelConfig(**(model.get("tiny") or {}))
        return str(ensure_builtin(builtin_spec(model["name_or_path"], tiny, cfg["seed"]), print))
    path = (cfg.get("run") or {}).get("model_path")
    if path:
        return path
    import json

    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def _link_root(src: Path) -> Path:
    """Where the links of a model directory may point: inside it, or inside the Hugging Face cache repository
    it is a snapshot of (`models--ORG--NAME/snapshots/REV/FILE` links to `models--ORG--NAME/blobs/HASH`)."""
    real = src.resolve()
    return next((p for p in real.parents if p.name.startswith("models--") and (p / "blobs").is_dir()), real)


def _refuse_links(src: Path) -> None:
    """Refuse a source directory holding a symbolic link to anything but a regular file of the model (inside
    it, or its Hugging Face cache blobs), or anything but directories and regular files: a link in a received
    directory could name any file of this account (~/.ssh/id_rsa), which the export would carry, readable by
    all; a FIFO would block the copy for ever."""
    def unreadable(e: OSError) -> None:  # os.walk would skip the directory, and the export lack its files
        raise FittuneError(f"cannot read {e.filename} ({e.strerror}): fix its permissions") from None

    root = _link_root(src)
    for top, dirs, files in os.walk(src, onerror=unreadable):  # a link to a directory is listed, not followed
        for name in sorted(dirs + files):
            entry = Path(top) / name
            if entry.is_symlink():
                target = entry.resolve()
                if target.is_file() and target.is_relative_to(root) and name not in dirs:
                    continue
                raise FittuneError(f"{entry} is a symbolic link to {target}, outside the model: an export copies "
                                   f"only the model's own files (a link could carry any file it points to into the "
                                   f"export); replace it with the file itself (cp -L) if it is the model's, or "
                                   f"remove it")
            if not (entry.is_dir() or entry.is_file()):
                raise FittuneError(f"{entry} is not a regular file: an export copies only the model's own files; "
                                   f"remove it")


def _copy_model_files(src: Path, dst: Path) -> None:
    """The files of a model or adapter directory (checked by `_refuse_links`), sub-directories too, into `dst`;
    never fittune's own marker and lock, which describe the directory, not the model."""
    for top, _, files in os.walk(src):
        into = dst / Path(top).relative_to(src)
        into.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name not in (MARKER, LOCK_INFO):
                shutil.copyfile(Path(top) / name, into / name)


def _tokenizer_source(d: Path, base: str) -> str:
    return str(d) if (d / "tokenizer_config.json").is_file() else base


def _rename_new(tmp: Path, out: Path, empty_dir: bool) -> None:
    """Rename `tmp` to `out` only if `out` does not exist (`rundir.rename_noreplace`). `empty_dir`: `out` was an
    empty directory (made for the export): a plain rename replaces it only while it is still empty."""
    if empty_dir:
        try:
            tmp.rename(out)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise FittuneError(f"{out} was filled while exporting: choose a new --output directory") from None
    try:
        if rename_noreplace(tmp, out):
            return
    except FileExistsError:
        raise FittuneError(f"{out} appeared while exporting: choose a new --output directory") from None
    if out.exists():  # no renameat2 here: check, then rename (a small window)
        raise FittuneError(f"{out} appeared while exporting: choose a new --output directory")
    tmp.rename(out)


@dataclass(frozen=True)
class ExportTrust:
    """What an export may run besides reading tensors: both off unless its command line says so."""

    checkpoint: bool = False
    """Unpickle DeepSpeed's / FSDP2's shards of a checkpoint fittune did not save here (--trust_checkpoint)."""
    remote_code: bool = False
    """Run the base model's or tokenizer's own Python code (`auto_map`; --trust_remote_code)."""


def _from_base(loader, name: str, trust: ExportTrust, **kwargs):
    """Load the base model, its config or tokenizer; a missing one is a clear error (transformers raises
    OSError, which must not read as a failed write). Their own code runs only when trusted (transformers
    would otherwise ask on the terminal, and a `y` piped in ran it)."""
    try:
        return loader.from_pretrained(name, trust_remote_code=trust.remote_code, **kwargs)
    except (OSError, ValueError) as e:  # ValueError: a damaged config.json ("Unrecognized model ...")
        if "custom code" in str(e) and not trust.remote_code:
            raise FittuneError(f"{name} names its own code (auto_map), which is not run: pass --trust_remote_code "
                               f"only if you trust where it came from") from None
        raise FittuneError(f"cannot load {name} ({str(e).strip().splitlines()[0]}): the checkpoint's base model "
                           f"must be available at the path its run recorded") from None


def _export_adapter(src: Path, adapter_dir: Path, tmp: Path, cfg: dict, merge: bool, trust: ExportTrust) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = _base_model_path(adapter_dir, cfg)
    tokenizer = _from_base(AutoTokenizer, _tokenizer_source(src, base), trust)
    if merge:
        from peft import PeftModel

        # eager: the merge runs no attention, and a config.json naming a Hub kernel would fetch its code
        model = _from_base(AutoModelForCausalLM, base, trust, dtype=torch.float32, attn_implementation="eager")
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        _copy_model_files(adapter_dir, tmp)
    tokenizer.save_pretrained(tmp)


def _export_consolidated(src: Path, tmp: Path, cfg: dict, trust: ExportTrust) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = (cfg.get("run") or {}).get("model_path")
    if not base:
        raise FittuneError(f"{src} has no config.yaml naming its base model: cannot rebuild the architecture")
    state = _consolidated_state_dict(src, trust.checkpoint)
    config = _from_base(AutoConfig, base, trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager",
                                                 trust_remote_code=trust.remote_code)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FittuneError(f"{src} does not match {base}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.save_pretrained(tmp, safe_serialization=True)
    _from_base(AutoTokenizer, base, trust).save_pretrained(tmp)


def _describe(src: Path, tmp: Path) -> None:
    """The run's recipe and held-out ids beside the exported weights (as final/ has them), so evaluate.py
    scores the export on the run's held-out rows wherever it is copied."""
    run = owning_run(src)
    sources = ((RunLayout(run).config, RunLayout(run).heldout_ids) if run is not None else
               (src / OWN_CONFIG, src / OWN_HELDOUT_IDS))
    for source, name in zip(sources, (OWN_CONFIG, OWN_HELDOUT_IDS)):
        if source.is_symlink():  # fittune writes these itself, never as links (`_refuse_links`)
            raise FittuneError(f"{source} is a symbolic link, which fittune never writes: replace it with the "
                               f"file itself, or remove it")
        if source.is_file() and not (tmp / name).exists():
            shutil.copyfile(source, tmp / name)


def _write_export(src: Path, tmp: Path, merge: bool, trust: ExportTrust) -> None:
    """Everything the export holds, into the empty directory `tmp`."""
    _refuse_links(src)
    cfg = _run_config(src)
    adapter_dir = src if (src / "adapter_config.json").is_file() else src / "adapter"
    if (adapter_dir / "adapter_config.json").is_file():
        _export_adapter(src, adapter_dir, tmp, cfg, merge, trust)
    elif (src / "config.json").is_file():
        if merge:
            raise FittuneError(f"{src} is a full model, not an adapter: nothing to merge (drop --merge)")
        _copy_model_files(src, tmp)
    elif merge:
        raise FittuneError(f"{src} is a full fine-tuning checkpoint, not an adapter: nothing to merge (drop --merge)")
    else:
        _export_consolidated(src, tmp, cfg, trust)
    _describe(src, tmp)


def export(checkpoint: str, output: str, merge: bool = False, trust_checkpoint: bool = False,
           trust_remote_code: bool = False) -> Path:
    """Write a standalone model (or adapter) directory to `output` (new, or an empty directory) whole or not at
    all; returns its path. `trust_checkpoint`: read DeepSpeed's pickled shards from outside a fittune run;
    `trust_remote_code`: run the base model's own code."""
    trust = ExportTrust(trust_checkpoint, trust_remote_code)
    src = Path(checkpoint)
    if not src.is_dir():
        raise FittuneError(f"checkpoint not found: {checkpoint}")
    out = Path(output).absolute()  # `.` has no name to build a sibling of
    check_not_cwd(Path(output), "--output")
    empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())  # e.g. made with mkdir for it
    if (out.exists() or out.is_symlink()) and not empty_dir:
        raise FittuneError(f"{output} already exists and is not an empty directory: choose a new --output "
                           f"directory (fittune writes only where nothing would be replaced)")
    check_not_inside_fittune_dir(out, "--output")  # a run's final/, eval/ ... are replaced with what is inside
    check_name_room(out, "--output")
    weights = _weights_of(src)
    if resolved(out).is_relative_to(resolved(weights)):  # its build would be copied into itself
        raise FittuneError(f"--output {output} is inside the checkpoint being exported ({weights}): choose a "
                           f"directory outside it")
    lock = _lock_source_run(src)  # first: a run being trained is said to be
    try:
        _build_and_publish(weights, out, merge, trust, empty_dir)
    finally:
        if lock is not None:
            lock.release()
    print(f"fittune: exported {checkpoint} -> {out}", flush=True)
    return out


def _weights_of(src: Path) -> Path:
    """What to export from `src`: a run's final/, or `src` itself; a run without final/ names its checkpoints."""
    if RunLayout(src).final.is_dir() and RunLayout(src).config.is_file():
        return RunLayout(src).final
    if owned(src, "train"):  # a run that stopped before its end: its checkpoints are what it has
        saves = complete_checkpoints(src)
        hint = f"export its last checkpoint: --checkpoint {saves[-1]}, or " if saves else ""
        raise FittuneError(f"{src} is a fittune training run with no final/ yet (it stopped before the end): "
                           f"{hint}finish it with train.py --output_dir {src} --resume auto")
    return src


def _lock_source_run(src: Path) -> DirLock | None:
    """The shared lock of the run `src` lies in, held while exporting: a run being trained (its checkpoints
    rotated, its final/ replaced) is refused, and it is not resumed or replaced until the export ends."""
    run = owning_run(src)
    if run is None:
        return None
    return hold_for_reading(run, "export", "export")


def _build_and_publish(src: Path, out: Path, merge: bool, trust: ExportTrust, empty_dir: bool) -> None:
    """Build the export in a hidden directory of its own next to `out` (marked and locked: a killed export's is
    removed by the next export to `out`, a live one's refuses it), then rename it into place (in place of `out`
    when that is an empty directory, `empty_dir`). A failure leaves no trace, the directories made for it too."""
    made, tmp, lock = missing_parents(out), None, None
    try:
        with write_guard(f"the export {out}", f"nothing was written to {out}"):
            out.parent.mkdir(parents=True, exist_ok=True)
            # a name of our own next to OUT (same filesystem, so the final rename is atomic); never a user's path
            tmp, lock = reserve_build(out, ".export-", "export", "export", busy=lambda holder: (
                f"{out} is being exported to by {holder}: wait for it to finish, or choose another --output"))
            _write_export(src, tmp, merge, trust)
            readable_like_umask(tmp)
            if empty_dir:  # the user's empty directory is replaced: its permissions and group are kept
                keep_access(out.stat(), tmp)
            fsync_tree(tmp)
            _rename_new(tmp, out, empty_dir)
            tmp = None  # published: a failure from here on leaves the export whole
            for name in (MARKER, LOCK_INFO):  # the export is the model's files alone (the lock's fd stays held)
                (out / name).unlink()
            fsync_dir(out)
            fsync_dir(out.parent)
    except BaseException:
        if tmp is not None and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)  # ours (the unique name above), half-written
        remove_if_empty(made)  # and the directories made for it: a refused export leaves no trace
        raise
    finally:
        if lock is not None:
            lock.release()


def _consolidated_state_dict(src: Path, trusted: bool) -> dict[str, torch.Tensor]:
    """One state dict from a training checkpoint: ZeRO shards (any stage), FSDP2 shards or accelerate's model
    file, as the checkpoint's trainer state says it was saved (by its files only where it has none)."""
    saved = saved_under(src)
    if saved.deepspeed if saved else (src / "pytorch_model").is_dir():
        require_trusted(src, trusted, "DeepSpeed ZeRO shards (DeepSpeed's zero_to_fp32 reads them with "
                                      "torch.load(weights_only=False))")
        check_files(src, export=True)  # a cut shard is named here, not as a zip error from inside DeepSpeed
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(src), tag="pytorch_model")
        except (OSError, ValueError, RuntimeError, KeyError) as e:  # a shard missing, or not DeepSpeed's layout
            reason = first_line(e)
            raise FittuneError(f"checkpoint {src} is damaged: its ZeRO shards cannot be read ({reason}); export "
                               f"an older checkpoint ({src.parent}/step-N)") from None
    if saved.fsdp if saved else (src / FSDP_MODEL_DIR).is_dir():
        require_trusted(src, trusted, "FSDP2's torch.distributed.checkpoint metadata (.metadata is a pickle)")
        check_dcp_files(src, export=True, needs=(FSDP_MODEL_DIR,))  # a missing or cut shard is named here
        return _fsdp2_state_dict(src / FSDP_MODEL_DIR)
    files = sorted(src.glob("model*.safetensors"))
    if not files:
        raise FittuneError(f"{src} holds no model weights (no ZeRO or FSDP2 shards, no model.safetensors)")
    from safetensors.torch import load_file

    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as e:  # safetensors' SafetensorError for a cut or overwritten file
            raise FittuneError(f"{f} cannot be read ({str(e).strip() or type(e).__name__}): the checkpoint is "
                               f"damaged; export another checkpoint") from None
    return state


def _fsdp2_state_dict(shards: Path) -> dict[str, torch.Tensor]:
    """The whole model from FSDP2's sharded checkpoint (accelerate's `save_state`: torch.distributed.checkpoint
    files holding {"model": state_dict}), read in this one process: every tensor is allocated whole, with the
    shape and dtype the checkpoint's metadata records, and the shards of all ranks are read into it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(shards))
    try:
        entries = reader.read_metadata().state_dict_metadata
        whole = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
                 if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        if not whole:
            raise FittuneError(f"{shards} holds no model tensors: the checkpoint is damaged; export another one")
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process, on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": {k[len("model."):]: t for k, t in whole.items()}}, storage_reader=reader,
                     no_dist=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, CheckpointException) as e:
        if isinstance(e, CheckpointException):  # a missing or cut shard: the reader's own error, per rank
            e = next(iter(e.failures.values()))[0]
        reason = first_line(e)
        raise FittuneError(f"{shards} cannot be read ({type(e).__name__}: {reason}): the checkpoint is damaged; "
                           f"export another checkpoint") from None
    return {k[len("model."):]: t for k, t in whole.items()}


def main(argv: list[str]) -> None:
    """`fittune-export --checkpoint DIR --output OUT [--merge] [--trust_checkpoint] [--trust_remote_code]`."""
    from fittune.cli import split_flag

    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    checkpoint, rest = split_flag(argv, "checkpoint")
    output, rest = split_flag(rest, "output")
    flags = {"--merge", "--trust_checkpoint", "--trust_remote_code"}
    merge, trust, remote = "--merge" in rest, "--trust_checkpoint" in rest, "--trust_remote_code" in rest
    rest = [a for a in rest if a not in flags]
    if rest:
        raise FittuneError(f"unexpected arguments {rest}: use {USAGE}")
    if not checkpoint or not output:
        raise FittuneError(f"--checkpoint DIR and --output OUT are required: {USAGE}")
    from fittune.distributed import name_deepspeed_cpu_accelerator

    name_deepspeed_cpu_accelerator()  # a ZeRO checkpoint's conversion imports DeepSpeed
    export(checkpoint, output, merge, trust, remote)


def cli() -> None:
    """The `fittune-export` command (pyproject's [project.scripts])."""
    run_cli(lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
