#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for trying distinf's multi-node paths without a cluster.
#   cluster/local_cluster.sh start [NODES]   head + NODES-1 worker nodes, 1 CPU each, on 127.0.0.1:6379
#   cluster/local_cluster.sh stop
# Then: RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- distinf run jobs/demo.yaml \
#         --set runtime.address=auto
set -euo pipefail
RAY=${RAY:-$(dirname "$0")/../.venv/bin/ray}
PORT=${RAY_PORT:-6379}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

case "${1:-}" in
  start)
    nodes=${2:-2}
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=1 \
      --dashboard-host=127.0.0.1 --include-dashboard=true --disable-usage-stats
    for ((i = 1; i < nodes; i++)); do
      "$RAY" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 --disable-usage-stats
    done
    echo "Ray cluster with $nodes node(s) at 127.0.0.1:$PORT; jobs API at http://127.0.0.1:8265"
    ;;
  stop)
    "$RAY" stop --force
    ;;
  *)
    echo "usage: $0 start [NODES] | stop" >&2
    exit 2
    ;;
esac
