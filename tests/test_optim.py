"""train.optimizer / train.optimizer_in_backward (fittune/optim.py), in-process on tiny models: the in-backward
step equals the ordinary one, refusals, non-finite steps, stochastic rounding, state bytes against the
planner, and the low-bit state's save/load round trip. torchao's optimizers run eagerly here
(`torch.compiler.set_stance("force_eager")`: the same PyTorch ops without the ~20 s compilation per
parameter shape on this CPU); test_compiled_lowbit_step_equals_eager checks the compiled step once."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fittune import estimate as E
from fittune.batches import collate_train, tokenize_examples
from fittune.config import DataConfig, build_config
from fittune.distributed import Launched
from fittune.errors import FittuneError
from fittune.model import load_tokenizer
from fittune.model_shapes import shape_from_hf_config
from fittune.optim import (
    InBackwardOptimizer,
    build_optimizer,
    choose,
    live_state_bytes,
    state_bytes,
    unsupported,
)
from fittune.precision import Precision
from fittune.splits import load_splits
from fittune.step import StepPlan, StepRunner
from fittune.strategy import Strategy

pytest.importorskip("torchao")


@pytest.fixture(autouse=True)
def eager():
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    """Four global batches of two training rows each, and the pad id."""
    cfg = DataConfig(path="builtin:ai-research-qa", max_length=96)
    train, _ = load_splits(cfg, 0)
    tok = load_tokenizer(str(tiny_model_dir))
    items, _ = tokenize_examples(train[:8], tok, cfg)
    return [items[k:k + 2] for k in range(0, 8, 2)], tok.pad_token_id


def _cfg(**train):
    return build_config(None, {f"train.{k}": v for k, v in train.items()})


def _runner(model_dir, cfg, dtype=torch.float32, cpu=True, recompute=False):
    """A StepRunner over the tiny model with the optimizer fittune builds for `cfg`; `recompute`: gradient
    checkpointing and the chunked loss (32-token chunks), both recomputed inside backward."""
    from transformers import get_scheduler

    from fittune.loss import install_chunked_loss
    from fittune.model import enable_gradient_checkpointing

    accel = Accelerator(cpu=cpu)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    head = None
    if recompute:
        enable_gradient_checkpointing(model, lora=False)
        head = model.get_output_embeddings() if install_chunked_loss(model, 32) else None
    params = [p for p in model.parameters() if p.requires_grad]
    setup = build_optimizer(cfg, params, Strategy(), Precision("no"), fused=not cpu, gpu=not cpu)
    sched = get_scheduler("linear", setup.optimizer, num_training_steps=8, num_warmup_steps=1)
    model, opt = accel.prepare(model, setup.optimizer)
    model.train()
    return StepRunner(Launched(accel, Precision("no"), Strategy()), model, opt, sched, params, head,
                      cfg.train.max_grad_norm, setup.in_backward)


def _step(runner, rows, pad):
    n_targets = sum(x.n_targets for x in rows)
    dev = runner.accelerator.device
    return runner.run(StepPlan([list(range(len(rows)))], lambda r: {
        k: v.to(dev) for k, v in collate_train([rows[j] for j in r], pad).items()}, n_targets))


def _weights(runner):
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()}


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "checkpointing+chunked-loss"])
def test_in_backward_equals_the_ordinary_step_fp32_adamw(tiny_model_dir, batches, recompute):
    """Several steps, fp32 weights, torch AdamW: the same losses, gradient norms and weights (1e-6), with and
    without what recomputes inside backward (a parameter is stepped only after its last use there)."""
    groups, pad = batches
    base = dict(lr=1e-2, max_grad_norm=0.0, weight_decay=0.1)
    ordinary = _runner(tiny_model_dir, _cfg(**base), recompute=recompute)
    in_bwd = _runner(tiny_model_dir, _cfg(**base, optimizer_in_backward=True), recompute=recompute)
    assert isinstance(in_bwd.in_backward, InBackwardOptimizer) and ordinary.in_backward is None
    before = _weights(ordinary)
    for rows in groups:  # 4 steps, a linear schedule with warmup: the lr changes every step
        a, b = _step(ordinary, rows, pad), _step(in_bwd, rows, pad)
        assert a.stepped and b.stepped
        assert b.nll == pytest.approx(a.nll, rel=1e-6)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)  # measured in the hooks, before each update
        assert all(p.grad is None for p in in_bwd.params)  # every gradient freed in backward
    wa, wb = _weights(ordinary), _weights(in_bwd)
    assert max((wa[k] - before[k]).abs().max().item() for k in wa) > 1e-2  # the weights really moved
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-6, msg=k)
    assert in_bwd.scheduler.last_epoch == ordinary.scheduler.last_epoch == 4


def test_in_backward_skips_a_step_whose_first_gradient_is_not_finite(tiny_model_dir, batches):
    groups, pad = batches
    runner = _runner(tiny_model_dir, _cfg(lr=1e-2, max_grad_norm=0.0, optimizer_in_backward=True))
    with torch.no_grad():
        runner.model.model.norm.weight[0] = float("inf")  # every logit, so every gradient, non-finite
    before = _weights(runner)
    res = _step(runner, groups[0], pad)
    assert not res.stepped and runner.scheduler.last_epoch == 0  # counted non-finite, the schedule waits
    after = _weights(runner)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was updated
    assert all(p.grad is None for p in runner.params)


@pytest.mark.parametrize("overrides, needle", [
    ({"grad_accum": 2}, "set train.grad_accum 1"),
    ({"max_grad_norm": 1.0}, "set train.max_grad_norm 0"),
    ({"oom_adaptive": True}, "turn train.oom_adaptive off"),
])
def test_in_backward_refuses_what_it_cannot_do(overrides, needle):
    cfg = {"max_grad_norm": 0.0, **overrides, "optimizer_in_backward": True}
    with pytest.raises(FittuneError, match=needle):
        _cfg(**cfg)


@pytest.mark.parametrize("mixed_precision", ["fp16", "auto", "best"])
def test_in_backward_refuses_fp16_loss_scaling_however_it_was_asked_for(mixed_precision, monkeypatch):
    """By the precision the launch resolves to (was: the config's string, so `auto` under an fp16 launcher or
    `best` on an fp16-only GPU got past the config's check)."""
    from fittune.precision import resolve_precision
    from fittune.supported import check_supported

    cfg = _cfg(max_grad_norm=0.0, optimizer_in_backward=True, mixed_precision=mixed_precision)
    precision = resolve_precision(mixed_precision, "fp16", gpu=True, bf16_supported=False)
    assert precision.scales_loss
    with pytest.raises(FittuneError, match="cannot use fp16 loss scaling.*use bf16"):
        check_supported(cfg, Strategy(), precision)
    check_supported(cfg, Strategy(), Precision("bf16"))  # the same recipe on a bf16 launch runs


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3_offload", "fsdp2"])
def test_one_process_only_for_torchao_and_in_backward(name):
    strategy, one = Strategy.named(name, 2), Strategy()
    assert "in one process" in unsupported(choose("adamw", True, torch.float32, strategy), strategy, Precision("bf16"), False).why
    assert "one process" in unsupported(choose("adamw8bit", False, torch.float32, strategy), strategy, Precision("bf16"), False).why
    assert unsupported(choose("adamw", False, torch.float32, strategy), strategy, Precision("bf16"), False) is None  # as before
    bf16 = choose("adamw", False, torch.bfloat16, strategy)
    if strategy.sharded:  # the engine keeps fp32 master weights of a bf16 module: nothing to round
        assert not bf16.stochastic_rounding and unsupported(bf16, strategy, Precision("bf16"), False) is None
    else:  # DDP replicas would each draw their own rounding
        assert "one process" in unsupported(bf16, strategy, Precision("bf16"), False).why
    for single in (one, Strategy.named("device_map")):
        assert unsupported(choose("adamw8bit", True, torch.bfloat16, single), single, Precision("bf16"), False) is None
    assert "LoRA" in unsupported(choose("adamw8bit", False, torch.float32, one), one, Precision("bf16"), True).why
    assert "fp16 weights" in unsupported(choose("adamw8bit", False, torch.float16, one), one, Precision("fp16"), False).why
    assert "fp16 loss scaling" in unsupported(choose("adamw", True, torch.float32, one), one, Precision("fp16"), False).why
    # the setting named is the one its reason is about (the planner's `not with SETTING`), also where two are set
    lora_lowbit = unsupported(choose("adamw8bit", True, torch.float32, strategy), strategy, Precision("bf16"), True)
    assert lora_lowbit.setting == "train.optimizer adamw8bit" and "LoRA" in lora_lowbit.why
    assert unsupported(choose("adamw8bit", False, torch.float16, one), one, Precision("fp16"), False).setting == "model.dtype"


@pytest.mark.parametrize("name, library", [("single", "(torch)"), ("zero2", "(torch)"),
                                           ("zero2_offload", "(DeepSpeed CPU Adam, in CPU RAM)"),
                                           ("zero3_offload", "(DeepSpeed CPU Adam, in CPU RAM)")])
def test_the_run_log_names_the_optimizer_that_runs(name, library):
    """Under DeepSpeed's optimizer offload accelerate swaps torch's AdamW for DeepSpeedCPUAdam
    (accelerate.utils.map_pytorch_optim_to_deepspeed): the run log's optimizer line says so."""
    strategy = Strategy.named(name, 2)
    assert choose("adamw", False, torch.float32, strategy).describe() == f"AdamW {library}"


def test_bf16_weights_lose_small_updates_without_stochastic_rounding():
    """1.0 - 1e-3 is 1.0 in bf16 (its spacing below 1 is 2^-8 = 0.0039): plain bf16 AdamW never moves; with
    stochastic rounding each element moves by 1e-3 per step on average (Adam's step is lr x sign(gradient)
    for a constant gradient), so the mean after 50 steps is 1 - 0.05 within sampling noise."""
    n, steps, lr = 8192, 50, 1e-3
    plain = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    rounded = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    torch_opt = torch.optim.AdamW([plain], lr=lr, weight_decay=0.0)  # what bf16 weights got before
    setup = build_optimizer(_cfg(lr=lr, weight_decay=0.0), [rounded], Strategy(), Precision("bf16"), fused=False, gpu=False)
    assert setup.choice.stochastic_rounding and setup.choice.torchao
    torch.manual_seed(0)
    for _ in range(steps):
        for p, opt in ((plain, torch_opt), (rounded, setup.optimizer)):
            p.grad = torch.ones_like(p)
            opt.step()
    assert torch.equal(plain.detach(), torch.ones_like(plain))  # every update lost
    # each element's final value is a sum of 50 roundings of spacing 2^-8: sd per element <= 0.5 x 2^-8 x
    # sqrt(50), so the mean of 8192 is within 1e-4 x 4 of 0.95 (4 sigma)
    assert rounded.detach().float().mean().item() == pytest.approx(1 - steps * lr, abs=4e-4)


def _qwen(hidden=64, inter=256, layers=2, vocab=1024) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw4bit", "adamw"])
def test_live_state_bytes_equal_the_planner_term(optimizer):
    """bf16 weights: the moments torchao allocates (codes + scales + lookup tables, or plain bf16) against
    the planner's optimizer term for the same shape. The shape mixes quantized tensors (embedding, MLP)
    and ones too small to quantize (attention 64 x 64, biases, norms)."""
    config = _qwen()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    params = list(model.parameters())
    cfg = _cfg(optimizer=optimizer, max_grad_norm=0.0, optimizer_in_backward=True, lr=1e-3)
    setup = build_optimizer(cfg, params, Strategy(), Precision("bf16"), fused=False, gpu=False)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # the states exist after the first step
    live = live_state_bytes(setup.optimizer)
    full = build_config(None, {"model.dtype": "bfloat16", "train.optimizer": optimizer})
    shape = shape_from_hf_config(config, full, torch.bfloat16)
    work = E.Workload(2, 16, False, 0, Precision("bf16"), optimizer=optimizer, in_backward=True)
    planned = E.estimate(Strategy(), shape, work, 1).gpu["optimizer"]
    assert planned == pytest.approx(live, rel=0.01)
    assert live == state_bytes([p.numel() for p in params], optimizer, 2)  # and the formula is exact here


def test_lowbit_in_backward_state_round_trips_through_accelerate_save(tmp_path, tiny_model_dir, batches):
    """Two steps, save (accelerate.utils.save: torch.save of the state dict, as save_state does), two more;
    a fresh run loaded from the save (accelerate.utils.load: weights_only, as load_state does) and given the
    same RNG state repeats the last two steps exactly (stochastic rounding included)."""
    from accelerate.utils import load, save

    groups, pad = batches
    cfg = _cfg(optimizer="adamw8bit", optimizer_in_backward=True, max_grad_norm=0.0, lr=1e-2)
    first = _runner(tiny_model_dir, cfg, torch.bfloat16)
    for rows in groups[:2]:
        _step(first, rows, pad)
    state = first.optimizer.state_dict()
    assert any(type(v).__name__ == "OptimState8bit" for s in state["inner"] for st in s["state"].values()
               for v in st.values())  # the embedding's moments are quantized
    save(state, tmp_path / "optimizer.bin", safe_serialization=False)
    weights, rng = _weights(first), torch.get_rng_state()
    losses = [_step(first, rows, pad).nll for rows in groups[2:]]
    second = _runner(tiny_model_dir, cfg, torch.bfloat16)
    second.model.load_state_dict(weights)
    second.optimizer.load_state_dict(load(tmp_path / "optimizer.bin"))
    for _ in range(2):
        second.scheduler.step()
    torch.set_rng_state(rng)
    assert [_step(second, rows, pad).nll for rows in groups[2:]] == losses
    for k, v in _weights(second).items():
        assert torch.equal(v, _weights(first)[k]), k


def test_compiled_lowbit_step_equals_eager():
    """torchao compiles its step (what runs on a GPU); the eager path the other tests use computes the same."""
    torch.manual_seed(0)
    grads = [torch.randn(4096) for _ in range(3)]
    out = []
    for stance in ("force_eager", "default"):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 4096))
        setup = build_optimizer(_cfg(optimizer="adamw8bit", lr=1e-2), [p], Strategy(), Precision("no"), fused=False, gpu=False)
        with torch.compiler.set_stance(stance):
            for g in grads:
                p.grad = g.clone()
                setup.optimizer.step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[1], out[0], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The real entry point: bf16 weights + 8-bit states in backward on the demo data, against the fp32-master run

STEPS = 24


def _launch_args(root, model_dir, lowbit: bool, run: str) -> list:
    from conftest import write_config

    train = {"micro_batch_size": 4, "grad_accum": 1, "max_steps": STEPS, "lr": 5e-3, "log_every": 1,
             "max_grad_norm": 0.0, "save_steps": 4 if lowbit else 0, "keep_checkpoints": 2}
    model = {"name_or_path": str(model_dir), "dtype": "bfloat16" if lowbit else "float32"}
    if lowbit:
        train.update(optimizer="adamw8bit", optimizer_in_backward=True)
    cfg = write_config(root / f"{run}.yaml", {
        "seed": 0, "log_with": "none", "model": model, "train": train, "eval": {"batch_size": 8},
        "data": {"path": "builtin:ai-research-qa", "max_length": 96, "choices_column": "choices",
                 "label_column": "topic"}})
    return ["--config", cfg, "--output_dir", root / run]




@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, tiny_model_dir):
    """The fp32-master run (torch AdamW, ordinary step) and the bf16 + adamw8bit + in-backward run, with
    checkpoints every 4 steps, both uninterrupted."""
    from conftest import launch

    root = tmp_path_factory.mktemp("lowbit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHDYNAMO_DISABLE", "1")  # children run torchao's step eagerly (module docstring)
        for run, lowbit in (("fp32", False), ("lowbit", True)):
            proc = launch("train.py", _launch_args(root, tiny_model_dir, lowbit, run))
            assert ("8-bit states (torchao), bf16 weights with stochastic rounding, stepped in backward"
                    in proc.stdout) == lowbit
    return root


def _metrics(run) -> dict:
    import json

    return json.loads((run / "eval" / "metrics.json").read_text())


def test_bf16_lowbit_in_backward_tracks_the_fp32_master_run(demo_runs):
    """Tolerance: every logged loss within 2% of the fp32-master run's, the held-out loss within 2%, the
    held-out accuracy within 0.1 (4 of 40 questions). bf16 keeps 8 significant bits (a weight's rounding is
    0.2% of it, unbiased with stochastic rounding) and the 8-bit moments are within ~1% of their block's
    largest value, so each update differs by a small fraction of lr; measured: 0.04% at most per step here
    (0.4% with the demo's 4x wider model, 30 steps; 1.9% with adamw4bit). 2% leaves room for other CPUs' kernels while a lost update
    (bf16 without stochastic rounding) or a broken state would show as tens of percent."""
    from conftest import read_log

    ref, low = read_log(demo_runs / "fp32"), read_log(demo_runs / "lowbit")
    assert [r["step"] for r in low] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.5  # the reference really learns
    for a, b in zip(low, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.02), a["step"]
    m_low, m_ref = _metrics(demo_runs / "lowbit"), _metrics(demo_runs / "fp32")
    assert m_low["loss"] == pytest.approx(m_ref["loss"], rel=0.02)
    assert abs(m_low["accuracy"] - m_ref["accuracy"]) <= 0.1


def test_sigkill_then_resume_auto_with_adamw8bit_in_backward(demo_runs, tiny_model_dir, monkeypatch):
    import random
    import subprocess

    from conftest import ROOT, child_env, read_log
    from test_checkpoints import kill_when_logged, launch_cmd

    root = demo_runs
    args = _launch_args(root, tiny_model_dir, True, "killed")
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # as demo_runs (child_env copies os.environ)
    at = random.Random("adamw8bit-in-backward").randint(6, 15)
    kill_when_logged(launch_cmd(1, None, args), root / "killed" / "train_log.jsonl", at)
    done = [int(p.name.split("-")[1]) for p in (root / "killed/checkpoints").glob("step-*") if ".tmp" not in p.name]
    assert done and max(done) < STEPS  # it died mid-run, after at least one checkpoint
    proc = subprocess.run(launch_cmd(1, None, args + ["--resume", "auto"]), cwd=ROOT, env=child_env(1), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(exact restore)" in proc.stdout
    ref, run = read_log(root / "lowbit"), read_log(root / "killed")
    assert [r["step"] for r in run] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in run] == [r["loss"] for r in ref]  # bit for bit: states, RNG and rounding restored
    from safetensors.torch import load_file

    a, b = (load_file(str(root / r / "final/model.safetensors")) for r in ("lowbit", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_on_gpu_in_backward_equals_the_ordinary_step_compiled(tiny_model_dir, batches, optimizer):
    """On CUDA with torchao's compiled step (fp32 weights: no random rounding, so the order the parameters
    are stepped in does not matter): in-backward and ordinary steps give the same weights."""
    groups, pad = batches
    base = dict(lr=1e-2, max_grad_norm=0.0, optimizer=optimizer)
    with torch.compiler.set_stance("default"):
        ordinary = _runner(tiny_model_dir, _cfg(**base), cpu=False)
        in_bwd = _runner(tiny_model_dir, _cfg(**base, optimizer_in_backward=True), cpu=False)
        for rows in groups:
            a, b = _step(ordinary, rows, pad), _step(in_bwd, rows, pad)
            assert a.stepped and b.stepped and b.nll == pytest.approx(a.nll, rel=1e-5)
    wa, wb = _weights(ordinary), _weights(in_bwd)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-5, msg=k)


def test_in_backward_state_view_serves_lora_portable_moments():
    """fittune.checkpoints reads and writes `optimizer.state[p]` (LoRA's portable moments): with one optimizer
    per parameter the facade's state is each parameter's own (read after a step, written on resume)."""
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    setup = build_optimizer(_cfg(max_grad_norm=0.0, optimizer_in_backward=True), [p, q], Strategy(), Precision("no"), False, False)
    opt = setup.optimizer
    (p.sum() * 2).backward()  # only p gets a gradient: only p is stepped
    assert set(opt.state) == {p} and opt.state[p]["exp_avg"].shape == (3,) and opt.state.get(q, {}) == {}
    opt.state[q] = {"step": torch.tensor(1.0), "exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)}
    assert opt.by_param[q].state[q]["exp_avg"].sum() == 2  # written into q's own optimizer
    done = opt.finish_step()
    assert done.stepped and done.grad_norm == pytest.approx(2 * 3**0.5)


def test_missing_torchao_is_one_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # as if not installed
    with pytest.raises(FittuneError, match=r"pip install 'fittune\[lowbit\]'"):
        build_optimizer(_cfg(optimizer="adamw8bit"), [torch.nn.Parameter(torch.ones(2))], Strategy(), Precision("no"), False,
                        False)
