#!/usr/bin/env bash
# The real job on one GPU machine: `distinf run` with runtime.device: cuda (Ray actors, DeepSpeed
# ZeRO-3 over NCCL, Parquet chunks, the reducer, scoring tasks) on a random-initialised 1.07B Llama
# in bfloat16, through benchmarks/scale.py; then, if time is left, benchmarks/gpu_extraction.py
# (the worker's setup + compress path without Ray: tokens/s against the forward + backward floor).
# One prepared script for the device tool, ending inside DISTINF_GPU_BUDGET seconds (default 400).
#
#   benchmarks/gpu_job.sh --prepare   here: .whl/ (deepspeed and its pure-Python needs via
#                                     gpu.sh --prepare; ray 2.60.0 cp312 trimmed to fit by
#                                     benchmarks/trim_wheel.py; jsonschema, referencing,
#                                     jsonschema-specifications, rpds-py cp312) and .gpu_assets/
#                                     (SmolLM2's tokenizer files and the texts, which come from
#                                     packages the GPU machine lacks); both ignored by git
#   benchmarks/gpu_job.sh             there (device tool: carry [".whl", ".gpu_assets"],
#                                     timeout_s 420); everything it writes is in $OUT:
#                                     gpu_job.log, scale.json, scale.md, manifest.json,
#                                     distinf-run.log, ray-logs.tgz, extraction/results.{json,md}
# A check on a CPU machine (no install, a tiny model):
#   DISTINF_GPU_DEVICE=cpu DISTINF_GPU_MODEL=llama-tiny DISTINF_GPU_INSTALL=0 PYTHON=.venv/bin/python \
#     DISTINF_GPU_BUDGET=300 benchmarks/gpu_job.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl
ASSETS=.gpu_assets
TRAIN=${DISTINF_GPU_TRAIN:-64}            # training texts per source (6 sources), plus 1 query each
RAY_WHEEL=${RAY_WHEEL:-/tmp/raywhl/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl}

if [[ ${1:-} == --prepare ]]; then
    set -e
    VENV_PY=${VENV_PY:-.venv/bin/python}
    benchmarks/gpu.sh --prepare
    if [[ ! -f $RAY_WHEEL ]]; then
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux2014_x86_64 -d "$(dirname "$RAY_WHEEL")" ray==2.60.0
    fi
    python3 benchmarks/trim_wheel.py "$RAY_WHEEL" "$WHEELS"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    HF_HUB_OFFLINE=1 "$VENV_PY" benchmarks/scale.py --export-inputs "$ASSETS" --train-per-source "$TRAIN"
    tracked=$(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c)
    untracked=$(git ls-files -z --others --exclude-standard | xargs -0 cat 2>/dev/null | wc -c)
    carried=$(du -sb "$WHEELS" "$ASSETS" | awk '{s += $1} END {print s}')
    echo "travels: tracked $((tracked / 1048576)) MiB + untracked $((untracked / 1048576)) MiB +" \
         "carried $((carried / 1048576)) MiB = $(((tracked + untracked + carried) / 1048576)) MiB (limit 64)"
    exit 0
fi

BUDGET=${DISTINF_GPU_BUDGET:-400}
DEVICE=${DISTINF_GPU_DEVICE:-cuda}
MODEL=${DISTINF_GPU_MODEL:-llama-1b}
OUTDIR=${OUT:-${DISTINF_GPU_OUT:-runs/gpu_job}}
mkdir -p "$OUTDIR"
exec > >(tee -a "$OUTDIR/gpu_job.log") 2>&1
left() { echo $((BUDGET - SECONDS)); }
stage() { echo; echo "=== $* (t = ${SECONDS} s, $(left) s left)"; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
export DS_ACCELERATOR=$DEVICE

stage "install"
if [[ ${DISTINF_GPU_INSTALL:-1} == 1 ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || echo "FAILED: installing $WHEELS/*.whl"
    export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi
"$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "deepspeed", "ray", "pydantic", "pyarrow", "numpy", "safetensors", "jsonschema"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as error:
        print(f"{name}: IMPORT FAILED: {type(error).__name__}: {error}")
import torch
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, torch.cuda.get_device_name(0), "nccl", torch.cuda.nccl.version())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
nproc; free -g | head -2; df -h /dev/shm /tmp | tail -2

stage "the job: benchmarks/scale.py --device $DEVICE --model $MODEL --workers 1"
# The model and the run go to a work folder, so that $ASSETS (carried) holds only the inputs.
WORK=${DISTINF_GPU_WORK:-/tmp/distinf-gpu-job}
mkdir -p "$WORK" && cp -r "$ASSETS/scale" "$WORK/"
# The job's share: all but what the extraction needs (~110 s), and never past the budget.
job_limit=$(( $(left) - ${DISTINF_GPU_EXTRACTION_S:-110} ))
(( job_limit < 120 )) && job_limit=$(( $(left) - 20 ))
timeout -k 10 "$job_limit" "$PY" benchmarks/scale.py --assets "$WORK" --device "$DEVICE" --model "$MODEL" \
    --workers 1 --train-per-source "$TRAIN" --tokens "${DISTINF_GPU_TOKENS:-128}" --batch "${DISTINF_GPU_BATCH:-8}" \
    --k "${DISTINF_GPU_K:-65536}" --json "$OUTDIR/scale.json" --out "$OUTDIR/scale.md"
job_status=$?
echo "scale.py exit $job_status"
dtype=$([[ $DEVICE == cuda ]] && echo "-bfloat16" || true)
run_root="$WORK/scale/runs/$MODEL$dtype-w1"
cp "$run_root/run/manifest.json" "$OUTDIR/manifest.json" 2>/dev/null || echo "no manifest in $run_root/run"
cp "$run_root/distinf-run.log" "$OUTDIR/distinf-run.log" 2>/dev/null || echo "no distinf-run.log in $run_root"
# Whatever a killed job left running, on the GPU machine only (elsewhere other Ray sessions may be someone else's).
[[ $DEVICE == cuda ]] && { "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true; }
if [[ -d /tmp/ray/session_latest/logs ]]; then
    tar -czf "$OUTDIR/ray-logs.tgz" -C /tmp/ray/session_latest logs 2>/dev/null
    if (( $(stat -c %s "$OUTDIR/ray-logs.tgz") > 15000000 )); then
        tar -czf "$OUTDIR/ray-logs.tgz" -C /tmp/ray/session_latest --wildcards 'logs/*.err' 'logs/*.out' 2>/dev/null
    fi
fi
[[ -f $OUTDIR/scale.md ]] && cat "$OUTDIR/scale.md"

stage "extraction: benchmarks/gpu_extraction.py"
extraction_status=skipped
if (( $(left) > 60 )); then
    if [[ $DEVICE == cuda ]]; then
        args=(--pairs 6 --warmup 2)
    else
        args=(--size tiny --device cpu --tokens 32 --batch 2 --pairs 2 --warmup 1 --ks 64,256)
    fi
    timeout -k 5 $(( $(left) - 15 )) "$PY" benchmarks/gpu_extraction.py --out "$OUTDIR/extraction" "${args[@]}"
    extraction_status=$?
    if [[ $extraction_status != 0 ]] && (( $(left) > 45 )); then
        echo "the worker-path extraction failed (exit $extraction_status); the same without ZeRO-3"
        timeout -k 5 $(( $(left) - 10 )) "$PY" benchmarks/gpu_extraction.py --zero3 off --out "$OUTDIR/extraction" \
            "${args[@]}" --pairs 3
        extraction_status="$extraction_status, then without ZeRO-3: $?"
    fi
else
    echo "skipped: $(left) s left"
fi

stage "done: job exit $job_status, extraction exit $extraction_status"
ls -la "$OUTDIR" "$OUTDIR/extraction" 2>/dev/null
exit "$job_status"
