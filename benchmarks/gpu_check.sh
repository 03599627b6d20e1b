#!/usr/bin/env bash
# The prepared GPU check (issues 13 and 32), one command within one device lease:
#
#   bash benchmarks/gpu_check.sh [SECONDS]    # from the repository root; everything within SECONDS (default 510)
#
# 1. installs what the machine lacks from the wheels carried in benchmarks/wheels/ (its own torch, numpy, ...
#    are used);
# 2. timings on the synthetic phantom (benchmarks/gpu_check.py): iterations/s and peak GPU memory of the
#    default, `cct_r`, `cts` and `ls` at patch 128 and 224, batch 8, with the precision default and the
#    handlers on as `monai.bundle run training` runs them (validation excepted), the default at patch 128 in
#    float32 too, and two default trainings side by side (each its own process); registration pairs/s; then
#    the default at patch 128 eager and with graph capture on (torch.compile, CUDA graphs; the compile within
#    the warm-up iterations);
# 3. for the time left, the training command as a user runs it on ACDC with 1 labeled patient at patch
#    224 (registration on the GPU first, then the default CCT-R, its length sized from step 2's rate,
#    validation five times), and beside it the test suite on CUDA (verbose, every failure named; the
#    SimpleITK, jsonschema and MLflow tests skipped where the image lacks them);
# 4. one summary: the timing table, the registration's pairs/s, the validation curve, the tests' count.
#
# The device machine has PyTorch but no network, and sees the repository only: carry the ignored
#   benchmarks/wheels/      `bash benchmarks/gpu_check.sh --download [PYTHON_VERSION]` (5.3 MB; default 3.12)
#   .gpu/acdc_pack.tar.xz   `python benchmarks/gpu_pack_acdc.py --labeled 1` (ACDC re-stored small; step 3
#                           is skipped without it)
# Results: $OUT (the device tool's folder) or benchmarks/results/gpu_check/.
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh   # PY, WHEELS, gpu_install_wheels, gpu_tests, gpu_test_summary
PKGS="monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 fire==0.7.1 termcolor==3.3.0"

if [[ "${1:-}" == "--download" ]]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${2:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" $PKGS
  du -sh "$WHEELS"
  exit 0
fi

budget=${1:-510}
RES=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
echo "== GPU: $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))'), $(nproc) CPUs"
gpu_install_wheels || exit 1
[[ -f .gpu/acdc_pack.tar.xz && ! -d /tmp/acdc_pack ]] && { tar -C /tmp -xJf .gpu/acdc_pack.tar.xz & }

echo "== timings on the phantom (at most 210 s)"
timeout 210 "$PY" benchmarks/gpu_check.py --variants default cct_r cts ls --patch 128 224 --warmup 6 --iterations 30 \
  --pairs 64 --cpu_pairs 4 --fp32_too --old_pipeline_too --side_by_side 2 --out "$RES/gpu_check.json" > "$RES/timings.log" 2>&1
grep -E '^\||^\{' "$RES/timings.log" | grep -v '^{' ; grep -E "Error|error:" "$RES/timings.log" | tail -5
echo "== graph capture: the default at patch 128 eager, then captured (the compile within 8 warm-up iterations; at most 180 s)"
timeout 180 "$PY" benchmarks/gpu_check.py --variants default --patch 128 --warmup 8 --iterations 30 --pairs -1 \
  --capture_too --out "$RES/gpu_capture.json" > "$RES/capture.log" 2>&1
grep -E '^\|' "$RES/capture.log"; grep -E "graph_capture:|Error|error:" "$RES/capture.log" | cut -c1-300 | tail -3
wait  # the unpacking

left=$(( budget - $(elapsed) ))
if [[ ! -f /tmp/acdc_pack/acdc_1.json ]]; then
  echo "== no ACDC pack: the test suite alone (at most $(( left - 10 )) s)"
  OMP_NUM_THREADS=2 gpu_tests $(( left - 10 )) "$RES/tests.log" 8
  gpu_test_summary "$RES/tests.log"; echo "== total $(elapsed) s"; exit 0
fi
# default at patch 224 alone (step 2); two thirds of it beside the tests; ~100 s for start, registration, caching
rate=$("$PY" -c "
import json; rows = json.load(open('$RES/gpu_check.json'))['training']
print(next((r['it_per_s'] for r in rows if r['variant'] == 'default' and r['patch'] == 224 and not r.get('side_by_side')), 2))" 2>/dev/null || echo 2)
iterations=$("$PY" -c "print(max(100, int(($left - 130) * $rate * 0.65) // 50 * 50))")
echo "== ACDC, 1 labeled patient, patch 224: registration then $iterations iterations (phantom rate $rate it/s; $left s left), tests on CUDA beside it"
OMP_NUM_THREADS=2 gpu_tests $(( left - 25 )) "$RES/tests.log" 6 > /dev/null &
tests=$!
timeout $(( left - 20 )) "$PY" -m monai.bundle run training --config_file "['configs/train.yaml','configs/dataset_acdc.yaml']" \
  --datalist_file /tmp/acdc_pack/acdc_1.json --patch_size '[224,224]' --num_iterations "$iterations" \
  --val_interval $(( iterations / 5 )) --progress false > "$RES/acdc_train.log" 2>&1
echo "training exit status: $? (124 = time limit)"
grep -E "registration done|registration: .*pairs|scripts.training.progress - INFO|Error|error:" "$RES/acdc_train.log" | cut -c1-260 | tail -12
wait "$tests"
gpu_test_summary "$RES/tests.log"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
echo "== total $(elapsed) s"
