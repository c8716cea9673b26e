# The image every distinf pod runs: the Ray head, the GPU workers and the nightly submitter.
#   docker build -t ghcr.io/your-org/distinf:0.1.0-ray2.60.0 .
# RAY_VERSION must equal `rayVersion` in cluster/kuberay/*.yaml and the `ray2.60.0` in their image
# tag (tests/test_cluster_files.py checks all three); the base image already holds that Ray, and the
# constraint below keeps pip from replacing it while it installs distinf's other dependencies.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu
ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
ARG DEEPSPEED_VERSION=0.19.8

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
RUN echo "ray[default]==${RAY_VERSION}" > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt "torch==${TORCH_VERSION}" \
 && DS_BUILD_OPS=0 pip install -c /tmp/constraints.txt --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
# Dependencies first (cached across code changes), then the code.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users distinf ./distinf
RUN pip install -c /tmp/constraints.txt ".[s3]" \
 && python -c "import ray, sys; sys.exit(ray.__version__ != '${RAY_VERSION}')"
# Job files and the cluster scripts ride in the image (the nightly submitter is distinf.nightly_submitter).
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users cluster ./cluster
