"""Registration QC montage: registered labels over their unlabeled targets, ordered by BRS score.

One row per unlabeled volume (best BRS score first; up to ``max_volumes``, spread over the ranking
when there are more): a few slices of the target image with the registered label's contours (solid)
and, where the datalist knows it, the true label's (dashed). A glance shows whether registration
placed the structures and whether the BRS score orders the volumes sensibly.
"""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np

from scripts.data.atomic_io import atomic_path
from scripts.data.datalist import load_datalist, load_datalist_info
from scripts.evaluation.figures import overlay_figure, pick_slices, slice_axis_of

__all__ = ["write_qc_montage"]


def _spread(items: list, count: int) -> list:
    if len(items) <= count:
        return items
    return [items[int(round(i))] for i in np.linspace(0, len(items) - 1, count)]


def write_qc_montage(
    datalist: str | os.PathLike, path: str | os.PathLike, max_volumes: int = 8, slices: int = 3
) -> str | None:
    """Write the montage PNG of an ``rsl_datalist.json``; ``None`` when no volume has a registered label."""
    import matplotlib.image
    import matplotlib.pyplot as plt

    entries = [e for e in load_datalist(datalist, "unlabeled") if e.get("registered_label")]
    if not entries:
        return None
    entries.sort(
        key=lambda e: e["brs_score"] if e.get("brs_score") is not None and math.isfinite(e["brs_score"]) else math.inf
    )
    names = {int(k): v for k, v in load_datalist_info(datalist)["labels"].items()}
    rows = []
    for e in _spread(entries, max_volumes):
        img = nib.load(e["image"])
        image = np.asarray(img.dataobj, dtype=np.float32)
        registered = np.asarray(nib.load(e["registered_label"]).dataobj).astype(np.int16)
        layers = {"registered label": registered}
        if e.get("true_label"):
            layers["true label"] = np.asarray(nib.load(e["true_label"]).dataobj).astype(np.int16)
        axis = slice_axis_of(img.header.get_zooms()[:3])
        classes = sorted(int(c) for c in np.unique(registered) if c)
        score = e.get("brs_score")
        title = f"{e['id']} <- {e.get('partner')}  (BRS score {score:.3f})" if score is not None else e["id"]
        fig = overlay_figure(image, layers, axis, pick_slices(registered, axis, slices), classes, title, names)
        fig.canvas.draw()
        rows.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
        plt.close(fig)
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    with atomic_path(path, suffix=".png") as tmp:
        matplotlib.image.imsave(tmp, np.concatenate(padded, axis=0), format="png")
    return str(path)
