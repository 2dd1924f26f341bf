"""Checkpoints and exact resume: a run killed at a random step and resumed ends exactly like an
uninterrupted run; SIGTERM saves and exits; partial checkpoints are skipped; incompatible ones refused.
In-process (no launch, a small model on one process): a save is atomic, keeps only fittune's own
checkpoints, fails on a full disk with one clear error that keeps the previous checkpoint; a damaged or
foreign file in a checkpoint is one clear error naming it."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, STRATEGY_CONFIGS, child_env, free_port, launch, read_log
from safetensors.torch import load_file

STEPS = 16  # checkpoints at 4, 8, 12, 16: a kill after the first and before the last leaves steps to redo


def recipe(tmp_path, tiny_model_dir, lora=False, **train):
    tree = {"seed": 0, "log_with": "none", "model": {"name_or_path": str(tiny_model_dir)},
            # multiple choice: a run ends by scoring 40 rows' choices (generating their answers under ZeRO-3
            # took half of the run's 44 s); what is checked here is the training, checkpoints and resume
            "data": {"path": "builtin:ai-research-qa", "choices_column": "choices", "max_length": 96},
            "lora": {"enabled": lora, "r": 4, "dropout": 0.0},
            "train": {"micro_batch_size": 2, "grad_accum": 2, "max_steps": STEPS, "lr": 2e-3, "log_every": 1,
                      "save_steps": 4, "keep_checkpoints": 2, **train},
            "eval": {"batch_size": 8}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def launch_cmd(nproc: int, accel: str | None, args: list) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accel:
        cmd += ["--config_file", str(ROOT / accel), "--num_processes", str(nproc)]
    elif nproc > 1:
        cmd += ["--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"), "--num_processes", str(nproc)]
    else:
        cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ["--main_process_port", str(free_port()), str(ROOT / "train.py")] + [str(a) for a in args]


def kill_when_logged(cmd: list[str], log: Path, at_row: int, sig=signal.SIGKILL, env: dict | None = None) -> int:
    """Start a run (in `env`, default child_env(1)); once `at_row` steps are logged, send `sig` to it and every
    process below it (torchrun puts its workers in their own sessions, so a process-group kill would miss them)."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len([x for x in log.read_text().splitlines() if x.strip()]) >= at_row:
            root = psutil.Process(proc.pid)
            for p in [root] + root.children(recursive=True):
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    if sig == signal.SIGKILL:
        time.sleep(0.5)  # let the kernel reap the workers before the test looks at their files
    assert proc.returncode != 0, f"the run finished before it could be killed at step {at_row}\n{err[-2000:]}"
    return proc.returncode


def final_weights(run: Path) -> dict:
    f = run / "final" / ("adapter_model.safetensors" if (run / "final/adapter_model.safetensors").exists()
                         else "model.safetensors")
    return load_file(f)


def assert_same_run(a: Path, b: Path, tol=1e-6):
    la, lb = [r["loss"] for r in read_log(a)], [r["loss"] for r in read_log(b)]
    assert [r["step"] for r in read_log(b)] == list(range(1, STEPS + 1))
    assert la == pytest.approx(lb, abs=tol, rel=tol)
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=tol)


# each sharding strategy's own checkpoint format; the reference is the strategy's uninterrupted run that
# test_deepspeed / test_fsdp compare with DDP (the same recipe, command and environment, trained once per session).
# One process resumes and redoes steps in test_partial_checkpoint_is_skipped (fp32 AdamW) and, with adamw8bit in
# backward, in test_optim
CASES = [("ddp", "full"), ("zero2", "full"), ("zero3", "lora"), ("fsdp2", "lora"), ("fsdp2", "full")]


def uninterrupted(cfg: Path, out: Path, nproc: int, accel: str | None) -> Path:
    subprocess.run(launch_cmd(nproc, accel, ["--config", cfg, "--output_dir", out]), cwd=ROOT, env=child_env(1),
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def one_process_ref(tmp_path_factory, tiny_model_dir) -> Path:
    """The uninterrupted 1-process run: the reference of the SIGTERM test (when and whether it checkpoints
    changes nothing in the training)."""
    d = tmp_path_factory.mktemp("one-process-ref")
    return uninterrupted(recipe(d, tiny_model_dir), d / "ref", 1, None)


@pytest.mark.parametrize("strategy, method", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_sigkill_then_resume_auto_matches_uninterrupted(tmp_path, strategy_run, shared_strategy_recipe,
                                                        strategy_extensions, strategy, method):
    train = yaml.safe_load(shared_strategy_recipe.read_text())["train"]
    assert (train["max_steps"], train["save_steps"], train["keep_checkpoints"]) == (STEPS, 4, 2)  # as below
    ref, run, accel = strategy_run(strategy, method), tmp_path / "run", STRATEGY_CONFIGS[strategy]
    args = ["--config", shared_strategy_recipe, "--output_dir", run, "--lora.enabled", str(method == "lora").lower()]
    env = child_env(1) | {"TORCH_EXTENSIONS_DIR": str(strategy_extensions)}  # the reference's: no op built there
    at = random.Random(f"{strategy}-{method}").randint(5, STEPS - 7)  # a random step, reproducible per case
    kill_when_logged(launch_cmd(2, accel, args), run / "train_log.jsonl", at, env=env)
    done = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*") if not p.name.endswith(".tmp")]
    assert done and max(done) < STEPS  # it really died mid-run, after at least one checkpoint
    proc = subprocess.run(launch_cmd(2, accel, args + ["--resume", "auto"]), cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints'}" in proc.stdout
    assert not list(strategy_extensions.rglob("*.so"))  # nor did a resume compile a DeepSpeed op (CPU ranks)
    assert_same_run(ref, run)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == [f"step-{STEPS - 4:08d}", f"step-{STEPS:08d}"]  # the newest two (keep_checkpoints: 2)


def test_sigterm_saves_and_resume_completes(tmp_path, tiny_model_dir, one_process_ref):
    """Also: the evaluation before training stays in the final report after a stop and --resume auto (was:
    dropped), and a --resume auto once the run has finished changes nothing and exits 0 (was: it saved the
    last checkpoint again and replaced final/ and eval/)."""
    cfg = recipe(tmp_path, tiny_model_dir, save_steps=0)  # no periodic checkpoints: the signal alone saves
    tree = yaml.safe_load(cfg.read_text())
    tree["eval"]["before_training"] = True
    cfg.write_text(yaml.safe_dump(tree))
    ref, run = one_process_ref, tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--output_dir", str(run)]
    code = kill_when_logged(cmd, run / "train_log.jsonl", 5, sig=signal.SIGTERM)
    assert code == 143  # 128 + SIGTERM, so a scheduler requeues the job
    (ckpt,) = list((run / "checkpoints").iterdir())
    assert 5 <= int(ckpt.name.split("-")[1]) < STEPS and not (run / "final").exists()
    launch("train.py", ["--config", cfg, "--output_dir", run, "--resume", "auto"])
    assert_same_run(ref, run)
    table = json.loads((run / "eval" / "comparison.json").read_text())
    assert list(table) == ["majority", "zero-shot", "fine-tuned"]  # a model from a path counts as pretrained
    assert table["zero-shot"] == json.loads((run / "eval_untrained" / "metrics.json").read_text())
    log = run / "train_log.jsonl"  # damaged since it finished: its requeue still has nothing to do (exit 0)
    log.write_text(log.read_text().replace("\n", "\nnot json\n", 1))
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    from fittune.rundir import DirLock

    evaluation = DirLock(run).acquire("evaluate.py", shared=True)  # an evaluation of the run reads it meanwhile
    try:  # ... which a requeue loop's --resume auto writes nothing to disturb: it shares the lock (was: exit 2)
        again = launch("train.py", ["--config", cfg, "--output_dir", run, "--resume", "auto"])
        anew = launch("train.py", ["--config", cfg, "--output_dir", run, "--overwrite"], check=False)
    finally:
        evaluation.release()
    # going back to its checkpoint in place would replace the finished final/ and eval/ (was: silently retrained)
    back = launch("train.py", ["--config", cfg, "--output_dir", run, "--resume", ckpt], check=False)
    assert back.returncode != 0 and "holds what the run did after it (final/, eval/)" in back.stderr
    assert f"{run} has finished ({STEPS} steps" in again.stdout and "nothing trained or rewritten" in again.stdout
    assert anew.returncode != 0 and "in use by another fittune process that reads it" in anew.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == files


def test_partial_checkpoint_is_skipped(tmp_path, tiny_model_dir):
    cfg = recipe(tmp_path, tiny_model_dir, max_steps=8)
    ref, run = tmp_path / "ref", tmp_path / "run"
    launch("train.py", ["--config", cfg, "--output_dir", ref])
    shutil.copytree(ref, run)  # the same run (a moved run directory resumes), then:
    # simulate a crash in the middle of saving step 8: its directory never got its final name, and a file
    # in it is cut short; the run's end (final/, eval/) never happened
    ckpts = run / "checkpoints"
    (ckpts / "step-00000008").rename(ckpts / "step-00000008.tmp")
    weights = ckpts / "step-00000008.tmp" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    for d in ("final", "eval"):
        shutil.rmtree(run / d)
    proc = launch("train.py", ["--config", cfg, "--output_dir", run, "--resume", "auto"])
    assert f"resumed from {ckpts / 'step-00000004'}" in proc.stdout
    assert not (ckpts / "step-00000008.tmp").exists()  # cleaned up, never resumed from
    la, lb = [r["loss"] for r in read_log(ref)], [r["loss"] for r in read_log(run)]
    assert la == pytest.approx(lb, abs=1e-6)
    for k, v in final_weights(ref).items():
        torch.testing.assert_close(final_weights(run)[k], v, atol=1e-6, rtol=1e-6)
    # a copy killed after its last checkpoint, before final/: its copied (unsealed) step-8 is what it resumes
    # from, and the end does not save that state again over it (was: refused, as not made here, at the end)
    done = shutil.copytree(ref, tmp_path / "copy")
    for d in ("final", "eval"):
        shutil.rmtree(done / d)
    copied = digest(done / "checkpoints" / "step-00000008")
    from fittune.rundir import claim_dir

    claim_dir(done / "eval", "eval")  # an earlier end's eval/, holding a note of the user's: refused before
    (done / "eval" / "notes.md").write_text("mine")  # anything runs (was: found only at the end, after training)
    log = (done / "train_log.jsonl").read_bytes()
    refused = launch("train.py", ["--config", cfg, "--output_dir", done, "--resume", "auto"], check=False)
    assert refused.returncode != 0 and "the run's eval/ " in refused.stderr and "also holds notes.md" in refused.stderr
    assert (done / "train_log.jsonl").read_bytes() == log and (done / "eval" / "notes.md").read_text() == "mine"
    shutil.rmtree(done / "eval")
    proc = launch("train.py", ["--config", cfg, "--output_dir", done, "--resume", "auto"])
    assert f"resumed from {done / 'checkpoints' / 'step-00000008'}" in proc.stdout and (done / "final").is_dir()
    assert digest(done / "checkpoints" / "step-00000008") == copied
    # a branch from a checkpoint its run is removing now (rotation holds the marker's exclusive lock) is refused
    # before anything is written (was: met mid-load, or not at all where the removal came first)
    from fittune.rundir import lock_marker

    branch, source = tmp_path / "branch", ref / "checkpoints" / "step-00000008"
    removing = lock_marker(source, exclusive=True)
    try:
        refused = launch("train.py", ["--config", cfg, "--output_dir", branch, "--resume", source], check=False)
    finally:
        os.close(removing)
    assert refused.returncode == 2 and f"checkpoint {source} was removed by the run that holds it" in refused.stderr
    assert not branch.exists()
    # a branch from another run's last checkpoint still saves its own (the skip is for the run's own only)
    launch("train.py", ["--config", cfg, "--output_dir", branch, "--resume", source])
    assert (branch / "checkpoints" / "step-00000008" / "trainer_state.json").is_file()


def test_a_run_rotating_keeps_the_checkpoint_a_branch_is_loading(tmp_path, tiny_model_dir):
    """A run's rotation skips a checkpoint that a resume elsewhere holds while it loads (a branch from this run,
    `--resume RUN/checkpoints/step-N`, whose hold the test takes here) and says so, at the save and again at
    its end (a later save or the end removes it once let go). The run's own resume lets go of its checkpoint
    once loaded, so its rotation still removes that one."""
    from fittune.checkpoints import hold_checkpoint

    cfg = recipe(tmp_path, tiny_model_dir, max_steps=8, save_steps=2, keep_checkpoints=4)
    run = tmp_path / "run"
    launch("train.py", ["--config", cfg, "--output_dir", run])
    ckpts = run / "checkpoints"
    for d in (ckpts / "step-00000008", run / "final", run / "eval"):  # as if killed after step 6's checkpoint
        shutil.rmtree(d)
    branch = hold_checkpoint(ckpts / "step-00000002")
    try:
        proc = launch("train.py", ["--config", cfg, "--output_dir", run, "--resume", "auto",
                                   "--train.keep_checkpoints", "1"])
    finally:
        branch.release()
    assert f"resumed from {ckpts / 'step-00000006'}" in proc.stdout
    assert f"kept {ckpts / 'step-00000002'} beyond train.keep_checkpoints for now" in proc.stdout
    assert f"kept {ckpts / 'step-00000002'} beyond train.keep_checkpoints: another run is still" in proc.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000008"]
    assert (ckpts / "step-00000002" / "trainer_state.json").is_file()


def test_incompatible_checkpoint_refused(tmp_path, tiny_model_dir):
    cfg = recipe(tmp_path, tiny_model_dir, max_steps=4)
    run = tmp_path / "run"
    launch("train.py", ["--config", cfg, "--output_dir", run, "--train.max_steps", "4"])
    proc = launch("train.py", ["--config", cfg, "--output_dir", run, "--train.max_steps", "4", "--resume", "auto",
                               "--lora.enabled", "true"], check=False)
    assert proc.returncode != 0
    assert "belongs to a different run setup" in proc.stderr and "lora" in proc.stderr
    fresh = launch("train.py", ["--config", cfg, "--output_dir", run, "--train.max_steps", "4"], check=False)
    # never mixes two runs in one dir: the ways on are named (a finished run: nothing to continue)
    assert fresh.returncode != 0 and "already holds a finished run: evaluate it with evaluate.py --checkpoint " \
        f"{run}, replace it with --overwrite" in fresh.stderr


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, tiny_model_dir):
    """A learning rate that makes the weights blow up: bad steps are skipped and counted; after
    max_bad_steps in a row the run stops with a diagnostic and a last good checkpoint."""
    cfg = recipe(tmp_path, tiny_model_dir, lr=1e12, max_grad_norm=0.0, max_bad_steps=3, warmup_ratio=0.0)
    run = tmp_path / "run"
    proc = launch("train.py", ["--config", cfg, "--output_dir", run], check=False)
    assert proc.returncode != 0 and "training diverged: 3 consecutive steps" in proc.stderr, proc.stderr[-2000:]
    rows = read_log(run)
    assert rows[-1]["nonfinite_skipped"] >= 3
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    weights = load_file(last / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())  # the saved weights are the last good ones


def test_checkpoint_dir_unwritable(tmp_path, tiny_model_dir):
    cfg = recipe(tmp_path, tiny_model_dir, max_steps=8)
    run = tmp_path / "run"
    from fittune.rundir import claim_dir

    claim_dir(run, "train")  # a run directory of fittune's (a foreign one is refused before anything runs)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-00000008.tmp").write_text("a file where the save must create a directory")
    proc = launch("train.py", ["--config", cfg, "--output_dir", run, "--resume", "auto"], check=False)
    # the stray .tmp is a file, not a partial checkpoint dir: the save of step 8 fails with a clear error
    assert proc.returncode != 0 and "could not write checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert (run / "checkpoints" / "step-00000004" / "trainer_state.json").is_file()  # the previous one is intact


RANK1_DISK_FULL = """
import errno, os
if os.environ.get("RANK") == "1":  # only the second training process
    import torch
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if "step-00000008" in str(f) and "random_states_1" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
"""


def fail_two_ranks(tmp_path, tiny_model_dir, hook_code: str) -> tuple[Path, Path, str]:
    """An 8-step DDP run on 2 processes with `hook_code` as their sitecustomize (a failure injected into the
    ranks it names): it must fail with exactly one `fittune: error:` line and no traceback before it.
    Returns (run dir, recipe, that line)."""
    cfg = recipe(tmp_path, tiny_model_dir, max_steps=8)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(hook_code)
    run = tmp_path / "run"
    proc = launch("train.py", ["--config", cfg, "--output_dir", run], nproc=2, check=False,
                  extra_env={"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)])})
    assert proc.returncode != 0 and proc.stderr.count("fittune: error:") == 1, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("fittune: error:"))
    assert "Traceback" not in proc.stderr.split(line)[0], proc.stderr[-3000:]  # the launcher's own comes after
    return run, cfg, line

def test_write_failure_on_one_rank_stops_every_rank_with_its_reason(tmp_path, tiny_model_dir):
    """DDP on 2 processes; only rank 1's write of its RNG state for step 8 fails (a full disk, injected by a
    sitecustomize in that process only): both processes stop (no hang), the one line printed (by rank 0)
    carries rank 1's reason, and the step-4 checkpoint is intact."""
    run, _, line = fail_two_ranks(tmp_path, tiny_model_dir, RANK1_DISK_FULL)
    assert "on process 1: could not write checkpoint" in line and "No space left on device (injected)" in line
    assert f"previous checkpoint is intact: {run / 'checkpoints' / 'step-00000004'}" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]
    assert (run / "checkpoints" / "step-00000004" / "trainer_state.json").is_file()


RANK0_LOG_FULL = """
import errno, os
if os.environ.get("RANK") == "0":  # only the main process writes train_log.jsonl
    import fittune.rundir as rundir
    real_append = rundir.append_line
    def append_line(path, line):
        if str(path).endswith("train_log.jsonl") and '"step": 6,' in line:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_append(path, line)
    rundir.append_line = append_line
"""


def test_failed_log_write_on_the_main_process_stops_every_rank_then_resumes(tmp_path, tiny_model_dir):
    """DDP on 2 processes; the main process cannot append step 6 to train_log.jsonl (a full disk): both
    processes stop with one clear line (no traceback, no rank left waiting), the step-4 checkpoint is intact,
    and once there is space `--resume auto` finishes the run with every step logged once."""
    run, cfg, line = fail_two_ranks(tmp_path, tiny_model_dir, RANK0_LOG_FULL)
    assert f"could not write {run / 'train_log.jsonl'} ([Errno 28] No space left on device (injected))" in line, line
    assert "the checkpoints already saved are intact" in line
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000004"]
    launch("train.py", ["--config", cfg, "--output_dir", run, "--resume", "auto"], nproc=2)
    assert [r["step"] for r in read_log(run)] == list(range(1, 9)) and (run / "final").is_dir()

def test_lora_zero3_two_processes_resumes_on_one(tmp_path, tiny_model_dir):
    """A LoRA checkpoint written by ZeRO-3 on 2 processes resumes on 1 process without DeepSpeed (from its
    unsharded adapter + optimizer moments; same global batch, so the same data order). The final loss
    equals the uninterrupted 2-process run's within 1e-5 (only the order of float sums differs)."""
    cfg = recipe(tmp_path, tiny_model_dir, lora=True, max_steps=12)
    zero3 = "accelerate_configs/deepspeed_zero3.yaml"
    run = tmp_path / "run"
    launch("train.py", ["--config", cfg, "--output_dir", run, "--train.keep_checkpoints", "3"], nproc=2, config_file=zero3)
    ref_losses, ref_weights = [r["loss"] for r in read_log(run)], final_weights(run)  # the uninterrupted run
    # keep only the step-4 checkpoint, as if the 2-GPU job had died at step 6
    for d in ("final", "eval", "checkpoints/step-00000008", "checkpoints/step-00000012"):
        shutil.rmtree(run / d)
    state = json.loads((run / "checkpoints/step-00000004/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["strategy"] == "zero3"
    proc = launch("train.py", ["--config", cfg, "--output_dir", run, "--resume", "auto", "--train.keep_checkpoints", "3",
                               "--train.micro_batch_size", "2", "--train.grad_accum", "4"])  # 1 x 2 x 4 = 2 x 2 x 2
    assert "(portable restore)" in proc.stdout
    # the run's record keeps both layouts (was: only the last one's strategy and world size)
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["trained_with"] == [
        {"strategy": "zero3", "world_size": 2, "micro_batch_size": 2, "grad_accum": 2, "from_step": 0},
        {"strategy": "single", "world_size": 1, "micro_batch_size": 2, "grad_accum": 4, "from_step": 4}]
    lb = [r["loss"] for r in read_log(run)]
    assert len(lb) == 12 and ref_losses == pytest.approx(lb, abs=1e-5, rel=1e-5)
    for k, v in ref_weights.items():
        torch.testing.assert_close(final_weights(run)[k], v, atol=1e-5, rtol=1e-5)


# ---- in-process: one process, a small model, no launch ------------------------------------------------------


def small_target():
    """A prepared 2-layer model + AdamW after one step, on an in-process single-process Accelerator."""
    from accelerate import Accelerator

    from fittune.checkpoints import CheckpointTarget
    from fittune.strategy import Strategy

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt = acc.prepare(model, opt)
    target = CheckpointTarget(acc, Strategy(1), model, opt, sched, lora=False)
    train_step(target)
    return target


def train_step(t):
    t.model(torch.randn(4, 128)).square().mean().backward()
    t.optimizer.step()
    t.optimizer.zero_grad()
    t.scheduler.step()


def save(t, out: Path, step: int, keep: int = 2) -> Path:
    from fittune.checkpoints import save_checkpoint

    return save_checkpoint(t, out, step, {"step": step, "world_size": 1, "optimizer_steps": step}, "seed: 0\n",
                           keep).path


def run_dir(parent: Path) -> Path:
    from fittune.rundir import claim_dir

    return claim_dir(parent / "run", "train")


def digest(d: Path) -> dict:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*")) if f.is_file()}


def test_save_is_published_whole_and_only_fittunes_checkpoints_are_removed(tmp_path):
    from fittune.checkpoints import FORMAT_VERSION, read_state
    from fittune.rundir import MARKER

    t, out = small_target(), run_dir(tmp_path)
    foreign = out / "checkpoints" / "step-00000000"  # looks like a checkpoint, but fittune did not write it
    foreign.mkdir(parents=True)
    (foreign / "trainer_state.json").write_text("{}")
    (foreign / "notes.txt").write_text("mine")
    for step in (1, 2, 3):
        save(t, out, step, keep=2)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000000", "step-00000002", "step-00000003"]  # step 1 (ours) trimmed, no .tmp left
    assert (foreign / "notes.txt").read_text() == "mine"
    state = read_state(out / "checkpoints" / "step-00000003")
    assert state["strategy"] == "single" and state["format_version"] == FORMAT_VERSION
    assert (out / "checkpoints" / "step-00000003" / MARKER).is_file()


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    from fittune.checkpoints import load_checkpoint, read_state

    t, out = small_target(), run_dir(tmp_path)
    path = save(t, out, 1)
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = [s["exp_avg_sq"].clone() for s in t.optimizer.optimizer.state.values()]
    lr = t.optimizer.param_groups[0]["lr"]
    after_save = torch.rand(3)
    train_step(t)
    train_step(t)
    assert load_checkpoint(t, path, read_state(path), trusted=False) == "exact"
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, weights[k])
    for s, m in zip(t.optimizer.optimizer.state.values(), moments):
        assert torch.equal(s["exp_avg_sq"], m)
    assert t.optimizer.param_groups[0]["lr"] == lr == 1e-3 / 2  # the schedule after one step
    assert torch.equal(torch.rand(3), after_save)  # the RNG continues where the save left it


def test_a_checkpoint_removed_while_it_loads_is_named_as_such(tmp_path):
    """A branch (`--resume OTHER_RUN/checkpoints/step-N`) from a run still training holds its checkpoint while
    it loads, so that run's rotation leaves it (below); where the filesystem has no locks the rotation can still
    remove it mid-load (state file first, then the rest). Was: "incomplete: random_states_0.pkl is missing;
    resume from an older checkpoint", which misled; now it says what happened and what to do."""
    from fittune.checkpoints import load_checkpoint, read_state
    from fittune.errors import FittuneError

    t, out = small_target(), run_dir(tmp_path)
    path = save(t, out, 1)
    state = read_state(path)  # read before the removal starts, as a resume reads it
    for name in ("trainer_state.json", "random_states_0.pkl"):  # remove_tree's first two steps
        (path / name).unlink()
    with pytest.raises(FittuneError, match=r"was removed by the run that holds it.*resume from a newer checkpoint"):
        load_checkpoint(t, path, state, trusted=False)


def test_rotation_keeps_a_checkpoint_a_resume_is_loading(tmp_path):
    """A resume holds its checkpoint from before its first read to after its last (`hold_checkpoint`, taken
    by every rank): the rotation of the run that wrote it skips it, and a later save (or the run's end:
    `rotate_checkpoints`) removes it once let go. Was: a branch from a run still training could lose its checkpoint to that run's rotation mid-load."""
    from fittune.checkpoints import hold_checkpoint, rotate_checkpoints, save_checkpoint

    t, out = small_target(), run_dir(tmp_path)
    first = save(t, out, 1, keep=1)
    hold, other = hold_checkpoint(first), hold_checkpoint(first)  # any number of resumes at once
    state = {"step": 2, "world_size": 1, "optimizer_steps": 2}
    saved = save_checkpoint(t, out, 2, state, "seed: 0\n", keep=1)
    assert saved.kept == [first] and (first / "trainer_state.json").is_file()
    hold.release()
    assert save_checkpoint(t, out, 3, {**state, "step": 3}, "seed: 0\n", keep=1).kept == [first]  # still one
    other.release()
    assert rotate_checkpoints(out, 1) == []  # what the run's end does: no save comes after its last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]


def test_a_resume_refuses_a_checkpoint_being_removed(tmp_path):
    """The hold is refused where the run that wrote the checkpoint is removing it now (it holds the marker's
    exclusive lock) or has removed its state file: the same one-line error as a removal met mid-load."""
    import os

    from fittune.checkpoints import hold_checkpoint
    from fittune.errors import FittuneError
    from fittune.rundir import lock_marker

    t, out = small_target(), run_dir(tmp_path)
    path = save(t, out, 1)
    removing = lock_marker(path, exclusive=True)
    with pytest.raises(FittuneError, match=r"was removed by the run that holds it"):
        hold_checkpoint(path)
    os.close(removing)
    hold_checkpoint(path).release()  # let go: held again at once
    (path / "trainer_state.json").unlink()  # remove_tree's first step
    with pytest.raises(FittuneError, match=r"was removed by the run that holds it"):
        hold_checkpoint(path)


def test_checkpoint_size_known_before_the_save(tmp_path):
    """The free-space check needs this rank's bytes: parameters + AdamW's two moments (+ a 4-byte step
    counter per parameter tensor), all float32 here."""
    from fittune.checkpoints import checkpoint_bytes

    t = small_target()
    params = list(t.model.parameters())
    assert checkpoint_bytes(t) == 3 * 4 * sum(p.numel() for p in params) + 4 * len(params)


def _cut_then_fail(error):
    """A writer that leaves half a file behind, then fails as a full disk makes it fail."""

    def write(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\0" * 100)
        raise error

    return write


def _write_failures():
    from safetensors import SafetensorError

    return {
        "oserror-enospc": ("accelerate.utils.other.safe_save_file", OSError(errno.ENOSPC, "No space left on device")),
        "safetensors": ("accelerate.utils.other.safe_save_file", SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')),
        "torch-save": ("torch.save", RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter "
                                                  "failed writing file data/0: file write failed")),
    }


@pytest.mark.parametrize("kind", ["oserror-enospc", "safetensors", "torch-save"])
def test_failed_write_is_one_clear_error_and_keeps_previous(tmp_path, monkeypatch, kind):
    from fittune.errors import FittuneError

    t, out = small_target(), run_dir(tmp_path)
    previous = save(t, out, 1)
    before = digest(previous)
    where, error = _write_failures()[kind]
    monkeypatch.setattr(where, _cut_then_fail(error))
    with pytest.raises(FittuneError) as e:
        save(t, out, 2)
    msg = str(e.value)
    assert "could not write checkpoint" in msg and f"previous checkpoint is intact: {previous}" in msg
    assert ("No space left" in msg) if kind != "torch-save" else ("failed writing file" in msg)
    assert digest(previous) == before  # byte for byte
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001"]  # no step-2(.tmp)


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (needs root and mount rights; skipped elsewhere: the injected failures above cover it)."""
    d = tmp_path / "disk"
    d.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(d)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "--lazy", str(d)], check=True)  # lazy: a failed test may still hold a file open


def test_full_disk_keeps_previous_checkpoint(small_disk, monkeypatch):
    """A real full disk: one checkpoint (~245 KB) fits, a second does not. The free-space check refuses it
    before writing; with the check blinded, the write itself fails (ENOSPC) and is reported the same way."""
    from fittune import checkpoints
    from fittune.errors import FittuneError

    t, out = small_target(), run_dir(small_disk)
    previous = save(t, out, 1)
    before = digest(previous)
    with pytest.raises(FittuneError, match="not enough free disk space for checkpoint step-00000002") as e:
        save(t, out, 2)
    assert f"previous checkpoint is intact: {previous}" in str(e.value)
    monkeypatch.setattr(checkpoints, "checkpoint_bytes", lambda target: 0)
    with pytest.raises(FittuneError, match="could not write checkpoint .*(No space left on device|disk may be full)") as e:
        save(t, out, 2)
    assert f"previous checkpoint is intact: {previous}" in str(e.value)
    assert digest(previous) == before
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001"]


def _payload(evidence: Path):
    """An object whose unpickling creates `evidence` (stands for any code a foreign pickle could run)."""

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(evidence),)

    return Payload()


@pytest.mark.parametrize("damage", ["optimizer-garbage", "optimizer-foreign-pickle", "model-cut", "rng-missing"])
def test_damaged_checkpoint_is_one_clear_error_naming_the_file(tmp_path, damage):
    from fittune.checkpoints import load_checkpoint, read_state
    from fittune.errors import FittuneError

    t, out = small_target(), run_dir(tmp_path)
    path = save(t, out, 1)
    evidence = tmp_path / "pickle-ran"
    if damage == "optimizer-garbage":
        (path / "optimizer.bin").write_bytes(b"\x80\x04garbage")
        name = "optimizer.bin"
    elif damage == "optimizer-foreign-pickle":  # a whole, valid torch file holding code, not tensors
        torch.save({"state": _payload(evidence)}, path / "optimizer.bin")
        name = "optimizer.bin"
    elif damage == "model-cut":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        name = "model.safetensors"
    else:
        (path / "random_states_0.pkl").unlink()
        name = "random_states_0.pkl"
    with pytest.raises(FittuneError) as e:
        load_checkpoint(t, path, read_state(path), trusted=False)
    assert name in str(e.value) and str(path) in str(e.value)
    assert not evidence.exists()  # weights_only: the pickle's code never ran


@pytest.mark.parametrize("damage", ["shard-cut", "shard-missing", "metadata-cut"])
def test_damaged_distributed_checkpoint_shards_are_named(tmp_path, damage):
    """FSDP2's torch.distributed.checkpoint files: a shard shorter than its metadata records, a missing shard
    or a cut .metadata is named before torch's reader fails inside (a zip error on every rank)."""
    import torch.distributed.checkpoint as dcp

    from fittune.checkpoints import check_dcp_files
    from fittune.errors import FittuneError

    ckpt = tmp_path / "step-00000001"
    state = {"model": {"w": torch.randn(64, 32), "b": torch.randn(32)}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(ckpt / "pytorch_model_fsdp_0")), no_dist=True)
    check_dcp_files(ckpt)  # whole: passes
    shard = next((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))
    if damage == "shard-cut":
        shard.write_bytes(shard.read_bytes()[:-10])
        bad, why = shard, "bytes, its metadata records"
    elif damage == "shard-missing":
        shard.unlink()
        bad, why = shard, "missing"
    else:
        bad = ckpt / "pytorch_model_fsdp_0" / ".metadata"
        bad.write_bytes(bad.read_bytes()[:20])
        why = "cannot be read"
    with pytest.raises(FittuneError, match="is damaged") as e:
        check_dcp_files(ckpt)
    assert f"pytorch_model_fsdp_0/{bad.name}" in str(e.value) and why in str(e.value)
    assert "--resume" in str(e.value)


def test_old_format_is_refused_clearly(tmp_path):
    from fittune.checkpoints import check_compatible
    from fittune.errors import FittuneError

    with pytest.raises(FittuneError, match="written by an older fittune .*format 1.*start a new output_dir"):
        check_compatible({"format_version": 1, "fingerprint": {}}, {}, tmp_path)



def test_a_changed_process_count_says_how_to_keep_the_global_batch(tmp_path):
    """Was "resume with the same recipe" when only the launch changed (2 processes -> 1)."""
    from fittune.checkpoints import FORMAT_VERSION, check_compatible
    from fittune.errors import FittuneError

    state = {"format_version": FORMAT_VERSION, "world_size": 2, "fingerprint": {"global_batch_size": 16}}
    with pytest.raises(FittuneError, match=r"global_batch_size: checkpoint 16 vs now 8.*written by 2 process\(es\), "
                                           r"this launch has 1: launch 2, or keep its global batch \(16 = "):
        check_compatible(state, {"global_batch_size": 8}, tmp_path, world_size=1)
    with pytest.raises(FittuneError, match="resume with the same recipe"):  # same launch, other recipe
        check_compatible(state, {"global_batch_size": 8}, tmp_path, world_size=2)
    # the data file unchanged, the examples not: a data key of the recipe, or the split rule of an older fittune
    state["fingerprint"] = {"global_batch_size": 16, "source_sha256": "s", "train_sha256": "a", "heldout_sha256": "h"}
    with pytest.raises(FittuneError, match=r"\(the training rows differ\); the data file is unchanged, so "
                                           r"the data keys of the recipe .* or the run began with a fittune from before"):
        check_compatible(state, {**state["fingerprint"], "train_sha256": "b"}, tmp_path, world_size=2)
    # the file changed: said in words (was: three pairs of 64-digit hashes)
    with pytest.raises(FittuneError, match=r"\(the data file's bytes differ; the training rows differ\); the data "
                                           r"changed since the checkpoint \(data.path or data.test_path\)"):
        check_compatible(state, {**state["fingerprint"], "source_sha256": "t", "train_sha256": "b"}, tmp_path,
                         world_size=2)

def test_partial_checkpoints_removed_only_when_fittunes(tmp_path):
    from fittune.rundir import remove_partial_checkpoints

    t, out = small_target(), run_dir(tmp_path)
    ours = save(t, out, 1).rename(out / "checkpoints" / "step-00000001.tmp")  # as a crash mid-save leaves it
    other = out / "checkpoints" / "step-00000002.tmp"
    other.mkdir()
    (other / "keep.txt").write_text("not fittune's")
    assert remove_partial_checkpoints(out) == [ours]
    assert not ours.exists() and (other / "keep.txt").is_file()


def test_save_killed_before_marking_its_tmp_does_not_block_the_next_save(tmp_path):
    """A kill between creating step-N.tmp and writing its marker (as CI once hit: SIGKILL mid-save, then
    `--resume auto` failed with "File exists") leaves an empty directory, or one holding only the marker's
    temporary file: the save of step N adopts it. A foreign step-N.tmp stays, and the save says so."""
    from fittune.errors import FittuneError
    from fittune.rundir import MARKER, remove_partial_checkpoints

    t, out = small_target(), run_dir(tmp_path)
    ckpts = out / "checkpoints"
    empty, half = ckpts / "step-00000001.tmp", ckpts / "step-00000002.tmp"
    half.mkdir(parents=True)
    empty.mkdir()
    (half / f".{MARKER}.tmp-4242").write_text('{"created_by": "fitt')  # killed mid-write of the marker
    foreign = ckpts / "step-00000003.tmp"
    foreign.mkdir()
    (foreign / f".{MARKER}.tmp-1").write_text("")
    (foreign / "notes.txt").write_text("someone else's")
    assert remove_partial_checkpoints(out) == []  # none is marked: adopted when saved again, never deleted
    assert (foreign / "notes.txt").is_file()
    assert save(t, out, 1).name == "step-00000001" and save(t, out, 2).name == "step-00000002"
    assert not empty.exists() and not half.exists()  # each adopted, written and published
    with pytest.raises(FittuneError, match=r"step-00000003.tmp: it already exists and is not a fittune checkpoint"
                                           r".*move it out.*previous checkpoint is intact: .*step-00000002"):
        save(t, out, 3)
    assert (foreign / "notes.txt").read_text() == "someone else's"


def test_a_save_never_replaces_or_rotates_away_what_is_not_a_fittune_checkpoint(tmp_path):
    """fittune's marker is not enough: a run someone trained at checkpoints/step-N (fittune refuses that
    output_dir now, but an older fittune did not), or an evaluation written there, is neither replaced by the
    save of step N nor removed by the rotation; only fittune's checkpoints are."""
    from fittune.errors import FittuneError
    from fittune.rundir import claim_dir

    t, out = small_target(), run_dir(tmp_path)
    nested = claim_dir(out / "checkpoints/step-00000002", "train")
    (nested / "train_log.jsonl").write_text('{"step": 1}\n')
    evaluation = claim_dir(out / "checkpoints/step-00000000", "eval")
    (evaluation / "trainer_state.json").write_text("{}")  # looks complete to the rotation
    with pytest.raises(FittuneError, match=r"step-00000002: it already exists and is not a checkpoint fittune made here"):
        save(t, out, 2)
    assert (nested / "train_log.jsonl").read_text() == '{"step": 1}\n'
    save(t, out, 1, keep=1)
    save(t, out, 3, keep=1)  # the rotation drops step 1, keeps the others' directories
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-00000000", "step-00000002",
                                                                     "step-00000003"]
    # a user's copy of a checkpoint under a step name (cp -r keeps the marker, not the seal): kept (was: deleted)
    import shutil

    shutil.copytree(out / "checkpoints/step-00000003", out / "checkpoints/step-00000001")
    save(t, out, 4, keep=1)
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-00000000", "step-00000001",
                                                                     "step-00000002", "step-00000004"]
    copied = digest(out / "checkpoints/step-00000001")  # nor does a save of step 1 replace it (was: replaced)
    with pytest.raises(FittuneError, match=r"step-00000001: it already exists and is not a checkpoint fittune made"):
        save(t, out, 1, keep=1)
    assert digest(out / "checkpoints/step-00000001") == copied
    # a copy under a later step's name neither takes the place of the newest checkpoint in the rotation (was:
    # the step just saved was rotated away) nor is what --resume auto continues from
    from fittune.checkpoints import find_resume_checkpoint

    shutil.copytree(out / "checkpoints/step-00000004", out / "checkpoints/step-00000009")
    save(t, out, 5, keep=1)
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == [
        "step-00000000", "step-00000001", "step-00000002", "step-00000005", "step-00000009"]
    assert find_resume_checkpoint(out, "auto") == out / "checkpoints/step-00000005"


def test_a_run_is_finished_when_its_evaluation_is_newer_than_its_newest_checkpoint(tmp_path):
    """final/ and eval/ written after the newest checkpoint: finished (a --resume auto trains nothing). A run
    resumed from an earlier checkpoint into its own directory and stopped again has newer checkpoints than its
    old final/ and eval/: not finished (a --resume auto continues it)."""
    from fittune.rundir import claim_dir, run_finished

    run = claim_dir(tmp_path / "run", "train")
    step = claim_dir(run / "checkpoints" / "step-00000004", "checkpoint")  # as a save makes it
    (step / "trainer_state.json").write_text("{}")
    assert not run_finished(run)
    (run / "final").mkdir()
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")
    os.utime(step / "trainer_state.json", ns=(1, 1))
    assert run_finished(run)
    copy = shutil.copytree(step, run / "checkpoints" / "step-00000009")  # a user's copy, newer: not the run's
    os.utime(copy / "trainer_state.json", ns=(2 * 10**18, 2 * 10**18))
    assert run_finished(run)
    shutil.rmtree(copy)
    os.utime(run / "eval" / "metrics.json", ns=(0, 0))  # older than the checkpoint: a later attempt saved it
    assert not run_finished(run)
    shutil.rmtree(run / "checkpoints")
    assert run_finished(run)  # no checkpoints at all (train.save_steps: 0)


def test_an_explicit_resume_never_replaces_later_work_or_mixes_runs(tmp_path):
    """--resume step-N into its own run is refused while the run holds later checkpoints (continuing would
    replace them, and a kill midway would leave both branches for --resume auto to pick the wrong one from);
    a checkpoint of another run is refused where a run already is; the newest checkpoint of an unfinished run,
    and any checkpoint into a new output_dir, are accepted."""
    from fittune.checkpoints import find_resume_checkpoint
    from fittune.errors import FittuneError
    from fittune.rundir import claim_dir

    def run_with(root: Path, steps: list[int]) -> list[Path]:
        claim_dir(root, "train")
        (root / "config.yaml").write_text("{}")
        made = [root / "checkpoints" / f"step-{s:08d}" for s in steps]
        for step, d in zip(steps, made):
            d.mkdir(parents=True)
            (d / "trainer_state.json").write_text(json.dumps({"step": step}))
        return made

    a, b = tmp_path / "a", tmp_path / "b"
    five, ten = run_with(a, [5, 10])
    (other,) = run_with(b, [5])
    with pytest.raises(FittuneError, match=r"holds what the run did after it \(step-00000010\), which continuing "
                                           r"from it there would replace: pass a new --output_dir"):
        find_resume_checkpoint(a, str(five))
    with pytest.raises(FittuneError, match="it is not a checkpoint of the run in .*a, which continuing from it "
                                           "there would mix with"):
        find_resume_checkpoint(a, str(other))
    assert find_resume_checkpoint(a, str(ten)) == ten
    assert find_resume_checkpoint(tmp_path / "new", str(five)) == five
    (a / "final").mkdir()  # an end cut short during its evaluation: redone from the newest, as --resume auto does
    assert find_resume_checkpoint(a, str(ten)) == ten
    (a / "eval").mkdir()
    (a / "eval" / "metrics.json").write_text("{}")  # written after step-10: the run has finished
    with pytest.raises(FittuneError, match=r"holds what the run did after it \(final/, eval/\)"):
        find_resume_checkpoint(a, str(ten))
