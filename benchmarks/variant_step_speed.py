"""Seconds per training iteration of one variant, real networks, on the CPU (one thread), for a checkout.

Used as a ratio between two checkouts run alternately on the same machine (machines here are shared and
noisy), e.g. today's main in a worktree against the change:

    for i in 1 2 3; do for r in /path/to/old_main .; do python benchmarks/variant_step_speed.py --root $r --variant mcsc; done; done

Times ``--iterations`` iterations after ``--warmup`` of ``configs/train.yaml`` + the variant's overlay on the synthetic
phantom (``benchmarks/gpu_check.py``'s data and timing: the registrations replaced by the phantom's true transforms,
handlers off), patch ``--patch``, batch 8, the precision default. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the checkout to time")
    ap.add_argument("--variant", default="mcsc")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=6)
    args = ap.parse_args()
    root = str(Path(args.root).resolve())
    sys.path[:0] = [root, root + "/benchmarks"]
    torch.set_num_threads(1)
    import gpu_check
    from cross_teaching_speed import TRUE_LABEL_OVERRIDES

    data = Path(tempfile.mkdtemp(prefix="variant_step_speed_"))
    datalist, registration, _ = gpu_check.make_data(data, n_labeled=4, n_unlabeled=8)
    overrides = {**TRUE_LABEL_OVERRIDES, "num_workers": 0}
    row = gpu_check.time_training(
        datalist,
        registration,
        "cpu",
        args.patch,
        8,
        args.warmup,
        args.iterations,
        "auto",
        overrides,
        args.variant,
        handlers=False,
    )
    print(json.dumps({"root": root, "variant": args.variant, "patch": args.patch, "s_per_it": row["s_per_it"]}))


if __name__ == "__main__":
    main()
