"""The timing half of ``benchmarks/gpu_check.sh``: registration pairs/s and CCT-R iterations/s on a GPU.

On a synthetic phantom generated here (the bundle's own data; nothing is downloaded):

* **registration**: the torch engine with ``configs/train.yaml``'s settings registers every ordered
  pair of the training volumes in batches of 32, on CUDA and (a few pairs, for the ratio) on the CPU;
* **training**: ``configs/train.yaml`` (CCT-R: U-Net + SwinUNETR, RSL, SCL + REPS in the joint space)
  with the registrations replaced by the phantom's true transforms, validation and handlers off,
  ``--iterations`` timed after ``--warmup``, with and without AMP; peak GPU memory per case.

With ``--datalist`` (and ``--registration_dir``, a finished registration of that datalist) the same timings
run on real volumes instead: registration pairs between its labeled and unlabeled volumes, and
training on that datalist with those registrations (``benchmarks/gpu_acdc.sh`` passes ACDC).

Prints one table and writes JSON (``--out``). Runs on the CPU too (``--device cpu``), e.g. to check the
script before a GPU is lent:

    python benchmarks/gpu_check.py --device cpu --patch 64 --iterations 2 --pairs 4 --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(root: Path, n_labeled: int, n_unlabeled: int) -> tuple[str, str, list]:
    """Phantom datalist whose unlabeled volumes carry their true labels as registered labels
    (:func:`cross_teaching_speed.make_datalist`), and a registration folder holding the true transforms
    between all training volumes (for REPS)."""
    from cross_teaching_speed import make_datalist

    from scripts.data.phantom import load_phantom_subjects, true_transform
    from scripts.registration.engine import PairResult, PairSpec
    from scripts.registration.store import TransformStore
    from scripts.registration.transform import PairTransform

    datalist = Path(make_datalist(root, n_labeled, n_unlabeled))
    data = json.loads(datalist.read_text())
    subjects = load_phantom_subjects(root / "phantom")
    entries = data["training"] + data["unlabeled"]
    ids = [e["id"] for e in entries]
    store = TransformStore(root / "registration", settings={"engine": "truth"})
    store.commit(
        [PairResult(i, j, PairTransform(true_transform(subjects[i], subjects[j]))) for i in ids for j in ids if i != j]
    )
    store.consolidate()
    shutil.copy(datalist, root / "registration" / "rsl_datalist.json")
    pairs = [PairSpec(a["id"], a["image"], b["id"], b["image"]) for a in entries for b in entries if a is not b]
    return str(datalist), str(root / "registration"), pairs


def real_data(datalist: str, registration_dir: str) -> tuple[str, str, list]:
    """A real datalist's labeled <-> unlabeled pairs (both directions), as registration plans them."""
    from scripts.data.datalist import load_datalist
    from scripts.registration.pairs import plan_pairs

    pairs = plan_pairs(load_datalist(datalist, "training"), load_datalist(datalist, "unlabeled"))
    return datalist, registration_dir, pairs


def time_registration(pairs: list, device: str, limit: int | None) -> dict:
    from monai.bundle import ConfigParser

    from scripts.registration.engine import make_engine

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    settings = dict(parser.get_parsed_content("registration_torch_settings"))
    engine = make_engine("torch", device=device, **settings)
    todo = pairs[:limit] if limit else pairs
    engine.register_batch(todo[:2])  # warm-up: caches, kernels
    _sync(engine.device)
    start = time.perf_counter()
    ok = 0
    for s in range(0, len(todo), 32):
        ok += sum(r.ok for r in engine.register_batch(todo[s : s + 32]))
    _sync(engine.device)
    seconds = time.perf_counter() - start
    return {
        "device": str(engine.device),
        "pairs": len(todo),
        "ok": ok,
        "seconds": seconds,
        "pairs_per_s": len(todo) / seconds,
    }


VARIANTS = ("default", "cct_r", "cts", "ls")


def config_files(variant: str) -> list[str]:
    """``configs/train.yaml`` and, for a variant other than the default, its overlay."""
    files = [str(ROOT / "configs" / "train.yaml")]
    return files if variant == "default" else files + [str(ROOT / "configs" / f"variant_{variant}.yaml")]


def time_training(
    datalist: str,
    registration: str,
    device: str,
    patch: int,
    batch: int,
    warmup: int,
    iterations: int,
    amp: str,
    overrides: dict | None = None,
    variant: str = "default",
    handlers: bool = True,
) -> dict:
    """Iterations/s of one training as ``monai.bundle run training`` builds it (``variant``'s overlay on
    ``train.yaml``). ``handlers``: the config's handlers as a user runs them (loss copy every ``log_every``,
    progress bar, TensorBoard, checkpoints, ...); validation falls after the timed iterations. Off: none."""
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(variant))
    total = warmup + iterations
    parser.update(
        {
            "bundle_root": tempfile.mkdtemp(prefix="gpu_check_"),
            "datalist_file": datalist,
            "registration_dir": registration,
            "patch_size": [patch, patch],
            "batch_size": batch,
            "num_workers": 4,
            "cache_num_workers": 0,
            "val_interval": total + 1,
            "num_iterations": total + 1,
            "amp": {"auto": "auto", "1": True, "0": False}[str(amp)],
            "device": f"$torch.device('{device}')",
            **(overrides or {}),
        }
    )
    if not handlers:
        parser["train#handlers"] = []
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    dev = torch.device(device)
    marks: dict = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _(engine):
        if engine.state.iteration == warmup:
            _sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            marks["start"] = time.perf_counter()
        if engine.state.iteration == total:
            _sync(dev)
            marks["end"] = time.perf_counter()
            engine.terminate()

    trainer.run()
    seconds = marks["end"] - marks["start"]
    out = trainer.state.output if isinstance(trainer.state.output, dict) else {"loss": trainer.state.output}
    terms = {k: float(v) for k, v in {**out.get("terms", {}), "loss": out.get("loss", float("nan"))}.items()}
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
    return {
        "variant": variant,
        "patch": patch,
        "batch": batch,
        "amp": str(amp),
        "amp_on": bool(parser.get_parsed_content("amp_on")),
        "handlers": handlers,
        "graph_capture": trainer.capture.describe()
        if hasattr(trainer, "capture")
        else (f"MONAI compile {trainer.compile}" if getattr(trainer, "compile", False) else "off (eager)"),
        "pipeline": "workers, 3 passes" if (overrides or {}).get("device_sampling") is False else "device, 1 pass",
        "iterations": iterations,
        "seconds": seconds,
        "it_per_s": iterations / seconds,
        "s_per_it": seconds / iterations,
        "peak_gpu_mb": peak,
        "finite_losses": all(v == v and abs(v) != float("inf") for v in terms.values()),
    }


def side_by_side(n: int, args, datalist: str, registration: str, truth: bool) -> list[dict]:
    """``n`` trainings at once, each its own process (as ``n`` users' runs would share one GPU)."""
    outs = [Path(tempfile.mkdtemp(prefix="gpu_check_sbs_")) / "out.json" for _ in range(n)]
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--datalist",
        datalist,
        "--registration_dir",
        registration,
        "--device",
        args.device,
        "--variants",
        args.variants[0],
        "--patch",
        str(args.patch[0]),
        "--batch",
        str(args.batch),
        "--warmup",
        str(args.warmup),
        "--iterations",
        str(args.iterations),
        "--amp",
        str(args.amp[0]),
    ]
    cmd += ["--truth_labels"] if truth else []
    procs = [
        subprocess.Popen(cmd + ["--out", str(o)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for o in outs
    ]
    rows = []
    for proc, out in zip(procs, outs):
        proc.wait()
        rows += [{**r, "side_by_side": n} for r in json.loads(out.read_text())["training"]] if out.exists() else []
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", nargs="+", default=["default"], choices=VARIANTS)
    ap.add_argument("--patch", nargs="+", type=int, default=[224])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=0, help="registration pairs to time (0: all; -1: none)")
    ap.add_argument("--cpu_pairs", type=int, default=4, help="pairs registered on the CPU for the ratio")
    ap.add_argument("--datalist", default=None, help="time on this datalist's volumes instead of the phantom")
    ap.add_argument("--registration_dir", default=None, help="with --datalist: its finished registration folder")
    ap.add_argument(
        "--amp",
        nargs="+",
        default=["auto"],
        choices=["auto", "1", "0"],
        help="precision of the timed trainings: the default (auto), autocast on (1) or float32 (0)",
    )
    ap.add_argument("--fp32_too", action="store_true", help="also time the first variant and patch in float32")
    ap.add_argument(
        "--old_pipeline_too",
        action="store_true",
        help="also time the first variant and patch with the MONAI per-slice pipeline and separate weak-to-strong passes",
    )
    ap.add_argument(
        "--capture_too",
        action="store_true",
        help="also time the first variant and patch with graph_capture on (torch.compile; CUDA graphs on CUDA)",
    )
    ap.add_argument("--no_handlers", action="store_true", help="time the steps alone (no handlers)")
    ap.add_argument("--side_by_side", type=int, default=0, help="then N runs of the first variant and patch at once")
    ap.add_argument("--truth_labels", action="store_true", help=argparse.SUPPRESS)  # a child on the parent's phantom
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one of --side_by_side's processes
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = ap.parse_args()
    if bool(args.datalist) != bool(args.registration_dir):
        raise SystemExit("--datalist and --registration_dir go together")
    from cross_teaching_speed import TRUE_LABEL_OVERRIDES

    truth = args.truth_labels or not args.datalist
    if args.child:
        datalist, registration, pairs = args.datalist, args.registration_dir, []
    elif args.datalist:
        datalist, registration, pairs = real_data(args.datalist, args.registration_dir)
    else:
        datalist, registration, pairs = make_data(
            Path(tempfile.mkdtemp(prefix="gpu_check_data_")), n_labeled=4, n_unlabeled=8
        )
    overrides = TRUE_LABEL_OVERRIDES if truth else {}
    report = {
        "data": "phantom" if truth else args.datalist,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "registration": [],
    }
    if not args.child and args.pairs >= 0:
        report["registration"].append(time_registration(pairs, args.device, args.pairs or None))
        if args.device != "cpu" and args.cpu_pairs:
            report["registration"].append(time_registration(pairs, "cpu", args.cpu_pairs))
    cases = [(v, p, a) for v in args.variants for p in args.patch for a in args.amp]
    cases = [(v, p, a, {}) for v, p, a in cases]
    if args.fp32_too:
        cases.append((args.variants[0], args.patch[0], "0", {}))
    if args.old_pipeline_too:  # items 2-3 of issue 32 off: loader workers and three passes per network
        old = {"device_sampling": False, "w2s_batched": False, "num_workers": 4}
        cases.append((args.variants[0], args.patch[0], args.amp[0], old))
    if args.capture_too:  # issue 32 item 4: the compile happens within the warm-up iterations
        cases.append((args.variants[0], args.patch[0], args.amp[0], {"graph_capture": True}))
    report["training"] = []
    for variant, patch, amp, extra in cases:
        row = time_training(
            datalist,
            registration,
            args.device,
            patch,
            args.batch,
            args.warmup,
            args.iterations,
            amp,
            {**overrides, **extra},
            variant,
            handlers=not args.no_handlers,
        )
        report["training"].append(row)
        print(json.dumps(row), flush=True)
    if args.side_by_side > 1 and not args.child:
        report["training"] += side_by_side(args.side_by_side, args, datalist, registration, truth)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=4) + "\n")
    if args.child:
        return
    print(f"\n{report['gpu'] or report['device']} | torch {report['torch']}")
    print("| what | device | amount | seconds | rate | peak GPU MB |\n|---|---|---:|---:|---:|---:|")
    for r in report["registration"]:
        print(
            f"| registration (torch engine, batches of 32) | {r['device']} | {r['pairs']} pairs ({r['ok']} ok) | "
            f"{r['seconds']:.1f} | {r['pairs_per_s']:.2f} pairs/s | |"
        )
    for r in report["training"]:
        together = f", {r['side_by_side']} side by side (each)" if r.get("side_by_side") else ""
        together += f", capture: {r['graph_capture']}" if r.get("graph_capture", "off (eager)") != "off (eager)" else ""
        print(
            f"| {r['variant']}, patch {r['patch']}, batch {r['batch']}, amp {r['amp']} ({'on' if r['amp_on'] else 'off'}), "
            f"handlers {'on' if r['handlers'] else 'off'}, {r['pipeline']}{together} | {args.device} | {r['iterations']} it. | "
            f"{r['seconds']:.1f} | {r['it_per_s']:.2f} it/s ({r['s_per_it']:.3f} s/it) | {r['peak_gpu_mb']:.0f} |"
        )
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
