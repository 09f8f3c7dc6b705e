#!/usr/bin/env bash
# hessian_every=15000: the demo's four checks an epoch, the defaults when this ran (since 2026-11-27: --config demo)
# The embedded default (`scaling-abs train`, no settings) with glibc's default malloc and with its
# mmap threshold raised and trimming off (large tensors reused from the heap instead of fresh,
# page-faulting mappings), alternating, two runs each. Run from the repository root.
set -eu
D=benchmarks/results/demo_malloc_ab_2026-11-27
for round in 1 2; do
  for tag in default tuned; do
    if [ $tag = tuned ]; then envs="MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=4000000000"; else envs=""; fi
    rm -rf /tmp/demo_$tag$round
    env $envs .venv/bin/scaling-abs train hessian_every=15000 output_dir=/tmp/demo_$tag$round progress=false tensorboard=false 2>&1 \
      | grep -v -i warn | tail -8 > $D/env_${tag}_$round.txt
    cp /tmp/demo_$tag$round/summary.json $D/env_${tag}_${round}_summary.json
  done
done
