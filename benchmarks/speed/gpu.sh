#!/usr/bin/env bash
# distinf gradient extraction on one GPU (issue 15 item 4), one prepared script, under 8 minutes:
# the gradient worker's own setup + compress path (distinf.runtime.shard.GradientShard, what the
# Ray actor runs, here without Ray) on a random-initialised Pythia-1.4B-sized model written as a
# bf16 safetensors checkpoint: ZeRO-3 on one rank over NCCL, partitions streamed from the
# checkpoint, tokens/s of distinf capture against the frozen forward + backward floor, setup time,
# peak GPU memory. See benchmarks/speed/gpu_extraction.py for the method.
#
# The GPU machine has python 3.12, torch, transformers, pyarrow but no deepspeed
# and no package registry, so DeepSpeed travels as wheels in .whl/ (ignored by git):
#   benchmarks/speed/gpu.sh --prepare    on this (CPU) machine: puts deepspeed and the pure-Python
#                                  packages it needs into .whl/, from this virtualenv; says which
#                                  compiled wheel (pydantic-core for CPython 3.12) is still missing
#   benchmarks/speed/gpu.sh              on the GPU machine (device tool: carry [".whl"]); results in
#                                  $OUT (the device tool's folder) or runs/gpu/
# Without a usable deepspeed it measures the same thing on a plain model and the table says so.
# A check on any machine: DISTINF_GPU_SIZE=tiny DISTINF_GPU_DEVICE=cpu benchmarks/speed/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${DISTINF_GPU_WHEELS:-.whl}
PY=${PYTHON:-python3}

if [[ ${1:-} == --prepare ]]; then
    VENV_PY=${VENV_PY:-.venv/bin/python}
    mkdir -p "$WHEELS"
    # Rebuild each installed distribution as a wheel from its own RECORD (no registry needed).
    "$VENV_PY" - "$WHEELS" deepspeed hjson pydantic annotated-types typing-inspection typing-extensions <<'EOF'
import base64, csv, hashlib, sys, zipfile
from importlib.metadata import distribution
from pathlib import Path

out = Path(sys.argv[1])
for name in sys.argv[2:]:
    dist = distribution(name)
    info = Path(dist._path)  # the .dist-info folder
    tag = "py3-none-any"
    wheel = out / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-{tag}.whl"
    record_name = f"{info.name}/RECORD"
    rows = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in dist.files:
            path = str(file)
            if "__pycache__" in path or path.endswith(".pyc") or path == record_name or path.startswith(".."):
                continue
            if path.endswith(("INSTALLER", "direct_url.json", "REQUESTED")):
                continue
            data = Path(file.locate()).read_bytes()
            archive.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append([path, f"sha256={digest}", str(len(data))])
        text = "".join(",".join(r) + "\n" for r in rows) + f"{record_name},,\n"
        archive.writestr(record_name, text)
    compiled = [f for f in dist.files if str(f).endswith(".so")]
    print(f"{wheel}  ({len(rows)} files{'; HAS COMPILED FILES: not portable' if compiled else ''})")
EOF
    if ! ls "$WHEELS"/pydantic_core-*cp312*.whl >/dev/null 2>&1; then
        echo "still missing: pydantic-core for CPython 3.12 (compiled; this machine's is for $("$VENV_PY" -c 'import sys; print(sys.version.split()[0])'))."
        echo "where PyPI is reachable: $VENV_PY -m pip download --no-deps --only-binary=:all: --python-version 3.12" \
             "--implementation cp --platform manylinux_2_17_x86_64 -d $WHEELS" \
             "pydantic-core==$("$VENV_PY" -c 'import pydantic_core; print(pydantic_core.__version__)')"
        echo "without it the GPU run falls back to a plain model (no ZeRO-3) and says so."
    fi
    du -sh "$WHEELS"
    exit 0
fi

OUTDIR=${OUT:-${DISTINF_GPU_OUT:-runs/gpu}}
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1 && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
        && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" \
        || echo "note: installing $WHEELS/*.whl failed; measuring without ZeRO-3"
fi
"$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 || true
[[ -n ${DISTINF_GPU_DEVICE:-} && $DISTINF_GPU_DEVICE == cpu ]] && export DS_ACCELERATOR=cpu
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 6 min for the ZeRO-3 run; if it fails, what is left for a plain-model run, so the whole stays under 8.
set +e
timeout 360 "$PY" -m benchmarks.speed.gpu_extraction --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/log.txt"
status=${PIPESTATUS[0]}
if [[ $status -ne 0 ]]; then
    echo "the ZeRO-3 run failed (exit $status); measuring without ZeRO-3" | tee -a "$OUTDIR/log.txt"
    timeout 100 "$PY" -m benchmarks.speed.gpu_extraction --zero3 off --pairs 4 --warmup 2 --out "$OUTDIR" "$@" 2>&1 \
        | tee -a "$OUTDIR/log.txt"
    status=${PIPESTATUS[0]}
fi
exit "$status"
