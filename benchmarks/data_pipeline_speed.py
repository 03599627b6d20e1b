"""Milliseconds per training batch: the device sampler against the MONAI per-slice pipeline, same checkout.

Builds ``train#data_loader`` from ``configs/train.yaml`` twice, ``device_sampling`` true and false, both in this
process with ``num_workers 0`` (so that the time is the cost of making a batch, which the per-slice pipeline
otherwise spends in loader worker processes beside the step), and times ``--batches`` batches of each, alternating
``--rounds`` times, after a warm-up batch. The volumes are read before the timing (the MONAI pipeline caches them,
the device sampler stacks them). Without ``--datalist`` a synthetic phantom is made; with it (e.g. ACDC), the
unlabeled half comes without registered labels (``rsl_weight 0``, no registration).

    python benchmarks/data_pipeline_speed.py --datalist /tmp/acdc/acdc_1.json --patch 128 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def build(datalist: str, patch: int, batch: int, device: str, on_device: bool, overlays: list[str]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ["train.yaml", *overlays]])
    parser.update(
        {
            "bundle_root": tempfile.mkdtemp(prefix="data_pipeline_speed_"),
            "datalist_file": datalist,
            "patch_size": [patch, patch],
            "batch_size": batch,
            "num_workers": 0,
            "cache_num_workers": 2,
            "rsl_weight": 0.0,
            "use_reps": False,
            "cl_weight": 0.0,
            "device_sampling": on_device,
            "device": f"$torch.device('{device}')",
            "val_interval": 10_000,
        }
    )
    return parser.get_parsed_content("train#data_loader")


def time_batches(loader, n: int, device: str) -> float:
    it = iter(loader)
    next(it)  # warm-up (and, for the device sampler, the stacks)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        batch = next(it)
        if not isinstance(batch["labeled"]["image"], torch.Tensor) or device.startswith("cuda"):
            # the MONAI loader's batch is a host batch: moving it is part of its cost on a GPU
            for half in ("labeled", "unlabeled"):
                batch[half]["image"] = torch.as_tensor(batch[half]["image"]).to(device, non_blocking=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datalist", default=None)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dataset", default=None, help="a dataset overlay, e.g. dataset_acdc.yaml")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    datalist = args.datalist
    if datalist is None:
        from cross_teaching_speed import make_datalist

        datalist = make_datalist(Path(tempfile.mkdtemp(prefix="data_pipeline_phantom_")), 4, 8)
    overlays = [args.dataset] if args.dataset else []
    loaders = {
        name: build(datalist, args.patch, args.batch, args.device, name == "device", overlays)
        for name in ("device", "monai")
    }
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            times[name].append(time_batches(loader, args.batches, args.device))
    ratios = [m / d for m, d in zip(times["monai"], times["device"])]
    report = {
        "datalist": datalist,
        "device": args.device,
        "threads": args.threads,
        "patch": args.patch,
        "batch": args.batch,
        "ms_per_batch": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "monai_over_device": [round(r, 2) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 2),
    }
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=4) + "\n")


if __name__ == "__main__":
    main()
