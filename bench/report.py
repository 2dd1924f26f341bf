"""Join fittune's rows with the naive baseline's (same call) and print the Markdown table for RESULTS.md.

    python bench/report.py rows.jsonl naive.jsonl "GPU name"
"""

import json
import sys

# fittune case -> the naive case it is compared with (same shape, micro-batch, sequence, checkpointing)
NAIVE = {"lora-4x1024": "lora-bf16 4x1024", "lora-4x1024-ckpt": "lora-bf16 4x1024 ckpt",
         "lora-4x2048-ckpt": "lora-bf16 4x2048 ckpt", "lora-4x2048": "-", "full-2x1024-ckpt": "full-amp-fp32master 2x1024 ckpt",
         "full-zero2_offload-2x1024-ckpt": "full-amp-fp32master 2x1024 ckpt",
         "full-zero3_offload-2x1024-ckpt": "full-amp-fp32master 2x1024 ckpt",
         "lora-zero3-4x1024-ckpt": "lora-bf16 4x1024 ckpt"}


def load(path):
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def main():
    ours, naive, gpu = load(sys.argv[1]), {r["case"]: r for r in load(sys.argv[2])}, sys.argv[3]
    print(f"GPU: {gpu}\n")
    print("| case | kernels | fittune peak GiB | planned GiB | fittune tokens/s | MFU | first loss | naive case | naive peak GiB | naive tokens/s | peak ratio | speed ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ours:
        if "error" in r:
            print(f"| {r['case']} | | {r['error']} | | | | | | | | | |")
            continue
        key = r["case"].removesuffix("-compile").removesuffix("-torch")  # same shape, other kernels
        n = naive.get(NAIVE.get(key, ""), {})
        npk, ntok = n.get("peak_gib"), n.get("tokens_per_s")
        pr = f"{r['peak_gib'] / npk:.2f}x" if npk else "-"
        sr = f"{r['tokens_per_s'] / ntok:.2f}x" if ntok else "-"
        print(f"| {r['case']} | {r.get('kernels', '-')} | {r['peak_gib']} | {r.get('planned_gib')} | {r['tokens_per_s']:,.0f} | "
              f"{r['mfu']:.1%} | {r.get('first_loss', '-')} | {NAIVE.get(key, '-')} | {npk if npk is not None else n.get('error', '-')} | "
              f"{f'{ntok:,.0f}' if ntok else '-'} | {pr} | {sr} |")


if __name__ == "__main__":
    main()
