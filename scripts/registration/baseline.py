"""Registration-only segmentation baseline: propagate labeled volumes' labels and score them.

For every evaluation volume v (validation/test, with a label) the labeled partners are ranked by
BRS; the best partner's label warped onto v is the "brs" prediction, and a voxel-wise majority
vote over the top-k partners' warped labels is the "top{k}" prediction (a step beyond the paper).
For reference the "first" prediction uses the first labeled volume (no selection).  Each set is
written as NIfTI on v's grid and scored with :func:`scripts.evaluation.metrics.evaluate_files`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..data.atomic_io import save_nifti, write_json
from ..evaluation.metrics import evaluate_files, summarize, write_reports
from .brs import BestRegistrationSelector, usable
from .propagation import majority_vote, propagate_label
from .store import TransformTable

logger = logging.getLogger(__name__)


def run_baseline(
    table: TransformTable,
    labeled: list[dict],
    evaluation: list[dict],
    selector: BestRegistrationSelector,
    out_dir: str | Path,
    top_k: int = 3,
    mode: str = "nearest",
    num_classes: int | None = None,
    class_names: dict[int, str] | None = None,
    label_mapping: dict[int, int] | None = None,
) -> dict:
    """Write predictions and metric reports under ``out_dir/<method>/``; return mean Dice per method.

    ``label_mapping`` (``{raw_value: class_id}``, e.g. Synapse's 13 -> 8 organs): labels are propagated and
    voted in their raw values, and both the propagated and the true label are mapped before scoring, so
    that ``class_names`` (the mapped classes) name what is scored.
    """
    out_dir = Path(out_dir)
    class_names = class_names or {1: "1", 2: "2", 3: "3"}
    label_of = {q["id"]: q["label"] for q in labeled}
    partners = [q["id"] for q in labeled]
    methods: dict[str, list[dict]] = {"first": [], "brs": []}
    if top_k and top_k > 1 and len(partners) > 1:
        methods[f"top{top_k}"] = []
    choices = {}
    for v in evaluation:
        ranked = usable(selector.rank(table, v["id"], v["image"], partners))
        choices[v["id"]] = [(s.partner, s.score) for s in ranked]
        warped: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def get(q: str):
            if q not in warped:
                t = table.get(v["id"], q)
                warped[q] = propagate_label(label_of[q], v["image"], t, mode, num_classes) if t is not None else None
            return warped[q]

        picks = {"first": [partners[0]], "brs": [s.partner for s in ranked[:1]]}
        if f"top{top_k}" in methods:
            picks[f"top{top_k}"] = [s.partner for s in ranked[:top_k]]
        for method, qs in picks.items():
            maps = [get(q) for q in qs]
            maps = [m for m in maps if m is not None]
            if not maps:  # no partner registered: a failure, scored with Dice 0 and named
                methods[method].append({"id": v["id"], "pred": None, "label": v["label"]})
                continue
            label = majority_vote([m[0] for m in maps], num_classes)
            path = out_dir / method / f"{v['id']}.nii.gz"
            save_nifti(label, maps[0][1], path, dtype=np.uint8)
            methods[method].append({"id": v["id"], "pred": str(path), "label": v["label"]})
    result = {"partners": choices}
    for method, cases in methods.items():
        if not cases:
            continue
        rows = evaluate_files(cases, class_ids=sorted(class_names), label_mapping=label_mapping)
        write_reports(rows, out_dir / method, class_names, prefix="metrics")
        summary = summarize(rows, class_names)
        dice = [float(r["dice"]) for r in rows]
        failed = [c["id"] for c in cases if c["pred"] is None]
        if failed:
            logger.warning(
                "registration-only %s: %d volume(s) without a registered partner, counted with Dice 0: %s",
                method,
                len(failed),
                ", ".join(failed),
            )
        result[method] = {
            "cases": len(cases),
            "no_prediction": failed,
            "mean_dice": float(np.mean(dice)) if dice else float("nan"),
            "per_class": summary,
        }
    write_json(out_dir / "baseline.json", result)
    return result
