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
    store.commit([PairResult(i, j, PairTransform(true_transform(subjects[i], subjects[j]))) for i in ids for j in ids if i != j])
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
    return {"device": str(engine.device), "pairs": len(todo), "ok": ok, "seconds": seconds, "pairs_per_s": len(todo) / seconds}


def time_training(datalist: str, registration: str, device: str, patch: int, batch: int, warmup: int, iterations: int,
                  amp: bool, overrides: dict | None = None) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    parser.update({
        "bundle_root": tempfile.mkdtemp(prefix="gpu_check_"), "datalist_file": datalist, "registration_dir": registration,
        "patch_size": [patch, patch], "batch_size": batch, "num_workers": 4, "cache_num_workers": 0,
        "val_interval": warmup + iterations, "num_iterations": 40000, "max_epochs": 1, "amp": amp,
        "device": f"$torch.device('{device}')", "train#handlers": [], **(overrides or {}),
    })
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
        if engine.state.iteration == warmup + iterations:
            _sync(dev)
            marks["end"] = time.perf_counter()
            engine.terminate()

    trainer.run()
    seconds = marks["end"] - marks["start"]
    terms = {k: float(v) for k, v in trainer.state.output["terms"].items()}
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
    return {"patch": patch, "batch": batch, "amp": amp, "iterations": iterations, "seconds": seconds,
            "it_per_s": iterations / seconds, "s_per_it": seconds / iterations, "peak_gpu_mb": peak,
            "finite_losses": all(v == v and abs(v) != float("inf") for v in terms.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--patch", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=0, help="registration pairs to time (0: all)")
    ap.add_argument("--cpu_pairs", type=int, default=4, help="pairs registered on the CPU for the ratio")
    ap.add_argument("--datalist", default=None, help="time on this datalist's volumes instead of the phantom")
    ap.add_argument("--registration_dir", default=None, help="with --datalist: its finished registration folder")
    ap.add_argument("--amp", nargs="+", type=int, default=[0, 1], help="training timed with amp off (0) and/or on (1)")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = ap.parse_args()
    if bool(args.datalist) != bool(args.registration_dir):
        raise SystemExit("--datalist and --registration_dir go together")
    if args.datalist:
        datalist, registration, pairs = real_data(args.datalist, args.registration_dir)
    else:
        datalist, registration, pairs = make_data(Path(tempfile.mkdtemp(prefix="gpu_check_data_")), n_labeled=4, n_unlabeled=8)
    from cross_teaching_speed import TRUE_LABEL_OVERRIDES

    overrides = {} if args.datalist else TRUE_LABEL_OVERRIDES
    report = {"data": args.datalist or "phantom", "machine": platform.platform(), "torch": torch.__version__, "device": args.device,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "threads": torch.get_num_threads()}
    report["registration"] = [time_registration(pairs, args.device, args.pairs or None)]
    if args.device != "cpu" and args.cpu_pairs:
        report["registration"].append(time_registration(pairs, "cpu", args.cpu_pairs))
    report["training"] = [time_training(datalist, registration, args.device, args.patch, args.batch, args.warmup, args.iterations, amp,
                                        overrides) for amp in (bool(a) for a in args.amp)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=4))
    print(f"\n{report['gpu'] or report['device']} | torch {report['torch']}")
    print("| what | device | amount | seconds | rate | peak GPU MB |\n|---|---|---:|---:|---:|---:|")
    for r in report["registration"]:
        print(f"| registration (torch engine, batches of 32) | {r['device']} | {r['pairs']} pairs ({r['ok']} ok) | "
              f"{r['seconds']:.1f} | {r['pairs_per_s']:.2f} pairs/s | |")
    for r in report["training"]:
        print(f"| CCT-R training, patch {r['patch']}, batch {r['batch']}, amp {r['amp']} | {args.device} | {r['iterations']} it. | "
              f"{r['seconds']:.1f} | {r['it_per_s']:.2f} it/s ({r['s_per_it']:.3f} s/it) | {r['peak_gpu_mb']:.0f} |")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
