"""Config tree: YAML + dotted overrides, unknown keys, cross-field checks, the saved config round trip."""


import pytest
import yaml

from fittune.config import Config, build_config, parse_overrides, to_yaml
from fittune.errors import FittuneError


def test_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"lr": 1e-3, "micro_batch_size": 2}, "lora": {"enabled": True}}))
    cfg = build_config(str(recipe), parse_overrides(["--train.lr", "2e-4", "--lora.r=8", "--data.path", "x.jsonl",
                                                     "--lora.target_modules", "[q_proj, v_proj]"]))  # LoRA in r.yaml
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.train.micro_batch_size == 2  # from the file
    assert cfg.lora.enabled and cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.path == "x.jsonl"
    assert cfg.data.test_size == 0.1  # default held-out fraction


@pytest.mark.parametrize("key, suggestion", [("trian.lr", "train.lr"), ("train.learning_rate", "train.lr"),
                                             ("lora.rank", "lora.r"), ("data.pth", "data.path"),
                                             ("train.seed", "seed")])  # was: 'train.kernels'
def test_unknown_key_suggests_closest(key, suggestion):
    with pytest.raises(FittuneError, match=f"unknown config key '{key}'.*did you mean '{suggestion}'"):
        build_config(None, {key: 1})


def test_unknown_key_in_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  micro_batch: 4\n")
    with pytest.raises(FittuneError, match="train.micro_batch.*did you mean 'train.micro_batch_size'"):
        build_config(str(recipe), {})


@pytest.mark.parametrize("overrides, message", [
    ({"lora.r": 0}, "lora.r must be >= 1"),
    ({"train.micro_batch_size": 0}, "micro_batch_size must be >= 1"),
    ({"train.grad_accum": 0}, "grad_accum must be >= 1"),
    ({"data.test_size": 1.5}, "test_size must be in"),
    ({"train.mixed_precision": "fp8"}, "mixed_precision"),
    ({"train.lr": "fast"}, "train.lr"),
    ({"data.csv_header": False}, "column_names"),
])
def test_cross_field_checks(overrides, message):
    with pytest.raises(FittuneError, match=message):
        build_config(None, overrides)


def test_precision_conflict_with_launcher(monkeypatch):
    from fittune.precision import run_precision

    def resolve_mixed_precision(cfg):
        return run_precision(cfg.train.mixed_precision).mixed

    cfg = build_config(None, {"train.mixed_precision": "fp16"})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(FittuneError, match="fp16.*bf16"):
        resolve_mixed_precision(cfg)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_mixed_precision(cfg) == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_mixed_precision(build_config(None, {})) == "bf16"  # auto follows the launcher


def test_saved_config_round_trip(tmp_path):
    cfg = build_config(None, {"train.lr": 5e-5, "lora.enabled": True})
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg, {"world_size": 2, "strategy": "ddp"}))
    again = build_config(str(saved), {})
    assert again == cfg


def test_a_flags_text_is_taken_as_typed_and_yes_no_stay_words(tmp_path):
    """Was: every flag value read as YAML, so `#` started a comment (`runs/exp #3` -> `runs/exp`), a prompt with
    `: ` was a mapping and a date a date ("Input should be a valid string"), `on` a boolean; and YAML 1.1 made
    `classes: [no, yes]` the classes 'False' and 'True'."""
    flags = parse_overrides(["--output_dir", "runs/exp #3", "--data.system_prompt", "Answer: A, B, C or D",
                             "--data.label_column", "on", "--data.answer_column", "null", "--data.classes",
                             "[no, yes]", "--data.test_path", "2024-06-01",
                             "--lora.enabled", "yes", "--train.micro_batch_size", "4", "--seed", "3"])
    cfg = build_config(None, flags)
    assert cfg.output_dir == "runs/exp #3" and cfg.data.system_prompt == "Answer: A, B, C or D"
    assert (cfg.data.label_column, cfg.data.answer_column, cfg.data.classes) == ("on", None, ["no", "yes"])
    assert cfg.data.test_path == "2024-06-01"
    assert parse_overrides(["--data.choices_column", "[A, B]"]) == {"data.choices_column": ["A", "B"]}
    assert cfg.lora.enabled is True and cfg.train.micro_batch_size == 4 and cfg.seed == 3
    assert parse_overrides(["--data.choices_column", "choices"]) == {"data.choices_column": "choices"}
    commas = build_config(None, parse_overrides(["--data.label_column", "label", "--data.answer_column", "null",
                                                 "--data.classes", "no, yes"]))
    assert commas.data.classes == ["no", "yes"]  # as lora.target_modules reads names with commas (was: refused)
    recipe = tmp_path / "r.yaml"  # a recipe: YAML 1.2's booleans, a GPU index as a number
    recipe.write_text("data: {label_column: label, answer_column: null, classes: [no, yes, maybe]}\n"
                      "lora: {enabled: yes}\nmodel: {parallel: auto, max_memory: {0: 10GiB, cpu: 20GiB}}\n")
    cfg = build_config(str(recipe), {})
    assert cfg.data.classes == ["no", "yes", "maybe"] and cfg.lora.enabled is True
    assert cfg.model.max_memory == {"0": "10GiB", "cpu": "20GiB"}
    assert build_config(str(recipe), {}) == cfg  # and its saved config reloads the same
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert build_config(str(saved), {}) == cfg


def test_bad_override_syntax():
    with pytest.raises(FittuneError, match="needs a value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(FittuneError, match="unexpected argument"):
        parse_overrides(["train.lr", "1"])


def test_every_field_documented():
    from pydantic import BaseModel

    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation)

    walk(Config)


def test_a_leading_tilde_is_the_home_directory_in_recipes_and_flags(tmp_path, monkeypatch):
    """Was: `output_dir: ~/runs/y` in a recipe made a directory literally named `~` in the working directory
    (and printed `outputs in ~/runs/y/`); a quoted `--data.path '~/em.jsonl'` was not found."""
    from fittune.cli import split_flag
    from fittune.config import build_config

    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: ~/runs/y\ndata:\n  path: ~/em.jsonl\n")
    cfg = build_config(str(recipe), {"data.test_path": "~/t.jsonl", "resume": "auto"})
    assert (cfg.output_dir, cfg.data.path, cfg.data.test_path) == (
        f"{tmp_path}/runs/y", f"{tmp_path}/em.jsonl", f"{tmp_path}/t.jsonl")
    hub = build_config(None, {"model.name_or_path": "Qwen/Qwen2.5-3B"}).model.name_or_path
    assert cfg.resume == "auto" and hub == "Qwen/Qwen2.5-3B"
    assert split_flag(["--checkpoint=~/run", "--x", "1"], "checkpoint") == (f"{tmp_path}/run", ["--x", "1"])
    # --resume without --config continues with the run's own recipe, found through ~ too (was: the demo's)
    from fittune.cli import choose_recipe
    from fittune.rundir import claim_dir

    run = claim_dir(tmp_path / "run1", "train")
    (run / "config.yaml").write_text("output_dir: ~/run1\n")
    assert choose_recipe(None, {"output_dir": "~/run1", "resume": "auto"}).path == str(run / "config.yaml")
    # going on from a checkpoint into a new output_dir: the recipe that checkpoint saved (was: refused, "pass
    # --config RECIPE"); a folder fittune did not save is not taken for one
    step = claim_dir(run / "checkpoints" / "step-00000002", "checkpoint")
    (step / "config.yaml").write_text("output_dir: ~/run1\n")
    branch = choose_recipe(None, {"output_dir": "~/run2", "resume": "~/run1/checkpoints/step-00000002"})
    assert branch.path == str(step / "config.yaml") and "the checkpoint's own recipe" in branch.note
    assert "model.trust_remote_code" in branch.skip
    # with no --output_dir, the checkpoint's recipe names its own run (continued there only from its newest);
    # a checkpoint that is not there is said to be missing (was: "no fittune config.yaml" of the output_dir)
    assert choose_recipe(None, {"resume": "~/run1/checkpoints/step-00000002"}).path == str(step / "config.yaml")
    with pytest.raises(FittuneError, match="step-00000009 does not exist"):
        choose_recipe(None, {"output_dir": "~/run2", "resume": "~/run1/checkpoints/step-00000009"})
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.yaml").write_text("output_dir: ~/run1\n")
    with pytest.raises(FittuneError, match="--resume without --config continues the run in"):
        choose_recipe(None, {"output_dir": "~/run2", "resume": str(copy)})


def test_a_key_given_twice_is_refused_and_a_short_tuple_says_so(tmp_path):
    """Was: `lr` twice trained with the last one silently; `--train.betas [0.9]` said only "Field required"."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 1.0e-3\n  micro_batch_size: 2\n  lr: 2.0e-3\n")
    with pytest.raises(FittuneError, match=r"twice.yaml gives the key 'lr' twice \(lines 2 and 4\): keep one"):
        build_config(str(twice), {})
    merged = tmp_path / "merged.yaml"  # a merged key set again is YAML's way to override it: allowed
    merged.write_text("train:\n  <<: {lr: 1.0e-3, warmup_ratio: 0.0}\n  lr: 2.0e-3\n")
    assert build_config(str(merged), {}).train.lr == 2e-3
    with pytest.raises(FittuneError, match=r"train.betas: too few values \(no value 2\): give them all, as in its "
                                           r"default \[0.9, 0.999\]"):
        build_config(None, {"train.betas": [0.9]})


@pytest.mark.parametrize(("line", "key", "flag"), [
    ("overwrite: true", "overwrite", "--overwrite"), ("resume: auto", "resume", "--resume auto"),
    ("trust_checkpoint: true", "trust_checkpoint", "--trust_checkpoint"),
    ("model: {trust_remote_code: true}", "model.trust_remote_code", "--model.trust_remote_code true")])
def test_a_file_never_asks_for_what_only_a_command_may(tmp_path, line, key, flag):
    """Replacing a run, continuing one, unpickling a checkpoint and running a model's own code are asked for on
    the command line only: a recipe (or a received run's config.yaml) that sets them is refused, unless the
    command line gives the key too; their defaults, which older runs saved, are accepted; a saved config.yaml
    leaves them out."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\n{line}\n")
    with pytest.raises(FittuneError, match=f"sets {key}: .*only the command line may ask for \\({flag}\\)"):
        build_config(str(recipe), {})
    value = {"overwrite": False, "resume": None, "trust_checkpoint": False, "model.trust_remote_code": False}[key]
    section, _, name = key.rpartition(".")

    def get(cfg):
        return getattr(getattr(cfg, section) if section else cfg, name)

    assert get(build_config(str(recipe), {key: value})) == value  # the command line decides
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\nresume: null\noverwrite: false\ntrust_checkpoint: false\n"
                      f"model: {{trust_remote_code: false}}\n")
    cfg = build_config(str(recipe), {key: True if key != "resume" else "auto"})
    saved = yaml.safe_load(to_yaml(cfg))
    assert name not in (saved[section] if section else saved) and saved["output_dir"] == str(tmp_path / "out")


@pytest.mark.parametrize("impl", ["kernels-community/flash-attn", "someone/attn@main:v2"])
def test_a_hub_kernel_for_attention_needs_trust_remote_code(impl):
    """transformers downloads and runs a kernel repository's code for `attn_implementation: owner/name`: that
    is remote code, so it needs model.trust_remote_code like a model's own code; built-in kernels do not."""
    with pytest.raises(FittuneError, match=f"'{impl}' names a kernel repository on the Hugging Face Hub.*"
                                           "--model.trust_remote_code true"):
        build_config(None, {"model.attn_implementation": impl})
    assert build_config(None, {"model.attn_implementation": impl, "model.trust_remote_code": True}) \
        .model.attn_implementation == impl
    for builtin in ("sdpa", "eager", "flash_attention_2", "paged|eager"):
        assert build_config(None, {"model.attn_implementation": builtin}).model.attn_implementation == builtin
