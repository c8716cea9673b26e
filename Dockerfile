# The image every distinf pod runs: the Ray head, the GPU workers and the nightly submitter.
#   docker build -t ghcr.io/your-org/distinf:0.1.0-ray2.60.0 .
# RAY_VERSION must equal `rayVersion` in cluster/kuberay/*.yaml, the `ray2.60.0` in their image tag
# and the ray pin in constraints.txt (tests/test_cluster_files.py checks all four); the base image
# already holds that Ray, and the lock keeps pip from replacing it.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu
ARG RAY_VERSION

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1

# WORKDIR creates a missing folder as root under the classic builder and kaniko; pip runs as ray.
USER root
RUN mkdir -p /app && chown ray:users /app
USER ray
WORKDIR /app

# Every pip step through the lock: the versions the test suite passed with. torch==2.13.0 from
# PyPI is its CUDA build; DeepSpeed builds against it as pure Python (no compiled ops).
COPY --chown=ray:users constraints.txt ./
RUN pip install -c constraints.txt torch \
 && DS_BUILD_OPS=0 pip install -c constraints.txt --no-build-isolation deepspeed
# Dependencies first (cached across code changes), then the code.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users distinf ./distinf
RUN pip install -c constraints.txt ".[s3]" \
 && python -c "import ray, sys; sys.exit(ray.__version__ != '${RAY_VERSION}')"
# Job files and the cluster scripts ride in the image (the nightly submitter is distinf.nightly_submitter).
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users cluster ./cluster
