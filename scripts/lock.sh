#!/usr/bin/env bash
# Print a lock (constraints file) of what the venv $1 holds, local version labels (+cpu) left out.
set -euo pipefail
cd "$(dirname "$0")/.."
sed -n '/^#/p' constraints.txt
"$1/bin/python" -m pip freeze --all --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$//' | sort -f
