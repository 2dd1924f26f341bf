"""fittune-export (python -m fittune.export): a merged LoRA model gives the adapter model's logits; a sharded ZeRO or FSDP2
checkpoint becomes one safetensors model equal to the trained weights."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, STRATEGY_STEPS, child_env, launch
from safetensors.torch import load_file


def export(*args, answer: str = ""):
    proc = subprocess.run([sys.executable, "-m", "fittune.export", *map(str, args)], cwd=ROOT, env=child_env(2),
                          capture_output=True, text=True, input=answer)
    return proc


def test_merged_lora_export_matches_adapter_logits(tmp_path, tiny_config):
    run = tmp_path / "run"
    launch("train.py", ["--config", tiny_config(lora={"enabled": True, "r": 4, "dropout": 0.0}, train={"lr": 3e-2}),
                        "--output_dir", run])
    assert export("--checkpoint", run, "--output", tmp_path / "merged", "--merge").returncode == 0
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    adapter = AutoPeftModelForCausalLM.from_pretrained(run / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # exporting twice to the same place refuses rather than overwrite
    again = export("--checkpoint", run, "--output", tmp_path / "merged", "--merge")
    assert again.returncode == 2 and "already exists" in again.stderr

    # a received adapter whose tokenizer names its own code: run only with --trust_remote_code (was: transformers
    # asked on the terminal, and a `y` on stdin ran it)
    received, ran = shutil.copytree(run / "final", tmp_path / "received"), tmp_path / "code-ran"
    (received / "evil.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n")
    tok = json.loads((received / "tokenizer_config.json").read_text())
    tok = {k: v for k, v in tok.items() if k != "tokenizer_class"} | {"auto_map": {"AutoTokenizer": ["evil.T", None]}}
    (received / "tokenizer_config.json").write_text(json.dumps(tok))
    untrusted = export("--checkpoint", received, "--output", tmp_path / "exp", answer="y\n")
    assert untrusted.returncode == 2 and not ran.exists() and not (tmp_path / "exp").exists()
    assert "names its own code (auto_map), which is not run: pass --trust_remote_code" in untrusted.stderr
    export("--checkpoint", received, "--output", tmp_path / "exp2", "--trust_remote_code")
    assert ran.read_text() == "ran"  # the flag is what allows it


SHARDS = {"zero2": "pytorch_model", "zero3": "pytorch_model", "fsdp2": "pytorch_model_fsdp_0"}


@pytest.mark.parametrize("accel", list(SHARDS))
def test_sharded_checkpoint_consolidates_to_one_model(tmp_path, strategy_run, accel, capsys):
    """ZeRO shards and FSDP2's torch.distributed.checkpoint shards become the model the run itself wrote
    (the shared 2-process full fine-tuning runs of test_deepspeed / test_fsdp, checkpointed at their end)."""
    run = strategy_run(accel, "full")
    ckpt = run / "checkpoints" / f"step-{STRATEGY_STEPS:08d}"
    assert (ckpt / SHARDS[accel]).is_dir() and not list(ckpt.glob("model*.safetensors"))  # really sharded
    proc = export("--checkpoint", ckpt, "--output", tmp_path / "model")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    trained = load_file(run / "final" / "model.safetensors")  # what the run itself exported at the same step
    exported = load_file(tmp_path / "model" / "model.safetensors")
    # the run's own export may also write the tied lm_head.weight (a copy of embed_tokens)
    assert set(trained) - set(exported) <= {"lm_head.weight"} and set(exported) <= set(trained)
    for k in exported:
        torch.testing.assert_close(exported[k], trained[k])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # it carries the run's recipe and held-out ids: evaluate.py scores it on the run's held-out rows wherever it
    # is (was: every row of the data, the training rows too), with the numbers of the run's own evaluation
    import json

    from test_evaluate_safety import evaluate

    assert (run / "final" / "fittune_heldout_ids.json").read_bytes() == (run / "heldout_ids.json").read_bytes()
    moved = tmp_path / "elsewhere" / "model"
    __import__("shutil").copytree(tmp_path / "model", moved)
    (moved.parent / "config.yaml").write_text("database: postgres\n")  # another tool's file beside it: not ours
    code, out, err = evaluate(["--checkpoint", moved, "--output_dir", tmp_path / "ev"], capsys)
    assert code == 0 and "(the run's held-out rows)" in out, err[-3000:]
    ours, theirs = ([json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
                    for d in (tmp_path / "ev", run / "eval"))
    assert [p["id"] for p in ours] == [p["id"] for p in theirs]
    assert [p["nll"] for p in ours] == pytest.approx([p["nll"] for p in theirs], rel=1e-4, abs=1e-4)
    # the same shards received from elsewhere (outside a fittune run) are pickles: refused without the flag
    from fittune.errors import FittuneError
    from fittune.export import export as export_in_process

    received = tmp_path / "received" / "checkpoints" / ckpt.name
    __import__("shutil").copytree(ckpt, received)
    (tmp_path / "received" / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(FittuneError, match="code-equivalent"):
        export_in_process(str(received), str(tmp_path / "model2"))
    export_in_process(str(received), str(tmp_path / "model2"), trust_checkpoint=True)
    again = load_file(tmp_path / "model2" / "model.safetensors")
    assert set(again) == set(exported) and all(torch.equal(again[k], exported[k]) for k in exported)
    # a cut shard is named before the shard reader fails inside, and nothing is written
    shard = max((received / SHARDS[accel]).glob("*"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(FittuneError, match=f"{SHARDS[accel]}/{shard.name} cannot be read.*export an older"):
        export_in_process(str(received), str(tmp_path / "model3"), trust_checkpoint=True)
    shard.unlink()  # a missing shard: the same clear error (was "free disk space or fix permissions" for ZeRO)
    with pytest.raises(FittuneError, match=f"checkpoint {received} is damaged.*export an older"):
        export_in_process(str(received), str(tmp_path / "model3"), trust_checkpoint=True)
    assert not (tmp_path / "model3").exists()
    # all shards gone: the trainer state says what the checkpoint was saved under, so it is damaged (was: read
    # by its files alone, "holds no model weights (no ZeRO or FSDP2 shards, no model.safetensors)")
    __import__("shutil").rmtree(received / SHARDS[accel])
    with pytest.raises(FittuneError, match=f"{received}.*(damaged|missing).*export an older"):
        export_in_process(str(received), str(tmp_path / "model3"), trust_checkpoint=True)
    assert not (tmp_path / "model3").exists()


def accelerate_checkpoint(root, model_dir):
    """A full fine-tuning checkpoint as accelerate writes it for one process / DDP (model.safetensors), in a
    run whose config.yaml names the base model."""
    import shutil

    import yaml

    from fittune.rundir import claim_dir, owned

    if not owned(root, "train"):
        claim_dir(root, "train")  # a fittune run: its config.yaml is the checkpoint's recipe
    ckpt = root / "checkpoints" / "step-00000004"
    ckpt.mkdir(parents=True)
    shutil.copy(model_dir / "model.safetensors", ckpt / "model.safetensors")
    (root / "config.yaml").write_text(yaml.safe_dump({"run": {"model_path": str(model_dir)}}))
    return ckpt


def test_export_is_atomic_and_never_touches_other_paths(tmp_path, tiny_model_dir):
    """The export is built under a name of its own and renamed into place: a user's `OUT.tmp` survives (the
    old code emptied it), a failed export leaves neither OUT nor a partial directory, and the weights are
    the checkpoint's."""
    from fittune.errors import FittuneError
    from fittune.export import export

    ckpt = accelerate_checkpoint(tmp_path / "run", tiny_model_dir)
    (tmp_path / "model.tmp").mkdir()
    (tmp_path / "model.tmp" / "thesis.tex").write_text("mine")
    export(str(ckpt), str(tmp_path / "model"))
    assert (tmp_path / "model.tmp" / "thesis.tex").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.tmp", "run"]
    exported, original = load_file(tmp_path / "model" / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert set(exported) == set(original) - {"lm_head.weight"}
    for k, v in exported.items():
        assert torch.equal(v, original[k])
    (ckpt / "trainer_state.json").write_text("{cut")  # a damaged trainer state, whole weights: read by their files
    (tmp_path / "made").mkdir()  # an empty directory made for the export: filled (replaced while empty)
    export(str(ckpt), str(tmp_path / "made"))
    assert load_file(tmp_path / "made" / "model.safetensors").keys() == exported.keys()
    # a cut weights file: one clear error naming it, nothing written
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for out in (tmp_path / "model2", tmp_path / "new" / "deep" / "model2"):  # nor the directories made for it
        with pytest.raises(FittuneError, match="model.safetensors cannot be read .*damaged"):
            export(str(ckpt), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made", "model", "model.tmp", "run"]
    with pytest.raises(FittuneError, match="already exists and is not an empty directory"):
        export(str(ckpt), str(tmp_path / "model"))
    with pytest.raises(FittuneError, match="already exists and is not an empty directory"):
        export(str(ckpt), str(tmp_path / "model.tmp"))  # the user's: kept
    assert [p.name for p in (tmp_path / "model.tmp").iterdir()] == ["thesis.tex"]
    from fittune.export import _rename_new

    (tmp_path / "made2").mkdir()
    (tmp_path / "made2" / "notes.txt").write_text("put there while the export ran")
    with pytest.raises(FittuneError, match="made2 was filled while exporting"):
        _rename_new(tmp_path / "model", tmp_path / "made2", empty_dir=True)
    assert (tmp_path / "made2" / "notes.txt").is_file() and (tmp_path / "model" / "model.safetensors").is_file()
    (tmp_path / "made2" / "notes.txt").unlink()
    (tmp_path / "made2").rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made", "model", "model.tmp", "run"]
    (tmp_path / "empty").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path / "empty")
        with pytest.raises(FittuneError, match="--output . is the current directory"):  # was: a traceback
            export(str(ckpt), ".")
    (tmp_path / "empty").rmdir()
    # never into a fittune directory, whose final/, eval/ ... fittune replaces with what is inside them
    from fittune.rundir import claim_dir

    run = claim_dir(tmp_path / "a-run", "train")
    claim_dir(run / "eval", "eval")
    for inside in (run / "eval" / "exported", run / "merged"):
        with pytest.raises(FittuneError, match="--output .* is inside .*choose a directory outside it"):
            export(str(ckpt), str(inside))
        assert not inside.exists()


def test_export_full_disk_is_one_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors import SafetensorError

    from fittune.errors import FittuneError
    from fittune.export import export

    ckpt = accelerate_checkpoint(tmp_path / "run", tiny_model_dir)

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    with pytest.raises(FittuneError, match="could not write the export .*No space left.*nothing was written"):
        export(str(ckpt), str(tmp_path / "model"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_final_is_built_in_a_marked_tmp_and_published_without_the_marker(tmp_path, tiny_model_dir):
    """final.tmp left by a crash is fittune's (its marker) and is removed; one that is not is refused and kept;
    the published final/ (the directory people copy) carries no marker of fittune's."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fittune.errors import FittuneError
    from fittune.final import save_final
    from fittune.rundir import MARKER, claim_dir

    acc = Accelerator(cpu=True)
    model = acc.prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    run = claim_dir(tmp_path / "run", "train")
    leftover = claim_dir(run / "final.tmp", "final")
    (leftover / "model.safetensors").write_text("half-written")
    final = save_final(model, acc, tokenizer, run, "seed: 0\n", lambda msg: None)
    assert (final / "model.safetensors").is_file() and not (final / MARKER).exists()
    assert not (run / "final.tmp").exists()
    mine = run / "final.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FittuneError, match="final.tmp exists and is not fittune's"):
        save_final(model, acc, tokenizer, run, "seed: 0\n", lambda msg: None)
    assert (mine / "notes.txt").read_text() == "mine" and (final / "model.safetensors").is_file()
    shutil.rmtree(mine)
    import fittune.rundir as rundir

    real_fsync_tree = rundir.fsync_tree

    def full_disk(root):
        raise OSError(28, "No space left on device")

    rundir.fsync_tree = full_disk  # the publish fails: final.tmp must stay recognisably fittune's
    try:
        with pytest.raises(FittuneError, match="could not write final/"):
            save_final(model, acc, tokenizer, run, "seed: 0\n", lambda msg: None)
    finally:
        rundir.fsync_tree = real_fsync_tree
    assert (run / "final.tmp" / MARKER).is_file() and (final / "model.safetensors").is_file()
    save_final(model, acc, tokenizer, run, "seed: 0\n", lambda msg: None)  # the next save removes it
    assert not (run / "final.tmp").exists() and not (final / MARKER).exists()


def test_a_run_being_trained_is_not_exported_and_exports_share_it(tmp_path, tiny_model_dir, monkeypatch):
    """A run that is being trained (its exclusive lock) is refused with its holder; one being evaluated or
    exported (shared locks) is exported, and stays locked against a resume until the export ends."""
    from fittune.errors import FittuneError
    from fittune.export import export
    from fittune.rundir import DirInUse, DirLock, claim_dir

    run = claim_dir(tmp_path / "run", "train")
    ckpt = accelerate_checkpoint(run, tiny_model_dir)
    trainer = DirLock(run).acquire("train.py")
    with pytest.raises(FittuneError, match=rf"cannot export now: {run} is in use by train\.py \(pid .*: wait"):
        export(str(ckpt), str(tmp_path / "model"))
    trainer.release()
    assert not (tmp_path / "model").exists()
    (ckpt / "trainer_state.json").write_text("{}")  # complete: the run stopped after saving it
    with pytest.raises(FittuneError, match=rf"no final/ yet .*: export its last checkpoint: --checkpoint {ckpt}, or "
                                           rf"finish it with train.py --output_dir {run} --resume auto"):
        export(str(run), str(tmp_path / "model"))  # was: "holds no model weights"
    with pytest.raises(FittuneError, match="full fine-tuning checkpoint, not an adapter: nothing to merge"):
        export(str(ckpt), str(tmp_path / "model"), merge=True)  # was: exported, --merge ignored
    evaluation = DirLock(run).acquire("evaluate.py", shared=True)  # an evaluation of the run goes on: shared
    seen = []
    import fittune.export as E

    real = E._write_export

    def write_and_try_a_resume(*args):  # a --resume auto started while the export runs, the evaluation over
        evaluation.release()
        with pytest.raises(DirInUse, match="reads it"):
            DirLock(run).acquire("train.py")
        seen.append("refused")
        return real(*args)

    monkeypatch.setattr(E, "_write_export", write_and_try_a_resume)
    export(str(ckpt), str(tmp_path / "model"))
    assert seen == ["refused"] and (tmp_path / "model" / "model.safetensors").is_file()
    DirLock(run).acquire("train.py").release()  # the export let go of it


def test_the_tied_head_is_saved_once_whatever_the_model_names_it(tmp_path):
    """final/ drops the output head's copy of a tied embedding by asking the model for its embedding pair
    (was: only the Qwen/Llama key names, so a GPT-2 run gathered by FSDP2 saved the tensor twice); the
    reloaded model ties them again and computes the same logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fittune.final import untied

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).eval()
    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # two tensors, as FSDP2 gathers them
    saved = untied(model, gathered)
    assert set(gathered) - set(saved) == {"lm_head.weight"}
    model.save_pretrained(tmp_path / "m", state_dict=saved)
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[1, 5, 9, 3]])
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()
    assert torch.equal(again(ids).logits, model(ids).logits)
    # untied embeddings (or a head that differs) are both saved
    model.config.tie_word_embeddings = False
    assert set(untied(model, gathered)) == set(gathered)


def test_a_cleared_or_damaged_model_cache_is_rebuilt_for_evaluation_and_export(tmp_path, tiny_config):
    """A LoRA run on a built-in model recorded its cache path; evaluate.py loaded it as it was and export gave
    a ValueError traceback (damaged) or 'cannot load' (cleared). Both now check the cache and rebuild it."""
    from conftest import TINY_SHAPE

    cache, run = tmp_path / "cache", tmp_path / "run"
    env = {"FITTUNE_CACHE": str(cache)}  # a cache of this test's own: the session's is shared
    cfg = tiny_config(model={"name_or_path": "builtin:tiny-qwen2", "tiny": TINY_SHAPE},
                      lora={"enabled": True, "r": 4, "dropout": 0.0}, train={"max_steps": 2})
    launch("train.py", ["--config", cfg, "--output_dir", run, "--eval.before_training", "false"], extra_env=env)
    (built,) = (cache / "models").glob("tiny-qwen2-*[!k]")  # not the .lock beside it
    (built / "config.json").write_text('{"broken": true}')
    proc = launch("evaluate.py", ["--checkpoint", run, "--output_dir", tmp_path / "ev"], extra_env=env)
    assert f"the cached model {built} is damaged or incomplete" in proc.stdout
    assert (tmp_path / "ev" / "metrics.json").is_file()
    shutil.rmtree(cache / "models")  # e.g. to free space
    proc = subprocess.run([sys.executable, "-m", "fittune.export", "--checkpoint", run, "--output",
                           tmp_path / "merged", "--merge"], cwd=ROOT, env={**child_env(2), **env},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.hidden_size == TINY_SHAPE["hidden_size"]


def test_an_export_copies_the_models_own_files_and_leaves_no_trace(tmp_path, tiny_model_dir):
    """Found by a review: a symbolic link in a received model (vocab.txt -> ~/.ssh/id_rsa) was followed and the
    key exported readable by all; an export into the model itself copied its own build into itself; a killed
    export's build stayed for good; an empty directory of the user's came back with other permissions."""
    import stat

    from fittune.errors import FittuneError
    from fittune.export import export
    from fittune.rundir import DirLock, claim_dir

    received = shutil.copytree(tiny_model_dir, tmp_path / "received")
    secret = tmp_path / "id_rsa"
    secret.write_text("KEY")
    (received / "vocab.txt").symlink_to(secret)
    with pytest.raises(FittuneError, match=r"vocab.txt is a symbolic link to .*id_rsa, outside the model: an export"):
        export(str(received), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-*"))
    (received / "vocab.txt").unlink()
    # a Hugging Face cache snapshot links each file to its blob: those are the model's own, and copied
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "rev").mkdir(parents=True)
    for f in received.iterdir():
        shutil.copyfile(f, repo / "blobs" / f"hash-{f.name}")
        (repo / "snapshots" / "rev" / f.name).symlink_to(f"../../blobs/hash-{f.name}")
    export(str(repo / "snapshots" / "rev"), str(tmp_path / "from-hub"))
    assert all((tmp_path / "from-hub" / f.name).read_bytes() == f.read_bytes() for f in received.iterdir())
    assert not any(p.is_symlink() for p in (tmp_path / "from-hub").iterdir())
    with pytest.raises(FittuneError, match=r"is inside the checkpoint being exported"):
        export(str(received), str(received / "copy"))
    assert not (received / "copy").exists()
    killed = claim_dir(tmp_path / ".out.export-999-0123abcd", "export")  # marked, its lock free: a killed one's
    DirLock(killed).acquire("export").release()
    (killed / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / ".out.export-mine"  # the same look, not fittune's: left alone
    mine.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o750)
    export(str(received), str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # was: 0o755, its files readable by all
    assert not killed.exists() and mine.is_dir()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in received.iterdir())  # no marker, lock
    live = claim_dir(tmp_path / ".out2.export-1-0123abcd", "export")  # another export writing there now
    lock = DirLock(live).acquire("export")
    try:
        with pytest.raises(FittuneError, match=r"out2 is being exported to by export \(pid"):
            export(str(received), str(tmp_path / "out2"))
    finally:
        lock.release()
    assert live.is_dir() and not (tmp_path / "out2").exists()
