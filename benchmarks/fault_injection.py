"""Fault injection: kill training, registration and evaluation at random moments, rerun, check the outcome.

For each stage the command is started, killed after a random delay (SIGKILL or SIGTERM, alternating),
every output file is checked to be whole (NIfTI, torch, JSON, NPZ and CSV files load), and the
command is run again (training with ``--resume true``) until it finishes. A kill is *survived* when
the stage then finishes with the expected result (training: exactly ``num_iterations``; registration:
every planned pair stored and ``rsl_datalist.json`` written; evaluation: one report row per case)
and no output file is corrupt.

    python benchmarks/fault_injection.py --kills 4 --seed 0 --out benchmarks/results/fault_injection.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAST = [
    "--patch_size",
    "[32,32]",
    "--batch_size",
    "4",
    "--num_workers",
    "0",
    "--cache_num_workers",
    "0",
    "--swin_feature_size",
    "12",
    "--cl_num_anchors",
    "50",
    "--cl_num_negatives",
    "50",
    "--registration_torch_settings#iterations",
    "[30,20]",
    "--registration_torch_settings#num_points",
    "512",
]
ITERATIONS = 120


def bundle_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", *args]


def run_killed(cmd: list[str], delay: float, signum: int, log: Path) -> int | None:
    """Run ``cmd``; send ``signum`` after ``delay`` s unless it finished. Returns the exit code."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            return proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signum) if signum == signal.SIGKILL else proc.send_signal(signum)
            return proc.wait(timeout=300)


def run_to_end(cmd: list[str], log: Path) -> int:
    return run_killed(cmd, 3600.0, signal.SIGKILL, log)


def corrupt_files(folder: Path) -> tuple[list[str], int]:
    """(files under their final name that do not load, temporary files left behind)."""
    import nibabel as nib
    import numpy as np
    import torch

    bad, temporary = [], 0
    for path in folder.rglob("*"):
        if not path.is_file() or path.name == ".lock" or path.name.startswith(".write-test"):
            continue
        if path.name.startswith("."):
            temporary += 1  # an atomic write that never reached its rename
            continue
        try:
            if path.name.endswith((".nii", ".nii.gz")):
                np.asarray(nib.load(path).dataobj)
            elif path.suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=path.name == "model.pt")
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".npz":
                dict(np.load(path, allow_pickle=False))
            elif path.suffix == ".csv":
                list(csv.reader(path.open()))
            elif path.suffix == ".png":
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        except Exception as e:  # noqa: BLE001 - any failure to load is a corrupt file
            bad.append(f"{path.relative_to(folder)}: {type(e).__name__}")
    return bad, temporary


def trial(stage: str, work: Path, datalist: str, delay: float, signum: int, log: Path) -> dict:
    """One kill of one stage, then reruns to completion; returns what was observed."""
    import torch

    run = work / f"{stage}_{int(time.time() * 1000)}"
    run.mkdir(parents=True)
    if stage == "training":
        base = [
            "run",
            "training",
            "--config_file",
            "configs/train.yaml",
            "--bundle_root",
            str(run),
            "--datalist_file",
            datalist,
            "--num_iterations",
            str(ITERATIONS),
            "--val_interval",
            "30",
            *FAST,
        ]
        first = bundle_cmd(*base)
        again = bundle_cmd(*base, "--resume", "true")
    elif stage == "registration":
        first = again = bundle_cmd(
            "run",
            "registration",
            "--config_file",
            "configs/registration.yaml",
            "--bundle_root",
            str(run),
            "--datalist_file",
            datalist,
            "--batch_size",
            "2",
            "--torch_settings#iterations",
            "[30,20]",
        )
    else:  # evaluation of the model trained once beforehand
        first = again = bundle_cmd(
            "run",
            "evaluating",
            "--config_file",
            "['configs/inference.yaml','configs/evaluate.yaml']",
            "--bundle_root",
            str(work / "trained"),
            "--datalist_file",
            datalist,
            "--datalist_section",
            "unlabeled_eval",
            "--output_dir",
            str(run / "out"),
        )
    rc = run_killed(first, delay, signum, log)
    killed = rc is not None and rc != 0
    bad_after_kill, temporary = (
        corrupt_files(run if stage != "evaluation" else run / "out") if run.exists() else ([], 0)
    )
    if stage == "evaluation":
        import shutil

        shutil.rmtree(run / "out", ignore_errors=True)  # an evaluation is rerun into a folder of its own
    rc2 = run_to_end(again, log)
    bad_final, _ = corrupt_files(run)
    ok = rc2 == 0 and not bad_final and not bad_after_kill
    detail = ""
    if stage == "training" and rc2 == 0:
        state = torch.load(run / "models" / "train_state.pt", map_location="cpu", weights_only=False)
        ok &= state["trainer"]["iteration"] == ITERATIONS and state["lr_scheduler"]["last_epoch"] == ITERATIONS
        detail = f"final iteration {state['trainer']['iteration']}"
    elif stage == "registration" and rc2 == 0:
        (folder,) = (run / "registration").iterdir()
        summary = json.loads((folder / "summary.json").read_text())
        ok &= (folder / "rsl_datalist.json").exists()
        detail = f"{summary['pairs']} pairs"
    elif stage == "evaluation" and rc2 == 0:
        rows = list(csv.DictReader((run / "out" / "metrics_per_case.csv").open()))
        ok &= len({r["case"] for r in rows}) == 3
        detail = f"{len({r['case'] for r in rows})} cases"
    return {
        "stage": stage,
        "signal": signal.Signals(signum).name,
        "delay_s": round(delay, 1),
        "killed": killed,
        "corrupt_after_kill": bad_after_kill,
        "temporary_files_after_kill": temporary,
        "rerun_rc": rc2,
        "corrupt_final": bad_final,
        "survived": bool(ok),
        "detail": detail,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=4, help="kills per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_injection.md"))
    args = parser.parse_args()
    from scripts.data.phantom import ensure_phantom_dataset

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fault-injection-"))
    datalist = ensure_phantom_dataset(work / "phantom", n_labeled=2, n_unlabeled=3, n_validation=1, n_test=0, seed=1)
    data = json.loads(Path(datalist).read_text())
    data["unlabeled_eval"] = [{"id": e["id"], "image": e["image"], "label": e["true_label"]} for e in data["unlabeled"]]
    Path(datalist).write_text(json.dumps(data))
    log = work / "log.txt"
    assert (
        run_to_end(
            bundle_cmd(
                "run",
                "training",
                "--config_file",
                "configs/train.yaml",
                "--bundle_root",
                str(work / "trained"),
                "--datalist_file",
                datalist,
                "--num_iterations",
                "4",
                "--val_interval",
                "2",
                *FAST,
            ),
            log,
        )
        == 0
    )
    windows = {"training": (6.0, 40.0), "registration": (4.0, 12.0), "evaluation": (4.0, 9.0)}
    results = []
    for stage, (lo, hi) in windows.items():
        for k in range(args.kills):
            signum = signal.SIGKILL if k % 2 == 0 else signal.SIGTERM
            results.append(trial(stage, work, datalist, rng.uniform(lo, hi), signum, log))
            print(json.dumps(results[-1]), flush=True)
    survived = sum(r["survived"] for r in results)
    landed = [r for r in results if r["killed"]]
    lines = [
        "# Fault injection",
        "",
        f"`python benchmarks/fault_injection.py --kills {args.kills} --seed {args.seed}` on a tiny phantom "
        "(2 labeled, 3 unlabeled,",
        f"1 validation volume; training {ITERATIONS} iterations at patch 32, validation every 30). Each row: the stage was",
        "started, sent the signal after the delay (if still running), its output files were checked (every NIfTI, torch,",
        "JSON, NPZ, CSV and PNG under its final name must load), then the command was rerun (training with `--resume true`)",
        "to the end and checked again.",
        "",
        f"**{sum(r['survived'] for r in landed)} of {len(landed)} kills that landed mid-run were survived**; "
        f"{len(results) - len(landed)} more runs had finished before their signal (checked and rerun all the same); "
        f"{survived} of {len(results)} rows survived in all.",
        "",
        "| stage | signal | after (s) | killed mid-run | corrupt files after the kill | temporary files left | rerun | result |",
        "|---|---|---:|---|---|---:|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['stage']} | {r['signal']} | {r['delay_s']} | {'yes' if r['killed'] else 'no (had finished)'} | "
            f"{', '.join(r['corrupt_after_kill']) or 'none'} | {r['temporary_files_after_kill']} | rc {r['rerun_rc']} | "
            f"{'survived' if r['survived'] else 'FAILED'}: {r['detail']} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{survived}/{len(results)} survived; written to {args.out}")


if __name__ == "__main__":
    main()
