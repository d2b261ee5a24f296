# `make demo` and `make test` work on a fresh machine with Python >= 3.10 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Without CUDA, the CPU build of torch: a bare `torch` would pull gigabytes of CUDA packages.
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The main job: LoRA on the Alpaca subset (CPU, 200 steps), held-out eval, a report with the
# base model's answers beside the adapter's.
# It replaces its own earlier output (runs/lora-alpaca, runs/lora-alpaca-report).
demo: setup
	$(VENV)/bin/peftkit train lora-alpaca --overwrite
	$(VENV)/bin/peftkit eval smollm2-135m --tasks alpaca-heldout --limit 100 --out runs/lora-alpaca-base/eval.json
	$(VENV)/bin/peftkit compare runs/lora-alpaca --base-eval runs/lora-alpaca-base/eval.json \
		--out runs/lora-alpaca-report --overwrite

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: setup
	HF_HUB_OFFLINE=1 $(PY) bench/lora_step.py
	HF_HUB_OFFLINE=1 $(PY) bench/qlora.py
	HF_HUB_OFFLINE=1 $(PY) bench/prefix.py
