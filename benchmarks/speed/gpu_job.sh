#!/usr/bin/env bash
# One GPU, one call of at most 9 minutes (DISTINF_GPU_BUDGET, default 520 s), everything in $OUT:
#   1. the frozen forward + backward (the floor) and distinf's capture at k = 8,192 on a
#      Pythia-1.4B-shaped GPT-NeoX in bfloat16, in tokens/s and TFLOP/s against the chip's peak,
#      at DISTINF_GPU_STEP (default 16 × 512 tokens a step), under ZeRO-3 on one rank (the worker's own
#      setup, benchmarks/speed/gpu_extraction.py --zero3 on) and without it (zero_stage 0: --zero3 off);
#   2. the real job (`run_job`: Ray actor, ZeRO-3 over NCCL, Parquet, reducer, scoring) on a
#      random-initialised 1.07B Llama in bfloat16 with the demo corpus's length mix (max_length 48),
#      before (consecutive batches of 8) and after the token-budget steps (runtime.tokens_per_step
#      DISTINF_GPU_TOKENS_PER_STEP, default 8192), through benchmarks/speed/token_batching.py: examples/s of
#      the gradient pass, the compute's wait on chunk commits.
#
#   benchmarks/speed/gpu_job.sh --prepare   here: .whl/ (deepspeed and its pure-Python needs via
#                                     gpu.sh --prepare; ray 2.60.0 cp312 trimmed to fit by
#                                     benchmarks/speed/trim_wheel.py; jsonschema, referencing,
#                                     jsonschema-specifications, rpds-py cp312) and .gpu_assets/
#                                     (SmolLM2's tokenizer files and the texts, which come from
#                                     packages the GPU machine lacks); both ignored by git
#   benchmarks/speed/gpu_job.sh             there (device tool: carry [".whl", ".gpu_assets"],
#                                     timeout_s 560); in $OUT: gpu_job.log, extraction-zero3/ and
#                                     extraction-zero0/ (results.{json,md}), batching.{json,md}
# A check on a CPU machine (no install, tiny models, the same stages):
#   PYTHON=.venv/bin/python benchmarks/speed/gpu_job.sh --size tiny --device cpu
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=.whl
ASSETS=.gpu_assets
TRAIN=${DISTINF_GPU_TRAIN:-64}            # training texts per source (6 sources), plus 1 query each
RAY_WHEEL=${RAY_WHEEL:-/tmp/raywhl/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl}

if [[ ${1:-} == --prepare ]]; then
    set -e
    VENV_PY=${VENV_PY:-.venv/bin/python}
    benchmarks/speed/gpu.sh --prepare
    if [[ ! -f $RAY_WHEEL ]]; then
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux2014_x86_64 -d "$(dirname "$RAY_WHEEL")" ray==2.60.0
    fi
    python3 -m benchmarks.speed.trim_wheel "$RAY_WHEEL" "$WHEELS"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    HF_HUB_OFFLINE=1 "$VENV_PY" -m benchmarks.memory.scale --export-inputs "$ASSETS" --train-per-source "$TRAIN"
    tracked=$(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c)
    untracked=$(git ls-files -z --others --exclude-standard | xargs -0 cat 2>/dev/null | wc -c)
    carried=$(du -sb "$WHEELS" "$ASSETS" | awk '{s += $1} END {print s}')
    echo "travels: tracked $((tracked / 1048576)) MiB + untracked $((untracked / 1048576)) MiB +" \
         "carried $((carried / 1048576)) MiB = $(((tracked + untracked + carried) / 1048576)) MiB (limit 64)"
    exit 0
fi

SIZE=full
DEVICE=${DISTINF_GPU_DEVICE:-cuda}
while (( $# )); do
    case $1 in
        --size) SIZE=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        *) echo "unknown argument $1 (--prepare, --size tiny|full, --device cuda|cpu)"; exit 2 ;;
    esac
done

BUDGET=${DISTINF_GPU_BUDGET:-520}
OUTDIR=${OUT:-${DISTINF_GPU_OUT:-runs/gpu_job}}
mkdir -p "$OUTDIR"
exec > >(tee -a "$OUTDIR/gpu_job.log") 2>&1
left() { echo $((BUDGET - SECONDS)); }
stage() { echo; echo "=== $* (t = ${SECONDS} s, $(left) s left)"; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
export DS_ACCELERATOR=$DEVICE
if [[ $SIZE == tiny ]]; then
    NEOX=tiny LLAMA=llama-tiny STEP=(--batch 2 --tokens 32) PAIRS=(--pairs 2 --warmup 1) TRAIN=${DISTINF_GPU_TRAIN:-4}
else
    NEOX=pythia-1.4b LLAMA=llama-1b STEP=(${DISTINF_GPU_STEP:---batch 16 --tokens 512}) PAIRS=(--pairs 4 --warmup 2)
fi
[[ $DEVICE == cpu ]] && : "${DISTINF_GPU_INSTALL:=0}"

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

# Each stage's share of the budget; a stage that overruns is stopped and the next one still runs.
extraction() {  # $1: on | off (ZeRO-3), $2: seconds
    stage "floor and capture at $NEOX, ZeRO-3 $1: benchmarks/speed/gpu_extraction.py"
    timeout -k 5 "$2" "$PY" -m benchmarks.speed.gpu_extraction --size "$NEOX" --device "$DEVICE" --zero3 "$1" --ks 8192 \
        "${STEP[@]}" "${PAIRS[@]}" --out "$OUTDIR/extraction-zero$([[ $1 == on ]] && echo 3 || echo 0)"
    echo "gpu_extraction.py --zero3 $1: exit $?"
}
extraction on "${DISTINF_GPU_ZERO3_S:-150}"
extraction off "${DISTINF_GPU_ZERO0_S:-90}"

stage "the job on $LLAMA, before and after token-budget steps: benchmarks/speed/token_batching.py"
# The model and the runs go to a work folder, so that $ASSETS (carried) holds only the inputs.
WORK=${DISTINF_GPU_WORK:-/tmp/distinf-gpu-job}
mkdir -p "$WORK" && { [[ -d $ASSETS/scale ]] && cp -r "$ASSETS/scale" "$WORK/" || echo "no $ASSETS/scale: texts from the packages"; }
timeout -k 10 $(( $(left) - 10 )) "$PY" -m benchmarks.speed.token_batching --model "$LLAMA" --device "$DEVICE" --workers 1 \
    --layouts "before,token budget" --train-per-source "$TRAIN" --max-length 48 --batch 8 \
    --tokens-per-step "${DISTINF_GPU_TOKENS_PER_STEP:-8192}" --chunk-examples 256 --k 8192 --assets "$WORK" \
    --json "$OUTDIR/batching.json" --out "$OUTDIR/batching.md"
job_status=$?
echo "token_batching.py exit $job_status"
# Whatever a killed job left running, on the GPU machine only (elsewhere other Ray sessions may be someone else's).
[[ $DEVICE == cuda ]] && { "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true; }

stage "done: job exit $job_status"
cat "$OUTDIR"/extraction-zero*/results.md 2>/dev/null
ls -la "$OUTDIR" "$OUTDIR"/extraction-zero* 2>/dev/null
exit "$job_status"
