#!/bin/bash
# hessian_every=15000: the demo's four checks an epoch, the defaults when this ran (since 2026-11-27: --config demo)
# Alternating before (dd711ba) / after (HEAD) demo runs on the quiet 2-core machine.
cd /work/main
OUT=/tmp/demo_ab; mkdir -p $OUT
for round in 1 2; do
  for which in after before; do
    for every in default every_epoch; do
      extra=""; [ $every = every_epoch ] && extra="hessian_every=0"
      src=/work/main; [ $which = before ] && src=/tmp/wt_before
      d=$OUT/${every}_${which}_$round
      ( cd $src && PYTHONPATH=$src /work/main/.venv/bin/python -m scaling_abs train hessian_every=15000 output_dir=$d $extra > $d.console.txt 2>&1 )
      python3 -c "import json;s=json.load(open('$d/summary.json'));print('$d', s['wall_time_s'], s['curvature_time_s'], round(100*s['curvature_time_s']/s['wall_time_s'],1), s['updates'], s['test_accuracy'])"
    done
  done
done
