"""fittune: fine-tune a large language model on the hardware you have, and evaluate it honestly.

The entry points are train.py, evaluate.py, `fittune-plan` and `fittune-export`; README.md
says how they fit together.
"""
