"""Seconds per volume of the bundle's inference (two-network ensemble), on one CPU core.

Runs ``configs/inference.yaml``'s evaluator in this process (loading, intensity transform, slice
resize, both networks, argmax, NIfTI writing) over the volumes of ``--input_dir``, once with
SwinUNETR's window attention through ``scaled_dot_product_attention`` (the bundle's default for
inference, ``SwinUNETR2D(use_flash_attention=True)``) and once with MONAI's explicit attention (the
bundle before), alternating, ``--repeats`` times each; reports the best pass of each (the machine is
shared) and their ratio. One thread: ``torch.set_num_threads(1)``.

    python benchmarks/inference_speed.py --ckpt_dir MODEL_DIR --input_dir VOLUMES --repeats 2 \
        --report benchmarks/results/inference.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt_dir", required=True)
    ap.add_argument("--input_dir", required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--report", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from monai.bundle import ConfigParser
    from monai.networks.nets.swin_unetr import WindowAttention

    os.chdir(ROOT)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    parser.update(
        {
            "ckpt_dir": args.ckpt_dir,
            "input_dir": args.input_dir,
            "output_dir": tempfile.mkdtemp(prefix="inf_bench_"),
            "device": "$torch.device('cpu')",
            "amp": False,
        }
    )
    parser.get_parsed_content("initialize")
    evaluator = parser.get_parsed_content("evaluator")
    network = parser.get_parsed_content("network")
    n = len(parser.get_parsed_content("data"))
    attention = [m for m in network.modules() if isinstance(m, WindowAttention)]
    times: dict[str, list[float]] = {"sdpa": [], "explicit": []}
    for _ in range(args.repeats):
        for mode in ("sdpa", "explicit"):
            for m in attention:
                m.use_flash_attention = mode == "sdpa"
            start = time.perf_counter()
            evaluator.run()
            times[mode].append((time.perf_counter() - start) / n)
    best = {k: min(v) for k, v in times.items()}
    lines = [
        f"# Inference seconds per volume, one CPU core ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"torch {torch.__version__})",
        "",
        f"Command: `python benchmarks/inference_speed.py --ckpt_dir {args.ckpt_dir} --input_dir {args.input_dir} "
        f"--repeats {args.repeats}`",
        f"({n} volumes; load, preprocess, both networks slice by slice, argmax, write NIfTI; best of {args.repeats} passes;"
        f" load average at the end {os.getloadavg()[0]:.1f}).",
        "",
        "| window attention | s / volume (best) | all passes |",
        "|---|---:|---|",
    ]
    for k, label in (("sdpa", "SDPA (default)"), ("explicit", "explicit (before)")):
        lines.append(f"| {label} | {best[k]:.2f} | {', '.join(f'{t:.2f}' for t in times[k])} |")
    lines += ["", f"Ratio explicit / SDPA: **{best['explicit'] / best['sdpa']:.2f}x**."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
