#!/usr/bin/env bash
# The curvature checks that need a CUDA GPU (issue 5), as one command, most important first:
#   0. tests/test_gpu.py (pytest -m gpu)
#   1. bench_hvp_accuracy.py: every HVP path against fp64 (fp32 with TF32 on and off, bf16, fp16)
#   2. bench_hvp.py on ResNet-18, 128 images 3x32x32 (the issue's setting), every measurement
#   3. the c1 preset (ResNet-18, one check of 4096 images per epoch) trained on Fashion-MNIST for
#      EPOCHS epochs, fp32 and bf16: the curvature share of wall time in a real run
#   4. bench_hvp.py on the other models, and ResNet-18 at a Hessian batch of 1024
#   5. demo: `make demo` (`scaling-abs train --config demo`) on the GPU
#   rules_ab (not in the default): bench_rules_ab.py, the second-order rule sets side by side in one
#      process (ResNet-18 at 128 and 1024 images, the small CNN at 512)
#   fold_layout (not in the default): BatchNorm folding and channels-last convolutions in our rules
#      on the GPU, with and without (rule sets, c1 preset and demo), and channels-last training steps
#   profile_check (not in the default): profile_check.py, a training check's time phase by phase
#      (Hessian batch fetch, graph builds, products, rest) and its top operators, for the c1 preset
#      with 1,024 samples and kept graphs, then with the preset's 4,096 (PROFILE_SETTINGS replaces
#      the settings of both, e.g. to try the stage on a CPU with a fake nvidia-smi)
#   share (not in the default): the curvature share of wall time in short ResNet-18 runs, one per
#      SHARE_RUNS entry ("name:settings,settings"; default: the c1 preset as it is, the same with
#      fresh products, model=c1 with the library's defaults, the preset with 1,024 samples)
# STAGES picks some (default: tests accuracy bench_c1 train bench_small bench_c1_1024 demo),
# PRECISIONS the training runs' (default: no bf16), ACC_MODELS the accuracy stage's models (default:
# c1 vit_tiny cnn), C1_MEASUREMENTS, SMALL_MEASUREMENTS and C1_1024_MEASUREMENTS the bench stages'
# rows (eig_pyhessian needs the pyhessian wheel), STAGE_TIMEOUT the seconds one stage may take
# (default 600), TRAIN_EXTRA settings added to the training runs (e.g. hessian_reuse_graph=true) and
# TRAIN_TAG a suffix for their file names.
# Everything lands in $OUT/gpu ($OUT defaults to /tmp/gpu_checks) and, after each stage, in
# $OUT/gpu_results.tar.gz (or PACK_TO). A failed or timed-out stage does not stop the next one.
#
#   OUT=/tmp/gpu FMNIST_DIR=/usr/share/datasets/fashion-mnist bash benchmarks/gpu_checks.sh
#   STAGES='tests train' PRECISIONS=no bash benchmarks/gpu_checks.sh
#   STAGES='bench_c1' C1_MEASUREMENTS='train_step hvp_reused hvp_reused_rules' bash benchmarks/gpu_checks.sh
set -u
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
if ! command -v nvidia-smi > /dev/null; then
  echo "gpu_checks.sh: no nvidia-smi here; these checks need a CUDA GPU (see --help)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
PY=${PY:-python3}
EPOCHS=${EPOCHS:-3}
export FMNIST_DIR=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}  # tests/test_gpu.py reads it too
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT/gpu"
R=$OUT/gpu

STAGES=" ${STAGES:-tests accuracy bench_c1 train bench_small bench_c1_1024 demo} "
PRECISIONS=${PRECISIONS:-no bf16}
ACC_MODELS=${ACC_MODELS:-c1 vit_tiny cnn}
C1_MEASUREMENTS=${C1_MEASUREMENTS:-train_step hvp_double_backward hvp_double_backward_stock \
  hvp_forward_over_reverse hvp_bf16 hvp_checkpointed hvp_segmented hvp_segmented_bf16 hvp_reused hvp_reused_stock \
  eig_ours eig_ours_stock eig_ours_fresh eig_ours_micro4 eig_ours_lanczos eig_ours_bf16 eig_ours_bf16_stock \
  eig_ours_segmented eig_classic eig_pyhessian}
SMALL_MEASUREMENTS=${SMALL_MEASUREMENTS:-train_step hvp_double_backward hvp_double_backward_stock \
  hvp_forward_over_reverse hvp_reused hvp_reused_stock hvp_bf16 hvp_checkpointed eig_ours eig_ours_stock \
  eig_ours_bf16 eig_classic}
C1_1024_MEASUREMENTS=${C1_1024_MEASUREMENTS:-train_step hvp_double_backward hvp_reused hvp_reused_stock \
  hvp_segmented hvp_segmented_bf16 hvp_bf16 eig_ours eig_ours_stock eig_ours_bf16 eig_ours_bf16_stock \
  eig_ours_segmented eig_classic hvp_compiled}
T="timeout ${STAGE_TIMEOUT:-600}"
want() { [[ $STAGES == *" $1 "* ]]; }
pack() { tar -czf "${PACK_TO:-$OUT/gpu_results.tar.gz}" -C "$OUT" gpu; }
stage() { echo "=== $(date +%T) $*"; }

stage machine
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c 'import torch, torchvision, accelerate; print(torch.__version__, torchvision.__version__, accelerate.__version__)'
  $PY -c 'import pyhessian' 2>&1 | tail -1; } | tee "$R/machine.txt"
pack

if want tests; then
stage "tests marked gpu"
$T $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$R/tests_gpu.log"
pack
fi

if want accuracy; then
stage accuracy
$T $PY benchmarks/bench_hvp_accuracy.py --models $ACC_MODELS --out "$R/bench_hvp_accuracy_cuda.json" 2>&1 \
  | grep --line-buffered -v -i warning | tee "$R/accuracy.log"
pack
fi

if want bench_c1; then
stage bench_hvp c1 128
# shellcheck disable=SC2086  # the lists are meant to split
$T $PY benchmarks/bench_hvp.py --models c1 --runs 5 --child-timeout 120 --out "$R/bench_hvp_cuda_c1.json" \
  --measurements $C1_MEASUREMENTS 2>&1 | grep --line-buffered -v -i warning | tee "$R/bench_c1.log"
pack
fi

if want train; then
for mp in $PRECISIONS; do
  run=c1_$mp${TRAIN_TAG:-}
  stage "train c1 preset on fashion_mnist, mixed_precision=$mp ${TRAIN_EXTRA:-}"
  rm -rf "/tmp/$run"
  # shellcheck disable=SC2086  # TRAIN_EXTRA is a list of settings
  $T $PY -m scaling_abs train --config c1 dataset=fashion_mnist "data_dir=$FMNIST_DIR" "epochs=$EPOCHS" \
    "mixed_precision=$mp" "output_dir=/tmp/$run" progress=false ${TRAIN_EXTRA:-} 2>&1 | grep --line-buffered -v -i warning | tail -12 | tee "$R/train_$run.log"
  cp "/tmp/$run/summary.json" "$R/train_${run}_summary.json"
  grep -v '"kind": "step"' "/tmp/$run/metrics.jsonl" > "$R/train_${run}_checks.jsonl"  # checks and evaluations
  pack
done
fi

if want bench_small; then
stage bench_hvp other models
# shellcheck disable=SC2086
$T $PY benchmarks/bench_hvp.py --models mlp cnn vit_tiny --runs 5 --child-timeout 60 --out "$R/bench_hvp_cuda_small.json" \
  --measurements $SMALL_MEASUREMENTS 2>&1 | grep --line-buffered -v -i warning | tee "$R/bench_small.log"
pack
fi

if want bench_c1_1024; then
stage bench_hvp c1 1024
# shellcheck disable=SC2086
$T $PY benchmarks/bench_hvp.py --models c1 --batch 1024 --runs 3 --child-timeout 120 --out "$R/bench_hvp_cuda_c1_1024.json" \
  --measurements $C1_1024_MEASUREMENTS 2>&1 | grep --line-buffered -v -i warning | tee "$R/bench_c1_1024.log"
pack
fi
if want demo; then
stage "demo: make demo (scaling-abs train --config demo) on the GPU"
rm -rf /tmp/demo_gpu
$T $PY -m scaling_abs train --config demo "data_dir=$FMNIST_DIR" output_dir=/tmp/demo_gpu progress=false 2>&1 \
  | grep --line-buffered -v -i warning | tail -12 | tee "$R/demo.log"
cp /tmp/demo_gpu/summary.json "$R/demo_summary.json"
grep -v '"kind": "step"' /tmp/demo_gpu/metrics.jsonl > "$R/demo_checks.jsonl"
pack
fi
if want rules_ab; then
stage "rule sets side by side: bench_rules_ab.py"
for mb in "c1 128" "c1 1024" "cnn 512"; do
  set -- $mb
  $T $PY benchmarks/bench_rules_ab.py --model "$1" --batch "$2" --rounds 5 --out "$R/bench_rules_ab_$1_$2.json" 2>&1 \
    | grep --line-buffered -v -i warning | tee -a "$R/rules_ab.log"
done
pack
fi
if want fold_layout; then
# BatchNorm folding and channels-last convolutions (our rules, fp32), on the GPU with and without:
# the rule sets side by side, then the c1 preset (1,024 Hessian samples, kept graphs) and the demo
# each with both off on CUDA ($OFF: they are module settings, read at each call) and as by default,
# then channels-last training steps.
OFF='from scaling_abs import _second_order as s; s.FOLD_DEVICES = s.LAYOUT_DEVICES = ("cpu",); import sys'
stage "fold and channels-last on CUDA: rule sets side by side"
for mb in "c1 128 5" "c1 1024 3" "cnn 512 5"; do
  set -- $mb
  $T $PY benchmarks/bench_rules_ab.py --model "$1" --batch "$2" --rounds "$3" \
    --sets pytorch ours_no_fold ours_nchw ours --out "$R/bench_rules_ab_fold_layout_$1_$2.json" 2>&1 \
    | grep --line-buffered -v -i warning | tee -a "$R/rules_ab_fold_layout.log"
  pack
done
for tag in off default; do
  if [ $tag = off ]; then pre="$OFF"; else pre="import sys"; fi
  for run in c1 demo; do
    stage "$run: fold and channels-last $tag"
    if [ $run = c1 ]; then
      args="--config c1 dataset=fashion_mnist epochs=$EPOCHS hessian_samples=1024 hessian_reuse_graph=true"
    else
      args="--config demo"
    fi
    rm -rf "/tmp/${run}_$tag"
    # shellcheck disable=SC2086  # args is a list of settings
    $T $PY -c "$pre; from scaling_abs.cli import main; sys.exit(main(sys.argv[1:]))" train $args \
      "data_dir=$FMNIST_DIR" "output_dir=/tmp/${run}_$tag" progress=false 2>&1 \
      | grep --line-buffered -v -i warning | tail -12 | tee "$R/train_${run}_$tag.log"
    cp "/tmp/${run}_$tag/summary.json" "$R/train_${run}_${tag}_summary.json"
    grep -v '"kind": "step"' "/tmp/${run}_$tag/metrics.jsonl" > "$R/train_${run}_${tag}_checks.jsonl"
    pack
  done
done
stage "channels-last training steps"
$T $PY benchmarks/bench_train_layout.py --model c1 --batch 128 --rounds 10 --out "$R/bench_train_layout_c1_128.json" 2>&1 \
  | grep --line-buffered -v -i warning | tee "$R/train_layout.log"
pack
fi
if want profile_check; then
# Where a c1 check's 140-160 ms per power iteration go (4 kept graphs of 256 images, 2026-11-27)
for samples in 1024 4096; do
  stage "profile one c1 check, $samples samples"
  # shellcheck disable=SC2086  # a list of settings
  $T $PY benchmarks/profile_check.py --config c1 --steps 20 --checks 4 --table 25 \
    ${PROFILE_SETTINGS:-dataset=fashion_mnist "data_dir=$FMNIST_DIR" hessian_samples=$samples hessian_reuse_graph=true} \
    2>&1 | grep --line-buffered -v -i warning | tee "$R/profile_check_c1_$samples.txt"
  pack
done
fi
if want share; then
# The curvature share of a CIFAR-scale run (issue 5): ResNet-18 trained on Fashion-MNIST for EPOCHS
# epochs, one run per SHARE_RUNS entry, "name:settings" with settings comma-separated; a name
# starting with "defaults" trains model=c1 with the library's defaults, any other the c1 preset.
SHARE_RUNS=${SHARE_RUNS:-c1_auto: c1_fresh:hessian_reuse_graph=false defaults: c1_1024:hessian_samples=1024}
for spec in $SHARE_RUNS; do
  name=${spec%%:*}; settings=${spec#*:}; settings=${settings//,/ }
  if [[ $name == defaults* ]]; then base="model=c1"; else base="--config c1"; fi
  stage "share $name: $base $settings"
  rm -rf "/tmp/share_$name"
  # shellcheck disable=SC2086  # base and settings are lists
  $T $PY -m scaling_abs train $base dataset=fashion_mnist "data_dir=$FMNIST_DIR" "epochs=$EPOCHS" \
    "output_dir=/tmp/share_$name" progress=false $settings 2>&1 | grep --line-buffered -v -i warning \
    | tail -12 | tee "$R/share_$name.log"
  cp "/tmp/share_$name/summary.json" "$R/share_${name}_summary.json"
  grep -v '"kind": "step"' "/tmp/share_$name/metrics.jsonl" > "$R/share_${name}_checks.jsonl"
  pack
done
fi
stage done
