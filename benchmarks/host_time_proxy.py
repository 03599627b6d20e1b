"""Host time per training iteration, measured on the CPU with networks shrunk to almost nothing.

With tiny networks the device work is negligible, so the wall time of an iteration is what the host
spends between operations: Python, handlers, launches and the reads that would make a GPU wait. That
is the proxy for how far the step is from device-bound. Per variant it reports the median iteration
time (``ITERATION_STARTED`` -> ``ITERATION_COMPLETED``: the step and its handlers, not the loader),
the ATen operations per iteration and the synchronising ones (``scripts.training.host_syncs``).

It compares two checkouts (``--root``: this one; ``--vs``: e.g. main checked out beside it) in one run:
each measurement is a fresh process per (checkout, variant), A and B alternating, one thread each, and
the ratio is taken pair by pair::

    git worktree add /tmp/main_before <commit> --detach
    python benchmarks/host_time_proxy.py --vs /tmp/main_before --repeats 3 --out benchmarks/results/host_time_proxy.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
TINY = {
    "patch_size": [128, 128],
    "batch_size": 8,
    "num_workers": 0,
    "cache_num_workers": 0,
    "monitor_max_volumes": 0,
    "net_a_spec#features": [4, 4, 4, 4, 8, 4],
    "swin_feature_size": 12,
    "progress": False,
    "registration_workers": 1,
    "registration_torch_settings#iterations": [5, 3],
    "registration_torch_settings#num_points": 256,
}


def _counter_class():
    """This checkout's HostSyncCounter, loaded by path (the measured checkout may predate it)."""
    spec = importlib.util.spec_from_file_location("_host_syncs", HERE / "scripts" / "training" / "host_syncs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HostSyncCounter


SIZE = {"tiny": TINY, "real": {k: v for k, v in TINY.items() if k not in ("net_a_spec#features", "swin_feature_size")}}


def _trainer(root: str, variant: str, data: str, total: int, log_every: int):
    """``root``'s trainer for ``variant`` with tiny networks, one thread, on its small phantom."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, root)
    os.chdir(root)
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from tests.cross_teaching_fixtures import make_rsl_datalist  # noqa: E402  (the measured checkout's own phantom helper)

    lists = make_rsl_datalist(Path(data))
    configs = ["configs/train.yaml"] + ([] if variant == "default" else [f"configs/variant_{variant}.yaml"])
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(
        {
            **SIZE[os.environ.get("HOST_TIME_SIZE", "tiny")],
            "bundle_root": tempfile.mkdtemp(),
            "datalist_file": lists["plain" if variant in ("default", "cct_r") else "rsl"],
            "num_iterations": total,
            "val_interval": total,
            "log_every": log_every,
            "amp": False,
        }
    )
    set_determinism(seed=0)
    return parser.get_parsed_content("train#trainer")


def run_iterations(
    root: str, variant: str, data: str, warmup: int, iterations: int, log_every: int, count: bool
) -> dict:
    """Median time of the iterations after ``warmup`` but the last (``count``: under the op counter, with op and
    sync counts)."""
    from ignite.engine import Events

    trainer = _trainer(root, variant, data, warmup + iterations, log_every)
    counter_cls = _counter_class() if count else None
    times, counters = [], []

    total = warmup + iterations
    timed_iteration = lambda it: warmup < it < total  # noqa: E731  (the last one ends the epoch: its host copy is by design)

    def start(engine):
        if timed_iteration(engine.state.iteration) and counter_cls is not None:
            counters.append(counter_cls())
            counters[-1].__enter__()
        engine.state.t0 = time.perf_counter()

    def end(engine):
        if timed_iteration(engine.state.iteration):
            times.append(time.perf_counter() - engine.state.t0)
            if counters:
                counters[-1].__exit__(None, None, None)

    trainer.add_event_handler(Events.ITERATION_STARTED, start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, end)
    trainer.run()
    out = {"variant": variant, "median_s": statistics.median(times)}
    if counters:
        out.update(
            ops=statistics.median(c.total for c in counters),
            syncs=statistics.median(sum(c.syncs.values()) for c in counters),
        )
    return out


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in ("--_plain", "--_count"):
        kind, root, variant, data, warmup, iterations, log_every = sys.argv[1:8]
        print(
            json.dumps(
                run_iterations(root, variant, data, int(warmup), int(iterations), int(log_every), kind == "--_count")
            )
        )
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(HERE), help="the checkout measured (A)")
    ap.add_argument("--vs", required=True, help="the reference checkout (B), e.g. main before the change")
    ap.add_argument("--variants", nargs="+", default=["default", "cct_r", "cts", "ls"])
    ap.add_argument("--repeats", type=int, default=3, help="A/B pairs per variant")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument(
        "--log_every", type=int, default=50, help="above warmup + iterations: no host copy among the timed iterations"
    )
    ap.add_argument(
        "--size",
        choices=sorted(SIZE),
        default="tiny",
        help="tiny: networks shrunk to almost nothing (host time); real: the configured networks (the CPU step)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    data = tempfile.mkdtemp()
    env = dict(os.environ, OMP_NUM_THREADS="1", HOST_TIME_SIZE=args.size)
    rows = []
    for variant in args.variants:
        pairs = []
        for _ in range(args.repeats):
            got = {}
            for name, root in (("a", args.root), ("b", args.vs)):
                cmd = [
                    sys.executable,
                    __file__,
                    "--_plain",
                    root,
                    variant,
                    data,
                    str(args.warmup),
                    str(args.iterations),
                    str(args.log_every),
                ]
                got[name] = json.loads(
                    subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                    .stdout.strip()
                    .splitlines()[-1]
                )["median_s"]
            pairs.append(got)
        counts = {}
        for name, root in (("a", args.root), ("b", args.vs)):
            cmd = [sys.executable, __file__, "--_count", root, variant, data, "2", "3", str(args.log_every)]
            counts[name] = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
            )
        ratios = [p["a"] / p["b"] for p in pairs]
        row = {
            "variant": variant,
            "a_median_s": statistics.median(p["a"] for p in pairs),
            "b_median_s": statistics.median(p["b"] for p in pairs),
            "ratio_a_over_b_median": statistics.median(ratios),
            "ratios": ratios,
            "ops_per_iteration": {k: counts[k]["ops"] for k in counts},
            "syncs_per_iteration": {k: counts[k]["syncs"] for k in counts},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "a": args.root,
        "b": args.vs,
        "rows": rows,
        "settings": {
            **SIZE[args.size],
            "size": args.size,
            "threads": 1,
            "warmup": args.warmup,
            "iterations": args.iterations,
        },
    }
    if args.out:
        sys.path.insert(0, str(HERE))
        from scripts.data.atomic_io import write_json

        write_json(args.out, result)


if __name__ == "__main__":
    main()
