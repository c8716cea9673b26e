# `make test` on a fresh machine: creates .venv, installs the tested versions, runs pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK := constraints.txt
export DS_ACCELERATOR := cpu
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all test-latest lock demo bench clean

install: $(VENV)/.installed

# Every step through the lock (constraints.txt): the versions the suite passed with. torch first,
# so no later step pulls another build; with torch==2.13.0 pip takes whichever build this machine
# offers (the CPU file on local disk here, a CUDA build from PyPI on most Linux machines), and both
# run the tests. DeepSpeed then builds against that torch as pure Python (no compiled ops).
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	VENV=$(VENV) LOCK=$(LOCK) bash scripts/install.sh
	touch $@

test: install
	$(PY) -m pytest -q

test-all: install
	DISTINF_SLOW=1 $(PY) -m pytest -q

# The newest versions pyproject.toml allows, in a venv of their own; when the suite passes there,
# constraints.txt moves forward to them (review with `git diff constraints.txt`).
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	VENV=.venv-latest LOCK= bash scripts/install.sh
	.venv-latest/bin/python -m pytest -q
	$(MAKE) lock VENV=.venv-latest

lock:
	bash scripts/lock.sh $(VENV) > $(LOCK).new && mv $(LOCK).new $(LOCK)

demo: install
	$(PY) -m distinf.demo

bench: install
	$(PY) -m benchmarks.speed.compress_overhead

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache
