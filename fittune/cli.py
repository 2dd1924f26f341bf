"""Command-line parsing shared by train.py and evaluate.py: `--config FILE` plus dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fittune.config import (
    BUILTIN_DATA,
    COMMAND_ONLY,
    DATA_MAPPING_KEYS,
    DEMO_DATA,
    Config,
    DataConfig,
    build_config,
    expand_home,
    help_text,
    parse_overrides,
    recipe_columns,
    recipe_data_path,
)
from fittune.errors import FittuneError
from fittune.launcher_env import is_launch_main
from fittune.rundir import RunLayout, owned
from fittune.sources import peek_columns

DEMO_RECIPE = DEMO_DATA.parent / "demo.yaml"


class FlagValue(NamedTuple):
    """A flag's value taken out of a command line, and the rest of it (unpacks as `value, rest`)."""

    value: str | None
    rest: list[str]


def split_flag(argv: list[str], name: str) -> FlagValue:
    """Remove `--name VALUE` (or `--name=VALUE`) from argv; return (value, rest). The flags taken this way
    name files or numbers: a leading `~` is expanded (`--output=~/x` reaches no shell expansion)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{name}":
            if i + 1 >= len(argv):
                raise FittuneError(f"--{name} needs a value")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return FlagValue(expand_home(value), rest)


@dataclass(frozen=True)
class RecipeChoice:
    """The recipe file a command reads, what of it is skipped, and the line that says so (None: nothing)."""

    path: str | None
    skip: tuple[str, ...]
    note: str | None

    def announce(self) -> None:
        """Print the note, once per launch (rank 0), not once per process."""
        if self.note and is_launch_main():
            print(f"fittune: {self.note}", flush=True)


def choose_recipe(config_file: str | None, overrides: dict[str, Any]) -> RecipeChoice:
    """train.py's recipe: the --config file, or without one the offline demo recipe (said). When the recipe's
    data is the built-in set and the user brings their own (`data.path`), the recipe's column mapping, written
    for the built-in set's columns, is skipped: the mapping starts from the defaults, so no column the user
    never named is looked for; the recipe's other settings (max_length, test split, ...) still apply."""
    if config_file is None and (saved := resumed_recipe(overrides)) is not None:
        return saved
    if config_file is None and overrides.get("resume") and overrides.get("output_dir") is not None:
        # a requeue script's typo must not start the demo there: --resume without --config continues a run
        resume = overrides["resume"]
        source = "" if resume == "auto" else f"; {resume} does not exist" if not Path(expand_home(resume)).exists() \
            else f", nor a config.yaml fittune saved in the checkpoint {resume}"
        raise FittuneError(f"--resume without --config continues the run in {overrides['output_dir']}, and there is "
                           f"none there (no fittune config.yaml){source}: check the directories, or pass --config "
                           f"RECIPE to start a run there (with --resume auto it continues it when requeued)")
    recipe = config_file or str(DEMO_RECIPE)
    notes = [] if config_file else [f"no --config given: running the offline demo recipe {recipe} (every setting "
                                    f"not given on the command line comes from it)"]
    reset = own_data_mapping(recipe, overrides)
    return RecipeChoice(recipe, reset.skip, "; ".join(notes + ([reset.note] if reset.note else [])) or None)


def own_data_mapping(recipe: str, overrides: dict[str, Any]) -> RecipeChoice:
    """Your own `data.path` with a recipe (or a run's saved config) whose data is the built-in set: that mapping
    was written for the built-in set's columns. A file that has every column it names (the set moved, or data
    in its format) keeps it; otherwise its keys you did not give are skipped and the mapping starts from the
    defaults. Either is said in the returned note. train.py and evaluate.py both ask here."""
    path = overrides.get("data.path")
    if path in (None, BUILTIN_DATA) or recipe_data_path(recipe) != BUILTIN_DATA:
        return RecipeChoice(recipe, (), None)
    named = recipe_columns(recipe)
    if named <= (_file_columns(str(path), overrides) or set()):
        return RecipeChoice(recipe, (), f"data.path is your own and has the columns {recipe} maps for the built-in "
                                        f"set ({', '.join(sorted(named))}): that column mapping is kept")
    skip = tuple(f"data.{k}" for k in DATA_MAPPING_KEYS if f"data.{k}" not in overrides)
    return RecipeChoice(recipe, skip, f"data.path is your own and {recipe} maps the built-in set's columns "
                                      f"({', '.join(sorted(named))}), which it does not all have: the column "
                                      f"mapping starts from the defaults (question_column 'question', answer_column "
                                      f"'answer', no choices or label column; set yours with --data.KEY)")


def _file_columns(path: str, overrides: dict[str, Any]) -> set[str] | None:
    """The columns of a local data file, from its start (`sources.peek_columns`; None: not known cheaply)."""
    how = {k[5:]: v for k, v in overrides.items() if k in ("data.format", "data.csv_header", "data.column_names")}
    try:
        return peek_columns(DataConfig(path=path, **how))  # validated as training reads it: `~` expanded too
    except ValueError:  # pydantic's: the flags themselves are refused when the config is built
        return None


def resumed_recipe(overrides: dict[str, Any]) -> RecipeChoice | None:
    """`--resume ...` without --config: the saved recipe of the run in output_dir (RUN/config.yaml), not the
    demo's; else, going on from a checkpoint (`--resume PATH`), the recipe that checkpoint saved
    (PATH/config.yaml), into a new output_dir or, with none given, in its own run. Never their
    model.trust_remote_code (a run directory may come from elsewhere: only this command line grants that).
    None when neither is fittune's."""
    out, resume = overrides.get("output_dir"), overrides.get("resume")
    if not resume:
        return None
    run = RunLayout(Path(expand_home(str(out)))).config if out is not None else None
    if run is not None and run.is_file() and owned(run.parent, "train"):
        return _saved_recipe(run, "continuing with the run's own recipe")
    checkpoint = Path(expand_home(str(resume))) / "config.yaml"
    if resume != "auto" and checkpoint.is_file() and owned(checkpoint.parent, "checkpoint"):
        return _saved_recipe(checkpoint, "going on with the checkpoint's own recipe")
    return None


def _saved_recipe(saved: Path, what: str) -> RecipeChoice:
    # what each command grants for itself (trust, replacing a run) is never taken from the saved file
    return RecipeChoice(str(saved), COMMAND_ONLY, f"--resume without --config: {what} {saved} (every setting not "
                                                  f"given on the command line comes from it, except "
                                                  f"{', '.join(COMMAND_ONLY)})")


def parse_args(argv: list[str], prog: str) -> Config | None:
    """`[--config FILE] [--section.key VALUE ...]` -> validated Config (FittuneError on any problem);
    None after printing the help for `-h` / `--help`."""
    if "-h" in argv or "--help" in argv:
        plan = (f"\n`python {prog} --plan [--config FILE] [--gpus N --gpu-mem GIB --cpu-mem GIB]` predicts the "
                f"memory of every launch strategy instead of training (fittune-plan)." if prog == "train.py"
                else "")
        print(f"usage: accelerate launch {prog} [--config FILE] [--section.key VALUE ...]\n\nWithout --config, "
              f"{prog} runs the offline demo recipe {DEMO_RECIPE}: its values replace the defaults below.{plan}\n\n"
              f"config keys:")
        print(help_text())
        return None
    config_file, rest = split_flag(argv, "config")
    overrides = parse_overrides(rest)
    recipe = choose_recipe(config_file, overrides)
    recipe.announce()
    return build_config(recipe.path, overrides, recipe.skip)
