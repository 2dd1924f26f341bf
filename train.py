"""Fine-tune a causal LM with fittune.

    accelerate launch [--config_file accelerate_configs/X.yaml] train.py [--config configs/Y.yaml] [--key value ...]

With no arguments it runs the offline demo (tiny Qwen2 model, built-in AI-research QA set).
`python train.py --help` lists every config key with its default and meaning.
"""

import sys

from fittune.cli import parse_args
from fittune.entry import run_cli
from fittune.launch import install_parent_death_signal


def main() -> int:
    """Train with the recipe and flags of the command line; the exit code (143 after a SIGTERM's checkpoint)."""
    install_parent_death_signal()  # first: a launcher killed from here on still reaches this process
    if "--plan" in sys.argv[1:]:  # predict memory for every strategy instead of training
        from fittune.plan import exit_code, plan_main

        return exit_code(plan_main([a for a in sys.argv[1:] if a != "--plan"]))
    cfg = parse_args(sys.argv[1:], prog="train.py")
    if cfg is None:  # --help
        return 0
    from fittune.recipe import train  # after parsing: --help and config errors answer without importing torch

    return train(cfg).exit_code


if __name__ == "__main__":
    run_cli(main)
