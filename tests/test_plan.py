"""The memory planner: exact parameter counts on the meta device, every formula pinned on hand-computed values,
the chunked-loss saving, and the CLI (the 16 GB acceptance case and bad input). CPU only, no network."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, child_env
from transformers import Qwen2Config

from fittune import activations as A
from fittune import estimate as E
from fittune import hardware as H
from fittune import plan as P
from fittune.config import Config, build_config
from fittune.errors import FittuneError
from fittune.model_shapes import (
    PUBLISHED_PARAMS,
    builtin_config,
    model_shape,
    shape_from_hf_config,
)
from fittune.precision import Precision
from fittune.strategy import Strategy

QWEN3B = "Qwen/Qwen2.5-3B-Instruct"
GIB = 1024**3


def _cfg(**overrides) -> Config:
    return build_config(None, overrides)


def S(name: str) -> Strategy:
    """The strategy of the planner's row `name` (its world size: the fewest processes it is planned with)."""
    return P.OPTION_BY_NAME[name].strategy


# ---------------------------------------------------------------------------------------------------------
# Exact parameter counts


@pytest.fixture(scope="module")
def qwen3b_lora():
    """Qwen2.5-3B-Instruct + LoRA r=16 on all linear layers, as the 3B LoRA recipe trains it (bf16 base)."""
    cfg = build_config(str(ROOT / "configs/qwen2.5-3b-lora.yaml"), {})
    return model_shape(cfg, torch.bfloat16)


def test_qwen25_3b_counts_are_exact(qwen3b_lora):
    s = qwen3b_lora
    assert s.source.startswith("built-in shape table")
    assert s.frozen_params == 3_085_938_688  # the published Qwen2.5-3B count
    assert s.trainable_params == 29_933_568  # LoRA r=16 on q,k,v,o,gate,up,down of 36 layers
    # by hand: r x (in + out) per projection, kv width 2 heads x 128
    per_layer = 16 * ((2048 + 2048) + 2 * (2048 + 256) + (2048 + 2048) + 3 * (2048 + 11008))
    assert s.trainable_params == 36 * per_layer
    assert (s.frozen_itemsize, s.trainable_itemsize) == (2, 4)  # half base, fp32 adapters (PEFT autocast)
    assert s.tie_word_embeddings and s.head_params == 0 and s.vocab_size == 151936


@pytest.mark.parametrize("size", ["0.5B", "1.5B", "7B"])
def test_other_builtin_shapes_match_published_counts(size):
    shape = model_shape(_cfg(**{"model.name_or_path": f"Qwen/Qwen2.5-{size}"}), torch.bfloat16)
    assert shape.total_params == PUBLISHED_PARAMS[size]
    assert shape.trainable_params == shape.total_params  # full fine-tuning: everything trains


def test_builtin_table_has_published_3b_values():
    c = builtin_config(QWEN3B)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.tie_word_embeddings, c.max_position_embeddings) == (
        151936, 2048, 11008, 36, 16, 2, True, 32768)
    assert c.rope_parameters["rope_theta"] == 1e6 and c.rms_norm_eps == 1e-6


def test_local_dir_and_unknown_hub_id(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    shape = model_shape(_cfg(**{"model.name_or_path": str(tmp_path)}), torch.float32)
    assert shape.total_params == 1480 and shape.source.endswith("config.json")
    with pytest.raises(FittuneError, match="no config for model 'someone/not-a-model'"):
        model_shape(_cfg(**{"model.name_or_path": "someone/not-a-model"}), torch.float32)


def test_builtin_tiny_model_uses_built_config_or_says_it_approximates(tmp_path, monkeypatch):
    from fittune.model import resolve_model_path

    monkeypatch.setenv("FITTUNE_CACHE", str(tmp_path / "cache"))  # an empty cache: nothing built yet
    cfg = _cfg(output_dir=str(tmp_path))
    approx = model_shape(cfg, torch.float32)
    assert approx.vocab_size == cfg.model.tiny.vocab_size
    assert any("approximated" in n for n in approx.notes)
    built = Qwen2Config(vocab_size=1633, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    built.save_pretrained(resolve_model_path(cfg))
    exact = model_shape(cfg, torch.float32)
    assert exact.vocab_size == 1633 and not exact.notes
    assert exact.total_params == approx.total_params - (2048 - 1633) * 128


# ---------------------------------------------------------------------------------------------------------
# Formulas, pinned on a tiny Qwen2 shape computed by hand:
#   vocab 32, hidden 8, MLP 16, 2 layers, 2 heads / 1 KV head (head_dim 4), tied embeddings.
#   parameters: embedding 32*8 = 256; per layer q 8*8+8 = 72, k 8*4+4 = 36, v 36, o 64, gate/up/down 3*128,
#   2 norms 16 -> 608; final norm 8; total 256 + 2*608 + 8 = 1480.


def tiny_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)


def tiny_shape(lora: bool, weights_dtype=torch.float32, rank: int = 2, dropout: float = 0.05):
    cfg = _cfg(**({"lora.enabled": True, "lora.r": rank, "lora.dropout": dropout} if lora else {}))
    return shape_from_hf_config(tiny_config(), cfg, weights_dtype)


def test_tiny_parameter_counts():
    full = tiny_shape(lora=False)
    assert (full.total_params, full.trainable_params, full.layer_params, full.embed_params) == (1480, 1480, 608, 256)
    # autocast casts every trainable fp32 Linear weight + bias: 2 x (72+36+36+64+384) + the tied head 256
    assert full.autocast_cast_params == 2 * 592 + 256
    lora = tiny_shape(lora=True, weights_dtype=torch.bfloat16)
    # r x (in + out): q 2*16, k 2*12, v 2*12, o 2*16, gate/up/down 3 * 2*24 -> 256 per layer
    assert lora.trainable_params == 2 * 256 and lora.frozen_params == 1480
    assert lora.autocast_cast_params == 512  # only the fp32 adapters are cast


def test_layer_activation_terms_full_finetuning_native_bf16():
    # accelerate autocast over fp32 weights: residual stream fp32 (4 B), matmul outputs bf16 (2 B)
    shape = tiny_shape(lora=False)
    dt = A.activation_dtypes(S("single"), shape, Precision("bf16"))
    assert (dt.residual, dt.compute, dt.autocast) == (4, 2, True)
    assert A.layer_activation_terms(shape, dt) == {
        "rmsnorm": 2 * (4 * 8 + 4 + 4 * 8),  # fp32 input copy + 1/rms + normalised x (trainable weight)
        "qkv_inputs": 3 * 2 * 8,  # q, k and v each save their own bf16 cast of the fp32 norm output
        "attention": 2 * (8 + 8 + 8 + 8) + 4 * 2,  # q, repeated k and v, output + fp32 logsumexp per head
        "o_input": 0,  # the attention output, already saved by the kernel
        "gate_up_inputs": 2 * 2 * 8,
        "mlp": 3 * 2 * 16,  # SiLU input, act and up (the product's two factors)
        "down_input": 2 * 16,
    }  # 416 B per token per layer = 34 h + 8 I + 4 heads + 8
    assert sum(A.layer_activation_terms(shape, dt, gqa_repeated=False).values()) == 416 - 2 * 2 * (8 - 4)


def test_layer_activation_terms_lora_and_deepspeed():
    lora = tiny_shape(lora=True, weights_dtype=torch.bfloat16)  # bf16 base, fp32 adapters, dropout 0.05
    dt = A.activation_dtypes(S("single"), lora, Precision("bf16"))
    assert (dt.residual, dt.compute, dt.lora_input) == (2, 2, 2)
    adapter = (1 + 2) * 8 + 2 * 2  # bool dropout mask + bf16 A input per input feature, + A's rank-2 output
    assert A.layer_activation_terms(lora, dt) == {
        "rmsnorm": 2 * (4 * 8 + 4),  # frozen norm weight: no normalised-x copy
        "qkv_inputs": 3 * adapter,  # frozen base Linears save nothing
        "attention": 72,
        "o_input": adapter,
        "gate_up_inputs": 2 * adapter,
        "mlp": 96,
        "down_input": (1 + 2) * 16 + 2 * 2,
    }  # 460 = 34 h + 9 I + 14 r + 4 heads + 8
    full = tiny_shape(lora=False)
    ds = A.activation_dtypes(S("zero2"), full, Precision("bf16"))  # DeepSpeed keeps the module in bf16, no autocast
    assert (ds.residual, ds.compute, ds.autocast) == (2, 2, False)
    terms = A.layer_activation_terms(full, ds)
    assert terms["rmsnorm"] == 2 * (4 * 8 + 4 + 2 * 8) and terms["qkv_inputs"] == 2 * 8  # one shared input
    assert sum(terms.values()) == 336  # 24 h + 8 I + 4 heads + 8


def test_activation_terms_with_and_without_checkpointing():
    shape = tiny_shape(lora=False)
    dt = A.activation_dtypes(S("single"), shape, Precision("bf16"))
    tokens = 2 * 4  # micro-batch 2 x 4 tokens
    per_layer = 416 * tokens
    mask_per_layer = 2 * 4 * 4 * 2  # SDPA's bf16 additive mask, micro x seq x seq
    workspace = (3 * 2 * 16 + 2 * 4 * 8) * tokens  # 3 MLP gradients (bf16) + 2 hidden gradients (fp32)
    head = (4 * 8 + 4 + 4 * 8 + 2 * 8) * tokens  # final norm + the head's own bf16 input cast
    assert A.activation_terms(shape, dt, 2, 4, checkpointing=False, chunked=False) == {
        "saved by all layers": 2 * (per_layer + mask_per_layer), "attention masks": 2 * 4 * 4,
        "layer backward": workspace, "final norm / head input": head}
    assert A.activation_terms(shape, dt, 2, 4, checkpointing=True, chunked=False) == {
        "layer inputs (checkpointed)": 2 * 4 * 8 * tokens,  # one fp32 hidden state per layer
        "attention masks": 2 * 4 * 4,
        "layer backward": per_layer + mask_per_layer + workspace,  # one layer recomputed
        "final norm / head input": head}


def test_logits_terms():
    shape = tiny_shape(lora=False)
    dt = A.activation_dtypes(S("single"), shape, Precision("bf16"))
    assert A.logits_bytes(shape, dt, 2, 4, chunk=0) == 2 * 4 * 32 * 12
    # chunk of 2 tokens: 2 x vocab x 14 B, + the 8 fp32 hidden states kept for the recompute
    assert A.logits_bytes(shape, dt, 2, 4, chunk=2) == 2 * 32 * 14 + 8 * 8 * 4
    assert A.logits_bytes(shape, dt, 1, 2, chunk=1024) == 2 * 32 * 14 + 2 * 8 * 4  # chunk > tokens


def test_single_gpu_and_ddp_estimates_full_finetuning():
    shape = tiny_shape(lora=False)
    work = E.Workload(micro_batch=2, seq_len=4, checkpointing=False, loss_chunk=0, precision=Precision("bf16"))
    est = E.estimate(S("single"), shape, work, gpus=1)
    assert est.gpu == {"weights": 1480 * 4, "gradients": 1480 * 4, "optimizer": 2 * 1480 * 4}
    acts = 2 * (416 * 8 + 64) + 32 + 84 * 8
    assert est.gpu_pass == {"activations": acts, "layer backward": 160 * 8, "logits/loss": 3072,
                            "weight copies": 2 * 1440}
    assert est.gpu_step == {"optimizer step": 0}  # fused AdamW updates in place
    # logits (3072) and the layer backward (1280) are never live together: the larger counts
    assert est.gpu_peak == (4 + 4 + 8) * 1480 + acts + 3072 + 2880  # W + G + O + the pass peak
    assert est.gpu_total == est.gpu_peak + int(E.CUDA_OVERHEAD_GIB * GIB)
    # without accumulation the gradients only exist once backward has freed the activations
    est.grad_accum = 1
    assert est.gpu_peak == (4 + 8) * 1480 + max(acts + 3072 + 2880, 4 * 1480)
    assert est.cpu == {"processes": int(E.HOST_PROCESS_GIB * GIB), "model load": 1480 * 4}
    ddp = E.estimate(S("ddp"), shape, work, gpus=2)
    assert ddp.gpu["gradients"] == 2 * 1480 * 4  # + DDP's bucket copy
    assert ddp.cpu["model load"] == 2 * 1480 * 4 and ddp.applicable
    assert not E.estimate(S("ddp"), shape, work, gpus=1).applicable


def test_single_gpu_estimate_lora():
    shape = tiny_shape(lora=True, weights_dtype=torch.bfloat16)
    work = E.Workload(micro_batch=2, seq_len=4, checkpointing=True, loss_chunk=0, precision=Precision("bf16"))
    est = E.estimate(S("single"), shape, work, gpus=1)
    assert est.gpu == {"weights": 1480 * 2 + 512 * 4, "gradients": 512 * 4, "optimizer": 2 * 512 * 4}
    assert est.gpu_pass["weight copies"] == 2 * 512
    assert est.gpu_pass["activations"] == 2 * 2 * 8 * 8 + 32 + (4 * 8 + 4) * 8  # bf16 layer inputs, no head input


def test_deepspeed_and_fsdp_estimates():
    shape = tiny_shape(lora=False)
    work = E.Workload(micro_batch=2, seq_len=4, checkpointing=True, loss_chunk=0, precision=Precision("bf16"))
    bucket = 2 * 8 * 8 * 2  # two reduce buckets of hidden^2 bf16 elements
    z2 = E.estimate(S("zero2"), shape, work, gpus=2)
    assert z2.gpu == {"weights": 1480 * 2, "gradients": 1480 * 2 // 2 + bucket, "optimizer": 12 * 1480 // 2}
    assert z2.gpu_step == {"fp32 gradients + AdamW temp": 2 * 4 * 740}
    z2o = E.estimate(S("zero2_offload"), shape, work, gpus=1)
    assert z2o.applicable and z2o.gpu == {"weights": 1480 * 2, "gradients": bucket, "optimizer": 0}
    assert z2o.cpu["offloaded optimizer"] == 16 * 1480  # fp32 master + 2 moments + fp32 gradients
    z3 = E.estimate(S("zero3"), shape, work, gpus=2)
    assert z3.gpu["weights"] == 1480 * 2 // 2
    assert z3.gpu_pass["gathered layers"] == (608 + 608) * 2  # the layer + the prefetched one (> embedding)
    z3o = E.estimate(S("zero3_offload"), shape, work, gpus=1)
    assert z3o.gpu["weights"] == 0 and z3o.cpu["offloaded parameters"] == 1480 * 2
    fsdp = E.estimate(S("fsdp2"), shape, work, gpus=2)
    assert fsdp.gpu == {"weights": 1480 * 4 // 2, "gradients": 1480 * 4 // 2, "optimizer": 2 * 1480 * 4 // 2}
    assert fsdp.gpu_pass["gathered layers"] == (256 + 2 * 608) * 2 + 608 * 2


def test_device_map_splits_layers():
    shape = tiny_shape(lora=False)
    work = E.Workload(micro_batch=2, seq_len=4, checkpointing=False, loss_chunk=0, precision=Precision("bf16"))
    est = E.estimate(S("device_map"), shape, work, gpus=2)
    # busiest GPU: the first one, with 1 of the 2 layers and the tied embedding / head (and the logits)
    assert est.gpu["weights"] == (608 + 256) * 4
    assert est.gpu_pass["activations"] == (416 * 8 + 64) + 32 + 84 * 8
    assert est.gpu_pass["logits/loss"] == 3072 and est.processes == 1


def test_estimate_follows_the_strategy_fields_not_its_name():
    # ZeRO-3 offloading only the optimizer (a DeepSpeed config may; the planner's zero3_offload row offloads
    # the weights too): the weights stay sharded on the GPUs, the optimizer states and fp32 gradients go to
    # CPU RAM, and no parameters do
    shape = tiny_shape(lora=False)
    work = E.Workload(micro_batch=2, seq_len=4, checkpointing=True, loss_chunk=0, precision=Precision("bf16"))
    z3 = Strategy(world_size=2, zero_stage=3, offload_optimizer=True)
    assert z3.name == "zero3_offload"
    est = E.estimate(z3, shape, work, gpus=2)
    assert est.gpu == {"weights": 1480 * 2 // 2, "gradients": 2 * 8 * 8 * 2, "optimizer": 0}
    assert est.cpu == {"processes": 2 * int(E.HOST_PROCESS_GIB * GIB), "model load": 2 * 1480 * 4,
                       "offloaded optimizer": 16 * 1480}  # each process loads the fp32 model (one shard)
    assert est.gpu_step == {} and est.strategy == z3 and est.processes == 2


@pytest.mark.parametrize("name", ["zero1", "fsdp2_offload"])
def test_estimate_refuses_a_strategy_it_has_no_model_of(name):
    work = E.Workload(micro_batch=2, seq_len=4, checkpointing=True, loss_chunk=0, precision=Precision("bf16"))
    with pytest.raises(FittuneError, match=f"no model of {name} yet"):
        E.estimate(Strategy.named(name, 2), tiny_shape(lora=False), work, gpus=2)


# ---------------------------------------------------------------------------------------------------------
# The chunked loss, and the plan on the real 3B shape


def test_chunked_loss_removes_most_of_the_3b_logits_term(qwen3b_lora):
    dt = A.activation_dtypes(S("single"), qwen3b_lora, Precision("bf16"))
    standard = A.logits_bytes(qwen3b_lora, dt, 4, 1024, chunk=0)
    assert standard == 4 * 1024 * 151936 * 12  # 6.96 GiB at the recipe's micro-batch 4 x 1024 tokens
    chunked = A.logits_bytes(qwen3b_lora, dt, 4, 1024, chunk=1024)
    assert chunked == 1024 * 151936 * 14 + 4 * 1024 * 2048 * 2  # 2.04 GiB
    assert chunked < standard / 3
    assert A.logits_bytes(qwen3b_lora, dt, 4, 1024, chunk=128) < standard / 20
    # the chunked term does not grow with the batch (only the hidden states kept for recompute do)
    assert A.logits_bytes(qwen3b_lora, dt, 16, 1024, chunk=1024) - chunked == 12 * 1024 * 2048 * 2


def test_make_plan_keeps_the_global_batch_when_halving():
    # full fine-tuning on one 16 GiB GPU: only the offload strategies fit
    cfg = build_config(str(ROOT / "configs/qwen2.5-3b-full.yaml"), {"train.gradient_checkpointing": False})
    plan = P.make_plan(cfg, gpus=1, gpu_mem_gib=16, cpu_mem_gib=256, recipe="configs/qwen2.5-3b-full.yaml")
    assert plan.shape.total_params == 3_085_938_688 and plan.global_batch == 2 * 8
    rec = plan.recommended
    assert rec.strategy.name == "zero2_offload" and rec.gpu_total <= 16 * GIB
    assert rec.micro_batch == 1 and rec.grad_accum == 16  # micro 2 does not fit without checkpointing
    for est in plan.estimates:
        assert est.micro_batch * est.grad_accum * est.processes == plan.global_batch
    assert plan.command(rec) == (
        "accelerate launch --config_file accelerate_configs/deepspeed_zero2_offload.yaml --num_processes 1 "
        "train.py --config configs/qwen2.5-3b-full.yaml --train.micro_batch_size 1 --train.grad_accum 16")
    by_key = {r.option.key: r.estimate for r in plan.rows}
    assert not by_key["single"].fits and "GPU memory" in by_key["single"].limit
    assert plan.command(by_key["device_map"]).startswith(
        "python train.py --config configs/qwen2.5-3b-full.yaml --model.parallel auto --train.micro_batch_size")
    assert plan.command_notes(by_key["device_map"]) == []  # model.parallel exists: nothing missing


def test_make_plan_multi_gpu_prefers_the_fastest_sharded_strategy():
    cfg = build_config(str(ROOT / "configs/qwen2.5-3b-full.yaml"), {})
    plan = P.make_plan(cfg, gpus=4, gpu_mem_gib=24, cpu_mem_gib=256, recipe="r.yaml", extra_args=["--train.lr", "1e-5"])
    by_key = {r.option.key: r.estimate for r in plan.rows}
    assert not by_key["ddp"].fits  # a full fp32 copy + Adam states per GPU is ~70 GiB
    assert plan.recommended.strategy.name == "zero2" and plan.recommended.processes == 4
    assert plan.command(plan.recommended) == (
        "accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml --num_processes 4 train.py "
        "--config r.yaml --train.lr 1e-5 --train.micro_batch_size 2 --train.grad_accum 8")
    assert plan.global_batch == 2 * 8 * 4
    # said once: 4 GPUs step on 4x the rows of one, at the recipe's learning rate, and how to keep one GPU's
    (note,) = [n for n in plan.notes if "global batch" in n]
    assert "64 rows per optimizer step, 4x the 16 of one GPU" in note and "--train.grad_accum 2 keeps 16" in note
    one = P.make_plan(cfg, gpus=1, gpu_mem_gib=80, cpu_mem_gib=256, recipe="r.yaml")
    assert one.global_batch == 16 and not [n for n in one.notes if "global batch" in n]


def test_the_printed_command_works_from_another_directory(tmp_path, monkeypatch):
    """Was: `accelerate_configs/... train.py` relative to the repository, printed in a directory without them."""
    cfg = build_config(str(ROOT / "configs/qwen2.5-3b-lora.yaml"), {})
    monkeypatch.chdir(tmp_path)
    plan = P.make_plan(cfg, gpus=1, gpu_mem_gib=16, cpu_mem_gib=64, recipe="r.yaml")
    assert plan.command(plan.recommended).startswith(
        f"accelerate launch --config_file {ROOT}/accelerate_configs/single_gpu.yaml {ROOT}/train.py --config r.yaml ")
    assert P.plan_main(["--gpus", "1", "--gpu-mem", "16"]).recipe == str(ROOT / "fittune/demo/demo.yaml")  # no --config


@pytest.mark.parametrize("strategy, on_gpu, local, expected", [
    ("zero2_offload", True, 2, 8),   # torchrun's one thread per process would run CPU Adam on one core
    ("zero3_offload", True, 4, 4),
    ("fsdp2_offload", True, 1, 16),  # FSDP2 offload steps the CPU shards
    ("zero2_offload", True, 32, 1),  # 16 cores cannot feed 32 processes more than one thread each
    ("zero2", True, 2, 1),           # the step runs on the GPU: left as launched
    ("ddp", False, 2, 1),            # several CPU processes: as launched (accelerate's use_cpu splits the cores)
    ("single", False, 1, 16),        # one CPU process launched with one thread (accelerate without use_cpu)
])
def test_cpu_threads_for_work_on_the_cpu(strategy, on_gpu, local, expected, monkeypatch):
    s = Strategy.named(strategy, local)
    monkeypatch.setattr(H, "physical_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    got = H.run_cpu_threads(0, s, torch.device("cuda" if on_gpu else "cpu"))
    assert got.count == expected and bool(got.why) == (expected != 1)
    if got.why:
        assert got.why.startswith("the model runs on the CPU" if not on_gpu else "the optimizer step runs on the CPU")
    work = "the CPU does the work"
    assert H.choose_cpu_threads(3, work, local, 1, 16) == H.CpuThreads(3, "train.cpu_threads")
    assert H.choose_cpu_threads(0, work, local, current=4, cores=16) == H.CpuThreads(4, "")  # the user's OMP_NUM_THREADS


def test_physical_cores_honours_a_container_cpu_quota(monkeypatch):
    monkeypatch.setattr(H, "_cgroup_cpu_limit", lambda: 1)
    assert H.physical_cores() == 1


def test_set_cpu_threads_sizes_the_openmp_pool_deepspeeds_cpu_adam_uses(monkeypatch):
    """DeepSpeed's CPU Adam extension links no OpenMP of its own (its built cpu_adam.so leaves GOMP_parallel
    undefined and needs no libgomp): its loops run on the OpenMP runtime torch loaded, process-wide, whose
    size set_cpu_threads sets (read here through that runtime's own symbol, not through torch)."""
    import ctypes

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # restored afterwards
    before = torch.get_num_threads()
    try:
        H.set_cpu_threads(H.CpuThreads(3, "test"))
        assert ctypes.CDLL(None).omp_get_max_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU default")
def test_no_gpu_plans_for_one_16_gib_gpu_and_says_so():
    hw = H.detect_hardware(None, None, None)
    assert (hw.gpus, hw.gpu_mem_gib) == (1, H.DEFAULT_GPU_MEM_GIB) and hw.cpu_mem_gib > 0
    assert any("no CUDA GPU" in n for n in hw.notes)


def test_given_gpus_without_cpu_mem_say_the_ram_is_this_machines():
    """GPUs given on the command line may be another machine's; the offload rows then need its RAM."""
    said = [any("pass its --cpu-mem" in n for n in H.detect_hardware(*given).notes)
            for given in ((1, 16.0, None), (None, 16.0, None), (1, 16.0, 16.0), (None, None, None))]
    assert said == [True, True, False, False]


# ---------------------------------------------------------------------------------------------------------
# Command line


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fittune.plan", *args], cwd=ROOT, env=child_env(2),
                          capture_output=True, text=True, timeout=300)


def test_cli_16gb_acceptance():
    proc = _plan_cli("--config", "configs/qwen2.5-3b-lora.yaml", "--gpus", "1", "--gpu-mem", "16")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "3,085,938,688" in out and "29,933,568 trainable" in out
    assert "recommended: single GPU" in out
    assert ("accelerate launch --config_file accelerate_configs/single_gpu.yaml train.py --config "
            "configs/qwen2.5-3b-lora.yaml --train.micro_batch_size 4 --train.grad_accum 4") in out
    needed = float(re.search(r"needed\s+([\d.]+) GiB\s+of 16\.0 GiB", out).group(1))
    assert needed <= 16.0
    assert re.search(r"^single GPU \(LoRA\)\s+yes\s+4 x 4", out, re.M)


def test_nothing_fits_exits_1_so_a_script_can_tell():
    """Was exit 0, as for a plan."""
    proc = _plan_cli("--config", "configs/qwen2.5-3b-lora.yaml", "--gpus", "1", "--gpu-mem", "0.5")
    assert proc.returncode == 1 and "nothing fits 1 x 0.5 GiB" in proc.stdout and not proc.stderr.strip(), proc.stderr


def test_help_prints_usage_and_returns(capsys):
    assert P.plan_main(["--help"]) is None  # returns to the caller (train.py --plan, run_cli): no sys.exit
    assert capsys.readouterr().out.startswith("usage: fittune-plan [--config FILE]")


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/qwen2.5-3b-lora.yaml", "--train.learning_rate", "1e-4"],
     "fittune: error: unknown config key 'train.learning_rate'; did you mean 'train.lr'?"),
    (["--config", "configs/missing.yaml"], "fittune: error: config file not found: configs/missing.yaml"),
    (["--config", "configs/qwen2.5-3b-lora.yaml", "--gpus", "0"],
     "fittune: error: --gpus must be a whole number >= 1 (got '0')"),
    (["--config", "configs/qwen2.5-3b-lora.yaml", "--train.optimizer", "adamw8bit", "--gpus", "2"],  # was: a crash
     "fittune: error: train.optimizer adamw8bit is for full fine-tuning (LoRA's optimizer states are a few MB): use "
     "train.optimizer adamw with LoRA"),
    (["--config", "configs/qwen2.5-3b-full.yaml", "--model.dtype", "float16", "--train.optimizer", "adamw8bit",
      "--train.mixed_precision", "bf16"],  # the weights' own dtype, as training reads it (was: taken as bf16)
     "fittune: error: fp16 weights cannot be trained with low-bit states or stochastic rounding: keep fp32 master "
     "weights (model.dtype auto) on an fp16 GPU, or bf16 weights (model.dtype bfloat16) where it has bf16"),
    (["--config", "configs/qwen2.5-3b-lora.yaml", "--gpus", "1", "--gpu-mem", "16000"],  # MB for GiB
     "fittune: error: --gpu-mem 16000 is in GiB: more than a GPU holds (over 1024 GiB); if you meant MiB (as "
     "nvidia-smi and free -m print), pass 15.625"),
])
def test_cli_bad_input_is_one_error_line_and_exit_2(args, message):
    proc = _plan_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------------------
# Low-bit optimizer states and the optimizer in backward (train.optimizer, train.optimizer_in_backward)


def _qwen3b_tensors() -> list[int]:
    """Every trainable tensor of Qwen2.5-3B by hand (published config): per layer q 2048x2048 + bias, k and v
    256x2048 + biases, o 2048x2048, gate/up 11008x2048, down 2048x11008, two norms; the tied embedding;
    the final norm."""
    layer = [2048 * 2048, 2048, 256 * 2048, 256, 256 * 2048, 256, 2048 * 2048, 3 * [11008 * 2048], 2048, 2048]
    flat = [n for x in layer for n in (x if isinstance(x, list) else [x])]
    return flat * 36 + [151936 * 2048, 2048]


def _by_hand(tensors: list[int], code_bytes: float, block: int, qmap: int) -> int:
    """Both moments: quantized tensors (>= 4096 elements, whole blocks) as codes + fp32 scale per block + a
    lookup table; the rest in bf16."""
    one = sum(int(n * code_bytes) + n // block * 4 + qmap * 4 if n >= 4096 and n % block == 0 else 2 * n
              for n in tensors)
    return 2 * one


@pytest.mark.parametrize("optimizer, code_bytes, block, qmap", [("adamw8bit", 1, 256, 256),
                                                                 ("adamw4bit", 0.5, 128, 16)])
def test_qwen25_3b_lowbit_states_follow_the_formula(optimizer, code_bytes, block, qmap):
    cfg = build_config(str(ROOT / "configs/qwen2.5-3b-full-16gb.yaml"), {"train.optimizer": optimizer})
    shape = model_shape(cfg, torch.bfloat16)
    hand = _qwen3b_tensors()
    assert sum(hand) == shape.trainable_params == 3_085_938_688
    assert sorted(E.trainable_numels(shape)) == sorted(hand)
    work = E.Workload(2, 1024, True, 512, Precision("bf16"), optimizer=optimizer, in_backward=True)
    est = E.estimate(Strategy(), shape, work, 1)
    assert est.gpu["optimizer"] == _by_hand(hand, code_bytes, block, qmap)
    assert est.gpu["optimizer"] / 2**30 == pytest.approx(5.84 if optimizer == "adamw8bit" else 3.05, abs=0.01)
    assert est.gpu["weights"] == 2 * 3_085_938_688  # bf16, no fp32 master copy
    assert est.gpu["gradients"] == 2 * 151936 * 2048  # one gradient at a time: the tied embedding's
    assert est.gpu_step["optimizer step"] == 2 * 4 * 151936 * 2048  # its two moments in fp32


@pytest.mark.parametrize("setting, refused_under", [("train.compile", {"zero2", "fsdp2", "zero3"}),
                                                    ("train.oom_adaptive", {"fsdp2", "zero3"})])
def test_the_plan_never_recommends_a_launch_training_refuses(setting, refused_under):
    """The planner asks training's own check (fittune.supported): with train.compile on it recommended ZeRO-2 on
    4 x 24 GiB, which train.py then refused."""
    plan = P.make_plan(build_config(str(ROOT / "configs/qwen2.5-3b-full.yaml"), {setting: True}), 4, 24, 256)
    by_name = {r.option.key: r.estimate for r in plan.rows}
    for name in refused_under:
        assert not by_name[name].applicable and by_name[name].why_not == f"not with {setting}"
    assert by_name["ddp"].why_not != f"not with {setting}"
    assert plan.recommended is not None and plan.recommended.strategy.name not in refused_under
    if setting == "train.oom_adaptive":  # a step in backward cannot be redone (was: pydantic's help URL here)
        for key in ("single+adamw8bit_in_backward", "single+adamw4bit_in_backward"):
            assert by_name[key].why_not == "not with train.oom_adaptive" and by_name[key].micro_batch == 64


def test_lowbit_rows_and_refusals_in_the_plan():
    cfg = build_config(str(ROOT / "configs/qwen2.5-3b-full.yaml"), {})  # fp32 AdamW, 2 x 8
    plan = P.make_plan(cfg, gpus=1, gpu_mem_gib=16, cpu_mem_gib=16, recipe="configs/qwen2.5-3b-full.yaml")
    rows = {r.option.key: r for r in plan.rows}
    four = rows["single+adamw4bit_in_backward"].estimate
    assert plan.recommended is four and four.fits  # the case: nothing fitted 16 GB + 16 GiB before
    assert (four.micro_batch, four.grad_accum) == (16, 1)  # same global batch, no accumulation in backward
    assert plan.command(four).endswith(
        "--model.dtype bfloat16 --train.mixed_precision bf16 --train.max_grad_norm 0 --train.optimizer adamw4bit "
        "--train.optimizer_in_backward true --train.micro_batch_size 16 --train.grad_accum 1")
    lora = P.make_plan(build_config(str(ROOT / "configs/qwen2.5-3b-lora.yaml"), {}), 1, 16, 16)
    assert {r.estimate.why_not for r in lora.rows if r.option.recipe_overrides} == {"full fine-tuning only"}
    assert "in backward" not in P.render(lora) and "in backward" in P.render(plan)  # not shown with LoRA numbers
    own = P.make_plan(build_config(str(ROOT / "configs/qwen2.5-3b-full-16gb.yaml"), {}), 4, 24, 256)
    by_key = {r.option.key: r.estimate for r in own.rows}
    assert by_key["ddp"].why_not == by_key["zero2"].why_not == "not with train.optimizer adamw8bit"  # its reason
    assert by_key["single+adamw8bit_in_backward"].why_not == "the recipe's own row"
    # one process only: on several GPUs one of them at GPU speed (was: the device map, no faster: the layers
    # work one after another), at the recipe's own global batch (was: 4 GPUs' worth, 8 rows at the same
    # learning rate), and what would use every GPU is said
    assert own.recommended is by_key["single"] and (own.recommended.micro_batch, own.recommended.grad_accum) == (2, 1)
    assert own.global_batch == 2 and "carries the global batch" not in P.render(own)
    assert ("this recipe's optimizer runs in one process (train.optimizer adamw8bit, optimizer_in_backward, "
            "model.dtype bfloat16): it is planned at its own global batch of 2 rows on one GPU") in P.render(own)
    assert "x 1 process = global batch 2" in P.render(own)
    # bf16 weights under fp16 mixed precision are bf16 to the optimizer (was: taken as fp16 and refused)
    mixed = build_config(str(ROOT / "configs/qwen2.5-3b-full.yaml"), {"model.dtype": "bfloat16",
                                                                     "train.mixed_precision": "fp16",
                                                                     "train.optimizer": "adamw8bit"})
    assert P.make_plan(mixed, 2, 80, 64).recommended is not None
    row = next(ln for ln in P.render(own).splitlines() if ln.startswith("single GPU, bf16 + 8-bit"))
    assert "the recipe's own row" in row and "yes" not in row  # not offered (was: "yes (1 GPU)")
    # was "nothing fits" although a one-GPU row did, once a second GPU was given; and said to try gradient
    # checkpointing, which the recipe has on
    full = P.make_plan(build_config(str(ROOT / "configs/qwen2.5-3b-full.yaml"), {}), 2, 24, 64)
    assert full.row(full.recommended).option.key == "single+adamw4bit_in_backward"
    tight = P.render(P.make_plan(build_config(str(ROOT / "configs/qwen2.5-3b-full.yaml"), {}), 2, 8, 8))
    assert "nothing fits" in tight and "gradient_checkpointing" not in tight.split("try: ")[1]


def test_cli_16gb_full_finetuning_acceptance():
    proc = _plan_cli("--config", "configs/qwen2.5-3b-full-16gb.yaml", "--gpus", "1", "--gpu-mem", "16",
                     "--cpu-mem", "16")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "all trainable (full fine-tuning)" in out and "CPU RAM 16.0 GiB" in out
    if not torch.cuda.is_available():  # bf16 is assumed, and this recipe cannot fall back to fp16
        assert "this recipe needs a GPU with bf16" in out and "fp16-only GPU gives the same plan" not in out
    assert "recommended: single GPU (one process, whole model on one GPU), micro-batch 2 x accumulation 1" in out
    assert ("accelerate launch --config_file accelerate_configs/single_gpu.yaml train.py --config "
            "configs/qwen2.5-3b-full-16gb.yaml --train.micro_batch_size 2 --train.grad_accum 1") in out
    if not torch.cuda.is_available():  # bf16 is assumed, and this recipe cannot fall back to fp16
        assert "this recipe needs a GPU with bf16" in out and "fp16-only GPU gives the same plan" not in out
    needed = float(re.search(r"needed\s+([\d.]+) GiB\s+of 16\.0 GiB", out).group(1))
    cpu = float(re.search(r"CPU RAM\s+([\d.]+) GiB", out).group(1))
    assert needed <= 16.0 and cpu <= 16.0


def test_a_misnamed_hardware_flag_names_the_right_ones(capsys):
    for wrong, right in (("--gpu", "--gpus"), ("--gpu_mem", "--gpu-mem"), ("--cpu-memory", "--cpu-mem")):
        with pytest.raises(FittuneError, match=f"unknown flag {wrong}: did you mean {right}\\?"):
            P.plan_main([wrong, "1"])
    with pytest.raises(FittuneError, match="unknown config key 'train.lrr'"):  # a config key stays one
        P.plan_main(["--train.lrr", "1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the note is about a machine without a GPU")
def test_the_hardware_note_names_only_what_was_not_given():
    """Was: `--gpus 2` alone noted "no --gpus/--gpu-mem"."""
    from fittune.hardware import detect_hardware

    notes = " ".join(detect_hardware(2, None, 64).notes)
    assert "no --gpu-mem: planning for 2 GPUs x 16 GiB" in notes and "--gpus/" not in notes
    assert "no --gpus and --gpu-mem: planning for 1 GPU" in " ".join(detect_hardware(None, None, 64).notes)


def test_the_printed_command_carries_the_flags_as_given():
    """A bare flag is passed on as it was typed (was: IndexError, a traceback, for `--overwrite`); the keys the
    plan sets itself are not repeated."""
    assert P._raw_overrides(["--overwrite", "--train.lr=3e-4", "--train.micro_batch_size", "2", "--resume", "auto"]) \
        == ["--overwrite", "--train.lr", "3e-4", "--resume", "auto"]
