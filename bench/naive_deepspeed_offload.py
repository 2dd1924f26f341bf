"""Naive DeepSpeed ZeRO-2 + CPU optimizer offload loop, what ../shared/bench/BASELINES.md measured (plain
accelerate loop + DeepSpeedCPUAdam, full fine-tuning of the Qwen2.5-3B shape, bf16, micro-batch 2 x 1024,
gradient checkpointing), here at `--acc` micro-batches per optimizer step, so that fittune's ZeRO-2 offload
rows (bench/bench_step.py full-zero2_offload-2x1024-ckpt[-accN]) are compared at the same global batch, in
the same device call. No fittune code. One JSON row.

    accelerate launch --config_file accelerate_configs/deepspeed_zero2_offload.yaml bench/naive_deepspeed_offload.py --acc 8
"""

import argparse
import json
import os
import time

import torch
from accelerate import Accelerator
from transformers import Qwen2Config, Qwen2ForCausalLM

TINY = os.environ.get("TINY") == "1"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--acc", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warm", type=int, default=2)
    args = ap.parse_args()
    mb, seq = 2, 1024
    acc = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=args.acc)
    ds = acc.state.deepspeed_plugin.deepspeed_config  # the values a user fills by hand for "auto"
    ds.update(train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=args.acc,
              train_batch_size=mb * args.acc * acc.num_processes, gradient_clipping=1.0)
    if TINY:  # checks the script on the CPU (bench/run_gpu_fullft.sh with TINY=1), measures nothing
        cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:
        cfg = Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                          rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(acc.device):  # built on the GPU (85 s in fp32 on the CPU)
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    opt = DeepSpeedCPUAdam(model.parameters(), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    model.train()
    x = torch.randint(0, cfg.vocab_size, (mb, seq), device=acc.device)
    t0 = None
    for i in range(args.warm + args.steps):
        if i == args.warm:
            sync()
            t0 = time.perf_counter()
        for _ in range(args.acc):
            with acc.accumulate(model):
                loss = model(input_ids=x, labels=x).loss
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    row = {"case": f"naive-zero2_offload-2x1024-ckpt-acc{args.acc}", "micro_batch": mb, "seq": seq,
           "grad_accum": args.acc, "peak_gib": round(peak, 2),
           "tokens_per_s": round(mb * seq * args.acc / dt, 1), "s_per_step": round(dt, 2), "loss": round(loss.item(), 3)}
    if acc.is_main_process:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
