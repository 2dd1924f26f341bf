# The two set-up commands of the README:
#   make demo   installs fittune and runs the offline demo (tiny model, built-in data, any CPU)
#   make test   installs fittune with its test dependencies and runs the test suite
PYTHON ?= python3
# torch is installed only when missing: keep a CUDA build you already have; on a fresh CPU machine
# this takes the CPU wheel (set TORCH_SPEC/TORCH_PIP_ARGS, e.g. --index-url https://download.pytorch.org/whl/cpu)
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install install-test demo test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e .

install-test: install
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	$(PYTHON) -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no train.py

test: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q
