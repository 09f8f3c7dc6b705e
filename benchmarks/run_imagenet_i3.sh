#!/usr/bin/env bash
# I3: ResNet-18 on ImageNet with ABSA across nodes (paper Section 4.2, Table 3).
#   DATA_DIR=/data/imagenet NUM_NODES=2 NODE_RANK=0 MAIN_ADDR=<node 0> PROCS_PER_NODE=8 \
#     benchmarks/run_imagenet_i3.sh            # DEEPSPEED=zero2 for ZeRO; --help for all settings
set -euo pipefail
PRESET=i3 exec "$(dirname "$0")/run_preset.sh" "$@"
