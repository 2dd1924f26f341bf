"""Export trained weights as a standalone Hugging Face model directory.

    python -m fittune.export --checkpoint DIR --output OUT [--merge]

DIR may be:
  * a run's `final/` (or the run dir): an adapter is copied, or with `--merge` folded into its base model;
  * a training checkpoint `checkpoints/step-N/`: a LoRA checkpoint exports its unsharded adapter (merged with
    `--merge`); a full fine-tuning checkpoint is consolidated into one safetensors model, from DeepSpeed ZeRO
    shards (any stage) or from accelerate's single-file state.
The result loads with `AutoModelForCausalLM.from_pretrained(OUT)` (or PEFT for an unmerged adapter) without
fittune or DeepSpeed; tied input/output embeddings stay tied.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import yaml

from fittune.errors import FittuneError, run_cli


def _run_config(d: Path) -> dict:
    for candidate in (d / "fittune_config.yaml", d / "config.yaml", d.parent / "config.yaml", d.parent.parent / "config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


def _base_model_path(adapter_dir: Path, cfg: dict) -> str:
    path = (cfg.get("run") or {}).get("model_path")
    if path:
        return path
    import json

    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def _tokenizer_source(d: Path, base: str) -> str:
    return str(d) if (d / "tokenizer_config.json").is_file() else base


def export(checkpoint: str, output: str, merge: bool = False) -> Path:
    """Write a standalone model (or adapter) directory to `output`; returns its path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(checkpoint)
    if not src.is_dir():
        raise FittuneError(f"checkpoint not found: {checkpoint}")
    if (src / "final").is_dir() and (src / "config.yaml").is_file():
        src = src / "final"
    out = Path(output)
    if out.exists():
        raise FittuneError(f"{output} already exists: choose a new --output directory")
    cfg = _run_config(src)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    adapter_dir = src if (src / "adapter_config.json").is_file() else src / "adapter"
    if (adapter_dir / "adapter_config.json").is_file():
        base = _base_model_path(adapter_dir, cfg)
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(src, base))
        if merge:
            from peft import PeftModel

            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            shutil.copytree(adapter_dir, tmp)
        tokenizer.save_pretrained(tmp)
    elif (src / "config.json").is_file():
        if merge:
            raise FittuneError(f"{src} is a full model, not an adapter: nothing to merge (drop --merge)")
        shutil.copytree(src, tmp)
    else:
        base = (cfg.get("run") or {}).get("model_path")
        if not base:
            raise FittuneError(f"{src} has no config.yaml naming its base model: cannot rebuild the architecture")
        state = _consolidated_state_dict(src)
        config = AutoConfig.from_pretrained(base)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise FittuneError(f"{src} does not match {base}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    tmp.rename(out)
    print(f"fittune: exported {checkpoint} -> {out}", flush=True)
    return out


def _consolidated_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """One state dict from a training checkpoint: ZeRO shards (any stage) or accelerate's model file."""
    if (src / "pytorch_model").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(src), tag="pytorch_model")
    files = sorted(src.glob("model*.safetensors"))
    if not files:
        raise FittuneError(f"{src} holds no model weights (no ZeRO shards, no model.safetensors)")
    from safetensors.torch import load_file

    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def main(argv: list[str]) -> None:
    from fittune.cli import split_flag

    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    checkpoint, rest = split_flag(argv, "checkpoint")
    output, rest = split_flag(rest, "output")
    merge = "--merge" in rest
    rest = [a for a in rest if a != "--merge"]
    if rest:
        raise FittuneError(f"unexpected arguments {rest}: use --checkpoint DIR --output OUT [--merge]")
    if not checkpoint or not output:
        raise FittuneError("--checkpoint DIR and --output OUT are required")
    export(checkpoint, output, merge)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
