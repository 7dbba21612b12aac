# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint format bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: these builds are on local disk; anything else would download GBs.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]' torch==2.14.1 torchvision==0.29.1
	# DeepSpeed's CPU comm op, built once into this venv (not by the first training run).
	$(BIN)/python -m vlm.runtime build-ops
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/vlm demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check vlm pipelines tests bench
	$(BIN)/ruff format --check vlm pipelines tests bench

format: $(STAMP)
	$(BIN)/ruff format vlm pipelines tests bench
	$(BIN)/ruff check --fix vlm pipelines tests bench

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train_clip.py
	$(BIN)/python bench/zero_memory.py
	$(BIN)/python bench/capfilt.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/flamingo_1b.py

# On a GPU machine: every GPU path measured in one table (bench/results/gpu_check.json), then the
# CUDA-only tests. Without a GPU the first line says so and exits 2 (its --cpu-dry-run is in `make test`).
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py
	$(BIN)/python -m pytest tests/test_gpu.py -q -m gpu

clean:
	rm -rf demo_out mlruns.db mlartifacts bench/results .pytest_cache
