#!/usr/bin/env bash
# Launch titan_rl training with torchrun (torchtitan style).
#
#   ./run_train.sh                                   # 1 process, train_configs/debug_cpu.toml (tool task)
#   ./run_train.sh --training.steps=5                # any --section.key=value override
#   NPROC=2 ./run_train.sh --parallelism.dp_shard=2  # 2 processes, FSDP over both
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=29500 NGPU=8 ./run_train.sh   # multi-node
#
# NGPU / NPROC: processes per node (default 1; CPU works). LOG_RANK: ranks that print (default 0).
# CONFIG_FILE: the TOML config. NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, RDZV_ID:
# multi-node rendezvous. Every config key: README.md, "Config reference".
set -euo pipefail
for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
        sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
        echo
        exec python -m titan_rl.train --help
    fi
done
# Paths (CONFIG_FILE, --job.dump_folder, data files) are relative to where you run this from.
ROOT="$(cd "$(dirname "$0")" && pwd)"

NPROC=${NPROC:-${NGPU:-1}}
NNODES=${NNODES:-1}
CONFIG_FILE=${CONFIG_FILE:-$ROOT/train_configs/debug_cpu.toml}
LOG_RANK=${LOG_RANK:-0}
# torchrun sets 1 thread per process when there are several (and prints a banner saying so)
if [ "$NPROC" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then export OMP_NUM_THREADS=1; fi

if [ "$NNODES" -gt 1 ]; then
    rendezvous=(--nnodes="$NNODES" --node-rank="${NODE_RANK:?set NODE_RANK for multi-node runs}"
                --rdzv-backend="${RDZV_BACKEND:-c10d}"
                --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}"
                --rdzv-id="${RDZV_ID:-titan_rl}")
else
    rendezvous=(--standalone)
fi

# Validate the config in one plain process first: a bad key or layout is one line, no launcher noise.
WORLD_SIZE=$((NPROC * NNODES)) python -m titan_rl.train --check-config --check-machine --config "$CONFIG_FILE" "$@"

# titan_rl.launch is torchrun with a one-line failure report instead of the launcher's traceback.
exec python -m titan_rl.launch "${rendezvous[@]}" --nproc-per-node="$NPROC" \
    --local-ranks-filter="$LOG_RANK" --role=rank --tee=3 \
    -m titan_rl.train --config "$CONFIG_FILE" "$@"
