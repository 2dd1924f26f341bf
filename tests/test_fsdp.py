"""FSDP2 (accelerate's `fully_shard` path) on two real CPU ranks (gloo, fp32): parameters really sharded, the
same losses and predictions as DDP, verified exports that reload in one process, and clear config errors.
Save/resume under FSDP2 is in test_checkpoints.py (the SIGKILL-and-resume cases)."""

import json

import pytest
import yaml
from conftest import STRATEGY_STEPS, independent_nll, launch, read_log

STEPS = STRATEGY_STEPS


@pytest.fixture(scope="module")
def recipe(shared_strategy_recipe):
    return shared_strategy_recipe


@pytest.fixture(scope="module")
def runs(strategy_run):
    """{DDP, FSDP2} x {LoRA, full}: the same command, only --config_file differs."""
    return {(s, m): strategy_run(s, m) for m in ("lora", "full") for s in ("ddp", "fsdp2")}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp2_matches_ddp(runs, method):
    """Same losses and held-out predictions as DDP. Tolerance 1e-5: both fp32, same global batch and
    token-normalised loss; FSDP2 only reorders the gradient sums (reduce-scatter of flat shards)."""
    ref, got = runs[("ddp", method)], runs[("fsdp2", method)]
    cfg = yaml.safe_load((got / "config.yaml").read_text())
    assert cfg["run"]["strategy"] == "fsdp2" and cfg["run"]["world_size"] == 2
    la, lb = [r["loss"] for r in read_log(ref)], [r["loss"] for r in read_log(got)]
    assert len(lb) == STEPS and la == pytest.approx(lb, abs=1e-5, rel=1e-5)
    ga, gb = [r["grad_norm"] for r in read_log(ref)], [r["grad_norm"] for r in read_log(got)]
    assert ga == pytest.approx(gb, rel=1e-4)  # clipping sees the live (sharded) gradients
    pa = [json.loads(x) for x in (ref / "eval/predictions.jsonl").read_text().splitlines()]
    pb = [json.loads(x) for x in (got / "eval/predictions.jsonl").read_text().splitlines()]
    assert [p["pred"] for p in pa] == [p["pred"] for p in pb]
    assert [p["nll"] for p in pa] == pytest.approx([p["nll"] for p in pb], abs=1e-3, rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp2_parameters_are_sharded(runs, method):
    """Each rank holds half of every weight (dim 0), DDP the whole; the ranks train on disjoint rows."""
    ranks = json.loads((runs[("fsdp2", method)] / "ranks.json").read_text())
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        shapes = r["parameter_shapes"]
        local, full = shapes["model.embed_tokens.weight" if method == "full" else
                             "base_model.model.model.embed_tokens.weight"]
        assert local == [full[0] // 2, full[1]]
        for name, (local, full) in shapes.items():
            assert local[0] == -(-full[0] // 2) or (r["rank"] == 1 and local[0] == full[0] // 2), name
            assert local[1:] == full[1:], name
        assert r["local_parameter_elements"] <= r["parameter_elements"] // 2 + 1000
    ddp = json.loads((runs[("ddp", method)] / "ranks.json").read_text())
    assert all(r["local_parameter_elements"] == r["parameter_elements"] for r in ddp)
    a, b = (set(r["first_step_ids"]) for r in ranks)
    assert len(a) == len(b) == 4 and not a & b


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp2_export_reloads_in_one_process(runs, method):
    """final/ holds the gathered adapter / full model (tied lm_head included), loadable with plain
    transformers / peft in one process, reproducing the trained model's per-example NLL."""
    run = runs[("fsdp2", method)]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "final")
    if method == "lora":
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(run / "final")
    else:
        model = AutoModelForCausalLM.from_pretrained(run / "final")
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
        from safetensors import safe_open

        with safe_open(run / "final" / "model.safetensors", "pt") as f:  # was: the head saved too (FSDP2 gathers
            assert "lm_head.weight" not in f.keys()                       # the tied parameter as two tensors)
    model.eval()
    expected = independent_nll(model, tok, run)
    preds = {json.loads(x)["id"]: json.loads(x) for x in (run / "eval/predictions.jsonl").read_text().splitlines()}
    for ex_id, nll in expected.items():
        assert preds[ex_id]["nll"] == pytest.approx(nll, rel=1e-4, abs=1e-4)


def test_evaluate_under_fsdp2(runs, tmp_path):
    """evaluate.py launched with the FSDP2 config on 2 ranks: same predictions as training's own evaluation."""
    run = runs[("fsdp2", "full")]
    out = tmp_path / "eval"
    launch("evaluate.py", ["--checkpoint", run, "--output_dir", out], nproc=2, config_file="accelerate_configs/fsdp2.yaml")
    pa = [json.loads(x) for x in (run / "eval/predictions.jsonl").read_text().splitlines()]
    pb = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in pa] == [p["id"] for p in pb] and [p["pred"] for p in pa] == [p["pred"] for p in pb]
    assert [p["nll"] for p in pa] == pytest.approx([p["nll"] for p in pb], abs=1e-4, rel=1e-5)


def test_fsdp2_offload_without_gpu_is_a_clear_error(recipe, tmp_path):
    proc = launch("train.py", ["--config", recipe, "--output_dir", tmp_path / "run", "--train.max_steps", 1],
                  nproc=2, config_file="accelerate_configs/fsdp2_offload.yaml", check=False)
    assert proc.returncode != 0
    assert "fittune: error: fsdp_offload_params" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "final").exists()
