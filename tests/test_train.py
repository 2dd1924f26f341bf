"""End to end through `accelerate launch train.py`: learning, reloadable outputs, accumulation and
process-count equivalence, bad input."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_SHAPE, independent_nll, launch, read_log, run_python
from safetensors.torch import load_file


@pytest.mark.parametrize("method", ["lora", "full"])
def test_end_to_end_learns_and_final_reloads_without_fittune(tmp_path, method, capsys):
    run = tmp_path / "run"
    shape = [f"--model.tiny.{k}={v}" for k, v in TINY_SHAPE.items()]
    args = ["--output_dir", run, "--log_with", "none", "--seed", "1", "--data.max_length", "128",
            "--train.max_steps", "60", "--train.micro_batch_size", "8", "--train.log_every", "1",
            "--train.lr", "1e-2" if method == "lora" else "2e-3", "--eval.before_training", "false", *shape]
    if method == "lora":  # with non-reentrant gradient checkpointing (and the input-grad hook LoRA needs)
        args += ["--lora.enabled", "true", "--lora.r", "16", "--lora.dropout", "0.0",
                 "--train.gradient_checkpointing", "true"]
    proc = launch("train.py", args)  # the built-in demo recipe, made smaller
    assert "held-out metrics" in proc.stdout

    losses = [r["loss"] for r in read_log(run)]
    assert len(losses) == 60
    # it learns: a random tiny model starts near log(vocab); LoRA on it moves slower than full fine-tuning
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.25, losses
    for f in ["config.yaml", "heldout_ids.json", "loss_curve.png", "eval/metrics.json", "eval/evaluation.json",
              "eval/predictions.jsonl",
              "eval/report.md", "eval/confusion_matrix.png", "final/tokenizer_config.json"]:
        assert (run / f).is_file(), f
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run"]["world_size"] == 1 and saved["train"]["max_steps"] == 60
    about = json.loads((run / "eval/evaluation.json").read_text())
    assert "step 60 of this run" in about["model"] and about["processes"] == 1
    assert about["eval"] == {k: v for k, v in saved["eval"].items() if k != "before_training"}
    assert f"- model: {about['model']}" in (run / "eval/report.md").read_text()  # the report says what it scored
    umask = os.umask(0)
    os.umask(umask)
    assert {f.stat().st_mode & 0o777 for f in (run / "final").iterdir()} == {0o666 & ~umask}  # weights too

    # final/ loads with plain transformers / peft and reproduces the in-memory model's per-example NLL
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    if method == "lora":
        from peft import AutoPeftModelForCausalLM

        assert (run / "final/adapter_model.safetensors").is_file()
        # the recipe's adapter reached the model: r, alpha, dropout as given, an r x (in + out) pair on every
        # linear layer but the output head, counted here on the base model (PEFT's "all-linear")
        adapter = json.loads((run / "final/adapter_config.json").read_text())
        assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (16, 32, 0.0)
        base = AutoModelForCausalLM.from_pretrained(saved["run"]["model_path"])
        linear = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
        assert len(linear) == 7 * TINY_SHAPE["num_layers"]  # q k v o, gate up down
        expected_count = sum(16 * (m.in_features + m.out_features) for m in linear.values())
        assert f"{expected_count:,} trainable" in proc.stdout
        assert sum(t.numel() for t in load_file(run / "final/adapter_model.safetensors").values()) == expected_count
        model = AutoPeftModelForCausalLM.from_pretrained(run / "final")
    else:
        assert (run / "final/model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(run / "final")
    model.eval()
    expected = independent_nll(model, tokenizer, run)
    preds = {json.loads(line)["id"]: json.loads(line) for line in (run / "eval/predictions.jsonl").read_text().splitlines()}
    assert set(preds) == set(expected)
    for ex_id, nll in expected.items():
        assert preds[ex_id]["nll"] == pytest.approx(nll, rel=1e-4, abs=1e-4)
    if method == "lora":  # the adapter is scored on the built-in base it was trained on, whatever --seed says
        from test_evaluate_safety import evaluate

        code, _, err = evaluate(["--checkpoint", run, "--seed", "7", "--output_dir", tmp_path / "ev7"], capsys)
        assert code == 0, err[-2000:]  # seed 7 is not the run's split: every row scored (was: on a base of seed 7)
        again = {p["id"]: p["nll"] for p in map(json.loads, (tmp_path / "ev7/predictions.jsonl").read_text().splitlines())}
        assert [again[i] for i in expected] == pytest.approx([preds[i]["nll"] for i in expected], rel=1e-4, abs=1e-4)
        for recipe in ([], ["--config", run / "config.yaml"]):  # its own recipe, or given again
            code, _, err = evaluate(["--checkpoint", run, *recipe, "--model.tiny.num_layers", "3", "--output_dir",
                                     tmp_path / "ev3"], capsys)
            assert code == 2 and "--model.tiny.num_layers: the run's base model is the built-in" in err


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory, tiny_model_dir):
    """The same global batch of 4 split as 4x1, 2x2, 1x4 (1 process) and 2x1, 1x2 (2 processes)."""
    root = tmp_path_factory.mktemp("splits")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "seed": 0, "log_with": "none", "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": "builtin:ai-research-qa", "choices_column": "choices", "max_length": 96},
        "train": {"max_steps": 5, "lr": 1e-3, "warmup_ratio": 0.0, "max_grad_norm": 1.0},
        "eval": {"batch_size": 8}}))
    runs = {}
    for name, micro, accum, nproc in [("4x1", 4, 1, 1), ("2x2", 2, 2, 1), ("1x4", 1, 4, 1), ("2proc-2x1", 2, 1, 2),
                                      ("2proc-1x2", 1, 2, 2)]:
        out = root / name
        launch("train.py", ["--config", recipe, "--output_dir", out, "--train.micro_batch_size", micro,
                            "--train.grad_accum", accum], nproc=nproc)
        runs[name] = out
    return runs


def _compare(runs, a, b, tol=1e-5):
    la, lb = [r["loss"] for r in read_log(runs[a])], [r["loss"] for r in read_log(runs[b])]
    assert len(la) == len(lb) == 5
    assert la == pytest.approx(lb, abs=tol, rel=tol), (a, b)
    wa, wb = load_file(runs[a] / "final/model.safetensors"), load_file(runs[b] / "final/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("self_attn.k_proj.bias"):
            # the key bias has a mathematically zero gradient (softmax is shift-invariant per query: q.b_k is
            # the same for every key), so Adam turns its rounding noise into lr-sized steps whose sign depends
            # on the summation order; every parameter with a real gradient is compared below
            continue
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=tol, msg=f"{a} vs {b}: {k}")
    # the weights really moved, so equality is not trivial
    start = load_file(Path(yaml.safe_load((runs[a] / "config.yaml").read_text())["run"]["model_path"]) / "model.safetensors")
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 1e-3


@pytest.mark.parametrize("other", ["2x2", "1x4"])
def test_gradient_accumulation_equivalence(split_runs, other):
    """micro-batch x accumulation 4x1 = 2x2 = 1x4 in fp32: same losses and weights (1e-5) after 5 steps,
    on batches whose answers have different lengths (the loss is normalised by the global token count)."""
    _compare(split_runs, "4x1", other)


@pytest.mark.parametrize("other", ["2proc-2x1", "2proc-1x2"])
def test_two_processes_match_one(split_runs, other):
    _compare(split_runs, "4x1", other)


def test_ranks_are_real_and_see_their_own_shard(split_runs):
    ranks = json.loads((split_runs["2proc-2x1"] / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    a, b = (set(r["first_step_ids"]) for r in ranks)
    assert len(a) == len(b) == 2 and not a & b  # each rank trains on its own half of the global batch
    single = json.loads((split_runs["4x1"] / "ranks.json").read_text())
    assert a | b == set(single[0]["first_step_ids"])  # together: the global batch of the 1-process run
    assert yaml.safe_load((split_runs["2proc-2x1"] / "config.yaml").read_text())["run"]["world_size"] == 2


@pytest.mark.parametrize("case", ["missing_file", "empty", "missing_column", "malformed_line", "unknown_model",
                                  "unknown_key", "conflict"])
def test_bad_input_one_clear_error(tmp_path, case):
    run = tmp_path / "run"
    data = tmp_path / "d.jsonl"
    good = '{"question": "q", "answer": "a"}\n' * 10
    args = ["--output_dir", run, "--data.choices_column", "null", "--data.label_column", "null", "--data.path", data]
    expect = {"missing_file": "data file not found", "empty": "holds no rows",
              "missing_column": "column 'answer' (data.answer_column) not found; the columns are: question, reply",
              "malformed_line": "d.jsonl:4: malformed JSON", "unknown_model": "model not found",
              "unknown_key": "did you mean 'train.lr'", "conflict": "lora.r must be >= 1"}[case]
    if case == "empty":
        data.write_text("")
    elif case == "missing_column":
        data.write_text('{"question": "q", "reply": "a"}\n')
    elif case == "malformed_line":
        data.write_text(good[:99] + '{"question": "q", "answer": \n' + good)
    elif case != "missing_file":
        data.write_text(good)
    if case == "unknown_model":
        args += ["--model.name_or_path", str(tmp_path / "no-such-model")]
    if case == "unknown_key":
        args += ["--train.learning_rate", "1e-4"]
    if case == "conflict":
        args += ["--lora.enabled", "true", "--lora.r", "0"]
    proc = run_python("train.py", args)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fittune: error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (run / "final").exists()


def test_demo_beats_untrained_and_majority(tmp_path):
    """The offline demo (no recipe): fine-tuning beats the untrained model and the majority class."""
    run = tmp_path / "demo"
    proc = launch("train.py", ["--output_dir", run], launcher=True)  # `make demo`'s command
    assert "held-out metrics" in proc.stdout and "fine-tuned" in proc.stdout
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))  # TensorBoard on by default
    assert any("val_loss" in r for r in read_log(run))  # periodic validation loss
    tuned = json.loads((run / "eval/metrics.json").read_text())
    untrained = json.loads((run / "eval_untrained/metrics.json").read_text())
    assert tuned["num_examples"] == 40
    for metric in ("accuracy", "f1_weighted"):
        assert tuned[metric] > untrained[metric] + 0.2
    from collections import Counter

    preds = [json.loads(x) for x in (run / "eval/predictions.jsonl").read_text().splitlines()]
    majority = Counter(p["gold"] for p in preds).most_common(1)[0][1] / len(preds)  # best any constant guess gets
    assert tuned["accuracy"] > majority + 0.2


def test_bf16_lora_keeps_adapters_fp32(tmp_path, tiny_config):
    """bf16 mixed precision (CPU autocast): frozen base loaded in bf16, LoRA weights trained and saved in fp32.
    (Also: train.cpu_threads reaches the process, which the launcher started with OMP_NUM_THREADS=1; rows whose
    prompt was cut to data.max_length are counted on screen, not only in config.yaml.)"""
    run = tmp_path / "run"
    recipe = tiny_config(lora={"enabled": True, "r": 4, "dropout": 0.0}, data={"max_length": 40},
                         train={"mixed_precision": "bf16", "max_steps": 4, "gradient_checkpointing": True,
                                "cpu_threads": 2})
    proc = launch("train.py", ["--config", recipe, "--output_dir", run])
    assert "CPU threads per process: 2 (train.cpu_threads)" in proc.stdout
    assert json.loads((run / "ranks.json").read_text())[0]["cpu_threads"] == 2
    facts = yaml.safe_load((run / "config.yaml").read_text())["run"]
    truncated = facts["truncated_rows"]
    assert facts["heldout_dropped_rows"] == 0
    assert truncated > 1 and f"{truncated} rows had the start of their prompt cut" in proc.stdout
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run"]["mixed_precision"] == "bf16"
    adapter = load_file(run / "final/adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert all(r["loss"] == r["loss"] for r in read_log(run))  # finite


def test_compiled_layers_train_like_eager(tiny_config, tmp_path):
    """train.compile (torch.compile of each decoder layer, here with LoRA and gradient checkpointing) gives
    the eager run's losses: compilation fuses kernels, it must not change the numbers beyond fp32 rounding.
    (LoRA dropout 0: compiled code draws its dropout masks from another random stream.) The layers compile
    with dynamic shapes: 6 steps of batches padded to different lengths, and the held-out scoring, build 4
    graphs (with and without padding, evaluation, the checkpointed recompute), where one graph per length
    built 6 and grew with every new length."""
    base = {"max_steps": 6, "gradient_checkpointing": True}
    eager = tiny_config("eager.yaml", output_dir=str(tmp_path / "eager"), train=base,
                        lora={"enabled": True, "dropout": 0.0})
    launch("train.py", ["--config", eager])
    comp = tiny_config("comp.yaml", output_dir=str(tmp_path / "comp"), train={**base, "compile": True},
                       lora={"enabled": True, "dropout": 0.0})
    # inductor's compile workers are processes of their own, each importing torch: on CI's 2 busy cores they
    # only add CPU time (~15 s here); the kernels and numbers are the same
    proc = launch("train.py", ["--config", comp], extra_env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})
    assert "torch.compile: 2 decoder layers" in proc.stdout
    graphs = int(re.search(r"torch.compile: (\d+) graphs built", proc.stdout)[1])
    assert graphs <= 4, proc.stdout
    a, b = [r["loss"] for r in read_log(tmp_path / "eager")], [r["loss"] for r in read_log(tmp_path / "comp")]
    assert len(a) == 6 and a == pytest.approx(b, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("micro, accum, steps", [(4, 3, 5), (2, 2, 6)], ids=["whole-file", "two-epochs"])
def test_full_finetuning_matches_an_independent_adamw_loop(tmp_path, tiny_model_dir, micro, accum, steps):
    """The whole update path (token-normalised loss over micro-batches, clipping, AdamW's betas and weight decay,
    warmup then cosine schedule) against a plain transformers + torch.optim.AdamW loop written here on the same
    rows: a global batch of the whole training file (4 x 3 = 12 rows: the order plays no part), or of 4 rows over
    two epochs, each epoch in its own order (a permutation of the file seeded by seed x 1000003 + epoch, the order
    fittune documents in fittune.batches.plan_global_batches, drawn here)."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(x) for x in (Path(__file__).parents[1] / "fittune/demo/ai_research_qa.jsonl")
            .read_text().splitlines()[:16]]
    for name, part in (("train.jsonl", rows[:12]), ("test.jsonl", rows[12:])):
        (tmp_path / name).write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                             for r in part))
    lr, betas, wd, clip, warmup, seed = 3e-3, (0.8, 0.95), 0.1, 0.5, 1, 3
    launch("train.py", ["--output_dir", tmp_path / "run", "--log_with", "none", "--model.name_or_path", tiny_model_dir,
                        "--data.path", tmp_path / "train.jsonl", "--data.test_path", tmp_path / "test.jsonl",
                        "--data.max_length", "256", "--data.system_prompt", "Answer briefly.",
                        "--seed", str(seed), "--data.group_by_length", "false",
                        "--train.micro_batch_size", str(micro), "--train.grad_accum", str(accum),
                        "--train.max_steps", str(steps), "--train.lr", str(lr), "--train.betas", json.dumps(betas),
                        "--train.weight_decay", str(wd), "--train.max_grad_norm", str(clip),
                        "--train.lr_scheduler", "cosine", "--train.warmup_ratio", str(warmup / steps),
                        "--train.log_every", "1", "--train.eval_every", str(steps), "--eval.max_new_tokens", "0"])
    log = read_log(tmp_path / "run")

    def schedule(step: int) -> float:  # transformers' cosine with linear warmup, written out
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    def batch(part: list[dict]) -> dict:  # the chat prompt, then the answer and <|im_end|> as the only targets
        seqs = []
        for r in part:
            chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": r["question"]}]
            prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(r["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            seqs.append((p + a, [-100] * len(p) + a))
        width = max(len(s) for s, _ in seqs)
        return {"input_ids": torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s, _ in seqs]),
                "labels": torch.tensor([la + [-100] * (width - len(la)) for _, la in seqs]),
                "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs])}

    size, heldout = micro * accum, batch(rows[12:])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
    losses, norms = [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step)
        epoch, k = divmod(step, 12 // size)
        order = torch.randperm(12, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
        loss = model(**batch([rows[j] for j in order[k * size:(k + 1) * size]])).loss  # the rows' answer tokens' mean
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert [r["loss"] for r in log] == pytest.approx(losses, rel=1e-4)
    assert [r["grad_norm"] for r in log] == pytest.approx(norms, rel=1e-3)
    assert min(norms) > clip  # every step was clipped
    assert [r["lr"] for r in log] == pytest.approx([lr * schedule(s + 1) for s in range(steps)], abs=1e-12)
    with torch.no_grad():  # the periodic validation loss: the held-out rows' token-mean NLL after the last step
        assert log[-1]["val_loss"] == pytest.approx(model(**heldout).loss.item(), rel=1e-4)
    trained = load_file(tmp_path / "run/final/model.safetensors")
    assert set(model.state_dict()) - {"lm_head.weight"} <= set(trained)  # the tied head is saved once
    for name in trained:
        torch.testing.assert_close(trained[name], model.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
