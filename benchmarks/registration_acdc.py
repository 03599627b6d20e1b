"""ACDC benchmark of the registration engines: per-pair time and propagated-label Dice.

For evaluation volumes v (ACDC validation patients, both frames) and every labeled volume q
(7 labeled patients -> 14 volumes) it registers (v, q) and (q, v), propagates y_q onto v through
T_vq and scores it against v's ground truth (mean Dice over RV, myocardium, LV, as
``scripts.evaluation.metrics.dice_score``).  Reported: median seconds per pair, mean Dice without selection
(average over all partners = a random labeled partner), with BRS, with top-k majority fusion, and the
oracle (best partner), plus the fraction of failed pairs (counted as Dice 0 where a partner is
forced).  Never run by the tests; needs the ACDC folder.

    python benchmarks/registration_acdc.py --acdc /path/to/acdc --engine torch --n-eval 10 \
        --settings '{"init": "moments"}' --out benchmarks/results/acdc_torch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from scripts.data.atomic_io import write_json
from scripts.data.datalist import build_acdc, load_datalist
from scripts.evaluation.metrics import dice_score
from scripts.registration.brs import BestRegistrationSelector
from scripts.registration.engine import PairSpec, make_engine
from scripts.registration.propagation import majority_vote, propagate_label
from scripts.registration.store import TransformTable
from scripts.registration.volumes import load_volume


def mean_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([dice_score(pred == c, gt == c) for c in (1, 2, 3)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--acdc", required=True)
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--settings", default="{}", help="engine settings as JSON")
    ap.add_argument("--n-eval", type=int, default=10, help="evaluation volumes (first N of validation)")
    ap.add_argument("--labeled", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--brs", default='{"w_rmse": 0.1, "w_mi": 1.0}')
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--work", default="/tmp/registration_acdc_benchmark")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    datalist = build_acdc(
        args.acdc, Path(args.work) / f"acdc{args.labeled}" / "datalist.json", labeled=args.labeled, include_test=False
    )
    labeled = load_datalist(datalist, "training")
    evaluation = load_datalist(datalist, "validation")[: args.n_eval]
    engine = make_engine(args.engine, **json.loads(args.settings))
    pairs = [PairSpec(v["id"], v["image"], q["id"], q["image"]) for v in evaluation for q in labeled]
    pairs += [PairSpec(q["id"], q["image"], v["id"], v["image"]) for v in evaluation for q in labeled]
    results, batch_times = [], []
    for start in range(0, len(pairs), args.batch_size):
        batch = pairs[start : start + args.batch_size]
        t0 = time.perf_counter()
        results += engine.register_batch(batch)
        batch_times.append((time.perf_counter() - t0) / len(batch))
    table = TransformTable.from_results(results)
    selector = BestRegistrationSelector(**json.loads(args.brs))

    per_pair, chosen, fused, first, details = {}, {}, {}, {}, {}
    for v in evaluation:
        gt = np.rint(load_volume(v["label"]).array).astype(np.uint8)
        warped = {}
        for q in labeled:
            t = table.get(v["id"], q["id"])
            if t is None:
                per_pair[(v["id"], q["id"])] = 0.0
                continue
            warped[q["id"]] = propagate_label(q["label"], v["image"], t, "nearest")[0]
            per_pair[(v["id"], q["id"])] = mean_dice(warped[q["id"]], gt)
        full_rank = selector.rank(table, v["id"], v["image"], [q["id"] for q in labeled])
        details[v["id"]] = [
            {"partner": s.partner, "dice": per_pair[(v["id"], s.partner)], "rmse": s.rmse, "mi": s.mi, "score": s.score}
            for s in full_rank
        ]
        ranked = [s for s in full_rank if s.score < np.inf]
        chosen[v["id"]] = per_pair[(v["id"], ranked[0].partner)] if ranked else 0.0
        top = [warped[s.partner] for s in ranked[: args.top_k]]
        fused[v["id"]] = mean_dice(majority_vote(top, 4), gt) if top else 0.0
        first[v["id"]] = per_pair[(v["id"], labeled[0]["id"])]
    ids = [v["id"] for v in evaluation]
    all_pairs = list(per_pair.values())
    report = {
        "engine": engine.settings(),
        "n_eval_volumes": len(evaluation),
        "n_labeled_volumes": len(labeled),
        "pairs": len(pairs),
        "failed_pairs": sum(not r.ok for r in results),
        "failure_reasons": sorted({r.reason.split(":")[0] for r in results if not r.ok}),
        "median_seconds_per_pair": statistics.median(r.seconds for r in results),  # torch: batch time / size
        "total_seconds": float(
            sum(
                batch_times[i] * len(pairs[i * args.batch_size : (i + 1) * args.batch_size])
                for i in range(len(batch_times))
            )
        ),
        "dice_all_partners_mean": float(np.mean(all_pairs)),
        "dice_first_partner": float(np.mean([first[i] for i in ids])),
        "dice_brs": float(np.mean([chosen[i] for i in ids])),
        f"dice_top{args.top_k}_fusion": float(np.mean([fused[i] for i in ids])),
        "dice_oracle": float(np.mean([max(per_pair[(i, q["id"])] for q in labeled) for i in ids])),
        "threads": args.threads,
        "per_target": details,
    }
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "per_target"}, indent=1))


if __name__ == "__main__":
    main()
