#!/usr/bin/env bash
# Issue #13, device call 2 (~8 min on an H100/H200): ZeRO-2 + CPU optimizer offload of the Qwen2.5-3B shape at
# 2 x 1024 with checkpointing, fittune against the naive DeepSpeed loop (bench/naive_deepspeed_offload.py) at
# the same accumulation, in the same call: accumulation 1 and 8 (the CPU Adam step amortised over 8
# micro-batches), and DeepSpeed's CPU Adam given the machine's cores (accelerate launch runs one OpenMP thread
# per process unless --num_cpu_threads_per_process says otherwise), plus torchao's CPUOffloadOptimizer as a
# one-GPU offload path. Needs deepspeed (+ its pydantic deps) and torchao wheels in .whl/.
set -u
source bench/gpu_common.sh
Z2="accelerate launch --config_file accelerate_configs/deepspeed_zero2_offload.yaml"
T=$(nproc)
python3 -c "import torch, deepspeed, torchao; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'torchao', torchao.__version__)" 2>&1 | tail -1 | tee "$OUT/versions.txt"
run 200 naive-ds-acc1 $Z2 bench/naive_deepspeed_offload.py --acc 1
run 200 z2o-acc1 $Z2 bench/bench_step.py --case full-zero2_offload-2x1024-ckpt --steps 3 --warm 2
run 200 z2o-acc1-threads $Z2 --num_cpu_threads_per_process "$T" bench/bench_step.py --case full-zero2_offload-2x1024-ckpt --steps 3 --warm 2
run 240 naive-ds-acc8 $Z2 bench/naive_deepspeed_offload.py --acc 8 --steps 2 --warm 1
run 240 z2o-acc8-threads $Z2 --num_cpu_threads_per_process "$T" bench/bench_step.py --case full-zero2_offload-2x1024-ckpt-acc8 --steps 2 --warm 1
OMP_NUM_THREADS=$T run 200 torchao-offload python3 bench/bench_step.py --case full-2x1024-ckpt-aooffload --steps 3 --warm 2
: > "$OUT/naive.jsonl"  # the naive loops of this call are rows of their own (naive-zero2_offload-...)
python3 bench/report_lowbit.py "$OUT/rows.jsonl" "$OUT/naive.jsonl" "$(cat "$OUT/gpu.txt")" | tee "$OUT/table.md"
