"""Where a CPU training step of each network spends its time, and the most any change outside the dense kernels can gain.

One training step (forward, Dice + CE, backward; the same step as ``cpu_step_options.py``) of the U-Net and
the SwinUNETR at each ``--patches``, batch ``--batch``, one thread, float32, under ``torch.profiler``. Each
operator's self time is put in one of two groups:

* **dense kernels**: convolutions (forward and backward) and matrix products (``mm``, ``bmm``, ``addmm``...),
  the oneDNN / BLAS work whose speed is set by the arithmetic and the precision;
* **the rest**: copies (window partition, roll, concatenation), normalisation, activations, softmax,
  elementwise, optimiser-free bookkeeping.

The Amdahl bound ``total / dense`` is the speed-up of a step whose "rest" took no time at all, which is
more than fusing (``torch.compile``), memory formats or attention rewrites could give. The forward FLOPs of
the dense operators (``with_flops``) give their achieved rate, counting the backward as twice the forward.

    python benchmarks/cpu_step_profile.py --patches 128 224 --report benchmarks/results/cpu_step_profile.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_step_options import build, step  # noqa: E402

DENSE = ("conv", "mm", "bmm", "addmm", "baddbmm", "matmul", "linear")


def is_dense(name: str) -> bool:
    """An aten operator that is a convolution or a matrix product (forward or backward)."""
    op = name.split("::")[-1]
    return "conv" in op or op in DENSE


def profile_step(kind: str, patch: int, batch: int) -> dict:
    from monai.losses import DiceCELoss
    from torch.profiler import ProfilerActivity, profile

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, patch, patch, generator=g)
    y = torch.randint(0, 4, (batch, 1, patch, patch), generator=g)
    net = build(kind, None)
    for _ in range(2):
        step(net, x, y, loss_fn)
    start = time.perf_counter()
    step(net, x, y, loss_fn)
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        step(net, x, y, loss_fn)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    dense = sum(e.self_cpu_time_total for e in events if is_dense(e.key)) / 1e6
    flops = sum(e.flops for e in events if is_dense(e.key))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    return {
        "network": kind,
        "patch": patch,
        "wall": wall,
        "total": total,
        "dense": dense,
        "forward_gflop": flops / 1e9,
        "top": [(e.key, e.self_cpu_time_total / 1e6 / total) for e in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--report", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [profile_step(kind, patch, args.batch) for patch in args.patches for kind in ("unet", "swin")]
    lines = [
        f"# Where the CPU training step spends its time ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"torch {torch.__version__}, 1 thread, float32)",
        "",
        f"Command: `python benchmarks/cpu_step_profile.py --patches {' '.join(map(str, args.patches))} --batch {args.batch}` "
        f"(load average at the end {os.getloadavg()[0]:.1f}; one profiled step after 3 unprofiled).",
        "",
        "| network | patch | step s (unprofiled) | operator s (profiled) | dense kernels | rest | Amdahl bound "
        "| dense GFLOP/s (fwd x3) | largest operators (share of operator time) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        share = r["dense"] / r["total"]
        rate = 3 * r["forward_gflop"] / r["dense"] if r["dense"] else float("nan")
        top = ", ".join(f"{k.split('::')[-1]} {s:.0%}" for k, s in r["top"])
        lines.append(
            f"| {r['network']} | {r['patch']} | {r['wall']:.2f} | {r['total']:.2f} | {share:.0%} | {1 - share:.0%} | "
            f"{1 / share:.2f}x | {rate:.0f} | {top} |"
        )
    unet = {r["patch"]: r for r in rows if r["network"] == "unet"}
    swin = {r["patch"]: r for r in rows if r["network"] == "swin"}
    lines += [
        "",
        "Both networks together (the CCT-R step is about 1.05x the two passes, `cross_teaching.md`):",
        "",
        "| patch | dense share | Amdahl bound |",
        "|---:|---:|---:|",
    ]
    for p in args.patches:
        total = unet[p]["total"] + swin[p]["total"]
        dense = unet[p]["dense"] + swin[p]["dense"]
        lines.append(f"| {p} | {dense / total:.0%} | {total / dense:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
