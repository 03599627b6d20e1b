"""PseudoLabelMonitor: Dice of each network's and of the registered labels against the true labels, known values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.data import MetaTensor
from torch import nn

from scripts.evaluation.pseudo_label_monitor import PseudoLabelMonitor, monitored_entries
from scripts.inference.inferer import SliceResizeInferer

torch.set_num_threads(1)
CLASSES = ["background", "RV", "myocardium", "LV"]


class _Oracle(nn.Module):
    """Reads the label off an image that is label / 3: a perfect segmentation network."""

    def forward(self, x):
        return 10.0 * F.one_hot(torch.round(x[:, 0] * 3).long(), 4).permute(0, 3, 1, 2).float()


class _Background(nn.Module):
    def forward(self, x):
        out = torch.zeros(x.shape[0], 4, *x.shape[2:])
        out[:, 0] = 1.0
        return out


def _batch() -> dict:
    label = np.zeros((16, 16, 4), np.float32)
    label[2:8, 2:8] = 1
    label[8:12, 3:10] = 2
    label[4:7, 10:14] = 3
    registered = label.copy()
    registered[registered == 1] = 0  # registration missed the RV
    affine = torch.diag(torch.tensor([1.5, 1.5, 8.0, 1.0], dtype=torch.float64))
    as_batch = lambda a: MetaTensor(torch.from_numpy(a)[None, None], affine=affine)  # noqa: E731
    return {"image": as_batch(label / 3.0), "true_label": as_batch(label), "registered_label": as_batch(registered)}


def test_monitor_scores_networks_and_registered_labels(tmp_path):
    oracle = _Oracle().train()
    monitor = PseudoLabelMonitor(
        [_batch(), _batch()],
        {"cnn": oracle, "transformer": _Background()},
        SliceResizeInferer([16, 16]),
        CLASSES,
        output_file=tmp_path / "pseudo.json",
    )
    engine = Engine(lambda e, b: None)
    monitor.attach(engine)
    engine.run([0, 0], max_epochs=2)
    assert oracle.training  # the network's mode is given back
    history = json.loads((tmp_path / "pseudo.json").read_text())
    assert [r["iteration"] for r in history] == [2, 4]
    dice = history[-1]["dice"]
    assert dice["cnn"] == {"RV": 1.0, "myocardium": 1.0, "LV": 1.0, "mean": 1.0}
    assert dice["transformer"]["mean"] == 0.0
    assert dice["registered"]["RV"] == 0.0 and dice["registered"]["LV"] == 1.0
    assert dice["registered"]["mean"] == pytest.approx(2 / 3)
    assert engine.state.metrics["pseudo_dice_cnn"] == 1.0
    restored = PseudoLabelMonitor([], {"a": oracle}, None, CLASSES)
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history


def test_monitored_entries_keep_only_volumes_with_true_labels(tmp_path):
    data = {
        "training": [{"id": "l", "image": "l.nii.gz", "label": "l_gt.nii.gz"}],
        "unlabeled": [
            {"id": "u2", "image": "u2.nii.gz", "true_label": "u2_gt.nii.gz", "registered_label": "r2.nii.gz"},
            {"id": "u1", "image": "u1.nii.gz", "true_label": "u1_gt.nii.gz", "registered_label": None},
            {"id": "u0", "image": "u0.nii.gz"},
        ],
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    entries = monitored_entries(path)
    assert [e["id"] for e in entries] == ["u1", "u2"]  # sorted by id; u0 has no true label
    assert "registered_label" not in entries[0] and entries[1]["registered_label"] == str(tmp_path / "r2.nii.gz")
    assert [e["id"] for e in monitored_entries(path, max_volumes=1)] == ["u1"]
    with pytest.raises(ValueError, match="reserved"):
        PseudoLabelMonitor([], {"registered": _Oracle()}, None, CLASSES)
