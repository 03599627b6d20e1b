#!/usr/bin/env bash
# The prepared GPU check (issue 13). On a GPU machine that has PyTorch but no network:
#
#   bash benchmarks/gpu_check.sh            # from the repository root; needs benchmarks/wheels/
#
# installs the bundle's dependencies that the machine lacks from the wheels carried in benchmarks/wheels/
# (the machine's own torch, numpy, scipy, ... are used), runs the test suite (on CUDA where a test or
# config picks the GPU; verbose, so that a run cut by its time limit still names its failures), then
# times registration (pairs/s) and a CCT-R training (iterations/s, peak GPU memory) on a synthetic
# phantom (benchmarks/gpu_check.py), and prints one table. Budget: under 8 minutes (tests capped at 4,
# timings at 3). Results: benchmarks/results/gpu_check.json (or $OUT). benchmarks/gpu_acdc.sh does the
# same timings on real volumes and trains on them (benchmarks/results/gpu_h200.md: what ran on an H200).
#
# Before going to the GPU machine, on a machine with network:
#
#   bash benchmarks/gpu_check.sh --download [PYTHON_VERSION]   # 5.3 MB of wheels into benchmarks/wheels/
#
# PYTHON_VERSION is the GPU machine's (default 3.12, the lent H200 image's). Only pure-Python wheels are
# carried: an image with PyTorch has numpy, scipy, h5py, einops, tqdm, PyYAML, pytest (and pytest-xdist)
# already. SimpleITK (53 MB), jsonschema and MLflow are not carried: the torch registration engine and
# training need none of them; their test modules are skipped when they are absent.
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh   # PY, WHEELS, gpu_install_wheels, gpu_tests
PKGS="monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 fire==0.7.1 termcolor==3.3.0"

if [[ "${1:-}" == "--download" ]]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${2:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" $PKGS
  du -sh "$WHEELS"
  exit 0
fi

start=$(date +%s)
echo "== GPU: $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))')"
gpu_install_wheels || exit 1
TESTLOG="${OUT:-benchmarks/results}/gpu_check_tests.log"
gpu_tests 240 "$TESTLOG" "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))"
gpu_test_summary "$TESTLOG"

echo "== timings (at most 180 s)"
OUTFILE="${OUT:-benchmarks/results}/gpu_check.json"
timeout 180 "$PY" benchmarks/gpu_check.py --out "$OUTFILE" 2>&1 | grep -v -i warning | tail -12
echo "== total $(( $(date +%s) - start )) s"
