"""Speed and memory of one CCT-R training iteration against the LS baseline, on CPU.

Each case runs in its own subprocess (so that its peak memory is its own), one after the other in one
invocation, on a phantom generated in a temporary folder, with the trainers built from the bundle's
own configs (``train.yaml`` for ``ls``; ``train.yaml`` + ``cct_r.yaml`` for ``cct-r``; validation,
checkpoints and logging handlers removed):

* ``ls``      — MONAI ``SupervisedTrainer``, one 2D U-Net, batch of ``batch_size`` labeled slices;
* ``cct-r``   — ``CrossTeachingTrainer``, U-Net + SwinUNETR, half labeled / half unlabeled slices
  with registered labels;
* ``unet_pass`` / ``swin_pass`` — the bare work CCT-R cannot avoid: one forward, Dice + CE, backward
  and AdamW step of each network on a ``batch_size`` batch of plain tensors (no data loading).

For each, per iteration: data time (ignite ``GET_BATCH``), compute time (the iteration step), it/s,
and memory: peak resident set size during the timed iterations and its rise above the resident
size before them (``/proc/self/clear_refs`` resets the peak). The report gives
``cct-r compute / (unet_pass + swin_pass)``: the issue asks for at most 1.15.

    python benchmarks/cross_teaching_speed.py --patches 224,128 --iterations 5 \
        --out benchmarks/results/cross_teaching.json --report benchmarks/results/cross_teaching.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("ls", "cct-r", "unet_pass", "swin_pass")


# ---------------------------------------------------------------------------------- memory (Linux)
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------- data
def make_datalist(root: Path, n_labeled: int = 4, n_unlabeled: int = 4) -> str:
    """A phantom whose unlabeled entries carry their true label as registered label (absolute paths)."""
    from scripts.data.phantom import ensure_phantom_dataset

    plain = Path(
        ensure_phantom_dataset(
            root / "phantom", n_labeled=n_labeled, n_unlabeled=n_unlabeled, n_validation=1, n_test=0, seed=0
        )
    )
    data = json.loads(plain.read_text())
    for section in ("training", "unlabeled", "validation"):
        for e in data[section]:
            for k in ("image", "label", "true_label"):
                if k in e:
                    e[k] = str(plain.parent / e[k])
            if section == "unlabeled":
                e["registered_label"] = e["true_label"]
    out = root / "rsl_datalist.json"
    out.write_text(json.dumps(data))
    return str(out)


#: What a config needs to train from :func:`make_datalist`'s datalist: its registered labels are the true
#: labels, with no BRS scores, so RSL weights them equally (the default's ``rank`` needs the scores).
TRUE_LABEL_OVERRIDES = {"rsl_reliability": "none"}


# ---------------------------------------------------------------------------------- one case (child process)
def _parser(files: list[str], datalist: str, patch: int, batch: int, iterations: int, feature_size: int):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    parser.update(
        {
            "bundle_root": tempfile.mkdtemp(prefix="cct_bench_"),
            "datalist_file": datalist,
            "patch_size": [patch, patch],
            "batch_size": batch,
            "num_workers": 0,
            "cache_num_workers": 0,
            "val_interval": iterations,
            "num_iterations": 40000,
            "max_epochs": 1,
            "swin_feature_size": feature_size,
            "amp": False,
            "train#handlers": [],
            **TRUE_LABEL_OVERRIDES,
        }
    )
    return parser


def _run_trainer(
    case: str, datalist: str, patch: int, batch: int, warmup: int, iterations: int, feature_size: int
) -> dict:
    from ignite.engine import Events

    # "cct-r": cross teaching + RSL (no contrastive term), as measured for bundle 0.2; otherwise the LS U-Net
    files = ["train.yaml", "variant_no_contrastive.yaml" if case == "cct-r" else "variant_ls.yaml"]
    parser = _parser(files, datalist, patch, batch, warmup + iterations, feature_size)
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    t = {"data": [], "compute": [], "mark": 0.0}
    mem = {}

    @trainer.on(Events.GET_BATCH_STARTED)
    def _(engine):
        if engine.state.iteration == warmup:  # the first timed iteration is about to fetch its batch
            mem["before_kb"] = _status_kb("VmRSS")
            mem["reset"] = _reset_peak()
        t["mark"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _(engine):
        if engine.state.iteration >= warmup:
            t["data"].append(time.perf_counter() - t["mark"])

    @trainer.on(Events.ITERATION_STARTED)
    def _(engine):
        t["mark"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _(engine):
        if engine.state.iteration > warmup:
            t["compute"].append(time.perf_counter() - t["mark"])

    trainer.run()
    mem["peak_kb"] = _status_kb("VmHWM")
    return {"data_s": t["data"], "compute_s": t["compute"], **mem}


def _run_pass(
    case: str, datalist: str, patch: int, batch: int, warmup: int, iterations: int, feature_size: int
) -> dict:
    import torch

    parser = _parser(
        ["train.yaml", "variant_no_contrastive.yaml"], datalist, patch, batch, warmup + iterations, feature_size
    )
    parser.get_parsed_content("initialize")
    from scripts.training.model_config import build

    net = build(parser.get_parsed_content("net_a_spec" if case == "unet_pass" else "net_b_spec"))
    loss_fn = parser.get_parsed_content("loss")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, patch, patch, generator=g)
    y = torch.randint(0, 4, (batch, 1, patch, patch), generator=g).float()
    times, mem = [], {}
    net.train()
    for i in range(warmup + iterations):
        if i == warmup:
            mem["before_kb"] = _status_kb("VmRSS")
            mem["reset"] = _reset_peak()
        start = time.perf_counter()
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    mem["peak_kb"] = _status_kb("VmHWM")
    return {"data_s": [0.0] * len(times), "compute_s": times, **mem}


def run_case(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    runner = _run_trainer if args.case in ("ls", "cct-r") else _run_pass
    result = runner(
        args.case, args.datalist, args.patch, args.batch_size, args.warmup, args.iterations, args.feature_size
    )
    result.update(case=args.case, patch=args.patch, batch_size=args.batch_size, threads=args.threads)
    return result


# ---------------------------------------------------------------------------------- the whole benchmark
def summarize(r: dict) -> dict:
    compute = statistics.median(r["compute_s"])
    data = statistics.median(r["data_s"])
    return {
        "case": r["case"],
        "patch": r["patch"],
        "compute_s": compute,
        "data_s": data,
        "it_per_s": 1.0 / (compute + data),
        "peak_rss_mb": r["peak_kb"] / 1024,
        "iteration_mem_mb": (r["peak_kb"] - r["before_kb"]) / 1024 if r.get("reset") else float("nan"),
    }


def report(rows: list[dict], meta: dict) -> str:
    lines = [
        "# CCT-R training iteration vs LS: speed and memory (CPU)",
        "",
        f"Generated by `benchmarks/cross_teaching_speed.py` on {meta['date']} ({meta['cpu']}; torch {meta['torch']}, "
        f"{meta['threads']} thread(s), batch {meta['batch_size']}, SwinUNETR feature size {meta['feature_size']}, "
        f"median of {meta['iterations']} iterations after {meta['warmup']} warm-up). Load average at start: {meta['load']}.",
        "",
        "| patch | case | compute s/it | data s/it | it/s | peak RSS MB | iteration memory MB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['patch']} | {r['case']} | {r['compute_s']:.3f} | {r['data_s']:.3f} | {r['it_per_s']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {r['iteration_mem_mb']:.0f} |"
        )
    lines += [
        "",
        "| patch | cct-r / ls (it time) | cct-r compute / (unet_pass + swin_pass) | ls compute / unet_pass |",
        "|---:|---:|---:|---:|",
    ]
    for patch in sorted({r["patch"] for r in rows}, reverse=True):
        by = {r["case"]: r for r in rows if r["patch"] == patch}
        if not set(CASES) <= set(by):
            continue
        it = lambda c: by[c]["compute_s"] + by[c]["data_s"]  # noqa: E731
        overhead = by["cct-r"]["compute_s"] / (by["unet_pass"]["compute_s"] + by["swin_pass"]["compute_s"])
        lines.append(
            f"| {patch} | {it('cct-r') / it('ls'):.2f} | {overhead:.3f} | "
            f"{by['ls']['compute_s'] / by['unet_pass']['compute_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", default="224,128")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--feature-size", type=int, default=24)
    ap.add_argument("--out", default=None, help="JSON of every measurement")
    ap.add_argument("--report", default=None, help="Markdown summary")
    ap.add_argument("--note", default="", help="appended to the report (what else was running)")
    # child mode
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--patch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--datalist", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.case:
        print("RESULT " + json.dumps(run_case(args)))
        return

    import platform

    import torch

    sys.path.insert(0, str(ROOT))
    from scripts.data.atomic_io import write_json, write_text

    with tempfile.TemporaryDirectory(prefix="cct_bench_data_") as tmp:
        datalist = make_datalist(Path(tmp))
        results = []
        for patch in [int(p) for p in args.patches.split(",")]:
            for case in args.cases.split(","):
                cmd = [
                    sys.executable,
                    __file__,
                    "--case",
                    case,
                    "--patch",
                    str(patch),
                    "--datalist",
                    datalist,
                    "--batch-size",
                    str(args.batch_size),
                    "--iterations",
                    str(args.iterations),
                    "--warmup",
                    str(args.warmup),
                    "--threads",
                    str(args.threads),
                    "--feature-size",
                    str(args.feature_size),
                ]
                env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    raise RuntimeError(f"case {case} patch {patch} failed:\n{proc.stderr[-4000:]}")
                results.append(json.loads(line[-1][7:]))
                s = summarize(results[-1])
                print(
                    f"patch {patch} {case:10s} compute {s['compute_s']:.3f} s  data {s['data_s']:.3f} s  "
                    f"peak {s['peak_rss_mb']:.0f} MB  iteration +{s['iteration_mem_mb']:.0f} MB",
                    flush=True,
                )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "feature_size": args.feature_size,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    text = report([summarize(r) for r in results], meta) + (f"\n{args.note}\n" if args.note else "")
    print(text)
    if args.out:
        write_json(args.out, {"meta": meta, "results": results})
    if args.report:
        write_text(args.report, text)


if __name__ == "__main__":
    main()
