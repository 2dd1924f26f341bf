"""python -m fittune.export: a merged LoRA model gives the adapter model's logits; a sharded ZeRO checkpoint
becomes one safetensors model equal to the trained weights."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, child_env, launch


def export(*args):
    proc = subprocess.run([sys.executable, "-m", "fittune.export", *map(str, args)], cwd=ROOT, env=child_env(2),
                          capture_output=True, text=True)
    return proc


def test_merged_lora_export_matches_adapter_logits(tmp_path, tiny_config):
    run = tmp_path / "run"
    launch("train.py", ["--config", tiny_config(lora={"enabled": True, "r": 4, "dropout": 0.0}, train={"lr": 3e-2}),
                        "--output_dir", run])
    assert export("--checkpoint", run, "--output", tmp_path / "merged", "--merge").returncode == 0
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    adapter = AutoPeftModelForCausalLM.from_pretrained(run / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # exporting twice to the same place refuses rather than overwrite
    again = export("--checkpoint", run, "--output", tmp_path / "merged", "--merge")
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize("accel", ["deepspeed_zero2", "deepspeed_zero3"])
def test_zero_checkpoint_consolidates_to_one_model(tmp_path, tiny_config, accel):
    run = tmp_path / "run"
    launch("train.py", ["--config", tiny_config(train={"max_steps": 4, "save_steps": 4}), "--output_dir", run],
           nproc=2, config_file=f"accelerate_configs/{accel}.yaml")
    ckpt = run / "checkpoints" / "step-00000004"
    assert (ckpt / "pytorch_model").is_dir()  # really sharded by DeepSpeed
    proc = export("--checkpoint", ckpt, "--output", tmp_path / "model")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    trained = load_file(run / "final" / "model.safetensors")  # what the run itself exported at the same step
    exported = load_file(tmp_path / "model" / "model.safetensors")
    # the run's own export may also write the tied lm_head.weight (a copy of embed_tokens)
    assert set(trained) - set(exported) <= {"lm_head.weight"} and set(exported) <= set(trained)
    for k in exported:
        torch.testing.assert_close(exported[k], trained[k])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
