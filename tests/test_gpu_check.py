"""benchmarks/gpu_check.py, the timing half of the prepared GPU check, runs end to end on the CPU.

It is only ever run for real on a lent GPU machine, where a broken script costs the lease: this test
keeps its phantom path working (it broke once when the default started ranking RSL by BRS scores,
which the phantom's true-transform labels do not have). Two variants, float32 and the side-by-side
child process run too: each is a separate path through the script."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_times_registration_and_training_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_check.py"),
        "--device",
        "cpu",
        "--patch",
        "32",
        "--warmup",
        "1",
        "--iterations",
        "1",
        "--pairs",
        "2",
        "--amp",
        "0",
        "--variants",
        "default",
        "ls",
        "--side_by_side",
        "2",
        "--old_pipeline_too",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (reg,) = report["registration"]  # on the CPU there is no second, CPU-side registration row
    assert reg["device"] == "cpu" and reg["pairs"] == 2 and reg["pairs_per_s"] > 0
    rows = report["training"]
    assert [(r["variant"], r.get("side_by_side")) for r in rows] == [
        ("default", None),
        ("ls", None),
        ("default", None),
        ("default", 2),
        ("default", 2),
    ]
    assert [r["pipeline"] for r in rows[:3]] == ["device, 1 pass", "device, 1 pass", "workers, 3 passes"]
    for r in rows:
        assert r["amp"] == "0" and not r["amp_on"] and r["handlers"] and r["iterations"] == 1 and r["finite_losses"]
        assert r["it_per_s"] > 0 and math.isnan(r["peak_gpu_mb"])
    assert "| ls, patch 32, batch 8, amp 0 (off), handlers on, device, 1 pass |" in proc.stdout
    assert "| default, patch 32, batch 8, amp 0 (off), handlers on, workers, 3 passes |" in proc.stdout
