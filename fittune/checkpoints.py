"""Finding what a checkpoint directory holds: the weights, the run it came from, its config and split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fittune.errors import FittuneError


@dataclass
class CheckpointInfo:
    """Where the weights are, which run they belong to, and that run's saved config (if any)."""

    weights_dir: Path
    run_dir: Path | None
    config_file: Path | None

    @property
    def heldout_ids(self) -> list[str] | None:
        path = self.run_dir / "heldout_ids.json" if self.run_dir else None
        return json.loads(path.read_text())["ids"] if path and path.is_file() else None


def _has_weights(d: Path) -> bool:
    return (d / "adapter_config.json").is_file() or (d / "config.json").is_file()


def resolve_checkpoint(path: str) -> CheckpointInfo:
    """Accept a training output dir (uses its final/), final/ itself, or any model / adapter directory."""
    p = Path(path)
    if not p.exists():
        raise FittuneError(f"checkpoint not found: {path}")
    if not p.is_dir():
        raise FittuneError(f"checkpoint must be a directory (a training output dir or its final/): {path}")
    if (p / "config.yaml").is_file() and (p / "final").is_dir():
        return CheckpointInfo(p / "final", p, p / "config.yaml")
    if not _has_weights(p):
        raise FittuneError(f"{path} holds no model or adapter (no config.json / adapter_config.json); "
                           f"pass a training output dir or its final/")
    if (p.parent / "config.yaml").is_file():
        return CheckpointInfo(p, p.parent, p.parent / "config.yaml")
    own = p / "fittune_config.yaml"
    return CheckpointInfo(p, None, own if own.is_file() else None)


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints: output_dir/checkpoints/step-00000012/ (complete) or step-00000012.tmp/ (partial)

STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. A directory is complete once renamed from .tmp, state file inside."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and not d.name.endswith(".tmp")
             and (d / STATE_FILE).is_file()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Directories left by a save that never finished (a crash mid-save)."""
    root = checkpoint_root(output_dir)
    return sorted(d for d in root.glob("step-*.tmp") if d.is_dir()) if root.is_dir() else []


def find_resume_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None (fresh), `auto` (newest complete in output_dir) or a path."""
    if resume is None:
        existing = complete_checkpoints(output_dir)
        if existing:
            raise FittuneError(f"{output_dir} already has checkpoints (newest {existing[-1].name}) from an earlier "
                               f"run: pass --resume auto to continue it, or choose another output_dir")
        return None
    if resume == "auto":
        existing = complete_checkpoints(output_dir)
        return existing[-1] if existing else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FittuneError(f"--resume {resume}: not a complete fittune checkpoint (no {STATE_FILE}); "
                           f"use --resume auto or a checkpoints/step-N directory")
    return path


def read_state(path: Path) -> dict:
    """The trainer state of a checkpoint (JSON: never unpickled)."""
    return json.loads((path / STATE_FILE).read_text())


def check_compatible(state: dict, fingerprint: dict, path: Path) -> None:
    """Refuse a checkpoint written for another model, adapter setup or batch plan, naming each difference."""
    if state.get("format_version") != FORMAT_VERSION:
        raise FittuneError(f"{path} was written by an incompatible fittune version (format "
                           f"{state.get('format_version')}, expected {FORMAT_VERSION})")
    saved = state.get("fingerprint", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
    if diffs:
        raise FittuneError(f"cannot resume from {path}: it belongs to a different run setup ({'; '.join(diffs)}); "
                           f"resume with the same recipe, or start a new output_dir")


def _trainable_named(model) -> list[tuple[str, "torch.nn.Parameter"]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _full_optimizer_state(accelerator, model, optimizer) -> dict:
    """{param name -> {exp_avg, exp_avg_sq}} gathered whole, whatever the sharding (collective under ZeRO)."""
    import torch

    from fittune.strategy import strategy_of

    out = {}
    if strategy_of(accelerator).deepspeed:
        from deepspeed.utils import safe_get_full_optimizer_state

        for name, p in _trainable_named(model):
            out[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in ("exp_avg", "exp_avg_sq")}
        return out
    def whole(t):  # FSDP2 keeps states as DTensor shards: all-gather (a collective, every rank calls it)
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()

    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    for name, p in _trainable_named(model):
        st = inner.state.get(p, {})
        if st:
            out[name] = {k: whole(st[k]) for k in ("exp_avg", "exp_avg_sq")}
        else:  # no step taken yet
            out[name] = {k: torch.zeros(p.shape, dtype=p.dtype) for k in ("exp_avg", "exp_avg_sq")}
    return out


def save_checkpoint(accelerator, model, optimizer, scheduler, output_dir: Path, step: int, state: dict,
                    config_yaml: str, keep: int, lora: bool) -> Path:
    """Write checkpoints/step-N atomically: accelerate's full state (weights, optimizer, scaler, every rank's
    RNG) plus trainer_state.json; LoRA runs add an unsharded adapter + optimizer moments (portable across
    process counts and strategies). Written to step-N.tmp and renamed once every rank has finished."""
    import shutil

    import torch
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    final, tmp = root / f"step-{step:08d}", root / f"step-{step:08d}.tmp"
    failure = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        portable = None
        if lora:
            from peft import get_peft_model_state_dict

            state_dict = accelerator.get_state_dict(model)  # gathered (collective under ZeRO-3)
            moments = _full_optimizer_state(accelerator, accelerator.unwrap_model(model), optimizer)
            portable = (get_peft_model_state_dict(accelerator.unwrap_model(model), state_dict=state_dict), moments)
        if accelerator.is_main_process:
            if portable is not None:
                adapter, moments = portable
                (tmp / "adapter").mkdir()
                accelerator.unwrap_model(model).save_pretrained(tmp / "adapter", state_dict=state_dict)
                flat = {f"{name}::{k}": v.contiguous() for name, d in moments.items() for k, v in d.items()}
                save_file(flat, str(tmp / "adapter_optimizer.safetensors"))
            sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "scheduler": sched, "format_version": FORMAT_VERSION},
                                                     indent=1))
    except OSError as e:  # disk full, permissions: report, keep the previous checkpoint
        failure = e
    failed = torch.tensor([1.0 if failure else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if failed.item():
        previous = complete_checkpoints(output_dir)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise FittuneError(f"could not write checkpoint {tmp} ({failure or 'failed on another rank'}); free disk "
                           f"space or fix permissions of {root}. The previous checkpoint is intact: "
                           f"{previous[-1] if previous else 'none yet'}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path, state: dict, lora: bool) -> str:
    """Restore a checkpoint into the prepared model/optimizer/scheduler. Returns how ("exact" or "portable").

    Same process count and strategy: accelerate's `load_state` (every rank's RNG included), an exact resume.
    Otherwise a LoRA run restores its unsharded adapter and optimizer moments (the data order is still exact:
    it depends only on the global batch); full fine-tuning refuses, naming what to change.
    """
    import torch

    from fittune.strategy import strategy_of

    strategy = strategy_of(accelerator)
    same_layout = state["world_size"] == accelerator.num_processes and state["strategy"] == strategy.name
    sched = dict(state["scheduler"])
    if same_layout:
        accelerator.load_state(str(path))
        how = "exact"
    elif lora and (path / "adapter_optimizer.safetensors").is_file():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        unwrapped = accelerator.unwrap_model(model)
        adapter_file = path / "adapter" / "adapter_model.safetensors"
        adapter = load_file(str(adapter_file))
        if strategy.sharded:
            raise FittuneError(f"{path} was written with {state['world_size']} process(es) under {state['strategy']}; "
                               f"a LoRA checkpoint moves to another layout only into DDP or one process (not "
                               f"DeepSpeed or FSDP), or resume with the original layout")
        set_peft_model_state_dict(unwrapped, adapter)
        flat = load_file(str(path / "adapter_optimizer.safetensors"))
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        steps_taken = state["optimizer_steps"]
        for name, p in _trainable_named(unwrapped):
            fused = inner.defaults.get("fused") or False
            inner.state[p] = {
                "step": torch.tensor(float(steps_taken), device=p.device if fused else "cpu"),
                "exp_avg": flat[f"{name}::exp_avg"].to(p.device, p.dtype),
                "exp_avg_sq": flat[f"{name}::exp_avg_sq"].to(p.device, p.dtype),
            }
        how = "portable"
    else:
        raise FittuneError(f"{path} was written with {state['world_size']} process(es) under {state['strategy']}, "
                           f"this run has {accelerator.num_processes} under {strategy.name}: full "
                           f"fine-tuning resumes only with the same layout (sharded optimizer states); relaunch "
                           f"with the original accelerate config and process count")
    sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sched)
    # load_state_dict restores the schedule's position but not the optimizer's current lr (set by step())
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    return how
