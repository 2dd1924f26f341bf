"""Command-line parsing shared by train.py and evaluate.py: `--config FILE` plus dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fittune.config import (
    BUILTIN_DATA,
    Config,
    build_config,
    help_text,
    parse_overrides,
)
from fittune.errors import FittuneError
from fittune.tiny import DEMO_DATA

DEMO_RECIPE = DEMO_DATA.parent / "demo.yaml"


def split_flag(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """Remove `--name VALUE` (or `--name=VALUE`) from argv; return (value, rest)."""
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
    return value, rest


@dataclass(frozen=True)
class DemoRecipe:
    """What a command without --config takes from the demo recipe, and the line that says so."""

    path: str
    skip_sections: tuple[str, ...]
    note: str


def demo_recipe(overrides: dict[str, Any], shown: str | None = None, verb: str = "running") -> DemoRecipe:
    """The demo recipe for a command without --config. When the user brings their own data (`data.path`),
    its data section (the demo set's column mapping) is skipped: the data settings start from the defaults,
    so no column the user never named is looked for. `shown`: the recipe path to print."""
    shown = shown or str(DEMO_RECIPE)
    own = overrides.get("data.path") not in (None, BUILTIN_DATA)
    if not own:
        return DemoRecipe(str(DEMO_RECIPE), (), f"no --config given: {verb} the offline demo recipe {shown} "
                                                 f"(every setting not given on the command line comes from it)")
    return DemoRecipe(str(DEMO_RECIPE), ("data",),
                      f"no --config given and data.path is your own: the data settings start from the defaults "
                      f"(question_column 'question', answer_column 'answer', no choices or label column; set yours "
                      f"with --data.KEY), every other setting comes from the offline demo recipe {shown}")


def parse_args(argv: list[str], prog: str) -> Config | None:
    """`[--config FILE] [--section.key VALUE ...]` -> validated Config (FittuneError on any problem);
    None after printing the help for `-h` / `--help`."""
    if "-h" in argv or "--help" in argv:
        print(f"usage: accelerate launch {prog} [--config FILE] [--section.key VALUE ...]\n\nconfig keys:")
        print(help_text())
        return None
    config_file, rest = split_flag(argv, "config")
    overrides = parse_overrides(rest)
    skip: tuple[str, ...] = ()
    if config_file is None and prog == "train.py":  # no recipe given: the offline demo
        recipe = demo_recipe(overrides)
        print(f"fittune: {recipe.note}", flush=True)
        config_file, skip = recipe.path, recipe.skip_sections
    return build_config(config_file, overrides, skip)
