#!/usr/bin/env bash
# Separate environment for the peer-tools benchmark (benchmarks/peers/peers.py): .venv-peers.
# CPU torch first (from local disk), then the peers with torch pinned so nothing pulls a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-peers
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install torch==2.13.0
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ else 'not a CPU torch: ' + torch.__version__)"

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
cat > "$CONSTRAINTS" <<PINS
torch==2.13.0
transformers==5.24.0
safetensors==0.8.0
tokenizers==0.23.3
huggingface_hub==2.4.0
numpy==2.4.6
PINS
"$PIP" install -c "$CONSTRAINTS" transformers==5.24.0 safetensors==0.8.0 pyarrow \
    bergson==2.5.1 kronfluence==1.0.1 dattri==0.3.0 traker==0.3.2 peft==0.21.2
# logix-ai 0.1.1 declares Requires-Python <3.11; this machine has 3.11. Its own deps
# (einops, numpy, pyyaml, torch, tqdm) are already present, so it goes in without them.
"$PIP" install -c "$CONSTRAINTS" --no-deps --ignore-requires-python logix-ai==0.1.1
# PyPI's torchvision/torchaudio (pulled by bergson, dattri, kronfluence, traker) are CUDA builds
# for other torch versions: their compiled ops fail to load against torch 2.13.0+cpu and break
# `import transformers` (torchvision::nms does not exist). No peer path measured here uses them.
"$PIP" uninstall -y torchvision torchaudio
"$VENV/bin/python" -c "import torch, bergson, logix, kronfluence, dattri, trak; assert '+cpu' in torch.__version__; print('peers env ok, torch', torch.__version__)"
