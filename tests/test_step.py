"""The step path in-process (no launcher): one global batch through StepRunner, split in different ways;
a non-finite step is skipped; OomAdaptive halves the micro-batch and gives the same update."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from fittune.batches import collate_train, tokenize_examples
from fittune.config import DataConfig
from fittune.distributed import Launched
from fittune.model import load_tokenizer
from fittune.precision import Precision
from fittune.splits import load_splits
from fittune.step import BatchSplit, OomAdaptive, StepPlan, StepRunner
from fittune.strategy import Strategy
from fittune.testing import install_oom_injection


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    """Four training rows of different lengths (so the token normalisation matters) and their collator."""
    cfg = DataConfig(path="builtin:ai-research-qa", max_length=96)
    train, _ = load_splits(cfg, 0)
    tok = load_tokenizer(str(tiny_model_dir))
    items, _ = tokenize_examples(train[:40], tok, cfg)
    by_len = sorted(range(len(items)), key=lambda i: len(items[i]))
    picked = [items[i] for i in (by_len[0], by_len[10], by_len[25], by_len[-1])]
    assert len({len(x) for x in picked}) > 1
    return picked, tok.pad_token_id


def _runner(tiny_model_dir, lr=0.1, max_grad_norm=0.0):
    accel = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # plain SGD: the update is the gradient itself, so equal weights mean equal gradients (Adam would turn
    # rounding noise on zero-gradient parameters into lr-sized steps)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt = accel.prepare(model, opt)
    model.train()  # as in the loop (the OOM test hook only fires in training mode)
    params = [p for p in model.parameters() if p.requires_grad]
    return StepRunner(Launched(accel, Precision("no"), Strategy()), model, opt, sched, params, None, max_grad_norm)


def _plan(items, pad_id, micro: int):
    order = list(range(len(items)))
    n_targets = sum(x.n_targets for x in items)
    return StepPlan([order[k:k + micro] for k in range(0, len(order), micro)],
                    lambda r: collate_train([items[j] for j in r], pad_id), n_targets)


def _weights(runner):
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()}


def test_any_split_of_the_batch_gives_the_same_update(tiny_model_dir, rows):
    items, pad = rows
    before = _weights(_runner(tiny_model_dir))
    results = {}
    for micro in (4, 2, 1):
        runner = _runner(tiny_model_dir)
        runner.accelerator.gradient_accumulation_steps = 4 // micro
        res = runner.run(_plan(items, pad, micro))
        assert res.stepped and not res.overflow
        results[micro] = (res, _weights(runner))
    ref_res, ref_w = results[4]
    assert max((ref_w[k] - before[k]).abs().max().item() for k in ref_w) > 1e-3  # the weights really moved
    for micro in (2, 1):
        res, w = results[micro]
        assert res.nll == pytest.approx(ref_res.nll, rel=1e-6)
        assert res.grad_norm == pytest.approx(ref_res.grad_norm, rel=1e-5)
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], atol=1e-6, rtol=1e-5, msg=f"micro {micro}: {k}")


def test_non_finite_step_is_skipped_with_weights_untouched(tiny_model_dir, rows):
    items, pad = rows
    runner = _runner(tiny_model_dir, max_grad_norm=1.0)
    with torch.no_grad():
        runner.model.model.norm.weight[0] = float("inf")  # every logit becomes non-finite
    before = _weights(runner)
    res = runner.run(_plan(items, pad, 4))
    assert not res.stepped and not res.overflow and not torch.isfinite(torch.tensor(res.grad_norm))
    assert runner.scheduler.last_epoch == 0  # the schedule waits for a real step
    after = _weights(runner)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in runner.params)  # gradients freed


def test_oom_halves_the_micro_batch_and_keeps_the_update(tiny_model_dir, rows, monkeypatch):
    items, pad = rows
    ref = _runner(tiny_model_dir)
    ref.accelerator.gradient_accumulation_steps = 4
    ref_res = ref.run(_plan(items, pad, 1))
    ref_w = _weights(ref)

    monkeypatch.setenv("FITTUNE_TEST_OOM_ABOVE", "1")  # a real torch.OutOfMemoryError above micro-batch 1
    runner = _runner(tiny_model_dir)
    assert install_oom_injection(runner.accelerator.unwrap_model(runner.model), rank=0)
    split, said = BatchSplit(4, 1), []
    adaptive = OomAdaptive(runner, split, 4, said.append)
    res = adaptive.run(0, lambda s: _plan(items, pad, s.micro_batch_size))
    assert (split.micro_batch_size, split.grad_accum) == (1, 4)
    assert runner.accelerator.gradient_accumulation_steps == 4
    assert [m.split(";")[0] for m in said] == ["out of memory at step 1: micro-batch -> 2, accumulation -> 2",
                                               "out of memory at step 1: micro-batch -> 1, accumulation -> 4"]
    assert res.stepped and res.nll == pytest.approx(ref_res.nll, rel=1e-6)
    w = _weights(runner)
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], atol=1e-6, rtol=1e-5, msg=k)


def test_oom_mid_step_drops_the_gradients_already_accumulated(tiny_model_dir, rows, monkeypatch):
    """The first micro-batch passes, the second runs out of memory: the redo must not count the first twice."""
    items, pad = rows
    ref = _runner(tiny_model_dir)
    ref.accelerator.gradient_accumulation_steps = 4
    ref.run(_plan(items, pad, 1))
    ref_w = _weights(ref)

    monkeypatch.setenv("FITTUNE_TEST_OOM_ABOVE", "1")
    monkeypatch.setenv("FITTUNE_TEST_OOM_SKIP", "1")  # lets the first micro-batch of 2 through
    runner = _runner(tiny_model_dir)
    install_oom_injection(runner.accelerator.unwrap_model(runner.model), rank=0)
    split = BatchSplit(2, 2)
    runner.accelerator.gradient_accumulation_steps = 2
    res = OomAdaptive(runner, split, 4, lambda m: None).run(0, lambda s: _plan(items, pad, s.micro_batch_size))
    assert (split.micro_batch_size, split.grad_accum) == (1, 4) and res.stepped
    w = _weights(runner)
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], atol=1e-6, rtol=1e-5, msg=k)


def test_oom_at_micro_batch_one_is_a_clear_error(tiny_model_dir, rows, monkeypatch):
    from fittune.errors import FittuneError

    items, pad = rows
    monkeypatch.setenv("FITTUNE_TEST_OOM_ABOVE", "0")
    runner = _runner(tiny_model_dir)
    install_oom_injection(runner.accelerator.unwrap_model(runner.model), rank=0)
    adaptive = OomAdaptive(runner, BatchSplit(2, 1), 2, lambda m: None)
    with pytest.raises(FittuneError, match="even with micro-batch 1"):
        adaptive.run(4, lambda s: _plan(items[:2], pad, s.micro_batch_size))


def test_oom_adaptive_is_refused_where_the_forward_gathers_weights():
    from fittune.config import build_config
    from fittune.precision import Precision
    from fittune.supported import refusal

    cfg = build_config(None, {"train.oom_adaptive": True})
    for name in ("zero3", "zero3_offload", "fsdp2"):
        assert "does not work under " + name in refusal(cfg, Strategy.named(name, 2), Precision("no")).why
    for name in ("single", "ddp", "zero2", "zero2_offload"):
        assert refusal(cfg, Strategy.named(name, 2), Precision("no")) is None


def test_strategy_names_round_trip():
    from fittune.strategy import NAMES

    for name in NAMES:
        s = Strategy.named(name, 1 if name in ("single", "device_map") else 2)
        assert s.name == name
    assert Strategy.named("zero3_offload").offload_params and Strategy.named("zero2_offload").offload_optimizer
    assert not Strategy.named("zero2_offload").offload_params
    assert Strategy.named("fsdp2", 4).gathers_weights and not Strategy.named("zero2", 4).gathers_weights
    assert Strategy.named("ddp", 2).ddp and not Strategy.named("zero2", 2).ddp
