"""Inference's largest-component post-processing (``largest_component``): on when the model says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import KeepLargestConnectedComponentd
from scipy import ndimage

from scripts.training.model_config import largest_component

ROOT = Path(__file__).resolve().parents[1]


def _model_config(recorded: bool | None) -> dict:
    """The bundle's default model description, with ``largest_component`` as recorded (``None``: absent)."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    config = {k: v for k, v in parser.get("default_model_config").items() if k != "largest_component"}
    return config if recorded is None else {**config, "largest_component": recorded}


def _postprocessing(model_config: dict, requested=None) -> list:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    parser["model_config"] = model_config
    parser["largest_component"] = requested
    return parser.get_parsed_content("postprocessing").transforms


def _two_blobs() -> torch.Tensor:
    """Logits (4, 24, 24, 6): class 1 in a big block and a small island apart from it, class 3 in one block."""
    logits = torch.zeros(4, 24, 24, 6)
    logits[0] = 1.0
    logits[1, 2:12, 2:12, 1:5] = 5.0  # the RV proper
    logits[1, 20:22, 20:22, 2:3] = 5.0  # a stray island, not touching it
    logits[3, 14:19, 2:8, 1:5] = 5.0
    return logits


def _components(label: np.ndarray, c: int) -> int:
    return ndimage.label(label == c, structure=np.ones((3, 3, 3)))[1]


def test_the_model_setting_decides_and_the_flag_overrides():
    assert largest_component({"largest_component": True}) is True
    assert largest_component({}) is False  # descriptions written before 0.9.0: no post-processing
    assert largest_component({"largest_component": True}, "false") is False
    assert largest_component({}, "true") is True
    assert largest_component({"largest_component": False}, "null") is False
    with pytest.raises(ValueError, match="largest_component"):
        largest_component({}, "maybe")


def test_postprocessing_drops_islands_only_when_on():
    on = _postprocessing(_model_config(True))
    off = _postprocessing(_model_config(True), "false")
    old = _postprocessing(_model_config(None))  # a model trained before the setting existed
    assert any(isinstance(t, KeepLargestConnectedComponentd) for t in on)
    assert not any(isinstance(t, KeepLargestConnectedComponentd) for t in off + old)
    # the transforms before the written copy: argmax (and the component filter when on)
    head = on[: [type(t).__name__ for t in on].index("CopyItemsd")]
    raw = np.asarray(head[0]({"pred": _two_blobs()})["pred"][0])
    kept = np.asarray(head[-1](head[0]({"pred": _two_blobs()}))["pred"][0])
    assert _components(raw, 1) == 2 and _components(kept, 1) == 1
    assert (kept[2:12, 2:12, 1:5] == 1).all() and (kept[20:22, 20:22, 2] == 0).all()  # the island, not the RV
    np.testing.assert_array_equal(kept == 3, raw == 3)  # a class in one piece is untouched
