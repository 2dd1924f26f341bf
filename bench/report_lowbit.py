"""Issue #13's GPU table: each fittune row beside the naive rows of the same call, with the planner's error.

    python3 bench/report_lowbit.py rows.jsonl naive.jsonl "GPU name"

Targets (issue #13): bf16 + adamw8bit + in-backward at 2 x 1024 with checkpointing: peak <= 14 GiB (4-bit:
<= 11.5 GiB), tokens/s >= 1.5x the naive fp32-master loop and >= 0.9x the naive pure-bf16 loop; fp32-master
>= 1.0x naive; ZeRO-2 offload >= 1.5x the naive DeepSpeed offload loop at the same accumulation; planner
within 10% of each measured peak.
"""

import json
import sys

AMP, BF16 = "full-amp-fp32master 2x1024 ckpt", "full-bf16 2x1024 ckpt"


def load(path):
    return [json.loads(x) for x in open(path) if x.strip().startswith("{")]


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def main():
    rows, naive, gpu = load(sys.argv[1]), {r["case"]: r for r in load(sys.argv[2])}, sys.argv[3]
    amp, bf16 = naive.get(AMP, {}).get("tokens_per_s"), naive.get(BF16, {}).get("tokens_per_s")
    print(f"GPU: {gpu}; naive fp32-master {amp} tokens/s ({naive.get(AMP, {}).get('peak_gib')} GiB), naive pure "
          f"bf16 {bf16} tokens/s ({naive.get(BF16, {}).get('peak_gib')} GiB), same call\n")
    print("| case | optimizer | accum | peak GiB | planned GiB | planner error | tokens/s | vs naive fp32-master | "
          "vs naive pure bf16 | vs naive DeepSpeed offload (same accum) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["case"] in naive or r["case"].startswith("profiled "):
            continue  # the naive loops' own rows (collected into rows.jsonl too)
        if "error" in r or r["case"].startswith("naive-"):
            if "error" in r:
                print(f"| {r['case']} | | | {r['error']} | | | | | | |")
            continue
        planned, peak = r.get("planned_gib"), r["peak_gib"]
        err = f"{(planned - peak) / peak:+.1%}" if planned and peak else "-"
        ds = next((n for n in rows if n["case"] == f"naive-zero2_offload-2x1024-ckpt-acc{r.get('grad_accum', 1)}"), {})
        vs_ds = ratio(r["tokens_per_s"], ds.get("tokens_per_s")) if "zero2_offload" in r["case"] else "-"
        offload = "offload" in r["case"]  # CPU-bound: the threads its step was given matter
        label = f"{r['case']} ({r.get('cpu_threads')} CPU threads)" if offload else r["case"]
        print(f"| {label} | {r.get('optimizer', '-')} | {r.get('grad_accum', 1)} | {peak} | {planned} | {err} | "
              f"{r['tokens_per_s']:,.0f} | {ratio(r['tokens_per_s'], amp)} | {ratio(r['tokens_per_s'], bf16)} | {vs_ds} |")
    for r in rows:
        if r["case"].startswith("naive-"):
            print(f"| {r['case']} (naive DeepSpeed loop) | DeepSpeedCPUAdam | {r['grad_accum']} | {r['peak_gib']} | | | "
                  f"{r['tokens_per_s']:,.0f} | | | |")


if __name__ == "__main__":
    main()
