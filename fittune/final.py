"""`final/`: the trained adapter or model + tokenizer, loadable without fittune, verified before it is published."""

from __future__ import annotations

from pathlib import Path

import torch

from fittune.distributed import on_main_then_agree
from fittune.errors import FittuneError
from fittune.rundir import (
    HELDOUT_IDS,
    MARKER,
    OWN_CONFIG,
    OWN_HELDOUT_IDS,
    RunLayout,
    atomic_write_text,
    claim_build_dir,
    publish_dir,
    write_guard,
)


def save_final(model, accelerator, tokenizer, out: Path, config_yaml: str, log) -> Path:
    """Write final/ through final.tmp: saved, checked against the live weights, then swapped in atomically
    (a previous final/ stays until the new one is complete)."""
    final = RunLayout(out).final
    # gathered from every rank's shards under ZeRO-3 / FSDP2 (a collective: every rank calls it)
    state_dict = accelerator.get_state_dict(model)

    def write() -> None:
        with write_guard("final/", f"the previous {final} (if any) is intact"):
            tmp = claim_build_dir(final.with_name("final.tmp"), "final", f"{out / 'final.tmp'} exists and is not "
                                  f"fittune's (no {MARKER} marker): move it away; the previous {final} is intact")
            unwrapped = accelerator.unwrap_model(model)
            # a copy: with a device map (hf_device_map), save_pretrained empties the dict it is given
            unwrapped.save_pretrained(tmp, state_dict=untied(unwrapped, state_dict), safe_serialization=True)
            checked = verify_export(tmp, unwrapped, state_dict)
            log(f"final/: {checked} saved tensors verified equal to the live (gathered) weights")
            tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / OWN_CONFIG, config_yaml)
            if (out / HELDOUT_IDS).is_file():  # a copy of final/ alone is still evaluated on the run's held-out rows
                atomic_write_text(tmp / OWN_HELDOUT_IDS, (out / HELDOUT_IDS).read_text())
            publish_dir(tmp, final)
            # final/ is the model directory people copy: no marker of fittune's in it (a kill just before this
            # leaves a hidden file that changes nothing; until publish_dir, final.tmp stays fittune's)
            (final / MARKER).unlink(missing_ok=True)

    on_main_then_agree(accelerator, write)  # a failed save or check stops every rank, none left waiting
    return final


def untied(unwrapped, state_dict: dict) -> dict:
    """A copy of `state_dict` to save: with tied input/output embeddings, without the output head's copy when
    it equals the embedding (FSDP2 gathers the one tied parameter as two tensors, which save_pretrained would
    both write: 1.16 GiB more for Qwen2.5-3B in fp32; from_pretrained ties them again)."""
    weights = dict(state_dict)
    names = _embedding_keys(unwrapped)
    if names is None:
        return weights
    embed, head = (weights.get(n) for n in names)
    tied = getattr(getattr(unwrapped, "config", None), "tie_word_embeddings", False)
    if tied and head is not None and embed is not None and torch.equal(head, embed):
        del weights[names[1]]
    return weights


def _embedding_keys(unwrapped) -> tuple[str, str] | None:
    """The state-dict keys of the input embedding and the output head, asked of the model itself (GPT-2 names
    them transformer.wte and lm_head, Qwen and Llama model.embed_tokens and lm_head); None if it has no pair."""
    try:
        modules = unwrapped.get_input_embeddings(), unwrapped.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if None in modules:
        return None
    names = {id(m): n for n, m in unwrapped.named_modules(remove_duplicate=False)}
    if any(id(m) not in names for m in modules):
        return None
    return names[id(modules[0])] + ".weight", names[id(modules[1])] + ".weight"


def verify_export(directory: Path, unwrapped, state_dict: dict) -> int:
    """Check the saved weights against the live (gathered) ones: the classic ZeRO-3 failure is an empty or
    partial adapter_model.safetensors that loads silently. Raises FittuneError, and final/ is not written."""
    from safetensors.torch import load_file

    if hasattr(unwrapped, "peft_config"):
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(unwrapped, state_dict=state_dict)
        files = [directory / "adapter_model.safetensors"]
    else:
        expected = state_dict
        files = sorted(directory.glob("model*.safetensors"))
    saved = {}
    for f in files:
        if not f.is_file():
            raise FittuneError(f"export check failed: {f.name} was not written; final/ was not written")
        saved.update(load_file(f))
    problems = [k for k, v in saved.items() if v.numel() == 0 or k not in expected
                or v.shape != expected[k].shape or not torch.equal(v.cpu(), expected[k].detach().cpu().to(v.dtype))]
    tied = {"lm_head.weight"} if getattr(getattr(unwrapped, "config", None), "tie_word_embeddings", False) else set()
    missing = [k for k in expected if k not in saved and k not in tied]
    if problems or missing or not saved:
        raise FittuneError(f"export check failed in {directory}: {len(problems)} saved tensors are empty or differ "
                           f"from the live weights (e.g. {problems[:3]}), {len(missing)} are missing "
                           f"(e.g. {missing[:3]}); final/ was not written")
    return len(saved)
