"""OOM-adaptive micro-batch: an out-of-memory error on ONE rank (a real torch.OutOfMemoryError raised by the
FITTUNE_TEST_OOM_ABOVE test hook) makes every rank halve the micro-batch and redo (DDP) or finish (ZeRO-2) the
step; the run then matches one started at the smaller micro-batch."""

import json

import pytest
from conftest import launch, read_log


@pytest.mark.parametrize("nproc, accel", [(1, None), (2, None), (2, "accelerate_configs/deepspeed_zero2.yaml")],
                         ids=["1proc", "ddp", "zero2"])
def test_injected_oom_halves_micro_batch_and_matches(tmp_path, tiny_config, nproc, accel):
    recipe = tiny_config(train={"micro_batch_size": 4, "grad_accum": 1, "max_steps": 5, "oom_adaptive": True,
                                "save_steps": 5})
    adapted, small = tmp_path / "adapted", tmp_path / "small"
    proc = launch("train.py", ["--config", recipe, "--output_dir", adapted], nproc=nproc, config_file=accel,
                  extra_env={"FITTUNE_TEST_OOM_ABOVE": "1", "FITTUNE_TEST_OOM_RANK": str(nproc - 1)})
    assert "out of memory at step 1: micro-batch -> 2, accumulation -> 2" in proc.stdout
    assert "micro-batch -> 1, accumulation -> 4" in proc.stdout
    launch("train.py", ["--config", recipe, "--output_dir", small, "--train.micro_batch_size", "1",
                        "--train.grad_accum", "4"], nproc=nproc, config_file=accel)
    la, lb = [r["loss"] for r in read_log(adapted)], [r["loss"] for r in read_log(small)]
    # DDP redoes the step at the smaller size: identical; ZeRO-2 sums the same terms through its own buckets
    assert len(la) == 5 and la == pytest.approx(lb, abs=1e-6 if accel is None else 1e-5)
    # the adapted micro-batch is part of the checkpoint, so a resume keeps it
    state = json.loads((adapted / "checkpoints/step-00000005/trainer_state.json").read_text())
    assert (state["micro_batch_size"], state["grad_accum"]) == (1, 4)


def test_zero2_oom_mid_step_keeps_the_finished_micro_batches(tmp_path, tiny_config):
    """ZeRO-2 has no no_sync: an out-of-memory on rank 1's SECOND micro-batch of step 1 (the first one is
    already reduced into DeepSpeed's buffers) is finished at half size; the run still matches 1 x 4."""
    zero2 = "accelerate_configs/deepspeed_zero2.yaml"
    recipe = tiny_config(train={"micro_batch_size": 2, "grad_accum": 2, "max_steps": 4, "oom_adaptive": True})
    adapted, small = tmp_path / "adapted", tmp_path / "small"
    proc = launch("train.py", ["--config", recipe, "--output_dir", adapted], nproc=2, config_file=zero2,
                  extra_env={"FITTUNE_TEST_OOM_ABOVE": "1", "FITTUNE_TEST_OOM_RANK": "1", "FITTUNE_TEST_OOM_SKIP": "1"})
    assert "out of memory at step 1: micro-batch -> 1, accumulation -> 4; finishing the step" in proc.stdout
    launch("train.py", ["--config", recipe, "--output_dir", small, "--train.micro_batch_size", "1",
                        "--train.grad_accum", "4"], nproc=2, config_file=zero2)
    la, lb = [r["loss"] for r in read_log(adapted)], [r["loss"] for r in read_log(small)]
    assert len(la) == 4 and la == pytest.approx(lb, abs=1e-5)


def test_oom_at_micro_batch_one_gives_up_clearly(tmp_path, tiny_config):
    recipe = tiny_config(train={"micro_batch_size": 2, "max_steps": 2, "oom_adaptive": True})
    proc = launch("train.py", ["--config", recipe, "--output_dir", tmp_path / "run"], check=False,
                  extra_env={"FITTUNE_TEST_OOM_ABOVE": "0"})
    errors = [x for x in proc.stderr.splitlines() if x.startswith("fittune: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "even with micro-batch 1" in errors[0]


@pytest.mark.parametrize("setting, accel, says", [
    ("oom_adaptive", "deepspeed_zero3", "train.oom_adaptive does not work under zero3"),
    ("compile", "fsdp2", "train.compile works with one process, DDP and model.parallel: auto, not under fsdp2"),
])
def test_what_a_strategy_cannot_run_is_refused_before_anything_is_written(tmp_path, tiny_config, setting, accel, says):
    """fittune.supported, the check the planner asks too (tests/test_plan.py)."""
    recipe = tiny_config(train={setting: True})
    proc = launch("train.py", ["--config", recipe, "--output_dir", tmp_path / "run"], nproc=2,
                  config_file=f"accelerate_configs/{accel}.yaml", check=False)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr[-2000:]  # torchrun exits 1 for its ranks
    assert not (tmp_path / "run").exists()


def test_a_finished_runs_requeue_is_not_refused_by_the_launch(tmp_path, tiny_config):
    """--resume auto of a finished run (saved without checkpoints: no recipe to check against) exits 0 with
    nothing trained or written, also under a launch whose checks would refuse its recipe (a requeue loop
    that calls it again with other launch settings)."""
    recipe = tiny_config(train={"max_steps": 2, "save_steps": 0})
    launch("train.py", ["--config", recipe, "--output_dir", tmp_path / "run"])
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    proc = launch("train.py", ["--output_dir", tmp_path / "run", "--resume", "auto", "--train.oom_adaptive", "true"],
                  nproc=2, config_file="accelerate_configs/deepspeed_zero3.yaml", check=False)
    assert proc.returncode == 0 and "has finished" in proc.stdout, proc.stderr[-2000:]
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*")) == before
