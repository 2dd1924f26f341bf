#!/usr/bin/env bash
# Re-run only the single-GPU cases (each case frees its memory before the next) next to the naive baseline,
# in one device call; used for the clean rows of bench/RESULTS.md. Needs OUT set, .whl and .bench carried.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
timeout 110 python3 bench/bench_step.py --case lora-4x2048-ckpt,lora-4x1024,lora-4x1024-ckpt,full-2x1024-ckpt --steps 6 --warm 2 > $OUT/native.log 2>&1
timeout 90 python3 .bench/naive_baseline.py > $OUT/naive.log 2>&1
grep -h '^{' $OUT/native.log > $OUT/rows.jsonl; grep -h '^{' $OUT/naive.log > $OUT/naive.jsonl
python3 bench/report.py $OUT/rows.jsonl $OUT/naive.jsonl "$(nvidia-smi --query-gpu=name --format=csv,noheader)" | tee $OUT/table.md
