#!/usr/bin/env bash
# Run a paper preset with `accelerate launch` on one node or across nodes.
#
#   PRESET=i3 DATA_DIR=/data/imagenet NUM_NODES=2 NODE_RANK=0 MAIN_ADDR=<main node> \
#     benchmarks/run_preset.sh [key=value ...]
#
# Run the same command on every node with its own NODE_RANK. Extra arguments are config overrides.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: [ENV=...] run_preset.sh [PRESET] [key=value ...]

Environment:
  PRESET          s1 | c1 | c2 | c3 | c4 | i1 | i2 | i3 (or the first argument)
  DATA_DIR        the data set folder (required)
  STRATEGY        bl | fb | gg | abs | absa (default absa)
  NUM_NODES       number of machines (default 1)
  NODE_RANK       this machine, 0 .. NUM_NODES-1 (default 0)
  MAIN_ADDR       address of node 0 (default 127.0.0.1)
  MAIN_PORT       rendezvous port (default 29500)
  PROCS_PER_NODE  processes (GPUs) per node (default 8)
  DEEPSPEED       empty, zero1, zero2, zero3 or zero3_offload (default empty: DDP)
  OUTPUT_DIR      run folder (default runs/<preset>_<strategy>)
  DRY_RUN=1       print the command instead of running it
TXT
}

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
PRESET=${PRESET:-}
if [[ -z "$PRESET" && $# -gt 0 && "$1" != *=* ]]; then PRESET=$1; shift; fi
if [[ -z "$PRESET" ]]; then echo "run_preset.sh: error: set PRESET (s1, c1, ..., i3)" >&2; exit 2; fi
if [[ -z "${DATA_DIR:-}" ]]; then echo "run_preset.sh: error: set DATA_DIR to the data set folder" >&2; exit 2; fi

STRATEGY=${STRATEGY:-absa}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}
PROCS_PER_NODE=${PROCS_PER_NODE:-8}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${PRESET}_${STRATEGY}}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

cmd=(accelerate launch --num_machines "$NUM_NODES" --machine_rank "$NODE_RANK"
     --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
     --num_processes $((NUM_NODES * PROCS_PER_NODE)))
extra=()
if [[ -n "${DEEPSPEED:-}" ]]; then
  ds="$ROOT/ds_configs/${DEEPSPEED}.json"
  [[ -f "$ds" ]] || { echo "run_preset.sh: error: no DeepSpeed config $ds" >&2; exit 2; }
  cmd+=(--use_deepspeed --deepspeed_config_file "$ds")
  extra+=("deepspeed=$ds")
elif (( NUM_NODES * PROCS_PER_NODE > 1 )); then
  cmd+=(--multi_gpu)
fi
cmd+=(-m scaling_abs train --config "$PRESET" "data_dir=$DATA_DIR" "strategy=$STRATEGY"
      "output_dir=$OUTPUT_DIR" "${extra[@]}" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
