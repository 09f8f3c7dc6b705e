#!/bin/bash
# hessian_every=15000: the demo's four checks an epoch, the defaults when this ran (since 2026-11-27: --config demo)
# The embedded default with and without channels_last=true, alternating, on the 2-core machine.
cd /work/main
OUT=/tmp/demo_cl_train; mkdir -p $OUT
for round in 1 2; do
  for which in channels_last default; do
    extra=""; [ $which = channels_last ] && extra="channels_last=true"
    d=$OUT/${which}_$round
    .venv/bin/python -m scaling_abs train hessian_every=15000 output_dir=$d $extra > $d.console.txt 2>&1
    python3 -c "import json;s=json.load(open('$d/summary.json'));print('$d', s['wall_time_s'], s['curvature_time_s'], round(100*s['curvature_time_s']/s['wall_time_s'],1), s['updates'], s['test_accuracy'])"
  done
done
