"""evaluate.py: score a saved model or adapter on its run's held-out rows (or other data), on any number of
processes, without touching anything fittune did not create.

Trust and identity rules (README "What fittune writes, and what it never touches"):
  * `model.trust_remote_code` comes from this command line only, never from the run's own saved config.yaml
    (a recipe file that sets it is refused): a run directory received from someone else runs none of its own
    Python;
  * a run directory that is being trained is refused (its lock), and held (shared: other evaluations and exports
    of it go on) for the evaluation's duration, so it is not resumed or replaced meanwhile;
  * the held-out rows must be the rows the run held out (their content hash), unless `--data.path` says
    explicitly that other data is meant, which is then said loudly;
  * the output directory is new, empty, or fittune's own; it is reserved from the start (a second evaluation
    into it is refused at once) and replaced atomically; it replaces the same model's results, another
    model's only with --overwrite, and inside a training run it holds only that run's models' evaluations;
  * a flag that only training reads is refused, not ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from fittune.batches import tokenize_examples
from fittune.checkpoints import CheckpointInfo, resolve_checkpoint
from fittune.cli import own_data_mapping, split_flag
from fittune.columns import Example, count_rows, is_class_task, map_columns, prompts_cut_note
from fittune.config import (
    BUILTIN_MODEL,
    COMMAND_ONLY,
    RUN_CONTROL,
    Config,
    TinyModelConfig,
    all_keys,
    build_config,
    parse_overrides,
)
from fittune.distributed import Launched, configure_deepspeed, on_main_then_agree, start_accelerator
from fittune.errors import DataNotFound, FittuneError
from fittune.evaldir import EvalDir, check_eval_dir, check_in_own_run, check_replaces_same_model, reserve_eval_dir
from fittune.evaluator import evaluate_and_report
from fittune.metrics import majority_note, majority_of
from fittune.model import (
    load_tokenizer,
    load_trained_model,
    prepare_builtin_model,
    resolve_model_path,
)
from fittune.placement import place_model
from fittune.precision import weights_dtype
from fittune.reports import metrics_table
from fittune.rundir import HELDOUT_IDS, OWN_HELDOUT_IDS, RunLayout, hold_for_reading, owned, owning_run
from fittune.sources import absolute_path, read_rows, resolve_data_path, same_file, scored_digest, source_digest
from fittune.splits import examples_digest, leaked_rows_note, load_splits, load_test_file, select_ids

USAGE = """usage: accelerate launch evaluate.py --checkpoint DIR [--config FILE] [--output_dir DIR] [--section.key VALUE ...]
  DIR: a training output dir, its final/, or a model/adapter dir.
  Without --output_dir the results go to RUN/eval-heldout (RUN/eval-NAME-HASH for other data: NAME.jsonl),
  beside the eval/ that training wrote; outside a fittune run --output_dir is required.
  Without --config the run's saved config.yaml and held-out ids are used (but never its
  model.trust_remote_code: pass --model.trust_remote_code true to run a checkpoint's own code).
  --data.path FILE evaluates every row of another file (said loudly).
  --overwrite replaces an --output_dir that holds another model's evaluation (the same model's is replaced
  without it: the same command again).
  The config keys evaluation reads can be given (--eval.batch_size 16, --eval.max_batch_tokens 8192,
  --data.KEY, --model.KEY, --seed, --train.mixed_precision, --lora.enabled): python train.py --help lists them all; a
  training-only key (--train.lr, --lora.r, --resume ...) is refused, not ignored."""

TRUST_KEY = "model.trust_remote_code"


@dataclass
class EvalRequest:
    """What the evaluate.py command line asked for."""

    checkpoint: str
    config_file: str | None
    """The explicit --config (None: the run's saved config.yaml)."""
    out_dir: str | None
    overrides: dict = field(default_factory=dict)
    overwrite: bool = False
    """--overwrite: replace an output directory that holds another model's evaluation."""

    @property
    def data_path_given(self) -> bool:
        """The user named the data explicitly (--data.path): other data is meant, not refused."""
        return "data.path" in self.overrides


def parse_request(argv: list[str]) -> EvalRequest:
    """`--checkpoint DIR [--config FILE] [--output_dir DIR] [--key value ...]` -> EvalRequest."""
    checkpoint, rest = split_flag(argv, "checkpoint")
    if checkpoint is None:
        raise FittuneError("--checkpoint DIR is required (a training output dir, its final/, or a model dir); "
                           "see python evaluate.py --help")
    out_dir, rest = split_flag(rest, "output_dir")
    config_file, rest = split_flag(rest, "config")
    overrides = parse_overrides(rest)
    overwrite = overrides.pop("overwrite", False)
    if not isinstance(overwrite, bool):
        raise FittuneError(f"--overwrite takes true or false (or nothing), not '{overwrite}'")
    for key in overrides:
        refuse_training_key(key)
    return EvalRequest(checkpoint, config_file, out_dir, overrides, overwrite)


# the training settings evaluation reads (the precision it runs in; LoRA's on/off chooses the base's dtype)
_READ_BY_EVALUATION = {"train.mixed_precision", "lora.enabled"}
# settings outside train.* / lora.* that only training reads (the tracker, the untrained model's report, the
# order of the training batches)
_TRAINING_ONLY = {"log_with", "eval.before_training", "data.group_by_length"}


def refuse_training_key(key: str) -> None:
    """A command-line key that only training reads is refused, not ignored: the weights are evaluated as saved
    (an adapter's own adapter_config.json says its shape), and eval.* says how they are scored."""
    if key in _READ_BY_EVALUATION or key not in all_keys():  # an unknown key: the config's did-you-mean error
        return
    if key in ("resume", "trust_checkpoint"):
        raise FittuneError(f"evaluate.py has no --{key}: it reads only the saved weights, never a checkpoint's "
                           f"optimizer files (train.py --output_dir RUN --resume auto continues a training run)")
    if key in _TRAINING_ONLY or key.startswith(("train.", "lora.")):
        raise FittuneError(f"--{key} is a training setting that evaluate.py does not read: the weights are "
                           f"evaluated as saved; evaluation settings are --eval.KEY (e.g. --eval.batch_size), "
                           f"--data.KEY, --model.KEY, --train.mixed_precision and --lora.enabled (python train.py "
                           f"--help)")


def evaluate_main(argv: list[str]) -> dict | None:
    """evaluate.py's entry point: returns the metrics (None for --help)."""
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return None
    req = parse_request(argv)
    run = SavedRun.read(resolve_checkpoint(req.checkpoint))
    cfg = eval_config(run, req)
    return evaluate_checkpoint(run, cfg, req)


@dataclass
class SavedRun:
    """The checkpoint and what its fittune run saved, each file read at most once: its config.yaml (`config`;
    None: the weights have no fittune recipe) and its held-out record (`heldout`)."""

    info: CheckpointInfo
    config: dict | None

    @classmethod
    def read(cls, info: CheckpointInfo) -> SavedRun:
        import yaml

        return cls(info, None if info.config_file is None else yaml.safe_load(info.config_file.read_text()) or {})

    def section(self, name: str) -> dict:
        """One section of the saved config ({} where there is none)."""
        return (self.config or {}).get(name) or {}

    @property
    def builtin_base(self) -> bool:
        """The run was trained on the built-in tiny model (random weights from its model.tiny shape and seed)."""
        return self.section("model").get("name_or_path") == BUILTIN_MODEL

    @cached_property
    def heldout(self) -> dict | None:
        """The run's held-out ids: in its directory, or carried by a model directory outside it (final/ copied,
        an export: `rundir.OWN_HELDOUT_IDS`). A damaged record is refused where it is needed."""
        info = self.info
        path = info.run / HELDOUT_IDS if info.run else info.weights_dir / OWN_HELDOUT_IDS
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            if not isinstance(record.get("ids"), list):
                raise ValueError("no list of ids")
        except (ValueError, AttributeError) as e:
            raise FittuneError(f"{path} is damaged ({e}): restore it, or pass --data.path to evaluate other "
                               f"data") from None
        return record


def eval_config(run: SavedRun, req: EvalRequest) -> Config:
    """The config to evaluate with: the explicit --config, else the run's saved one with its
    `model.trust_remote_code` replaced by this command line's (default off)."""
    overrides = dict(req.overrides)
    if req.data_path_given and "data.test_path" not in overrides:
        overrides["data.test_path"] = None  # --data.path names the data to score: not a recipe's test file
    if overrides.get("data.test_path") and "data.group_column" not in overrides:
        overrides["data.group_column"] = None  # a test file is scored whole: the run's groups split nothing there
    if req.config_file is None and run.config is None:
        raise FittuneError(f"{req.checkpoint} has no saved fittune config: pass --config FILE describing the data")
    if run.builtin_base:  # with --config too: base_model_config rebuilds the run's own base
        for key in overrides:
            if key.startswith("model.tiny."):  # the adapter fits the base it was trained on, and no other
                raise FittuneError(f"--{key}: the run's base model is the built-in {BUILTIN_MODEL} of the shape "
                                   f"and seed it was trained on (its config.yaml), which evaluate.py rebuilds as it "
                                   f"was: drop --{key}")
    recipe = own_data_mapping(req.config_file or str(run.info.config_file), overrides)
    recipe.announce()
    # an evaluation never replaces, continues or unpickles a run: a recipe's or an older run's saved
    # `overwrite: true` / `resume: auto` (saved before they became command-only) are not its to refuse
    skip = (*recipe.skip, *RUN_CONTROL)
    if req.config_file is not None:
        return build_config(recipe.path, overrides, skip)
    # the saved config is part of the (possibly received) run directory: it cannot grant itself trust
    return build_config(recipe.path, {**overrides, TRUST_KEY: overrides.get(TRUST_KEY, False)}, skip)


def base_model_config(cfg: Config, run: SavedRun) -> Config:
    """The config the base model is built or found from: a run's built-in tiny base is rebuilt from the run's own
    shape and seed, whatever --seed says (on evaluate.py's command line the seed chooses rows only)."""
    if not run.builtin_base or cfg.model.name_or_path != BUILTIN_MODEL:
        return cfg
    tiny = TinyModelConfig(**(run.section("model").get("tiny") or {}))
    return cfg.model_copy(update={"seed": run.config.get("seed", cfg.seed),
                                  "model": cfg.model.model_copy(update={"tiny": tiny})})


def remote_code_notice(run: SavedRun, cfg: Config) -> str | None:
    """A line saying which code a checkpoint asked to run and that it is not run (None: nothing to say)."""
    info = run.info
    if cfg.model.trust_remote_code:
        return None
    asked = []
    for path in (info.weights_dir / "config.json", info.weights_dir / "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads(path.read_text()):
                asked.append(path.name)
        except (OSError, ValueError):
            continue
    saved = run.section("model").get("trust_remote_code") is True
    if not asked and not saved:
        return None
    what = f"{info.weights_dir} names its own code (auto_map in {', '.join(asked)})" if asked else \
        f"the run's saved {info.config_file.name} allows remote code"
    return (f"fittune: {what}; it is NOT run: model.trust_remote_code comes only from this command line "
            f"(pass --model.trust_remote_code true only for a checkpoint you trust)")


# ---------------------------------------------------------------------------------------------------------
# Which rows


@dataclass
class EvalData:
    """The rows to evaluate and where they come from, and the rows the run trained on (`run_training_rows`)."""

    test: list[Example]
    source: str
    train: list[Example] = field(default_factory=list)
    """As the run trained on them; [] where unknown or changed since (no majority baseline then)."""


SPLIT_KEYS = ("path", "test_path", "test_split", "test_size", "group_column")  # with the seed: the held-out rows


def _same_key(saved: dict, cfg: Config, key: str) -> bool:
    """Whether data key `key` is the run's (a relative path and the absolute one training saved are the same)."""
    ours, theirs = getattr(cfg.data, key), (saved.get("data") or {}).get(key)
    return theirs == ours or (key in ("path", "test_path") and same_file(ours, theirs))


def runs_own_split(saved: dict | None, cfg: Config) -> bool:
    """Whether `cfg` names the held-out rows of the run whose saved config is `saved`: the same data, split the
    same way by the same seed (column mappings may differ)."""
    return saved is not None and saved.get("seed") == cfg.seed and all(_same_key(saved, cfg, k) for k in SPLIT_KEYS)


@dataclass
class DataChoice:
    """Which data an evaluation scores, each part decided once and only when asked (a data file is hashed at most
    once): the default folder's name and the choice of rows ask it."""

    run: SavedRun
    cfg: Config
    given: bool
    """--data.path was given: other data is meant, unless it holds the run's own bytes (`moved`)."""

    @cached_property
    def own_split(self) -> bool:
        """The recipe names the run's data, split the run's way by the run's seed: its held-out rows."""
        return runs_own_split(self.run.config, self.cfg)

    @cached_property
    def digest(self) -> str | None:
        """sha256 of the bytes scored (`sources.scored_digest`; None for a hub dataset)."""
        return scored_digest(self.cfg.data)

    @cached_property
    def holds_run_data(self) -> bool:
        """--data.path holds the bytes of the run's data file (the content hash in its held-out record), wherever
        it is now: the run's training rows can be made again from it."""
        if not self.given or self.cfg.data.test_path:
            return False
        try:  # with no test file, the bytes scored are the source's (`sources.source_digest`)
            record, digest = self.run.heldout, self.digest
        except FittuneError:  # a damaged record, an unreadable file: not shown to be the run's data
            return False
        return record is not None and digest is not None and record.get("source_sha256") == digest

    @cached_property
    def moved(self) -> bool:
        """--data.path names the run's data at another place, split the same way by the same seed: its held-out
        rows are the run's."""
        saved = self.run.config
        if saved is None or saved.get("seed") != self.cfg.seed or not self.holds_run_data:
            return False
        return all(_same_key(saved, self.cfg, k) for k in SPLIT_KEYS if k != "path")

    @property
    def run_heldout(self) -> bool:
        """The rows scored are the run's held-out rows (at the run's data, or at its new place)."""
        return self.own_split and not self.given or self.moved


def select_data(choice: DataChoice, say) -> EvalData:
    """The rows to score (`_rows_to_score`), and the rows the run trained on as it trained on them (for the
    majority baseline and the note on held-out rows that are also training rows; `run_training_rows`); a model
    with no run (a recipe given with --config) keeps the recipe's own training split."""
    run, cfg = choice.run, choice.cfg
    _run_classes(cfg, run.config, say)
    data = _rows_to_score(choice, say)
    if run.config is None:
        return data
    scored_as = is_class_task(cfg.data) if cfg.data.label_column or cfg.data.choices_column else None
    # the run's data at its new place (moved), also where another seed scores all of it: its training rows
    moved_to = cfg.data.path if choice.holds_run_data else None
    return replace(data, train=run_training_rows(run, scored_as, say, moved_to))


def _rows_to_score(choice: DataChoice, say) -> EvalData:
    """The run's own held-out rows while the source and split are the run's (column mappings may change),
    checked against their saved content hash; an explicit test file; or every row of other data."""
    run, cfg, given = choice.run, choice.cfg, choice.given
    same_source = choice.own_split or choice.moved
    record = run.heldout if same_source else None
    if record is not None and not cfg.data.test_path:
        examples = map_columns(_read_run_data(cfg, given), cfg.data, resolve_data_path(cfg.data.path))
        test = select_ids(examples, record["ids"], cfg.data.path)
        check_identity(record, test, cfg.data, given, say)
        if given:  # the split is the run's: its training rows would score what the model memorised
            say(f"fittune: NOTE: --data.path is the run's own data (its content hash): scoring its {len(test)} "
                f"held-out rows, not all {len(examples)} (the others trained the model); to score every row, pass "
                f"a copy of the file as --data.test_path")
        return EvalData(test, "the run's held-out rows")
    if same_source or cfg.data.test_path:
        # a run's training rows are the run's own (select_data): of a test file only the file is read then
        train, test = ([], load_test_file(cfg.data)) if cfg.data.test_path and run.config is not None \
            else load_splits(cfg.data, cfg.seed)
        if record is not None:
            check_identity(record, test, cfg.data, given, say)
        split = f" (split {cfg.data.test_split})" if cfg.data.test_split else ""
        # `train`: the recipe's own training rows, for a model with no run of its own (a run's replace them)
        return EvalData(test, f"the test file {cfg.data.test_path}{split}" if cfg.data.test_path
                        else "the held-out split", train)
    rows = read_rows(cfg.data.path, cfg.data)
    cfg.data.group_column = None  # every row is scored, none split: other data need not have the run's groups
    test = map_columns(rows, cfg.data, resolve_data_path(cfg.data.path))
    if run.config is not None:
        run_data = ", ".join(f"{k} {v}" for k in SPLIT_KEYS if (v := run.section("data").get(k)) is not None)
        say(f"fittune: NOTE: evaluating all {len(test)} rows of {cfg.data.path}, which is NOT the held-out split "
            f"of this run (the run used data {run_data}, seed {run.config.get('seed')}): these numbers are not "
            f"the run's held-out evaluation")
    return EvalData(test, f"all rows of {cfg.data.path}")


def run_training_rows(run: SavedRun, class_task: bool | None, say, data_path: str | None = None) -> list[Example]:
    """The rows the run trained on: its recipe's split of its data (at `data_path` when it moved), made again as
    training made it and checked against the digest training saved of them (`run: train_sha256`; an older run:
    its held-out rows' and data file's digests). Their most frequent class is the majority baseline for rows
    scored the same way (`class_task`: classes, or choice letters; None: not a class or choice task, the rows
    serve only the note on duplicates). [] with a note when they are not there as they were."""
    def none(why: str) -> list[Example]:
        what = "no majority baseline for these rows" if class_task is not None else \
            "these rows are not checked against the run's training rows"
        say(f"fittune: {what}: {why}")
        return []

    record = run.heldout
    if record is None:
        return none("the run has no heldout_ids.json to tell its training rows from its held-out ones")
    moved = {"data.path": data_path} if data_path else {}
    try:  # the run's own recipe, read, never run
        # only its data is read: its attention kernel (a Hub one needs trust) is not this function's to refuse
        run_cfg = build_config(str(run.info.config_file), {TRUST_KEY: False, "model.attn_implementation": "sdpa",
                                                       **moved}, COMMAND_ONLY)
    except FittuneError as e:
        return none(f"the run's saved config cannot be read ({e})")
    if class_task is not None and not (run_cfg.data.label_column or run_cfg.data.choices_column):
        return none("the run was trained on open answers, not classes or choices")
    if class_task is not None and is_class_task(run_cfg.data) != class_task:
        return none("the run was trained to choose " + ("classes" if not class_task else "between choices") +
                    ", these rows are scored the other way")
    try:
        train, test = load_splits(run_cfg.data, run_cfg.seed)
    except FittuneError as e:  # its data moved, or cannot be read here
        return none(f"the run's training rows cannot be read ({e})")
    changed = f"the run's data {run_cfg.data.path} changed since training"
    trained = run.section("run").get("train_sha256")
    if trained is not None:  # the rows themselves, as the run mapped them
        return train if examples_digest(train) == trained else none(changed)
    # an older run: its held-out rows' digest, and its data files' bytes (a hub dataset has none)
    by_id = {x.id: x for x in train + test}
    held = [by_id.get(i) for i in record["ids"]]
    saved_source = record.get("source_sha256")
    if None in held or record.get("examples_sha256") not in (None, examples_digest(held)):
        return none(changed)
    if saved_source is not None and source_digest(run_cfg.data) not in (None, saved_source):
        return none(changed)
    return train


def _read_run_data(cfg: Config, data_path_given: bool) -> list[dict]:
    """The rows of the run's data; where it is not there any more, how to point at its new place."""
    try:
        return read_rows(cfg.data.path, cfg.data)
    except DataNotFound as e:
        if data_path_given:
            raise
        raise DataNotFound(f"{e}; if the run's data moved, pass --data.path NEW_PATH: the run's held-out rows are "
                           f"found in it by their saved content hash") from None


def _run_classes(cfg: Config, saved: dict | None, say) -> None:
    """A recipe given with --config that names no classes scores the run's own (saved at training): the classes
    found in a slice of the data would be fewer candidates, and easier ones. Other classes given are said."""
    run_data = (saved or {}).get("data") or {}
    if not (is_class_task(cfg.data) and run_data.get("classes") and run_data.get("label_column") == cfg.data.label_column):
        return
    if cfg.data.classes is None:
        cfg.data.classes = run_data["classes"]
    elif sorted(cfg.data.classes) != sorted(run_data["classes"]):
        say(f"fittune: NOTE: scoring against the classes {cfg.data.classes} given, not the run's own "
            f"{run_data['classes']}: with other candidates these numbers do not compare with the run's evaluation")


def check_identity(record: dict, test: list[Example], data_cfg, data_path_given: bool, say) -> None:
    """Refuse held-out rows whose content changed since training (an explicit --data.path: say it loudly).
    The mapped rows are compared first; when they differ only because the column mapping or system prompt
    changed (the user's choice here), the source file's bytes decide."""
    source = data_cfg.test_path or data_cfg.path
    saved = record.get("examples_sha256")
    if saved is None:
        say("fittune: warning: this run's heldout_ids.json has no content hash (written by an older fittune): "
            "cannot check that the held-out rows are unchanged since training")
        return
    if examples_digest(test) == saved:
        return
    if record.get("source_sha256") is not None and source_digest(data_cfg) == record["source_sha256"]:
        return  # the same bytes, mapped differently (e.g. --data.label_column null): the same rows
    if data_path_given:
        say(f"fittune: NOTE: the rows behind the run's held-out ids in {source} changed since training: evaluating "
            f"their CURRENT content, which is other data than the run held out (--data.path given)")
        return
    raise FittuneError(f"the rows behind the run's {len(test)} held-out ids in {source} changed since training "
                       f"(content hash differs): restore the data the run was trained on, or pass --data.path "
                       f"explicitly to evaluate the current rows as other data")


# ---------------------------------------------------------------------------------------------------------
# What the evaluation holds while it runs


def hold_on_main(accelerator, held: ExitStack, info: CheckpointInfo, out: Path, overwrite: bool,
                 flag: str) -> EvalDir | None:
    """On the main process: the shared lock of each training run the evaluation reads or writes into (a run
    being trained is refused; other evaluations of it go on; none is resumed or replaced meanwhile), then the
    reservation of the output directory, whose results may be replaced only as `check_replaces_same_model`
    says. Each is released by `held`, however the evaluation ends; any failure stops every rank (none is left
    waiting). The reservation on the main process, None on the others."""
    reserved: list[EvalDir] = []

    def take() -> None:
        for run in dict.fromkeys(r for r in (info.run, owning_run(out.parent)) if r is not None):
            lock = hold_for_reading(run, "evaluate.py", "evaluate")
            if lock is not None:
                held.callback(lock.release)
        reserved.append(reserve_eval_dir(out, "evaluate.py"))
        held.callback(reserved[0].release)  # first released: it may remove its build directory
        check_replaces_same_model(out, info.weights_dir, info.run, overwrite, flag)  # reserved: no other writer now

    on_main_then_agree(accelerator, take)
    return reserved[0] if reserved else None


# ---------------------------------------------------------------------------------------------------------
# Evaluate


def evaluate_checkpoint(run: SavedRun, cfg: Config, req: EvalRequest) -> dict:
    """Evaluate a saved model/adapter (see the module docstring for the rules); write the reports on the main
    process; return the metrics."""
    launched = start_accelerator(cfg.train.mixed_precision, cfg.model.parallel, project_dir=cfg.output_dir)
    accelerator, info, choice = launched.accelerator, run.info, DataChoice(run, cfg, req.data_path_given)
    flag = "--output_dir" if req.out_dir else "the default output directory (--output_dir chooses another)"
    out = check_eval_dir(Path(req.out_dir) if req.out_dir else default_eval_dir(choice, req), flag)
    check_in_own_run(out, info.weights_dir, info.run, flag)
    with ExitStack() as held:
        reserved = hold_on_main(accelerator, held, info, out, req.overwrite, flag)
        notice = remote_code_notice(run, cfg)
        if notice:
            accelerator.print(notice)
        data = select_data(choice, accelerator.print)
        if note := leaked_rows_note(data.train, data.test, cfg.data, evaluation=True):
            accelerator.print(f"fittune: {note}")
        metrics = _score(launched, choice, data, out, reserved)
    accelerator.end_training()
    return metrics


def default_eval_dir(choice: DataChoice, req: EvalRequest) -> Path:
    """Where evaluate.py writes without --output_dir: in the training run, beside the eval/ that training wrote
    (never replaced by default), named after what is scored; nowhere else (a directory fittune did not create
    gets nothing written into it)."""
    run, prefix = choice.run.info.run_dir, "eval-"
    holder = RunLayout.of_checkpoint(run).root if run is not None and owned(run, "checkpoint") else None
    if holder is not None and owned(holder, "train"):
        run, prefix = holder, f"eval-{run.name}-"  # a checkpoint's adapter: RUN/eval-step-N-...
    if run is None or not owned(run, "train"):
        raise FittuneError(f"pass --output_dir DIR: {choice.run.info.weights_dir} is not in a fittune training "
                           f"run's directory, and fittune writes only into directories it creates")
    cfg, suffix = choice.cfg, _settings_suffix(req)
    if choice.run_heldout:  # (-HASH: scored with other settings), also of its data given by --data.path (moved)
        return run / f"{prefix}heldout{suffix}"
    # other data, or the run's split another way: named after the file scored, and a hash of its full path, its
    # bytes and how its rows were chosen (two test.jsonl, two seeds, or an edited file never share a folder)
    path = cfg.data.test_path or cfg.data.path
    source = str(absolute_path(resolve_data_path(path)))
    how = [cfg.seed, *(getattr(cfg.data, k) for k in SPLIT_KEYS[2:])] if cfg.data.test_path or choice.own_split \
        else []
    chosen = json.dumps([source, choice.digest, *how])
    stem = re.sub(r"[^\w.-]+", "-", Path(source).stem).strip("-.") or "data"
    return run / f"{prefix}{stem}-{hashlib.sha256(chosen.encode()).hexdigest()[:8]}{suffix}"


# flags that only choose the rows (in the default folder's name already), what may run, or how rows are batched
# (the same scores, to float rounding), not how rows are scored
_ROW_FLAGS = {"seed", "model.trust_remote_code", "eval.batch_size", "eval.max_batch_tokens",
              *(f"data.{k}" for k in SPLIT_KEYS)}


def _settings_suffix(req: EvalRequest) -> str:
    """"" for the run's own settings; else "-" and a hash of the flags that change how rows are scored (the
    length normalisation, data.max_length, the prompt, the classes ...) and of a --config file's bytes: two
    evaluations scored differently never share a default folder, and the same command again replaces its own."""
    flags = {k: v for k, v in sorted(req.overrides.items()) if k not in _ROW_FLAGS}
    recipe = hashlib.sha256(Path(req.config_file).read_bytes()).hexdigest() if req.config_file else None
    if not flags and recipe is None:
        return ""
    return "-" + hashlib.sha256(json.dumps([flags, recipe], default=str).encode()).hexdigest()[:8]


def _score(launched: Launched, choice: DataChoice, data: EvalData, out: Path, reserved: EvalDir | None) -> dict:
    """Score `data` and write the reports to `out` (the main process has it `reserved`)."""
    accelerator, cfg, info = launched.accelerator, choice.cfg, choice.run.info
    weights, base = info.weights_dir, base_model_config(cfg, choice.run)
    class_task = is_class_task(cfg.data)
    own_tokenizer = (weights / "tokenizer_config.json").is_file()
    if not own_tokenizer or (weights / "adapter_config.json").is_file():  # the base model is read
        prepare_builtin_model(base, accelerator)  # a built-in one: its cache checked, rebuilt if cleared
    tok_dir = weights if own_tokenizer else resolve_model_path(base)
    tokenizer = load_tokenizer(str(tok_dir), cfg.model.trust_remote_code)
    test_set, stats = tokenize_examples(data.test, tokenizer, cfg.data)
    if stats.dropped:
        accelerator.print(f"fittune: {count_rows(stats.dropped)} do not fit data.max_length and are not evaluated")
    if stats.truncated:  # as training says it: the model sees these prompts without their start
        accelerator.print(f"fittune: NOTE: {prompts_cut_note(stats.truncated)} (data.max_length is "
                          f"{cfg.data.max_length})")
    if not test_set:
        raise FittuneError("no example to evaluate fits data.max_length")
    model = _load_model(launched, weights, base)
    compare = {}
    if data.train and any(x.candidates for x in test_set):
        train_set, _ = tokenize_examples(data.train, tokenizer, cfg.data)
        if baseline := majority_of(train_set, test_set, class_task):
            compare["majority"] = baseline
            accelerator.print(f"fittune: {majority_note(baseline)}")
    if accelerator.is_main_process and (out / "metrics.json").is_file():
        print(f"fittune: replacing the previous evaluation in {out} (its evaluation.json said what it was)",
              flush=True)
    # what was scored, and how, in full: two evaluations can be told apart from their evaluation.json alone
    about = {"model": str(weights.resolve()), "data": data.source, "data_sha256": choice.digest,
             "data_config": cfg.data.model_dump(mode="json"), "mixed_precision": launched.precision.mixed}
    # the column training's own report names it (comparison.json keys alike); any other model is "model"
    column = "fine-tuned" if info.config_file is not None else "model"
    metrics = evaluate_and_report(model, launched, cfg, tokenizer, test_set, class_task,
                                  reserved or out, column, compare, about)
    accelerator.print(f"fittune: evaluated {weights} on {len(test_set)} examples ({data.source}) "
                      f"with {accelerator.num_processes} process(es)\n" + metrics_table({**compare, column: metrics}))
    if accelerator.is_main_process:
        files = ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))  # not marker, lock
        print(f"fittune: wrote {out}/ ({files})", flush=True)
    return metrics


def _load_model(launched: Launched, weights: Path, cfg: Config):
    """The saved weights, loaded and placed as the launch's strategy says, ready for forward passes."""
    accelerator, strategy, dtype = launched.accelerator, launched.strategy, weights_dtype(cfg, launched.precision)
    model = load_trained_model(weights, cfg, dtype)
    if strategy.device_map:  # strategy_of refused a device map under a distributed launch
        place_model(model, cfg.model.max_memory, dtype, training=False)
    if strategy.deepspeed:
        # ZeRO-3 loaded the weights partitioned: only the engine's hooks gather them for a forward pass
        configure_deepspeed(accelerator, strategy, cfg.eval.batch_size, 1, 0.0)
        return accelerator.prepare(model)
    # a device map placed the model already (even all on one device): accelerate must not move it
    return accelerator.prepare_model(model, device_placement=not strategy.device_map, evaluation_mode=True)
