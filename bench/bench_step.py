"""fittune's real training step on the Qwen2.5-3B shape (random weights), timed, with the planner's prediction.

Each case builds the model the way train.py does (fittune.model: LoRA, gradient checkpointing; fittune.loss:
chunked head loss; fittune.distributed: the Accelerator and DeepSpeed config filling) and runs
fittune.step.StepRunner on random tokens (every token a target, as in ../shared/bench/naive_baseline.py).

    python bench/bench_step.py --case lora-4x2048-ckpt[,lora-4x1024,...]            # native cases, one process
    accelerate launch --config_file accelerate_configs/deepspeed_zero2_offload.yaml bench/bench_step.py --case full-zero2_offload-2x1024-ckpt
    TINY=1 python bench/bench_step.py --case lora-4x1024                            # a toy shape on the CPU

Prints one JSON row per case: peak GiB (torch.cuda.max_memory_allocated), tokens/s, MFU (same formula as the
naive baseline), and `planned_gib`, the planner's predicted peak for the same case.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fittune.config import build_config  # noqa: E402
from fittune.distributed import Launched, configure_deepspeed, make_accelerator  # noqa: E402
from fittune.hardware import run_cpu_threads, set_cpu_threads  # noqa: E402
from fittune.loss import install_chunked_loss  # noqa: E402
from fittune.model import apply_liger, apply_lora, compile_layers, enable_gradient_checkpointing, use_liger  # noqa: E402
from fittune.optim import build_optimizer  # noqa: E402
from fittune.precision import Precision  # noqa: E402
from fittune.step import StepPlan, StepRunner  # noqa: E402
from fittune.strategy import Strategy, strategy_of  # noqa: E402

TINY = os.environ.get("TINY") == "1"
PROFILE = os.environ.get("PROFILE")  # a directory: after timing, profile 3 more steps there (torch.profiler)
PEAK_FLOPS = 989e12  # H100/H200 dense bf16, as in the naive baseline


def parse_case(name: str) -> dict:
    """'lora-4x2048-ckpt', 'full-2x1024-ckpt', 'full-zero2_offload-2x1024-ckpt', 'lora-zero3-4x1024-ckpt';
    a '-torch' suffix turns Liger kernels off (train.kernels: torch) for comparison; '-compile' adds
    train.compile (torch.compile of each decoder layer). Issue #13 (fittune/optim.py): '-bf16' trains bf16
    weights (stochastic rounding), '-8bit' / '-4bit' torchao's low-bit AdamW states, '-inbwd'
    train.optimizer_in_backward; '-accN' N micro-batches per optimizer step (tokens/s counts all of them);
    '-cpu1' train.cpu_threads 1 (what torchrun gives each of several processes; default: fittune's choice)."""
    parts = name.split("-")
    method, rest = parts[0], parts[1:]
    strategy = "single"
    if rest[0].startswith("zero"):
        strategy, rest = rest[0], rest[1:]
    micro, seq = (int(x) for x in rest[0].split("x"))
    accum = next((int(x[3:]) for x in rest if x.startswith("acc")), 1)
    optimizer = "adamw8bit" if "8bit" in rest else "adamw4bit" if "4bit" in rest else "adamw"
    return {"name": name, "method": method, "strategy": strategy, "micro": micro, "seq": seq,
            "ckpt": "ckpt" in rest, "kernels": "torch" if "torch" in rest else "auto", "compile": "compile" in rest,
            "bf16_weights": "bf16" in rest, "optimizer": optimizer, "in_backward": "inbwd" in rest, "accum": accum,
            "torchao_offload": "aooffload" in rest, "cpu_threads": 1 if "cpu1" in rest else 0}


def hf_config(seq: int):
    from transformers import Qwen2Config

    if TINY:
        return Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)


def planned_gib(case: dict, cfg) -> float | None:
    """The planner's predicted torch.cuda.max_memory_allocated for this case (None for the toy shape)."""
    if TINY:
        return None
    from fittune.estimate import Workload, estimate
    from fittune.model_shapes import model_shape
    from fittune.precision import weights_dtype

    shape = model_shape(cfg, weights_dtype(cfg, Precision("bf16")))
    work = Workload(case["micro"], case["seq"], case["ckpt"], cfg.train.loss_chunk_size, Precision("bf16"),
                    cfg.train.optimizer, cfg.train.optimizer_in_backward)
    est = estimate(Strategy.named(case["strategy"]), shape, work, 1)
    est.grad_accum = case["accum"]
    return round(est.gpu_peak / 2**30, 2)


def run_case(case: dict, steps: int, warm: int, accelerator=None) -> dict:
    lora = case["method"] == "lora"
    adapter = {"lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0} if lora else {}  # refused without LoRA
    cfg = build_config(None, {
        "model.name_or_path": "Qwen/Qwen2.5-3B", "lora.enabled": lora, **adapter, "train.micro_batch_size": case["micro"], "train.grad_accum": case["accum"],
        "train.mixed_precision": "bf16", "train.gradient_checkpointing": case["ckpt"],
        "data.max_length": case["seq"], "train.lr": 1e-4, "train.kernels": case["kernels"],
        "model.dtype": "bfloat16" if case["bf16_weights"] else "auto", "train.optimizer": case["optimizer"],
        "train.optimizer_in_backward": case["in_backward"], "train.max_grad_norm": 0.0 if case["in_backward"] else 1.0})
    torch.manual_seed(0)
    accelerator = accelerator or make_accelerator(Precision("bf16"), 1, None, "/tmp/fittune-bench")
    dev = accelerator.device
    strategy = strategy_of(accelerator)
    threads = run_cpu_threads(case["cpu_threads"], strategy, dev)  # as train.py chooses them
    if threads.why:
        set_cpu_threads(threads)
    deepspeed = strategy.deepspeed
    if deepspeed:
        configure_deepspeed(accelerator, strategy, case["micro"], case["accum"], 1.0)
    from transformers import AutoModelForCausalLM

    config = hf_config(case["seq"])
    config._attn_implementation = "sdpa"
    # LoRA: frozen bf16 base; full: fp32 master weights (bf16 autocast) as fittune's weights_dtype chooses,
    # or bf16 weights (model.dtype: bfloat16)
    dtype = torch.bfloat16 if lora or case["bf16_weights"] else torch.float32
    if deepspeed and strategy.zero_stage == 3:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # partitioned under zero.Init
    else:
        with torch.device(dev if not deepspeed else "cpu" if TINY else dev):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters()) if not deepspeed or strategy.zero_stage < 3 else None
    liger = use_liger(cfg, model, strategy.device_map)  # as fittune.model.build_model does
    if liger:
        apply_liger(model)
    if lora:
        model = apply_lora(model, cfg)
    if case["ckpt"]:
        enable_gradient_checkpointing(model, lora)
    if case["compile"]:
        compile_layers(model)  # train.compile (the warm-up steps absorb the compilation)
    head = model.get_output_embeddings() if install_chunked_loss(model, cfg.train.loss_chunk_size, liger) else None
    params = [p for p in model.parameters() if p.requires_grad]
    setup = build_optimizer(cfg, params, strategy, Precision("bf16"), fused=dev.type == "cuda",
                            gpu=dev.type == "cuda")  # as train.py builds it
    if case["torchao_offload"]:  # the one-GPU offload path to compare with ZeRO-2 offload (not in fittune)
        from torchao.optim import CPUOffloadOptimizer

        setup.optimizer = CPUOffloadOptimizer(params, torch.optim.AdamW, offload_gradients=case["accum"] == 1,
                                              lr=1e-4)
    from transformers import get_scheduler

    scheduler = get_scheduler("constant", setup.optimizer)
    model, optimizer = accelerator.prepare(model, setup.optimizer)
    model.train()
    runner = StepRunner(Launched(accelerator, Precision("bf16"), strategy), model, optimizer, scheduler, params, head,
                        cfg.train.max_grad_norm, setup.in_backward)
    accelerator.gradient_accumulation_steps = case["accum"]
    ids = torch.randint(0, config.vocab_size, (case["micro"], case["seq"]), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    n_targets = case["micro"] * case["accum"] * (case["seq"] - 1)
    plan = StepPlan([[0]] * case["accum"], lambda rows, b=batch: b, n_targets)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, first_loss = None, None
    for i in range(warm + steps):
        if i == warm:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        result = runner.run(plan)  # fittune's own step path
        nll, stepped = result.nll, result.stepped
        first_loss = first_loss if first_loss is not None else round(nll / n_targets, 4)  # same seed: comparable
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tok_s = case["micro"] * case["accum"] * case["seq"] / dt
    if PROFILE:
        profile_steps(case["name"], lambda: runner.run(plan))
    n = n_params or 3_085_938_688
    flops_tok = (6 if case["method"] == "full" else 4) * n + 12 * config.num_hidden_layers * config.hidden_size * case["seq"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    row = {"case": case["name"], "strategy": case["strategy"], "method": case["method"], "micro_batch": case["micro"],
           "seq": case["seq"], "grad_ckpt": case["ckpt"], "peak_gib": round(peak, 2), "tokens_per_s": round(tok_s, 1),
           "mfu": round(tok_s * flops_tok / PEAK_FLOPS, 4), "loss": round(nll / n_targets, 3),
           "planned_gib": planned_gib(case, cfg), "stepped": stepped, "first_loss": first_loss,
           "kernels": ("liger" if liger else "torch") + ("+compile" if case["compile"] else ""),
           "optimizer": "torchao CPUOffloadOptimizer (fused fp32 AdamW on the CPU)" if case["torchao_offload"]
           else setup.choice.describe(), "grad_accum": case["accum"],
           "cpu_threads": torch.get_num_threads()}  # DeepSpeed's CPU Adam and torchao's offload step use them
    # drop every reference (the Accelerator keeps its prepared objects) so the next case starts from zero
    accelerator.free_memory()
    del model, optimizer, batch, params, head, scheduler
    return row


def profile_steps(name: str, step, n: int = 3) -> None:
    """`n` steps under torch.profiler: the top operators by GPU time (self) to PROFILE/<name>.txt and a
    Chrome trace beside it (where the time goes, compared with bench/naive_profile.py's naive loop)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(n):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    out = Path(PROFILE)
    out.mkdir(parents=True, exist_ok=True)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    (out / f"{name}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    prof.export_chrome_trace(str(out / f"{name}.json"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, help="comma-separated case names")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warm", type=int, default=3)
    args = ap.parse_args()
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    accelerator = None
    for name in args.case.split(","):
        case = parse_case(name)
        if case["torchao_offload"] and not torch.cuda.is_available():  # TINY=1 on the CPU: nothing to check
            print(f"{name}: skipped, torchao's CPUOffloadOptimizer needs a CUDA (or XPU) device", flush=True)
            continue
        try:
            row = run_case(case, args.steps, args.warm, accelerator)
        except torch.OutOfMemoryError:
            row = {"case": name, "error": "OOM"}
            gc.collect()
            torch.cuda.empty_cache()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            row["allocated_after_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)  # must be ~0
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
