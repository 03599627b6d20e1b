#!/usr/bin/env bash
# The prepared GPU check (issue 13). On a GPU machine that has PyTorch but no network:
#
#   bash benchmarks/gpu_check.sh            # from the repository root; needs benchmarks/wheels/
#
# installs the bundle's other dependencies that the machine lacks from the wheels carried in
# benchmarks/wheels/ (the machine's own torch and numpy are used), runs the test suite (on CUDA where a
# test or config picks the GPU), then times registration (pairs/s) and a CCT-R training (iterations/s,
# peak GPU memory) on a synthetic phantom (benchmarks/gpu_check.py), and prints one table. Budget: under
# 8 minutes (tests capped at 4, timings at 3). Results: benchmarks/results/gpu_check.json (or $OUT).
#
# Before going to the GPU machine, on a machine with network (Python 3.11, x86_64):
#
#   bash benchmarks/gpu_check.sh --download  # ~44 MB of wheels into benchmarks/wheels/ (git-ignored)
#
# SimpleITK (53 MB) and matplotlib (+ its dependencies, 25 MB) are not carried, to stay under 60 MB:
# the torch registration engine and training need neither; tests that do are skipped when absent.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
PKGS="monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 scipy==1.17.1 fire==0.7.1 PyYAML==6.0.3 tqdm==4.70.1 h5py==3.16.0
einops==0.8.2 pytest==9.0.3 iniconfig==2.3.1 pluggy==1.7.0 Pygments==2.21.0 packaging==26.4 termcolor==3.3.0
typing_extensions==4.16.0"

if [[ "${1:-}" == "--download" ]]; then
  mkdir -p "$WHEELS"
  python -m pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 -d "$WHEELS" $PKGS
  du -sh "$WHEELS"
  exit 0
fi

start=$(date +%s)
echo "== GPU: $(python -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))')"
# install what the machine lacks (import name -> requirement)
missing=$(python - <<'PY'
import importlib.util
need = {"monai": "monai", "ignite": "pytorch-ignite", "nibabel": "nibabel", "scipy": "scipy", "fire": "fire", "yaml": "PyYAML",
        "tqdm": "tqdm", "h5py": "h5py", "einops": "einops", "pytest": "pytest", "iniconfig": "iniconfig", "pluggy": "pluggy",
        "pygments": "Pygments", "packaging": "packaging", "termcolor": "termcolor", "typing_extensions": "typing_extensions"}
print(" ".join(req for mod, req in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [[ -n "$missing" ]]; then
  echo "== installing from $WHEELS: $missing"
  python -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" $missing || { echo "wheel install failed"; exit 1; }
fi

# tests: skip the modules whose optional packages are absent
ignore=()
python -c "import SimpleITK" 2>/dev/null || ignore+=(--ignore=tests/test_registration_geometry.py --ignore=tests/test_phantom.py -k "not sitk")
python -c "import matplotlib" 2>/dev/null || ignore+=(--ignore=tests/test_bundle.py --ignore=tests/test_cross_teaching_variants.py
                                                       --ignore=tests/test_registration_in_training.py)
python -c "import SimpleITK" 2>/dev/null || ignore+=(--ignore=tests/test_registration_in_training.py)
python -c "import jsonschema" 2>/dev/null || ignore+=(--ignore=tests/test_bundle_metadata.py)
echo "== tests (at most 240 s) ${ignore[*]:-}"
timeout 240 python -m pytest -q -p no:cacheprovider tests "${ignore[@]}" 2>&1 | tail -5
echo "tests exit status: ${PIPESTATUS[0]} (124 = time limit)"

echo "== timings (at most 180 s)"
OUTFILE="${OUT:-benchmarks/results}/gpu_check.json"
timeout 180 python benchmarks/gpu_check.py --out "$OUTFILE" 2>&1 | grep -v -i warning | tail -12
echo "== total $(( $(date +%s) - start )) s"
