#!/usr/bin/env bash
# Issue #13 in ONE device call: full fine-tuning of the Qwen2.5-3B shape at 2 x 1024 with gradient
# checkpointing, each case alone on the GPU in its own process, beside the naive loops run in the same call,
# most important first, within BUDGET seconds (default 540: one call of the session's 15 device minutes,
# leaving the machine's start and a rerun of what failed):
#   1. the naive loops (../shared/bench/naive_baseline.py's own `run`: fp32 master + bf16 autocast, pure bf16)
#   2. bf16 weights + torchao 8-bit, then 4-bit AdamW stepped in backward (peak <= 14 / 11.5 GiB, speed)
#   3. the fp32-master path, profiled ($OUT/profile), and the naive fp32-master loop's profile beside it
#   4. ZeRO-2 + CPU optimizer offload at 8 micro-batches a step against the naive DeepSpeed loop at the same
#      global batch; torchao's CPUOffloadOptimizer
#   5. the GPU tests of tests/test_optim.py (pytest wheel in .whl), then, if time is left, the same at 1
#      micro-batch a step, and fittune at 1 CPU thread (torchrun's default for several processes a machine:
#      what fittune's thread choice, train.cpu_threads, is worth to DeepSpeed's CPU Adam)
# Last thing printed: bench/report_lowbit.py's table. On the CPU, TINY=1 runs the same script on a toy shape
# (checks the script, measures nothing). From the repo root, on this machine:
#   mkdir -p .bench && cp ../shared/bench/naive_baseline.py .bench/
#   ../shared/device/wheels.sh torchao==0.18.0 deepspeed    (+ deepspeed's pydantic deps; see ../shared/device)
# then on the device (carry .bench and .whl): bash bench/run_gpu_fullft.sh
# torchao there: its wheel's CUDA extensions may not load against the device's torch (a warning); the
# optimizers are PyTorch ops compiled by torch.compile and need none of them.
set -u
BUDGET=${BUDGET:-540}
source bench/gpu_common.sh
Z2="accelerate launch --config_file accelerate_configs/deepspeed_zero2_offload.yaml"
T=$(nproc)
python3 -c "import torch, transformers, accelerate, torchao, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'torchao', torchao.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee "$OUT/versions.txt"
run 150 naive python3 bench/naive_lowbit.py
# the first low-bit case's warm-up steps compile torchao's step for each parameter shape (~10 graphs;
# inductor's cache in /tmp serves the 4-bit case's shared parts)
run 240 lowbit-8bit-inbwd python3 bench/bench_step.py --case full-2x1024-ckpt-bf16-8bit-inbwd --steps 6 --warm 4
run 150 lowbit-4bit-inbwd python3 bench/bench_step.py --case full-2x1024-ckpt-bf16-4bit-inbwd --steps 6 --warm 4
PROFILE="$OUT/profile" run 120 fp32-master python3 bench/bench_step.py --case full-2x1024-ckpt --steps 6 --warm 3
run 90 naive-profile python3 bench/naive_lowbit.py --profile "$OUT/profile"
run 200 naive-ds-acc8 $Z2 bench/naive_deepspeed_offload.py --acc 8 --steps 2 --warm 1
run 200 z2o-acc8 $Z2 bench/bench_step.py --case full-zero2_offload-2x1024-ckpt-acc8 --steps 2 --warm 1
OMP_NUM_THREADS=$T run 150 torchao-offload python3 bench/bench_step.py --case full-2x1024-ckpt-aooffload --steps 3 --warm 2
run 120 gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_optim.py -k "on_gpu or compiled or round_trips or equals"
tail -2 "$OUT/gpu_tests.log"
run 150 naive-ds-acc1 $Z2 bench/naive_deepspeed_offload.py --acc 1
run 150 z2o-acc1 $Z2 bench/bench_step.py --case full-zero2_offload-2x1024-ckpt --steps 3 --warm 2
run 150 z2o-acc1-cpu1 $Z2 bench/bench_step.py --case full-zero2_offload-2x1024-ckpt-cpu1 --steps 3 --warm 2
grep -h '^{' "$OUT/naive.log" > "$OUT/naive.jsonl"
python3 bench/report_lowbit.py "$OUT/rows.jsonl" "$OUT/naive.jsonl" "$(cat "$OUT/gpu.txt")" | tee "$OUT/table.md"
head -25 "$OUT"/profile/*.txt > "$OUT/profile_top.txt" 2>/dev/null
echo "script time: $SECONDS s of $BUDGET"
