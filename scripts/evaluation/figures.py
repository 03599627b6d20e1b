"""Pictures a person looks at: label overlays on slices, per-class Dice across cases, training curves.

All drawing is headless (matplotlib's Agg backend) and every file is written atomically. Callers:

* :func:`overlay_figure` / :func:`write_case_overlays` - a few slices of one volume with label contours
  (evaluation: ground truth solid, prediction dashed; registration QC: the registered label);
* :func:`write_dice_plot` - the per-class Dice of every case (evaluation);
* :func:`write_curves` - training curves (loss terms, validation Dice per class, pseudo-label Dice).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scripts.data.atomic_io import atomic_path  # noqa: E402

__all__ = [
    "CLASS_COLOURS",
    "slice_axis_of",
    "pick_slices",
    "overlay_figure",
    "write_case_overlays",
    "write_dice_plot",
    "write_curves",
    "save_figure",
]

#: one colour per class id (background unused), cycling for many classes
CLASS_COLOURS = [
    "#000000",
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#fabed4",
]


def _colour(c: int) -> str:
    return CLASS_COLOURS[1 + (int(c) - 1) % (len(CLASS_COLOURS) - 1)] if c else CLASS_COLOURS[0]


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save ``fig`` as PNG atomically and close it."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)


def slice_axis_of(spacing: Sequence[float]) -> int:
    """The through-plane axis: the largest voxel spacing (the first one on ties)."""
    return int(np.argmax(np.asarray(spacing, dtype=float)))


def pick_slices(label: np.ndarray, axis: int, count: int = 3) -> list[int]:
    """``count`` slice indices spread over the slices where ``label`` has foreground (else over all)."""
    n = label.shape[axis]
    other = tuple(a for a in range(label.ndim) if a != axis)
    filled = np.flatnonzero(np.asarray(label > 0).any(axis=other)) if label.any() else np.arange(n)
    if len(filled) <= count:
        return [int(i) for i in filled]
    return [int(filled[int(round(q))]) for q in np.linspace(0, len(filled) - 1, count + 2)[1:-1]]


def _take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis).T  # rows = second in-plane axis, as viewers show it


def _contours(ax, label2d: np.ndarray, classes: Sequence[int], style: str) -> None:
    for c in classes:
        mask = (label2d == c).astype(float)
        if mask.any() and not mask.all():
            ax.contour(mask, levels=[0.5], colors=[_colour(c)], linewidths=1.2, linestyles=style)


def overlay_figure(
    image: np.ndarray,
    layers: Mapping[str, np.ndarray],
    axis: int,
    slices: Sequence[int],
    classes: Sequence[int],
    title: str = "",
    class_names: Mapping[int, str] | None = None,
):
    """One row of slices: the image in grey with each layer's class contours.

    ``layers`` maps a name to a label volume of the image's shape; the first is drawn solid, the next
    dashed, then dotted (e.g. ``{"ground truth": gt, "prediction": pred}``)."""
    styles = ["solid", "dashed", "dotted"]
    fig, axes = plt.subplots(1, max(1, len(slices)), figsize=(3.2 * max(1, len(slices)), 3.4), squeeze=False)
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    for ax, index in zip(axes[0], slices):
        ax.imshow(_take(image, axis, index), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
        for (name, layer), style in zip(layers.items(), styles):
            _contours(ax, _take(layer, axis, index), classes, style)
        ax.set_title(f"slice {index}", fontsize=8)
        ax.axis("off")
    legend = [plt.Line2D([], [], color=_colour(c), label=(class_names or {}).get(c, str(c))) for c in classes]
    legend += [plt.Line2D([], [], color="k", linestyle=s, label=n) for (n, _), s in zip(layers.items(), styles)]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    return fig


def write_case_overlays(
    path: str | os.PathLike,
    image: np.ndarray,
    layers: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    classes: Sequence[int],
    title: str = "",
    class_names: Mapping[int, str] | None = None,
    count: int = 3,
) -> None:
    """A PNG of ``count`` slices of one volume (slices where the first layer has foreground)."""
    axis = slice_axis_of(spacing)
    first = next(iter(layers.values()))
    fig = overlay_figure(image, layers, axis, pick_slices(first, axis, count), classes, title, class_names)
    save_figure(fig, path)


def write_dice_plot(path: str | os.PathLike, rows: Sequence[Mapping], class_names: Mapping[int, str]) -> None:
    """Per-class Dice of every case (dots) and the class mean (bar) from metric rows (``class``, ``dice``)."""
    classes = sorted({int(r["class"]) for r in rows})
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(classes), 3.6))
    for i, c in enumerate(classes):
        values = np.array([float(r["dice"]) for r in rows if int(r["class"]) == c])
        ax.bar(i, values.mean() if len(values) else 0.0, color=_colour(c), alpha=0.35, width=0.7)
        jitter = np.linspace(-0.18, 0.18, len(values)) if len(values) > 1 else np.zeros(len(values))
        ax.scatter(i + jitter, values, color=_colour(c), s=14, zorder=3)
        ax.text(i, 1.02, f"{values.mean():.3f}" if len(values) else "-", ha="center", fontsize=8)
    ax.set_xticks(range(len(classes)), [class_names.get(c, str(c)) for c in classes], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice per class ({len({r.get('case') for r in rows})} cases; bar = mean)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def write_curves(path: str | os.PathLike, panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]]) -> None:
    """One panel per entry of ``panels`` (title -> {series name -> [(iteration, value), ...]})."""
    panels = {k: v for k, v in panels.items() if any(len(s) for s in v.values())}
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for name, points in series.items():
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
