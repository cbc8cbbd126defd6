# Quick start:  make demo   (install, then run the demo recipe end to end)
#               make test   (install, then run the test suite)
# Installs take the exact versions in constraints.txt (the tested lock); pyproject.toml keeps
# ranges for users. `make test-latest` tests the newest versions those ranges allow instead.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
LOCK ?= constraints.txt
# torch first, from the lock (a CPU build on a CPU machine), so that the range in pyproject.toml
# does not pull a multi-GB CUDA build of the newest torch.
LATEST_VENV ?= .venv-latest

.PHONY: install demo test test-latest

install:
	@$(PIP) install -q -c $(LOCK) torch
	@$(PIP) install -q -c $(LOCK) -e ".[dev]"

demo: install
	$(PYTHON) -m dsq run recipes/demo.yaml

test: install
	$(PYTHON) -m pytest -q

# The newest versions pyproject.toml allows, torch included, in a fresh virtual environment
# (the newest torch on the index can be a CUDA build of several GB).
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -c "import importlib.metadata as m; print('versions:', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'compressed-tensors', 'bitsandbytes', 'peft', 'accelerate', 'datasets', 'onnx', 'onnxruntime', 'onnxscript', 'safetensors', 'pydantic', 'numpy')))"
	$(LATEST_VENV)/bin/python -m pytest -q
