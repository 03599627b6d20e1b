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
WHEELS=benchmarks/wheels
PY=$(command -v python3 || command -v python)   # a GPU image may have python3 only
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
# install what the machine lacks, beside its own packages (no network: only the carried wheels)
if ! "$PY" -c "import monai, ignite, nibabel, fire" 2>/dev/null; then
  echo "== installing from $WHEELS"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi

# tests: skip the modules whose optional packages are absent; in parallel where pytest-xdist is there;
# verbose with a per-test limit where pytest-timeout is, so that a cut run names what failed
ignore=()
"$PY" -c "import SimpleITK" 2>/dev/null || ignore+=(--ignore=tests/test_registration_geometry.py --ignore=tests/test_phantom.py -k "not sitk")
"$PY" -c "import jsonschema" 2>/dev/null || ignore+=(--ignore=tests/test_bundle_metadata.py)
"$PY" -c "import xdist" 2>/dev/null && ignore+=(-n "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))")
"$PY" -c "import pytest_timeout" 2>/dev/null && ignore+=(--timeout 120)
TESTLOG="${OUT:-benchmarks/results}/gpu_check_tests.log"
echo "== tests (at most 240 s, log $TESTLOG) ${ignore[*]:-}"
timeout 240 "$PY" -m pytest -v -rfE --tb=line -p no:cacheprovider tests "${ignore[@]}" > "$TESTLOG" 2>&1
echo "tests exit status: $? (124 = time limit)"
grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$TESTLOG" | tail -30
echo "passed: $(grep -c " PASSED" "$TESTLOG"), failed: $(grep -c " FAILED" "$TESTLOG"), errors: $(grep -c " ERROR" "$TESTLOG")"

echo "== timings (at most 180 s)"
OUTFILE="${OUT:-benchmarks/results}/gpu_check.json"
timeout 180 "$PY" benchmarks/gpu_check.py --out "$OUTFILE" 2>&1 | grep -v -i warning | tail -12
echo "== total $(( $(date +%s) - start )) s"
