# Shared by bench/run_gpu*.sh (sourced): wheels onto PYTHONPATH, the GPU's name, and run() which times a
# command, keeps its log in $OUT and collects its JSON rows into $OUT/rows.jsonl.
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# BUDGET (seconds, 0 = none): the whole script's share of one device call; a case that would start with less
# than 45 s of it left is skipped and said so, a later one gets at most what is left (its log says timeout)
BUDGET=${BUDGET:-0}
run() {  # run <timeout> <log name> <command...>
  local t=$1 name=$2; shift 2
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 45 ]; then echo "== $name skipped: $left s of the $BUDGET s budget left"; return; fi
    [ "$left" -lt "$t" ] && t=$left
  fi
  local t0=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "== $name exit $? ($((SECONDS - t0)) s)"
  grep -h '^{' "$OUT/$name.log" >> "$OUT/rows.jsonl"
}
: > "$OUT/rows.jsonl"
report() {  # the naive baseline's rows next to fittune's, as the Markdown table for RESULTS.md
  sed 's/^/naive /' "$OUT/naive.log" | grep '^naive {' | sed 's/^naive //' > "$OUT/naive.jsonl"
  python3 bench/report.py "$OUT/rows.jsonl" "$OUT/naive.jsonl" "$(cat "$OUT/gpu.txt")" | tee "$OUT/table.md"
}
