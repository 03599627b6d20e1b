"""The whole CCT-R training iteration in float32 against bfloat16 autocast (``amp: true``) on CPU.

Each case is the bundle's own trainer (``train#trainer`` of ``train.yaml``; ``plain``: with
``variant_no_contrastive.yaml``, i.e. cross teaching + RSL without SCL / REPS; ``scl_reps``: the
default, SCL + REPS on) on the cardiac phantom, with registration run once by the bundle's own
registration stage (so REPS has real transforms), in its own subprocess, ``--warmup`` iterations and
then ``--iterations`` timed ones (median compute time per iteration, data loading excluded). float32 and
bfloat16 runs alternate, ``--repeats`` times, and the best median of each is kept, so that both see the
same machine load; the report gives float32 / bfloat16 per patch and configuration. bfloat16 is fast only
where the CPU has bfloat16 matrix units (``amx_bf16`` / ``avx512_bf16`` in ``/proc/cpuinfo``; the report
says which of them this CPU has). The loss of the first iteration of each case is reported too (same seed,
same batch: float32 and bfloat16 differ by rounding only).

    python benchmarks/cpu_amp_speed.py --patches 128 224 --report benchmarks/results/cpu_amp_speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"plain": ["train.yaml", "variant_no_contrastive.yaml"], "scl_reps": ["train.yaml"]}


def run_case(config: str, patch: int, amp: bool, work: Path, warmup: int, iterations: int, threads: int) -> dict:
    """One trainer in this process: times of the iterations after ``warmup``, and the first loss."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(threads)
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in CONFIGS[config]])
    parser.update(
        {
            "bundle_root": str(work / "bundle"),
            "phantom_dir": str(work / "phantom"),
            "registration_root": str(work / "registration"),
            "registration_workers": 1,
            "patch_size": [patch, patch],
            "num_workers": 0,
            "cache_num_workers": 0,
            "num_threads": threads,
            "num_iterations": warmup + iterations,
            "val_interval": warmup + iterations + 1,
            "amp": amp,
            "monitor_max_volumes": 0,
            "train#handlers": [],
        }
    )
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("registration_stage").datalist
    trainer = parser.get_parsed_content("train#trainer")
    times, losses, mark = [], [], [0.0]

    @trainer.on(Events.ITERATION_STARTED)
    def _(engine):
        mark[0] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _(engine):
        if engine.state.iteration > warmup:
            times.append(time.perf_counter() - mark[0])
        if engine.state.iteration == 1:
            out = engine.state.output
            losses.append(float(out["loss"] if isinstance(out, dict) else out))

    trainer.run()
    return {
        "config": config,
        "patch": patch,
        "amp": amp,
        "median_s": statistics.median(times),
        "times": times,
        "first_loss": losses[0] if losses else float("nan"),
    }


def cpu_bf16_units() -> str:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ", ".join(have) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", nargs="+", type=int, default=[128, 224])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for the phantom and its registration (default: temporary)")
    ap.add_argument("--report", default=None)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="cpu_amp_speed_")).absolute()
    if args.case:
        config, patch, amp = args.case.split(":")
        print(json.dumps(run_case(config, int(patch), amp == "bf16", work, args.warmup, args.iterations, args.threads)))
        return
    results = []
    for r in range(args.repeats):
        for patch in args.patches:
            for config in args.configs:
                for amp in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--case",
                        f"{config}:{patch}:{amp}",
                        "--work",
                        str(work),
                        "--warmup",
                        str(args.warmup),
                        "--iterations",
                        str(args.iterations),
                        "--threads",
                        str(args.threads),
                    ]
                    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                    if out.returncode:
                        raise SystemExit(f"{config} {patch} {amp} failed:\n{out.stderr[-3000:]}")
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    results.append(res)
                    print(
                        f"repeat {r} patch {patch} {config} {amp}: {res['median_s']:.2f} s/it (loss {res['first_loss']:.4f})",
                        flush=True,
                    )
    lines = [
        f"# CCT-R iteration on CPU: float32 vs bfloat16 autocast ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"bfloat16 units: {cpu_bf16_units()}, {args.threads} thread(s))",
        "",
        "Command: `python benchmarks/cpu_amp_speed.py " + " ".join(sys.argv[1:]) + f"` (load average at the end "
        f"{os.getloadavg()[0]:.1f}; batch 8, best of {args.repeats} medians of {args.iterations} iterations, "
        "fp32 and bf16 alternating).",
        "",
        "| patch | configuration | float32 s/it | bfloat16 s/it | speed-up | first loss fp32 / bf16 |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for patch in args.patches:
        for config in args.configs:
            f = [x for x in results if x["patch"] == patch and x["config"] == config and not x["amp"]]
            b = [x for x in results if x["patch"] == patch and x["config"] == config and x["amp"]]
            tf, tb = min(x["median_s"] for x in f), min(x["median_s"] for x in b)
            lines.append(
                f"| {patch} | {config} | {tf:.2f} | {tb:.2f} | {tf / tb:.2f}x | "
                f"{f[0]['first_loss']:.4f} / {b[0]['first_loss']:.4f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
