#!/usr/bin/env bash
# One prepared GPU run: fittune's training step on the Qwen2.5-3B shape for every case, next to the naive
# baseline (../shared/bench/naive_baseline.py, copied to .bench/) in the same call. Logs go to $OUT; the last
# thing printed is the comparison table (bench/report.py). Run from the repo root on the GPU machine:
#   bash bench/run_gpu.sh            (wheels for deepspeed/pydantic in .whl/, see ../shared/device/README.md)
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__)" | tee "$OUT/versions.txt"
run() {  # run <timeout> <log name> <command...>
  local t=$1 name=$2; shift 2
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "== $name exit $?"
  grep -h '^{' "$OUT/$name.log" >> "$OUT/rows.jsonl"
}
: > "$OUT/rows.jsonl"
run 130 native python3 bench/bench_step.py --case lora-4x2048-ckpt,lora-4x1024,lora-4x1024-ckpt,lora-4x2048,full-2x1024-ckpt
run 130 naive python3 .bench/naive_baseline.py
run 130 zero2_offload accelerate launch --config_file accelerate_configs/deepspeed_zero2_offload.yaml bench/bench_step.py --case full-zero2_offload-2x1024-ckpt --steps 4 --warm 2
run 110 zero3_offload accelerate launch --config_file accelerate_configs/deepspeed_zero3_offload.yaml bench/bench_step.py --case full-zero3_offload-2x1024-ckpt --steps 4 --warm 2
run 60 zero3_lora accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml bench/bench_step.py --case lora-zero3-4x1024-ckpt --steps 6 --warm 2
sed 's/^/naive /' "$OUT/naive.log" | grep '^naive {' | sed 's/^naive //' > "$OUT/naive.jsonl"
python3 bench/report.py "$OUT/rows.jsonl" "$OUT/naive.jsonl" "$(cat "$OUT/gpu.txt")" | tee "$OUT/table.md"
