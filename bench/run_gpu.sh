#!/usr/bin/env bash
# One prepared GPU run: GPU-only correctness checks, then fittune's training step on the Qwen2.5-3B shape for
# every case next to the naive baseline (../shared/bench/naive_baseline.py, copied to .bench/) in the same
# call. Logs go to $OUT; the last thing printed is the comparison table (bench/report.py). From the repo root:
#   bash bench/run_gpu.sh      (wheels in .whl/: deepspeed + pydantic, liger-kernel, pytest; see ../shared/device/README.md)
set -u
source bench/gpu_common.sh
python3 -c "import torch, transformers, peft, accelerate, deepspeed, liger_kernel.transformers, importlib.metadata as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__, 'liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1 | tee "$OUT/versions.txt"
# timed cases first, alone on the GPU, one process each (clean peaks)
for c in lora-4x2048-ckpt lora-4x2048-ckpt-torch lora-4x2048 lora-4x1024 lora-4x1024-ckpt full-2x1024-ckpt; do
  run 60 "native-$c" python3 bench/bench_step.py --case "$c" --steps 6 --warm 3
done
run 150 naive python3 .bench/naive_baseline.py
# DeepSpeed offload (CPU-bound optimizer step) next to the GPU-only checks, which time nothing
run 240 zero2_offload accelerate launch --config_file accelerate_configs/deepspeed_zero2_offload.yaml bench/bench_step.py --case full-zero2_offload-2x1024-ckpt --steps 3 --warm 2 &
bg=$!
run 120 gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_loss.py tests/test_placement.py -k "gpu or forced"
run 90 fsdp2_offload accelerate launch --config_file accelerate_configs/fsdp2_offload.yaml --num_processes 1 --mixed_precision bf16 train.py --config configs/tiny-cpu.yaml --output_dir /tmp/fsdp2_off --train.max_steps 6
wait $bg
tail -3 "$OUT/gpu_tests.log"; grep -h "strategy:\|verified\|accuracy " "$OUT/fsdp2_offload.log" | head -4
report
