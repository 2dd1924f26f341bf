"""Evaluate a fine-tuned model (or adapter) on held-out data, across all processes.

    accelerate launch [--config_file accelerate_configs/X.yaml] evaluate.py --checkpoint DIR [--config FILE]
        [--output_dir DIR] [--key value ...]

DIR is a training output dir, its final/, or any model/adapter directory. Without --config the run's saved
config.yaml and held-out ids are reused (never its model.trust_remote_code); --data.path evaluates another file.
"""

import sys

from fittune.entry import run_cli
from fittune.launch import install_parent_death_signal


def main() -> None:
    """Evaluate the checkpoint the command line names, as its recipe (or --config) says."""
    install_parent_death_signal()  # a launcher killed from here on still ends this process
    from fittune.evaluate_cli import evaluate_main

    evaluate_main(sys.argv[1:])


if __name__ == "__main__":
    run_cli(main)
