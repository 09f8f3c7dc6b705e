#!/usr/bin/env bash
# hessian_every=15000: the demo's four checks an epoch, the defaults when this ran (since 2026-11-27: --config demo)
# The embedded default (`scaling-abs train`) with cpu_malloc=false (glibc as it comes) and with the
# default cpu_malloc=true, alternating, two runs each; then the same with hessian_every=0 (one check
# an epoch, the paper's frequency). Run from the repository root.
set -eu
D=benchmarks/results/demo_malloc_ab_2026-11-27
for extra in "" "hessian_every=0"; do
  pre=${extra:+every_epoch_}
  for round in 1 2; do
    for tag in off on; do
      if [ $tag = off ]; then set_malloc="cpu_malloc=false"; else set_malloc=""; fi
      rm -rf /tmp/demo_m
      # shellcheck disable=SC2086  # settings are words
      .venv/bin/scaling-abs train hessian_every=15000 output_dir=/tmp/demo_m progress=false tensorboard=false $set_malloc $extra 2>&1 \
        | grep -v -i warn | tail -8 > "$D/${pre}${tag}_$round.txt"
      cp /tmp/demo_m/summary.json "$D/${pre}${tag}_${round}_summary.json"
    done
  done
done
