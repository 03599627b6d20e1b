"""benchmarks/table1.py: the paper's Table 1 layout from the protocol runner's tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import table1  # noqa: E402


def _run(variant: str, seed: int, dice: float, hd: float) -> dict:
    metrics = {c: {"dice": dice, "hd95_mm": hd} for c in ("RV", "myocardium", "LV", "mean")}
    return {"variant": variant, "seed": seed, "metrics": metrics}


def _table(path: Path, runs: list[dict]) -> str:
    path.write_text(json.dumps({"preset": "full", "runs": runs}))
    return str(path)


def test_cells_are_seed_means_the_last_table_wins_and_missing_cells_say_why(tmp_path):
    old = _table(tmp_path / "old.json", [_run("ls", 1, 0.50, 10.0), _run("ls", 2, 0.50, 10.0)])
    new = _table(tmp_path / "new.json", [_run("ls", 1, 0.60, 10.0), _run("ls", 2, 0.80, 30.0), _run("cps", 1, 0.7, 5)])
    paper = tmp_path / "paper.json"
    paper.write_text(json.dumps({"7": {"ls": 75.9, "mcsc": 80.0}}))
    text = table1.main(
        [
            "--table",
            f"7:{old}",
            f"7:{new}",
            "--paper",
            str(paper),
            "--only",
            "ls",
            "mcsc",
            "--missing",
            "7:mcsc=too slow",
            "--version",
            "7:ls=0.7.0",
        ]
    )
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(lines) == 2  # --only: cps left out
    ls, mcsc = lines
    assert "**70.0 +- 10.0**" in ls and "20.0 +- 10.0" in ls and "| 75.9 |" in ls and "new.json" in ls
    assert "| 1, 2 | 0.7.0 | 75.9 |" in ls  # seeds, then the version that trained the cell
    assert "too slow" in mcsc and "| 80.0 |" in mcsc
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert ls.count("|") == mcsc.count("|") == header.count("|")


def test_a_table_that_is_not_there_is_named(tmp_path):
    with pytest.raises(SystemExit, match="nothere.json does not exist"):
        table1.main(["--table", f"1:{tmp_path / 'nothere.json'}"])
    with pytest.raises(SystemExit, match="not COUNT"):
        table1.main(["--table", "table.json"])


def test_the_largest_component_column_needs_every_run_of_the_cell(tmp_path):
    both = [
        _run("ls", s, 0.5, 10.0) | {"lcc_metrics": {"mean": {"dice": d, "hd95_mm": h}}}
        for s, d, h in ((1, 0.6, 4.0), (2, 0.8, 6.0))
    ]
    one = [
        _run("cps", 1, 0.5, 10.0) | {"lcc_metrics": {"mean": {"dice": 0.9, "hd95_mm": 1.0}}},
        _run("cps", 2, 0.5, 10.0),
    ]
    text = table1.main(["--table", f"3:{_table(tmp_path / 't.json', both + one)}"])
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    assert "| 70.0 +- 10.0 / 5.0 |" in rows["`ls`"]
    assert "/" not in rows["`cps`"].split("|")[9]  # one run without it: no cell rather than a one-seed number


def test_registration_only_row_from_the_baseline_summary(tmp_path):
    summary = tmp_path / "metrics_summary.csv"
    lines = ["class,class_name,n_cases,dice_mean,dice_std,hd95_mm_mean,hd95_mm_std"]
    for i, (name, dice, hd) in enumerate((("RV", 0.3, 40.0), ("myocardium", 0.2, 30.0), ("LV", 0.4, 20.0))):
        lines.append(f"{i + 1},{name},20,{dice},0.1,{hd},5.0")
    lines.append("mean,mean,20,0.3,0.1,30.0,5.0")
    summary.write_text("\n".join(lines) + "\n")
    table = _table(tmp_path / "t.json", [_run("ls", 1, 0.6, 10.0), _run("ls", 2, 0.6, 10.0)])
    text = table1.main(["--table", f"3:{table}", "--registration", f"3:{summary}", "--only", "ls", "registration_only"])
    reg = next(line for line in text.splitlines() if line.startswith("| `registration_only`"))
    assert "| 30.0 | 20.0 | 40.0 | **30.0** | 40.0 | 30.0 | 20.0 | 30.0 |" in reg and "+-" not in reg
    assert "no training" in reg and "metrics_summary.csv" in reg
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert reg.count("|") == header.count("|")
    summary.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(SystemExit, match="no row for myocardium, LV, mean"):
        table1.main(["--table", f"3:{table}", "--registration", f"3:{summary}"])
