#!/usr/bin/env bash
# Issue #13, device call 1 (~5-8 min on an H100/H200, most of it compiling and building; at most 13): full fine-tuning of the Qwen2.5-3B shape at 2 x 1024 with
# gradient checkpointing: bf16 weights + torchao 8-bit / 4-bit AdamW stepped in backward and the fp32-master
# path (every case profiled: $OUT/profile), each alone on the GPU in its own process, then the
# naive loops (../shared/bench/naive_baseline.py's `run`, fp32 master and pure bf16 at 2 x 1024) in the SAME
# call, and the profile of the naive fp32-master loop. Last thing printed: bench/report_lowbit.py's table.
#   cp ../shared/bench/naive_baseline.py .bench/ && ../shared/device/wheels.sh torchao==0.18.0
#   then on the device: bash bench/run_gpu_lowbit.sh     (carry .bench and .whl)
# torchao on the device: its wheel's CUDA extensions may not load against the device's torch (a warning);
# the optimizers are PyTorch ops compiled by torch.compile and need none of them.
set -u
source bench/gpu_common.sh
export PROFILE="$OUT/profile"
python3 -c "import torch, transformers, accelerate, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'torchao', torchao.__version__)" 2>&1 | tail -1 | tee "$OUT/versions.txt"
# the first case's warm-up steps compile torchao's step for each parameter shape (~10 graphs; inductor's
# cache in /tmp serves the later cases); EXTRA=1 adds the 8-bit ordinary step (no in-backward) and the
# GPU tests (in-backward == ordinary step with the compiled low-bit step, tests/test_optim.py)
run 300 lowbit-8bit-inbwd python3 bench/bench_step.py --case full-2x1024-ckpt-bf16-8bit-inbwd --steps 6 --warm 4
run 150 lowbit-4bit-inbwd python3 bench/bench_step.py --case full-2x1024-ckpt-bf16-4bit-inbwd --steps 6 --warm 4
run 120 fp32-master python3 bench/bench_step.py --case full-2x1024-ckpt --steps 6 --warm 3
run 200 naive python3 bench/naive_lowbit.py
if [ "${EXTRA:-0}" = 1 ]; then
  run 150 lowbit-8bit python3 bench/bench_step.py --case full-2x1024-ckpt-bf16-8bit --steps 6 --warm 3
  run 150 gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_optim.py -k "on_gpu or compiled or round_trips or equals"
  tail -2 "$OUT/gpu_tests.log"
fi
grep -h '^{' "$OUT/naive.log" > "$OUT/naive.jsonl"
python3 bench/report_lowbit.py "$OUT/rows.jsonl" "$OUT/naive.jsonl" "$(cat "$OUT/gpu.txt")" | tee "$OUT/table.md"
head -25 "$OUT/profile/full-2x1024-ckpt.txt" "$OUT/profile/naive-full-amp.txt" > "$OUT/profile/top.txt"
