"""The naive loops issue #13's GPU rows are compared with, from ../shared/bench/naive_baseline.py (copied to
.bench/, unchanged: its own `run`), at fittune's low-memory shape: Qwen2.5-3B, 2 x 1024, gradient
checkpointing, full fine-tuning with fp32 master weights + bf16 autocast, and in pure bf16 (bf16 weights,
torch AdamW). `--profile DIR` instead profiles one fp32-master run (not timed) into DIR/naive-full-amp.txt,
to set beside fittune's (bench/bench_step.py with PROFILE=DIR).

    python3 bench/naive_lowbit.py          (prints one JSON row per case, as naive_baseline.py does)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / ".bench"))
import naive_baseline as nb  # noqa: E402

CASES = [("full-amp-fp32master 2x1024 ckpt", "full-amp", 2, 1024, True),
         ("full-bf16 2x1024 ckpt", "full-bf16", 2, 1024, True)]


def profile_naive(out: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if nb.DEV == "cuda" else [])
    with profile(activities=acts) as prof:  # 3 warm-up + 3 steps, model build included (its init kernels)
        nb.run("profiled " + CASES[0][0], "full-amp", 2, 1024, True, steps=3, warm=3)
    key = "self_cuda_time_total" if nb.DEV == "cuda" else "self_cpu_time_total"
    out.mkdir(parents=True, exist_ok=True)
    (out / "naive-full-amp.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))


if __name__ == "__main__":
    if nb.DEV == "cuda":
        print(nb.torch.cuda.get_device_name(), nb.torch.__version__, flush=True)
    if sys.argv[1:2] == ["--profile"]:
        profile_naive(Path(sys.argv[2]))
        sys.exit(0)
    for case in CASES:
        try:
            nb.run(*case)
        except nb.torch.OutOfMemoryError:
            print('{"case": "%s", "error": "OOM"}' % case[0], flush=True)
