#!/usr/bin/env bash
# One setting of the fair LDS protocol (benchmarks/quality/lds_fair.py) end to end, in three phases that
# each fit one turn of the shared heavy lock:
#   export: train the attributed models and retrain the subsets, write <DIR>/<SETTING>-s<seed>/<SETTING>.pt
#   peers:  kronfluence EK-FAC (several dampings) and TRAK (k × λ grid) scores from those files (.venv-peers)
#   table:  distinf's grid and the peers' files, tuned on the validation half -> <DIR>/<SETTING>.md
# usage: benchmarks/quality/lds_fair_peers.sh PHASE SETTING "SEEDS" DIR [lds_fair.py arguments]
# env: TRAK_KS ("512 2048"), TRAK_DAMPINGS ("0.01 0.1 1"),
#      EKFAC_DAMPINGS ("default heuristic heuristic=0.01 heuristic=1"), PY (.venv/bin/python),
#      PEERS_PY (.venv-peers/bin/python), THREADS (1, the peers' torch threads), TRAK_BATCH (500)
#   flock /tmp/distinf-heavy.lock nice -n 5 benchmarks/quality/lds_fair_peers.sh export lora "0 1" /tmp/fair --n-train 200
set -euo pipefail
cd "$(dirname "$0")/../.."
PHASE=$1 SETTING=$2 SEEDS=$3 DIR=$4
shift 4
PY=${PY:-.venv/bin/python}
PEERS_PY=${PEERS_PY:-.venv-peers/bin/python}
TRAK_KS=${TRAK_KS:-512 2048}
TRAK_DAMPINGS=${TRAK_DAMPINGS:-0.01 0.1 1}
EKFAC_DAMPINGS=${EKFAC_DAMPINGS:-default heuristic heuristic=0.01 heuristic=1}
case $PHASE in
export)
    "$PY" -m benchmarks.quality.lds_fair --setting "$SETTING" --seeds $SEEDS --peer-dir x --export "$DIR/$SETTING-s{seed}" "$@" ;;
peers)
    for seed in $SEEDS; do
        D=$DIR/$SETTING-s$seed
        "$PEERS_PY" -m benchmarks.peers.lds_peer "$D/$SETTING.pt" --out "$D/ekfac.npy" --ekfac-damping $EKFAC_DAMPINGS --threads "${THREADS:-1}"
        for k in $TRAK_KS; do for d in $TRAK_DAMPINGS; do
            "$PEERS_PY" -m benchmarks.peers.lds_peer "$D/$SETTING.pt" --method trak --k "$k" --damping "$d" \
                --batch-size "${TRAK_BATCH:-500}" --threads "${THREADS:-1}" --out "$D/trak-k$k-d$d.npy"
        done; done
    done ;;
table)
    "$PY" -m benchmarks.quality.lds_fair --setting "$SETTING" --seeds $SEEDS --peer-dir "$DIR/$SETTING-s{seed}" \
        --out "$DIR/$SETTING.md" "$@" ;;
*)
    echo "PHASE must be export, peers or table, not '$PHASE'" >&2; exit 2 ;;
esac
