"""DeepSpeed ZeRO-2 / ZeRO-3 (with and without CPU offload) on two real CPU ranks (gloo, fp32): the same
losses as DDP, real ranks, verified exports that reload without DeepSpeed, and clear config errors."""

import json

import pytest
import yaml
from conftest import ROOT, STRATEGY_STEPS, independent_nll, launch, read_log

ZERO = ["zero2", "zero2_offload", "zero3", "zero3_offload"]
STEPS = STRATEGY_STEPS


@pytest.fixture(scope="module")
def recipe(shared_strategy_recipe):
    return shared_strategy_recipe


# every ZeRO config x {LoRA, full}, but ZeRO-2 offload with LoRA: it moves only the optimizer states to the CPU,
# which for an adapter are a few MB; its full fine-tuning (the case offload is for) runs, as does ZeRO-3 offload
# with LoRA (there the frozen weights live on the CPU)
CASES = [(s, m) for m in ("lora", "full") for s in ZERO if (s, m) != ("zero2_offload", "lora")]


@pytest.fixture(scope="module")
def runs(strategy_run):
    """The CASES, plus the 2-process DDP reference: the same command but --config_file."""
    return {(s, m): strategy_run(s, m) for s, m in CASES + [("ddp", "lora"), ("ddp", "full")]}


@pytest.mark.parametrize("strategy, method", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_zero_matches_ddp(runs, strategy, method):
    """Same losses and held-out predictions as DDP. Tolerance 1e-5: both are fp32 with the same global batch
    and token-normalised loss; DeepSpeed only changes the order of the gradient sums (flat buckets,
    reduce-scatter), which moves results by ~1e-7 relative per step."""
    ref, got = runs[("ddp", method)], runs[(strategy, method)]
    cfg = yaml.safe_load((got / "config.yaml").read_text())
    assert cfg["run"]["strategy"] == strategy and cfg["run"]["world_size"] == 2
    la, lb = [r["loss"] for r in read_log(ref)], [r["loss"] for r in read_log(got)]
    assert len(lb) == STEPS and la == pytest.approx(lb, abs=1e-5, rel=1e-5)
    pa = [json.loads(x) for x in (ref / "eval/predictions.jsonl").read_text().splitlines()]
    pb = [json.loads(x) for x in (got / "eval/predictions.jsonl").read_text().splitlines()]
    assert [p["pred"] for p in pa] == [p["pred"] for p in pb]
    assert [p["nll"] for p in pa] == pytest.approx([p["nll"] for p in pb], abs=1e-3, rel=1e-5)


def test_cpu_ranks_compile_no_deepspeed_op(runs, strategy_extensions):
    """Every ZeRO run above, offload included, on CPU ranks without compiling a DeepSpeed op: offload steps with
    torch's AdamW (DeepSpeed's CPU Adam is a C++ extension compiled on first use, 2 to 4 minutes on 2 cores,
    for states that are in CPU RAM anyway), and the shared-memory inference all-reduce is not built."""
    assert runs and not list(strategy_extensions.rglob("*.so")) and not list(strategy_extensions.rglob("*.o"))


@pytest.mark.parametrize("strategy", ["zero2", "zero3_offload"])
def test_zero_ranks_are_real(runs, strategy):
    """Without fittune's gloo choice each DeepSpeed rank would think it is alone (world size 1)."""
    ranks = json.loads((runs[(strategy, "lora")] / "ranks.json").read_text())
    assert [r["world_size"] for r in ranks] == [2, 2]
    a, b = (set(r["first_step_ids"]) for r in ranks)
    assert len(a) == len(b) == 4 and not a & b


@pytest.mark.parametrize("method", ["lora", "full"])
def test_zero3_export_reloads_without_deepspeed(runs, method):
    """ZeRO-3 shards every weight; final/ must hold the gathered adapter / consolidated model, loadable in
    one process with plain transformers / peft, reproducing the trained model's numbers."""
    run = runs[("zero3", method)]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "final")
    if method == "lora":
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(run / "final")
    else:
        model = AutoModelForCausalLM.from_pretrained(run / "final")
        # tied embeddings stay tied through the ZeRO-3 export
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    expected = independent_nll(model, tok, run)
    preds = {json.loads(x)["id"]: json.loads(x) for x in (run / "eval/predictions.jsonl").read_text().splitlines()}
    for ex_id, nll in expected.items():
        assert preds[ex_id]["nll"] == pytest.approx(nll, rel=1e-4, abs=1e-4)


def test_evaluate_under_zero3(runs, tmp_path):
    """evaluate.py under ZeRO-3 on 2 ranks: the engine gathers the sharded weights; same predictions. (Also: on
    CPU ranks DeepSpeed's shared-memory inference all-reduce op is not compiled, 90 s on a fresh machine for an
    op training never calls: its build directory stays empty.)"""
    run, ops = runs[("zero3", "lora")], tmp_path / "torch_extensions"
    launch("evaluate.py", ["--checkpoint", run, "--output_dir", tmp_path / "ev"], nproc=2,
           config_file="accelerate_configs/deepspeed_zero3.yaml", extra_env={"TORCH_EXTENSIONS_DIR": str(ops)})
    assert not list(ops.rglob("*deepspeed_shm_comm*"))
    a = [json.loads(x) for x in (run / "eval/predictions.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "ev/predictions.jsonl").read_text().splitlines()]
    assert [p["pred"] for p in a] == [p["pred"] for p in b]


@pytest.mark.parametrize("edit, message", [
    ({"train_micro_batch_size_per_gpu": 7}, "train_micro_batch_size_per_gpu=7 but the recipe gives 2"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "has a 'optimizer' section"),
])
def test_conflicting_deepspeed_json_is_an_error(recipe, tmp_path, edit, message):
    ds = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    ds.update(edit)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    acc = yaml.safe_load((ROOT / "accelerate_configs/deepspeed_zero2.yaml").read_text())
    acc["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "ds.json")
    (tmp_path / "acc.yaml").write_text(yaml.safe_dump(acc))
    proc = launch("train.py", ["--config", recipe, "--output_dir", tmp_path / "run"], config_file=str(tmp_path / "acc.yaml"),
                  check=False)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("fittune: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "final").exists()


def test_parameter_count_sees_through_zero3_partitioning():
    """Was: "parameters: 0 total, 0 trainable" under ZeRO-3 full fine-tuning (and that 0 in the resume
    fingerprint): a partitioned parameter is an empty placeholder whose real size is `ds_numel`."""
    import torch

    from fittune.model import count_parameters

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    assert count_parameters(model) == (36 + 10, 36)
    for p in model.parameters():  # what deepspeed.zero.Init leaves on a rank
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert count_parameters(model) == (36 + 10, 36)


def test_a_missing_deepspeed_json_is_named_with_the_fix(tmp_path, monkeypatch):
    """accelerate reads the launch config's relative deepspeed_config_file from the launch directory; launched
    from elsewhere it said only "Expected a string path to an existing deepspeed config"."""
    from fittune.distributed import check_deepspeed_config_file
    from fittune.errors import FittuneError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero2.json")
    monkeypatch.chdir(ROOT)
    check_deepspeed_config_file()  # found from the repository root
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FittuneError, match=f"ds_configs/zero2.json does not exist .*{tmp_path}.*repository root"):
        check_deepspeed_config_file()
