"""The protocol runner (benchmarks/protocol.py): the table's statistics, resuming, one real tiny run."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from scripts.data.phantom import ensure_phantom_dataset
from tests.cross_teaching_fixtures import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import protocol  # noqa: E402


def _result(variant, seed, rv, lv):
    metrics = {
        "RV": {"dice": rv},
        "LV": {"dice": lv},
        "mean": {"dice": (rv + lv) / 2, "hd95_mm": 5.0, "hd95_mm_ssl4mis": 4.0},
    }
    return {"variant": variant, "seed": seed, "metrics": metrics, "minutes": 1.0}


def test_table_gives_mean_and_population_std_per_variant_and_every_run(tmp_path):
    runs = [protocol.Run(v, [], s, tmp_path / f"{v}_s{s}") for v in ("cct-r", "cts") for s in (1, 2)]
    results = [_result("cct-r", 1, 0.5, 0.7), _result("cct-r", 2, 0.6, 0.9), _result("cts", 1, 0.4, 0.6)]
    md, js = protocol.table(results, runs, "screen", "validation")
    assert js["summary"]["cct-r"]["RV"]["mean"] == pytest.approx(55.0)
    assert js["summary"]["cct-r"]["mean"]["std"] == pytest.approx(statistics.pstdev([60.0, 75.0]))
    assert js["summary"]["cts"]["mean"]["n"] == 1
    assert "| cct-r | 1, 2 | 55.0 +- 5.0 | 80.0 +- 10.0 | 67.5 +- 7.5 |" in md
    assert "| cct-r_s2 | 60.0 | 90.0 | 75.0 | 5.0 (4.0) | 1 |" in md
    assert "Not finished yet: cct-r_s1, cct-r_s2, cts_s1, cts_s2." in md  # no result.json written in this test
    assert "Validation also selects" in md


def test_table_states_the_settings_the_runs_were_given(tmp_path):
    """The preset's iterations can be overridden (--set): the header must say what actually ran."""
    runs = [protocol.Run("rank", [], 1, tmp_path / "rank_s1")]
    md, _ = protocol.table(
        [],
        runs,
        "screen",
        "validation",
        {"num_iterations": "400", "patch_size": "[128,128]"},
        {"rank": {"rsl_reliability": "rank"}},
    )
    assert (
        "Settings of every run: `num_iterations=400`, `patch_size=[128,128]`. Per variant: rank: `rsl_reliability=rank`."
        in md
    )
    md, _ = protocol.table([], runs, "screen", "validation")
    assert "Settings of every run" not in md


def test_variant_parsing_refuses_unknown_overlays():
    assert protocol.parse_variant("cct-r=") == ("cct-r", [])
    assert protocol.parse_variant("cts=variant_cts.yaml") == ("cts", ["variant_cts.yaml"])
    with pytest.raises(SystemExit, match="does not exist"):
        protocol.parse_variant("x=variant_nope.yaml")


def test_one_tiny_run_end_to_end_then_resume_skips_it(tmp_path, monkeypatch):
    data = ensure_phantom_dataset(tmp_path / "phantom", n_labeled=2, n_unlabeled=2, n_validation=1, n_test=0, seed=3)
    out = tmp_path / "runs"
    args = [
        "--datalist",
        str(data),
        "--variants",
        "ls=variant_ls.yaml",
        "--seeds",
        "7",
        "--preset",
        "screen",
        "--out",
        str(out),
        "--set",
        "patch_size=[32,32]",
        "batch_size=4",
        "num_iterations=2",
        "val_interval=2",
        "num_workers=0",
        "cache_num_workers=0",
    ]
    protocol.main(args)
    result = json.loads((out / "ls_s7" / "result.json").read_text())
    assert result["seed"] == 7 and 0.0 <= result["metrics"]["mean"]["dice"] <= 1.0
    assert set(result["metrics"]) >= {"RV", "myocardium", "LV", "mean"}
    assert (out / "ls_s7" / "models" / "model.pt").is_file()
    table = (out / "table.md").read_text()
    assert "| ls | 7 |" in table and "Not finished" not in table
    # the same model evaluated with mirror TTA (the phantom model was trained with flips)
    assert json.loads((out / "ls_s7" / "models" / "model_config.json").read_text())["flip_augmentation"] is True
    assert set(result["tta_dice"]) >= {"RV", "mean"} and 0.0 <= result["tta_dice"]["mean"] <= 1.0
    assert "With mirror test-time augmentation" in table
    # the main numbers are the raw argmax (evaluate_command's test); the largest-component evaluation has its
    # own folder and table
    lcc = result["lcc_metrics"]
    assert set(lcc) >= {"RV", "mean"} and 0.0 <= lcc["mean"]["dice"] <= 1.0 and lcc["mean"]["hd95_mm"] >= 0.0
    assert (out / "ls_s7" / "eval" / "evaluation_validation_lcc" / "metrics_per_case.csv").is_file()
    assert "With the largest 3D connected piece" in table and table.count("| ls | 7 |") == 3
    calls = []
    monkeypatch.setattr(protocol, "execute", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(protocol, "add_tta", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(protocol, "add_largest_component", lambda *a, **k: calls.append(a))
    protocol.main(args)  # everything done: nothing runs again
    assert calls == []


def test_acdc_label_splits_build_one_datalist_each_and_name_runs_by_split(tmp_path, monkeypatch):
    import scripts.data.datalist as datalist_module

    built = []

    def fake_build(root, out, labeled, labeled_seed=None):
        built.append((labeled, labeled_seed))
        Path(out).write_text(json.dumps({"labeled_seed": labeled_seed}))
        return str(out)

    monkeypatch.setattr(datalist_module, "build_acdc", fake_build)
    executed = []
    monkeypatch.setattr(protocol, "execute", lambda run, dataset, section: executed.append(run))
    out = tmp_path / "runs"
    protocol.main(
        [
            "--acdc_root",
            str(tmp_path),
            "--labeled",
            "3",
            "--label_splits",
            "standard",
            "5",
            "--variants",
            "ls=variant_ls.yaml",
            "--seeds",
            "1",
            "2",
            "--out",
            str(out),
        ]
    )
    assert built == [(3, None), (3, 5)]
    assert sorted(r.name for r in executed) == ["ls_5_s1", "ls_5_s2", "ls_standard_s1", "ls_standard_s2"]
    for r in executed:
        assert json.loads(Path(r.datalist).read_text())["labeled_seed"] == (None if r.split == "standard" else 5)
        assert r.folder == out / r.name
    protocol.main(
        [
            "--acdc_root",
            str(tmp_path),
            "--labeled",
            "3",
            "--label_splits",
            "standard",
            "--variants",
            "ls=variant_ls.yaml",
            "--seeds",
            "1",
            "--out",
            str(out),
        ]
    )
    assert built == [(3, None), (3, 5)]  # datalists are built once
    with pytest.raises(SystemExit, match="exactly one"):
        protocol.main(["--variants", "ls=variant_ls.yaml", "--out", str(out)])


def test_table_over_splits_pools_seeds_and_splits():
    results = [dict(_result("tac", 1, 0.5, 0.7), split="standard"), dict(_result("tac", 1, 0.7, 0.9), split="4")]
    runs = [protocol.Run("tac", [], 1, Path("x"), split=s) for s in ("standard", "4")]
    md, js = protocol.table(results, runs, "full", "validation")
    assert js["summary"]["tac"]["mean"]["n"] == 2 and js["summary"]["tac"]["mean"]["mean"] == pytest.approx(70.0)
    assert "| tac | 4:1, standard:1 |" in md and "| tac_standard_s1 |" in md


def test_table_reports_each_network_of_two_network_models():
    r = dict(_result("cct-r", 1, 0.5, 0.7), branch_dice={"a": 0.65, "b": 0.4})
    md, _ = protocol.table(
        [r, _result("ls", 1, 0.5, 0.5)], [protocol.Run("cct-r", [], 1, Path("x"))], "full", "validation"
    )
    assert "| cct-r_s1 | mean | 60.0 | 65.0 | 40.0 |" in md and "| ls_s1 |" not in md.split("Each network alone")[1]
    # a model that segments with network A (ensemble_branch best): the mean of both has its own evaluation
    chosen = dict(_result("default", 2, 0.5, 0.7), branch="a", branch_dice={"a": 0.6, "b": 0.4, "mean": 0.55})
    md, _ = protocol.table([chosen], [protocol.Run("default", [], 2, Path("x"))], "full", "validation")
    assert "| default_s2 | a | 55.0 | 60.0 | 40.0 |" in md


def test_runs_whose_model_chose_a_network_are_also_evaluated_as_the_mean(tmp_path, monkeypatch):
    run = protocol.Run("default", [], 1, tmp_path)
    run.folder = tmp_path
    assert protocol.model_branch(run) == "mean"  # nothing trained yet
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model_config.json").write_text(json.dumps({"networks": {"a": {}, "b": {}}, "branch": "a"}))
    assert protocol.model_branch(run) == "a" and protocol.two_networks(run)
    commands = []
    monkeypatch.setattr(
        protocol.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or SimpleNamespace(returncode=0)
    )
    monkeypatch.setattr(protocol, "read_summary", lambda path: {"mean": {"dice": 0.5 if "_mean" in str(path) else 0.6}})
    result = protocol.execute(run, None, "validation")
    branches = [c[c.index("--branch") + 1] if "--branch" in c else None for c in commands[1:]]  # after training
    assert branches == [None, "a", "b", "mean"]
    assert result["branch"] == "a" and result["branch_dice"]["mean"] == 0.5 and result["metrics"]["mean"]["dice"] == 0.6


def test_evaluate_command_selects_the_branch(tmp_path):
    run = protocol.Run("cct-r", [], 1, tmp_path)
    cmd = protocol.evaluate_command(run, "dl.json", "validation", "b")
    assert cmd[-2:] == ["--branch", "b"] and cmd[cmd.index("--output_dir") + 1].endswith("evaluation_validation_b")
    assert "--branch" not in protocol.evaluate_command(run, "dl.json", "validation")
    raw = protocol.evaluate_command(run, "dl.json", "validation")
    assert raw[raw.index("--largest_component") + 1] == "false"  # whatever the model's own setting
    lcc = protocol.evaluate_command(run, "dl.json", "validation", largest_component=True)
    assert lcc[lcc.index("--largest_component") + 1] == "true"
    assert lcc[lcc.index("--output_dir") + 1].endswith("evaluation_validation_lcc")
    tta = protocol.evaluate_command(run, "dl.json", "validation", flip_tta=True)
    assert tta[-2:] == ["--flip_tta", "true"] and tta[tta.index("--output_dir") + 1].endswith(
        "evaluation_validation_tta"
    )


def test_table_reports_the_largest_component_evaluation_with_its_hd95():
    r1 = dict(
        _result("cct-r", 1, 0.5, 0.7),
        lcc_metrics={"RV": {"dice": 0.6}, "LV": {"dice": 0.8}, "mean": {"dice": 0.7, "hd95_mm": 4.0}},
    )
    r2 = dict(
        _result("cct-r", 2, 0.5, 0.7),
        lcc_metrics={"RV": {"dice": 0.4}, "LV": {"dice": 0.8}, "mean": {"dice": 0.6, "hd95_mm": 6.0}},
    )
    md, js = protocol.table([r1, r2], [protocol.Run("cct-r", [], 1, Path("x"))], "full", "validation")
    assert "| cct-r | 1, 2 | 50.0 +- 10.0 | 80.0 +- 0.0 | 65.0 +- 5.0 | 5.0 +- 1.0 |" in md.split("largest 3D")[1]
    assert js["summary"]["cct-r"]["lcc_mean"]["mean"] == pytest.approx(65.0)
    assert js["summary"]["cct-r"]["lcc_hd95_mm"]["std"] == pytest.approx(1.0)
