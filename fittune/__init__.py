"""fittune: fine-tune a large language model on the hardware you have, and evaluate it honestly.

The entry points are train.py, evaluate.py, `python -m fittune.plan` and `python -m fittune.export`; README.md
says how they fit together.
"""
