"""The chunked loss equals the standard loss, in value and in gradients."""

import pytest
import torch

from fittune.batches import IGNORE_INDEX
from fittune.loss import ChunkedLossHead, install_chunked_loss, nll_sum


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _batch(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = ids.clone()
    labels[:, :12] = IGNORE_INDEX  # a prompt
    labels[1, 30:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX  # a row with no target at all
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_chunked_loss_and_gradients_equal_standard(tiny_model_dir, chunk):
    """Tolerance 1e-5 (fp32): the same sums in a different order."""
    ref, chunked = _model(tiny_model_dir), _model(tiny_model_dir)
    assert install_chunked_loss(chunked, chunk)
    batch = _batch(ref.config.vocab_size)
    loss_ref = nll_sum(ref, batch)
    loss_chk = nll_sum(chunked, batch, chunked.get_output_embeddings())
    assert int((batch["labels"][:, 1:] != -100).sum()) == 28 + 18  # row 0: tokens 12..39; row 1: 12..29; row 2: none
    torch.testing.assert_close(loss_chk, loss_ref, atol=1e-5, rtol=1e-5)
    loss_ref.backward()
    loss_chk.backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), chunked.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_head_is_plain_linear_outside_training(tiny_model_dir):
    """Evaluation and generation see ordinary logits; the state dict and the tied weights are unchanged."""
    ref, chunked = _model(tiny_model_dir), _model(tiny_model_dir)
    install_chunked_loss(chunked, 16)
    assert isinstance(chunked.lm_head, ChunkedLossHead)
    assert chunked.lm_head.weight is chunked.model.embed_tokens.weight
    assert chunked.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(0, ref.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_no_chunking_for_a_lora_head_or_chunk_zero(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    assert not install_chunked_loss(_model(tiny_model_dir), 0)
    lora_head = get_peft_model(_model(tiny_model_dir), LoraConfig(r=2, target_modules=["lm_head"]))
    assert not install_chunked_loss(lora_head, 64)


def test_liger_on_cpu_is_a_clear_error_and_auto_falls_back(tiny_model_dir):
    from fittune.config import build_config
    from fittune.errors import FittuneError
    from fittune.model import use_liger

    model = _model(tiny_model_dir)
    assert not use_liger(build_config(None, {"train.kernels": "torch"}), model, False)
    if not torch.cuda.is_available():
        assert not use_liger(build_config(None, {"lora.enabled": True}), model, False)  # auto: plain torch without a GPU
        with pytest.raises(FittuneError, match="train.kernels: liger needs a CUDA GPU"):
            use_liger(build_config(None, {"train.kernels": "liger"}), model, False)


@pytest.mark.gpu
def test_liger_kernels_match_torch_on_gpu(tiny_model_dir, request):
    """Liger's fused head + cross-entropy, RMSNorm, SwiGLU and RoPE against plain torch, fp32 on the GPU:
    loss and gradients to 1e-4 (Triton kernels sum in another order)."""
    pytest.importorskip("liger_kernel")
    from transformers.models.qwen2 import modeling_qwen2

    from fittune.model import apply_liger

    ref, fused = _model(tiny_model_dir).cuda(), _model(tiny_model_dir).cuda()
    batch = {k: v.cuda() for k, v in _batch(ref.config.vocab_size).items()}
    install_chunked_loss(ref, 7)
    loss_ref = nll_sum(ref, batch, ref.get_output_embeddings())
    loss_ref.backward()  # before patching: RoPE is replaced module-wide
    # Liger patches transformers' Qwen2 module globally: restore it for the tests that follow in this process
    saved = {k: getattr(modeling_qwen2, k) for k in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP")}
    request.addfinalizer(lambda: [setattr(modeling_qwen2, k, v) for k, v in saved.items()])
    apply_liger(fused)
    assert install_chunked_loss(fused, 7, fused=True)
    loss_fused = nll_sum(fused, batch, fused.get_output_embeddings())
    torch.testing.assert_close(loss_fused, loss_ref, atol=1e-4, rtol=1e-4)
    loss_fused.backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)
