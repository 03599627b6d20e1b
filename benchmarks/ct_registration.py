"""CT registration on the synthetic abdominal CT phantom: affine vs affine + deformable, both engines, and costs.

1. **Accuracy** (small phantom, ``--n_labeled`` atlases, ``--n_unlabeled`` targets): every atlas label
   is propagated onto every target through ``T_target->atlas`` (as RSL does) and scored against the
   target's true label after the 13 -> 8 mapping: mean Dice over the 8 organs, per engine and mode
   (the settings of ``configs/train.yaml`` + ``configs/dataset_synapse.yaml``, with ``deformable`` off and on).
2. **CT size** (``size="ct"``: 512 x 512 x 100, 0.7-0.9 mm, 3-5 mm slices): one pair per engine and mode in
   its own process (one thread): seconds, and peak resident memory of that process.
3. **Synapse cost**: pairs the bundle plans for 18 training volumes with 1 / 2 / 4 labeled (RSL both
   directions, 2 REPS partners per volume, 0 validation volumes), times the CT-size seconds per pair,
   over 2 worker processes.

    python benchmarks/ct_registration.py --report benchmarks/results/ct_registration.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = [("torch", False), ("torch", True), ("sitk", False), ("sitk", True)]


def engine_settings(engine: str, deformable: bool) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "dataset_synapse.yaml")])
    parser["deformable"] = deformable
    key = "registration_torch_settings" if engine == "torch" else "registration_sitk_settings"
    settings = dict(parser.get_parsed_content(key))
    if engine == "torch":
        settings["device"] = "cpu"
    return settings


def mapped_dice(pred: np.ndarray, truth: np.ndarray, mapping: dict[int, int]) -> float:
    lut = np.zeros(max(mapping) + 1, np.int64)
    for k, v in mapping.items():
        lut[k] = v
    p, t = lut[pred.astype(np.int64)], lut[truth.astype(np.int64)]
    scores = []
    for c in range(1, 9):
        a, b = p == c, t == c
        if b.any():
            scores.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return float(np.mean(scores))


def accuracy(root: Path, n_labeled: int, n_unlabeled: int, threads: int) -> list[dict]:
    import nibabel as nib
    import torch

    from scripts.data.ct_phantom import ensure_ct_phantom_dataset
    from scripts.registration.engine import PairSpec, make_engine
    from scripts.registration.propagation import propagate_label

    torch.set_num_threads(threads)
    path = Path(
        ensure_ct_phantom_dataset(root / "small", n_labeled=n_labeled, n_unlabeled=n_unlabeled, n_validation=0, seed=5)
    )
    data = json.loads(path.read_text())
    mapping = dict(zip(data["label_mapping"]["orig"], data["label_mapping"]["target"]))
    atlases, targets = data["training"], data["unlabeled"]
    rows = []
    for engine, deformable in MODES:
        eng = make_engine(engine, **engine_settings(engine, deformable))
        dices, seconds, failed = [], [], 0
        for t in targets:
            truth = np.asarray(nib.load(path.parent / t["true_label"]).dataobj)
            for a in atlases:
                start = time.perf_counter()
                (res,) = eng.register_batch(
                    [PairSpec(t["id"], str(path.parent / t["image"]), a["id"], str(path.parent / a["image"]))]
                )
                seconds.append(time.perf_counter() - start)
                if not res.ok:
                    failed += 1
                    continue
                warped, _ = propagate_label(str(path.parent / a["label"]), str(path.parent / t["image"]), res.transform)
                dices.append(mapped_dice(warped, truth, mapping))
        rows.append(
            {
                "engine": engine,
                "deformable": deformable,
                "pairs": len(seconds),
                "failed": failed,
                "mean_dice": float(np.mean(dices)) if dices else float("nan"),
                "std_dice": float(np.std(dices)) if dices else float("nan"),
                "seconds_per_pair": statistics.median(seconds),
            }
        )
        print(rows[-1], flush=True)
    return rows


def one_ct_pair(engine: str, deformable: bool, root: str, threads: int) -> dict:
    """Child process: register one CT-size pair; returns seconds and this process's peak RSS."""
    import torch

    from scripts.data.ct_phantom import ensure_ct_phantom_dataset
    from scripts.registration.engine import PairSpec, make_engine

    torch.set_num_threads(threads)
    path = Path(ensure_ct_phantom_dataset(root, n_labeled=1, n_unlabeled=1, n_validation=0, seed=7, size="ct"))
    data = json.loads(path.read_text())
    a, t = data["training"][0], data["unlabeled"][0]
    eng = make_engine(engine, **engine_settings(engine, deformable))
    start = time.perf_counter()
    (res,) = eng.register_batch(
        [PairSpec(t["id"], str(path.parent / t["image"]), a["id"], str(path.parent / a["image"]))]
    )
    seconds = time.perf_counter() - start
    return {
        "engine": engine,
        "deformable": deformable,
        "ok": bool(res.ok),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def synapse_pairs(labeled: int, volumes: int = 18) -> int:
    from scripts.registration.pairs import plan_pairs

    entries = [{"id": f"v{i}", "image": f"v{i}.nii.gz"} for i in range(volumes)]
    return len(plan_pairs(entries[:labeled], entries[labeled:], [], reps_partners=2, seed=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_labeled", type=int, default=2)
    ap.add_argument("--n_unlabeled", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip_ct", action="store_true")
    ap.add_argument("--report", default=None)
    ap.add_argument("--child", nargs=3, metavar=("ENGINE", "DEFORMABLE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_ct_pair(args.child[0], args.child[1] == "1", args.child[2], args.threads)))
        return
    root = Path(tempfile.mkdtemp(prefix="ct_registration_"))
    acc = accuracy(root, args.n_labeled, args.n_unlabeled, args.threads)
    ct_rows = []
    if not args.skip_ct:
        from scripts.data.ct_phantom import ensure_ct_phantom_dataset

        t0 = time.perf_counter()
        ensure_ct_phantom_dataset(root / "ct", n_labeled=1, n_unlabeled=1, n_validation=0, seed=7, size="ct")
        render_s = (time.perf_counter() - t0) / 2
        for engine, deformable in MODES:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--child",
                    engine,
                    str(int(deformable)),
                    str(root / "ct"),
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            ct_rows.append(
                json.loads(line[-1][7:])
                if line
                else {"engine": engine, "deformable": deformable, "error": proc.stderr[-500:]}
            )
            print(ct_rows[-1], flush=True)
    lines = [
        f"# CT registration on the synthetic abdominal CT phantom ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} thread(s))",
        "",
        f"Command: `python benchmarks/ct_registration.py --n_labeled {args.n_labeled} --n_unlabeled {args.n_unlabeled} "
        f"--threads {args.threads}` (load average at the end {os.getloadavg()[0]:.1f}).",
        "",
        f"## Propagated-label Dice (small phantom: 96 x 96 x 24; {args.n_labeled} atlases x {args.n_unlabeled} targets; "
        "mean over the 8 Synapse organs after the 13 -> 8 mapping)",
        "",
        "| engine | registration | pairs (failed) | Dice mean +- std | s / pair |",
        "|---|---|---:|---:|---:|",
    ]
    for r in acc:
        lines.append(
            f"| {r['engine']} | {'affine + deformable' if r['deformable'] else 'affine'} | {r['pairs']} ({r['failed']}) | "
            f"{100 * r['mean_dice']:.1f} +- {100 * r['std_dice']:.1f} | {r['seconds_per_pair']:.2f} |"
        )
    if ct_rows:
        lines += [
            "",
            f"## One pair at CT size (512 x 512 x 100, 0.7-0.9 mm x 3-5 mm; rendering {render_s:.0f} s per volume)",
            "",
            "| engine | registration | s / pair | peak RSS of the process (MB) |",
            "|---|---|---:|---:|",
        ]
        for r in ct_rows:
            mode = "affine + deformable" if r["deformable"] else "affine"
            if "error" in r:
                lines.append(f"| {r['engine']} | {mode} | failed: {r['error'][-120:]!r} | |")
            else:
                lines.append(f"| {r['engine']} | {mode} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
        lines += [
            "",
            "## What a Synapse run would cost in registration (18 training volumes, 2 REPS partners, 2 workers)",
            "",
            "| labeled | pairs | "
            + " | ".join(
                f"{r['engine']} {'deformable' if r['deformable'] else 'affine'} (min)"
                for r in ct_rows
                if "error" not in r
            )
            + " |",
            "|---:|---:|" + "---:|" * sum("error" not in r for r in ct_rows),
        ]
        for labeled in (1, 2, 4):
            n = synapse_pairs(labeled)
            cells = [f"{n * r['seconds'] / 2 / 60:.0f}" for r in ct_rows if "error" not in r]
            lines.append(f"| {labeled} | {n} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Real Synapse volumes have about 85-200 slices at 2.5-5 mm (this phantom: 100), so scale by their slice count.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
