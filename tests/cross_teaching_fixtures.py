"""Shared helpers of the cross-teaching bundle tests: a tiny phantom with registered labels, and in-process bundle runs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from scripts.data.atomic_io import save_nifti
from scripts.data.phantom import ensure_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]
#: Overrides that keep a run to seconds: tiny patches, a small SwinUNETR, no worker processes.
FAST = {
    "patch_size": [32, 32],
    "batch_size": 4,
    "num_workers": 0,
    "cache_num_workers": 0,
    "swin_feature_size": 12,
    "monitor_max_volumes": 2,
}


def slice_batch(seed: int = 0) -> dict:
    """One semi-supervised loader batch of random 32x32 slices: 2 labeled, 2 unlabeled with registered labels."""
    g = torch.Generator().manual_seed(seed)
    return {
        "labeled": {
            "image": torch.rand(2, 1, 32, 32, generator=g),
            "label": torch.randint(0, 3, (2, 1, 32, 32), generator=g).float(),
        },
        "unlabeled": {
            "image": torch.rand(2, 1, 32, 32, generator=g),
            "registered_label": torch.randint(0, 3, (2, 1, 32, 32), generator=g).float(),
            "registered_label_valid": torch.tensor([1.0, 1.0]),
        },
    }


def make_rsl_datalist(root: Path, n_validation: int = 1) -> dict[str, str]:
    """A small phantom (2 labeled, 2 unlabeled) and its registration-style datalist.

    Returns ``{"plain": datalist.json, "rsl": rsl_datalist.json}``. The first unlabeled volume's
    registered label is its true label; the second's is the true label shifted by 3 voxels in-plane
    (a registration error), so registered labels score between 0 and 1; their BRS scores rank them so.
    """
    plain = Path(
        ensure_phantom_dataset(
            root / "phantom", n_labeled=2, n_unlabeled=2, n_validation=n_validation, n_test=0, seed=3
        )
    )
    data = json.loads(plain.read_text())
    for i, entry in enumerate(data["unlabeled"]):
        truth = nib.load(plain.parent / entry["true_label"])
        label = np.asarray(truth.dataobj)
        if i == 1:
            label = np.roll(label, 3, axis=0)
        path = root / "registered" / f"{entry['id']}.nii.gz"
        save_nifti(label, truth.affine, path, dtype=np.uint8)
        entry["registered_label"] = str(path)
        entry["brs_score"] = [1.0, 3.0][i % 2]  # the registration step's BRS score (lower: more reliable)
    for section in ("training", "unlabeled", "validation", "test"):
        for entry in data.get(section, []):
            for key in ("image", "label", "true_label"):
                if key in entry:
                    entry[key] = str(plain.parent / entry[key])
    rsl = root / "rsl_datalist.json"
    rsl.write_text(json.dumps(data, indent=1))
    return {"plain": str(plain), "rsl": str(rsl)}


def _overrides(args: tuple[str, ...]) -> dict:
    """``("--name", "value", ...)`` as keyword overrides (values parsed as JSON where they parse)."""
    if len(args) % 2:
        raise ValueError(f"overrides must come in --name value pairs, got {args}")
    out = {}
    for name, value in zip(args[::2], args[1::2]):
        try:
            out[name.lstrip("-")] = json.loads(value)
        except json.JSONDecodeError:
            out[name.lstrip("-")] = value
    return out


def run_bundle(run_dir: Path, config_files: list[str], datalist: str, *args: str, run_id: str = "training") -> None:
    """``python -m monai.bundle run <run_id>`` in this process, from the bundle root, with :data:`FAST` overrides."""
    import os

    from monai.bundle import run

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        run(
            run_id,
            config_file=[f"configs/{f}" for f in config_files],
            bundle_root=str(run_dir),
            datalist_file=datalist,
            **{**FAST, **_overrides(args)},
        )
    finally:
        os.chdir(cwd)


def run_trainer(run_dir: Path, config_files: list[str], datalist: str, **overrides):
    """Build ``train#trainer`` from the configs (with :data:`FAST` and ``overrides``) from the bundle root,
    run it, and return it (its ``state.output`` holds the last iteration's loss terms)."""
    import os

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in config_files])
    parser.update({**FAST, "bundle_root": str(run_dir), "datalist_file": datalist, **overrides})
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        trainer = parser.get_parsed_content("train#trainer")
        trainer.run()
    finally:
        os.chdir(cwd)
    return trainer
