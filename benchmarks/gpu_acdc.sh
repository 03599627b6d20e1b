#!/usr/bin/env bash
# ACDC on a lent GPU machine (issues 12 and 13): the protocol runner's default and paper-faithful CCT-R
# on a real datalist with a finished registration, and gpu_check.py's timings on the same volumes.
#
#   bash benchmarks/gpu_acdc.sh [SECONDS]   # everything within SECONDS (default 540)
#
# 1. gpu_check.py's timings on the ACDC volumes: registration pairs/s (GPU, and a few pairs on the CPU),
#    one CCT-R training's iterations/s and peak memory with and without AMP;
# 2. from the measured iterations/s, the largest multiple of 60 iterations that two runs side by side
#    finish in the time left (validation every 1/6 of the run), then the protocol runner's default
#    ("best") and paper-faithful `cct_r` (seed 12345) on that budget, evaluated as on the CPU;
# 3. beside them, the test suite on CUDA (pytest-xdist, 4 workers, verbose so that a cut run names its
#    failures; the SimpleITK, jsonschema tests skipped).
#
# The GPU machine has PyTorch but no network and no files outside the repository, so what it needs
# travels in ignored folders (benchmarks/results/gpu_h200.md has the commands that made them):
#   benchmarks/wheels/        wheels of the packages its image lacks (`bash benchmarks/gpu_check.sh --download`)
#   .gpu/acdc_pack.tar.xz     the ACDC development folder, images re-stored as scaled uint16 (lossless
#                             to 2e-5; the two volumes off a regular grid stay float32), unpacked to
#                             /tmp/acdc_pack, with its datalist .gpu/acdc_1.json (absolute /tmp/acdc_pack paths)
#   registration/             the finished registration of that datalist (made on the CPU here)
# Results go to $OUT (the device tool's folder) or benchmarks/results/gpu_acdc/.
# Environment: DATALIST, REG (its registration folder), VARIANTS (protocol --variants, default
# "best= cct_r=variant_cct_r.yaml"), SEEDS (default 12345), PARALLEL (runs side by side, default 2),
# ITERATIONS (instead of sizing the runs from the measured rate).
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
RES=${OUT:-benchmarks/results/gpu_acdc}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
start=$(date +%s)
. benchmarks/gpu_env.sh   # PY, gpu_install_wheels, gpu_tests
gpu_install_wheels || exit 1
"$PY" -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
[[ -d /tmp/acdc_pack ]] || tar -C /tmp -xJf .gpu/acdc_pack.tar.xz || exit 1
DATALIST=${DATALIST:-.gpu/acdc_1.json}   # e.g. a 7-labeled datalist of the same folder (its registration carried too)
REG=${REG:-$(ls -d registration/torch_affine_* | head -1)}
echo "== data $DATALIST, registration $REG ($(( $(date +%s) - start )) s)"

protocol() {  # $1 time limit (s), $2 iterations, $3 validation interval, $4 out
  timeout "$1" "$PY" benchmarks/protocol.py --datalist "$DATALIST" --dataset dataset_acdc.yaml \
    --variants ${VARIANTS:-"best=" "cct_r=variant_cct_r.yaml"} --seeds ${SEEDS:-12345} --preset full --parallel "${PARALLEL:-2}" \
    --set num_iterations="$2" val_interval="$3" num_threads=4 num_workers=5 cache_num_workers=4 --out "$4"
}
elapsed() { echo $(( $(date +%s) - start )); }

echo "== timings on ACDC volumes (at most 120 s)"
timeout 120 "$PY" benchmarks/gpu_check.py --datalist "$DATALIST" --registration_dir "$REG" --pairs "${PAIRS:-256}" --cpu_pairs 8 \
  --patch 128 --iterations "${TIMED:-30}" --amp 1 0 --out "$RES/gpu_check_acdc.json" > "$RES/timings.txt" 2>&1
grep -v -i warn "$RES/timings.txt" | tail -8
rate=$("$PY" -c "import json; print(json.load(open('$RES/gpu_check_acdc.json'))['training'][0]['it_per_s'])" 2>/dev/null || echo 2)
left=$(( budget - $(elapsed) ))
# two runs share the GPU (about 0.55 of one run's rate each); ~150 s for start-up, validation and the evaluations
iterations=$("$PY" -c "print(max(60, int(($left - 150) * $rate * 0.55) // 60 * 60))")
[[ -n "${ITERATIONS:-}" ]] && iterations=$ITERATIONS
echo "== $iterations iterations of each variant (one run alone: $rate it/s; $left s left), tests on CUDA beside them"
gpu_tests $(( left > 330 ? 300 : left - 30 )) "$RES/tests.log" 4 > /dev/null &
protocol $(( left - 15 )) "$iterations" $(( iterations / 6 )) /tmp/gpu_long 2>&1 | grep -v -i warn | tail -25
cp /tmp/gpu_long/table.md "$RES/long_table.md"; cp /tmp/gpu_long/table.json "$RES/long_table.json"
for log in /tmp/gpu_long/*/train.log; do cp "$log" "$RES/train_$(basename "$(dirname "$log")").log"; done
wait
gpu_test_summary "$RES/tests.log"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
echo "== total $(elapsed) s"
