#!/usr/bin/env bash
# Follow-up GPU call: train.compile (torch.compile of each decoder layer) on LoRA 4 x 2048 with checkpointing,
# (without Liger only if compiling with it fails), next to the same case uncompiled and the naive baseline,
# all in this call.
#   bash bench/run_gpu_compile.sh      (wheels in .whl/, as for run_gpu.sh)
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
run() {
  local t=$1 name=$2; shift 2
  local t0=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "== $name exit $? ($((SECONDS - t0)) s)"
  grep -h '^{' "$OUT/$name.log" >> "$OUT/rows.jsonl"
}
: > "$OUT/rows.jsonl"
run 60 native-lora-4x2048-ckpt python3 bench/bench_step.py --case lora-4x2048-ckpt --steps 6 --warm 3
run 130 native-lora-4x2048-ckpt-compile python3 bench/bench_step.py --case lora-4x2048-ckpt-compile --steps 6 --warm 4
# only if compiling around Liger's kernels failed: the same without Liger
grep -q '"case": "lora-4x2048-ckpt-compile"' "$OUT/rows.jsonl" ||
  run 100 native-lora-4x2048-ckpt-torch-compile python3 bench/bench_step.py --case lora-4x2048-ckpt-torch-compile --steps 6 --warm 4
run 70 naive python3 .bench/naive_baseline.py
grep -h "Error" "$OUT"/native-*.log | tail -3
sed 's/^/naive /' "$OUT/naive.log" | grep '^naive {' | sed 's/^naive //' > "$OUT/naive.jsonl"
python3 bench/report.py "$OUT/rows.jsonl" "$OUT/naive.jsonl" "$(cat "$OUT/gpu.txt")" | tee "$OUT/table.md"
