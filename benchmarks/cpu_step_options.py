"""Options for a faster CPU training step of the two networks, each timed against the bundle's step in the same run.

One training step (forward, Dice + CE, backward, AdamW) of each network at ``--patch``, batch
``--batch``, one thread, alternating the reference and the option ``--repeats`` times (best of each):

* ``swin/sdpa``: SwinUNETR window attention through ``scaled_dot_product_attention`` also in training
  (MONAI uses it only without gradients); loss and gradients are compared with the reference;
* ``swin/channels_last``, ``unet/channels_last``: the network and its input in channels-last memory format;
* ``swin/bf16``, ``unet/bf16``: forward and loss under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the
  trainer's ``amp: true`` on CPU; fast only on CPUs with bfloat16 matrix units, e.g. AMX or AVX512-BF16).
  Its loss and gradients differ from float32 by bfloat16 rounding, not by float tolerance.

``torch.compile`` is not timed here: on the 2 shared cores its first SwinUNETR training step had not
finished after 9 minutes (benchmarks/results/cpu_step_options.md).

    python benchmarks/cpu_step_options.py --patch 128 --batch 8 --repeats 3 --report benchmarks/results/cpu_step_options.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sdpa_forward(self, x, mask):
    """MONAI ``WindowAttention.forward`` with SDPA (the additive bias = relative position bias + shift mask)."""
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    rpb = (
        self.relative_position_bias_table[self.relative_position_index[:n, :n].reshape(-1)]
        .reshape(n, n, -1)
        .permute(2, 0, 1)
    )
    if mask is not None:
        nw = mask.shape[0]
        bias = (rpb.view(1, 1, self.num_heads, n, n) + mask.reshape(1, nw, 1, n, n)).expand(
            b // nw, nw, self.num_heads, n, n
        )
        bias = bias.reshape(b, self.num_heads, n, n)
    else:
        bias = rpb.unsqueeze(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=0.0, scale=self.scale)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


def build(kind: str, option: str | None):
    from monai.networks.nets import BasicUNet
    from monai.networks.nets.swin_unetr import WindowAttention

    from scripts.training.networks import SwinUNETR2D

    torch.manual_seed(0)
    net = SwinUNETR2D(1, 4, feature_size=24) if kind == "swin" else BasicUNet(2, 1, 4)
    if option == "sdpa":
        for m in net.modules():
            if isinstance(m, WindowAttention):
                m.forward = types.MethodType(sdpa_forward, m)
    if option == "channels_last":
        net = net.to(memory_format=torch.channels_last)
    return net


def step(net, x, y, loss_fn, bf16: bool = False):
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(net(x), y)
    loss.backward()
    return loss.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--options",
        nargs="+",
        default=["swin/sdpa", "swin/channels_last", "unet/channels_last"],
        help="network/option pairs (options: sdpa, channels_last, bf16)",
    )
    ap.add_argument("--report", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, args.patch, args.patch, generator=g)
    y = torch.randint(0, 4, (args.batch, 1, args.patch, args.patch), generator=g)
    rows = []
    for kind, option in (o.split("/") for o in args.options):
        ref, alt = build(kind, None), build(kind, option)
        xa = x.to(memory_format=torch.channels_last) if option == "channels_last" else x
        bf16 = option == "bf16"
        la, lb = step(ref, x, y, loss_fn), step(alt, xa, y, loss_fn, bf16)
        ga = torch.cat([p.grad.flatten() for p in ref.parameters()])
        gb = torch.cat([p.grad.flatten() for p in alt.parameters()])
        t_ref, t_alt = [], []
        for _ in range(args.repeats):
            for net, inp, ts, half in ((ref, x, t_ref, False), (alt, xa, t_alt, bf16)):
                start = time.perf_counter()
                step(net, inp, y, loss_fn, half)
                ts.append(time.perf_counter() - start)
        rows.append((kind, option, min(t_ref), min(t_alt), float((la - lb).abs()), float((ga - gb).norm() / ga.norm())))
    lines = [
        f"# CPU training-step options ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"torch {torch.__version__}, 1 thread)",
        "",
        f"Command: `python benchmarks/cpu_step_options.py --patch {args.patch} --batch {args.batch} --repeats {args.repeats} "
        f"--options {' '.join(args.options)}` "
        f"(load average at the end {os.getloadavg()[0]:.1f}; best of {args.repeats}, reference and option alternating).",
        "",
        "| network | option | reference s/step | option s/step | speed-up | loss diff | gradient rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for kind, option, a, b, dl, dg in rows:
        lines.append(f"| {kind} | {option} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {dl:.1e} | {dg:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
