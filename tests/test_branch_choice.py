"""``ensemble_branch: best``: validation scores the mean, A and B in one pass and the saved model segments with the best."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.training.branch_choice import AllBranches, SplitBranches, choose, evaluated_network
from scripts.training.checkpoint import BestModelSaver
from scripts.training.networks import EnsembleNet
from tests.cross_teaching_fixtures import make_rsl_datalist, run_bundle

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _pair() -> EnsembleNet:
    torch.manual_seed(0)
    return EnsembleNet(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(1, 4, 3, padding=1))


def test_one_pass_gives_each_branch_as_the_network_would():
    net, image = _pair(), torch.rand(2, 1, 8, 8)
    stacked = AllBranches(net)(image)
    assert stacked.shape == (2, 12, 8, 8)
    split = SplitBranches(num_classes=4)({"pred": stacked[0]})
    for branch, key in (("mean", "pred"), ("a", "pred_a"), ("b", "pred_b")):
        net.branch = branch
        torch.testing.assert_close(split[key], net(image)[0])
    one = torch.nn.Conv2d(1, 4, 3, padding=1)  # one network: passed through, every key the same prediction
    out = SplitBranches(num_classes=4)({"pred": AllBranches(one)(image)[0]})
    assert torch.equal(out["pred_a"], out["pred"]) and torch.equal(out["pred_b"], out["pred"])
    with pytest.raises(ValueError, match="channels"):
        SplitBranches(num_classes=3)({"pred": stacked[0]})
    assert evaluated_network(net, False) is net and isinstance(evaluated_network(net, True), AllBranches)


def test_choose_takes_the_best_and_keeps_the_mean_on_ties():
    key = "val_mean_dice"
    assert choose({key: 0.70, "val_mean_dice_a": 0.72, "val_mean_dice_b": 0.65}, key) == "a"
    assert choose({key: 0.70, "val_mean_dice_a": 0.68, "val_mean_dice_b": 0.71}, key) == "b"
    assert choose({key: 0.70, "val_mean_dice_a": 0.70, "val_mean_dice_b": 0.70}, key) == "mean"
    assert choose({key: 0.70}, key) == "mean"  # validated without the branches


def _saver(tmp_path: Path, choose_branch: bool) -> BestModelSaver:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    config = dict(parser.get("default_model_config"))
    return BestModelSaver(str(tmp_path / "model.pt"), _pair(), model_config=config, choose_branch=choose_branch)


def _validated(saver: BestModelSaver, epoch: int, mean: float, a: float, b: float) -> None:
    metrics = {"val_mean_dice": mean, "val_mean_dice_a": a, "val_mean_dice_b": b}
    saver(SimpleNamespace(state=SimpleNamespace(metrics=metrics, key_metric_name="val_mean_dice", epoch=epoch)))


def test_the_saved_model_records_the_branch_of_its_validation(tmp_path):
    saver = _saver(tmp_path, choose_branch=True)
    _validated(saver, 1, 0.60, 0.65, 0.50)
    assert json.loads((tmp_path / "model_config.json").read_text())["branch"] == "a"
    _validated(saver, 2, 0.58, 0.70, 0.70)  # not a better mean: nothing saved, the record stays
    assert saver.best_epoch == 1 and saver.best_branch == "a"
    _validated(saver, 3, 0.66, 0.64, 0.62)  # the mean selects the checkpoint; here the mean is also best
    assert json.loads((tmp_path / "model_config.json").read_text())["branch"] == "mean"
    resumed = _saver(tmp_path / "r", choose_branch=True)
    resumed.load_state_dict(saver.state_dict())
    assert (resumed.best_branch, resumed.best_epoch) == ("mean", 3)
    fixed = _saver(tmp_path / "f", choose_branch=False)
    _validated(fixed, 1, 0.60, 0.65, 0.50)
    assert json.loads((tmp_path / "f" / "model_config.json").read_text())["branch"] == "mean"


@pytest.mark.parametrize(
    "overlays, on",
    [
        ([], True),
        (["variant_two_unets.yaml"], True),
        (["variant_cct_r.yaml"], False),  # the paper: the mean
        (["variant_cts.yaml"], False),  # the baselines as measured
        (["variant_cps.yaml"], False),
        (["variant_mcsc.yaml"], False),
        (["variant_uamt.yaml"], False),  # the student
        (["variant_ls.yaml"], False),  # one network
        (["variant_tac.yaml"], False),
    ],
)
def test_which_variants_let_validation_choose(overlays, on):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ["train.yaml", *overlays]])
    assert parser.get_parsed_content("branch_choice_on") is on
    assert parser.get_parsed_content("network_branch") in ("mean", "a")


def test_training_saves_the_branch_validation_scored_best(tmp_path, capfd):
    data = make_rsl_datalist(tmp_path / "phantom")
    run_bundle(
        tmp_path / "run",
        ["train.yaml", "variant_cts.yaml"],
        data["plain"],
        "--ensemble_branch",
        "best",
        "--num_iterations",
        "4",
        "--val_interval",
        "2",
    )
    out = capfd.readouterr()
    lines = re.findall(r"iteration \d+/4: val_mean_dice .*", out.out + out.err)  # the bundle's log lines
    assert len(lines) == 2
    scores = []
    for line in lines:
        mean = float(re.search(r"val_mean_dice ([0-9.]+)", line).group(1))
        a, b = (float(v) for v in re.search(r"alone: cnn ([0-9.]+), transformer ([0-9.]+)", line).groups())
        scores.append((mean, {"mean": mean, "a": a, "b": b}))
    best_mean, best = max(scores, key=lambda s: s[0])  # the mean selects the checkpoint (first of equals)
    expected = max(("mean", "a", "b"), key=lambda k: (best[k], k == "mean"))
    config = json.loads((tmp_path / "run" / "models" / "model_config.json").read_text())
    assert config["branch"] == expected
    assert f"(inference: {dict(a='cnn', b='transformer').get(expected, expected)})" in lines[-1]


def test_choosing_at_validation_leaves_training_unchanged(tmp_path):
    data = make_rsl_datalist(tmp_path / "phantom")
    weights = {}
    for branch in ("mean", "best"):
        run_bundle(
            tmp_path / branch,
            ["train.yaml", "variant_no_contrastive.yaml"],
            data["rsl"],
            "--ensemble_branch",
            branch,
            "--num_iterations",
            "6",
            "--val_interval",
            "2",
        )
        state = torch.load(tmp_path / branch / "models" / "train_state.pt", map_location="cpu", weights_only=False)
        weights[branch] = state["network"]
    assert weights["mean"].keys() == weights["best"].keys()
    assert all(torch.equal(weights["mean"][k], weights["best"][k]) for k in weights["mean"])
