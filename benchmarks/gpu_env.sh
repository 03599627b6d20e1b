# Sourced by benchmarks/gpu_check.sh and benchmarks/gpu_acdc.sh (from the repository root): what both need
# on a GPU machine without network. PY: its Python (an image may have python3 only); WHEELS: the carried
# wheels (`bash benchmarks/gpu_check.sh --download`).
PY=$(command -v python3 || command -v python)
WHEELS=benchmarks/wheels

gpu_install_wheels() {  # install what the machine lacks from $WHEELS, beside its own packages
  "$PY" -c "import monai, ignite, nibabel, fire" 2>/dev/null && return 0
  echo "== installing from $WHEELS"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; return 1; }
  export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
}

gpu_tests() {  # $1 time limit (s), $2 log, $3 pytest-xdist workers: the suite, verbose (a cut run still names
  # its failures) with a per-test limit where pytest-timeout is; modules of absent optional packages skipped
  local args=()
  "$PY" -c "import SimpleITK" 2>/dev/null || args+=(--ignore=tests/test_registration_geometry.py --ignore=tests/test_phantom.py -k "not sitk")
  "$PY" -c "import jsonschema" 2>/dev/null || args+=(--ignore=tests/test_bundle_metadata.py)
  "$PY" -c "import xdist" 2>/dev/null && args+=(-n "$3")
  "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 120)
  echo "== tests (at most $1 s, log $2) ${args[*]:-}"
  timeout "$1" "$PY" -m pytest -v -rfE --tb=line -p no:cacheprovider tests "${args[@]}" > "$2" 2>&1
  printf '\ntests exit status: %s (124 = time limit)\n' "$?" >> "$2"   # on its own line also after a cut
}

gpu_test_summary() {  # $1 log of gpu_tests
  grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)|^tests exit status" "$1" | tail -30
  echo "passed: $(grep -c " PASSED" "$1"), failed: $(grep -c " FAILED" "$1"), errors: $(grep -c " ERROR" "$1")"
}
