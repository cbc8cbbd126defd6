# Quick start:  make demo   (install, then run the demo recipe end to end)
#               make test   (install, then run the test suite)
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# A CPU build of torch is installed first when no torch is present, so that the
# range in pyproject.toml does not pull a multi-GB CUDA build on a CPU machine.
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_CPU)"
	@$(PIP) install -q -e ".[dev]"

demo: install
	$(PYTHON) -m dsq run recipes/demo.yaml

test: install
	$(PYTHON) -m pytest -q
