#!/usr/bin/env bash
# hessian_every=15000: the demo's four checks an epoch, the defaults when this ran (since 2026-11-27: --config demo)
# Peak resident memory of a one-epoch embedded default with cpu_malloc=false and true, alternating,
# two runs each (GNU time's %M, KiB). Run from the repository root.
set -eu
D=benchmarks/results/demo_malloc_ab_2026-11-27
: > $D/rss.txt
for round in 1 2; do
  for setting in false true; do
    rm -rf /tmp/demo_rss
    /usr/bin/time -f "cpu_malloc=$setting peak RSS %M KiB, %e s" -a -o $D/rss.txt \
      .venv/bin/scaling-abs train hessian_every=15000 epochs=1 cpu_malloc=$setting output_dir=/tmp/demo_rss progress=false tensorboard=false > /dev/null 2>&1
  done
done
