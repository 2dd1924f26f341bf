"""Command-line parsing shared by train.py and evaluate.py: `--config FILE` plus dotted overrides."""

from __future__ import annotations

import sys

from fittune.config import Config, build_config, help_text, parse_overrides
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


def parse_args(argv: list[str], prog: str) -> Config:
    """`[--config FILE] [--section.key VALUE ...]` -> validated Config (FittuneError on any problem)."""
    if "-h" in argv or "--help" in argv:
        print(f"usage: accelerate launch {prog} [--config FILE] [--section.key VALUE ...]\n\nconfig keys:")
        print(help_text())
        sys.exit(0)
    config_file, rest = split_flag(argv, "config")
    if config_file is None and prog == "train.py":
        config_file = str(DEMO_RECIPE)  # no recipe given: the offline demo
        print(f"fittune: no --config given: running the offline demo recipe {DEMO_RECIPE}", flush=True)
    return build_config(config_file, parse_overrides(rest))
