#!/usr/bin/env bash
# Follow-up GPU call: train.compile (torch.compile of each decoder layer) on LoRA 4 x 2048 with checkpointing,
# (without Liger only if compiling with it fails), next to the same case uncompiled and the naive baseline,
# all in this call.
#   bash bench/run_gpu_compile.sh      (wheels in .whl/, as for run_gpu.sh)
set -u
source bench/gpu_common.sh
run 60 native-lora-4x2048-ckpt python3 bench/bench_step.py --case lora-4x2048-ckpt --steps 6 --warm 3
run 130 native-lora-4x2048-ckpt-compile python3 bench/bench_step.py --case lora-4x2048-ckpt-compile --steps 6 --warm 4
# only if compiling around Liger's kernels failed: the same without Liger
grep -q '"case": "lora-4x2048-ckpt-compile"' "$OUT/rows.jsonl" ||
  run 100 native-lora-4x2048-ckpt-torch-compile python3 bench/bench_step.py --case lora-4x2048-ckpt-torch-compile --steps 6 --warm 4
run 70 naive python3 .bench/naive_baseline.py
grep -h "Error" "$OUT"/native-*.log | tail -3
report
