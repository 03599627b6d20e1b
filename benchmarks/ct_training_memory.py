"""Peak memory and time of the default training command (CCT-R, registration inside) on CT-sized volumes.

Generates the synthetic abdominal CT phantom at CT size (512 x 512 x 100, 0.7-0.9 mm in-plane,
3-5 mm slices; ``scripts.data.ct_phantom --size ct``) with ``--n_labeled`` / ``--n_unlabeled`` /
``--n_validation`` volumes, then runs the README's Synapse command

    python -m monai.bundle run training --config_file "['configs/train.yaml','configs/dataset_synapse.yaml']"

(patch 224, batch 24, affine + deformable registration, SCL + REPS) for ``--iterations`` iterations
with one validation round at the end, in its own process group. Every 0.5 s it sums the resident
memory (``VmRSS``) of every process of that group (training, registration workers, data loader
workers) and reports the peak of that sum, the peak of the largest single process, and the time of
each phase read from the training log. The cache of one CT volume (float32 image + label, and a
registered label for unlabeled volumes) is about 200-300 MB, so the peak for Synapse's 18 training
volumes is extrapolated from the measured peak plus that per-volume size, and said to be so.

    python benchmarks/ct_training_memory.py --report benchmarks/results/ct_training_memory.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pss_kb(pid: str) -> int | None:
    """Proportional set size (kB): shared pages split between the processes that share them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def group_memory_kb(pgid: int) -> tuple[int, int]:
    """(sum of PSS, largest RSS) in kB over the live processes of process group ``pgid``.

    PSS sums to what the group uses (pages shared by forked workers are counted once overall);
    where ``smaps_rollup`` is unreadable the process's RSS stands in.
    """
    total, largest = 0, 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid:  # field 5 of stat: pgrp
                continue
            rss = next(
                int(line.split()[1])
                for line in Path(f"/proc/{entry}/status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )
        except (OSError, ValueError, StopIteration):
            continue
        pss = _pss_kb(entry)
        total += rss if pss is None else pss
        largest = max(largest, rss)
    return total, largest


class Sampler(threading.Thread):
    def __init__(self, pgid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pgid, self.interval = pgid, interval
        self.peak_sum = self.peak_max = 0
        self.series: list[tuple[float, int, int]] = []  # (wall clock, summed PSS kB, largest RSS kB)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            s, m = group_memory_kb(self.pgid)
            self.series.append((time.time(), s, m))
            self.peak_sum, self.peak_max = max(self.peak_sum, s), max(self.peak_max, m)
            self.stop.wait(self.interval)


PHASES = [  # (name, a log line that starts it)
    ("registration, then caching the volumes", r"registration before training"),
    ("training iterations", r"CrossTeachingTrainer - INFO - Engine run starting"),
]
STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+)"


def _stamp(line: str) -> float | None:
    m = re.match(STAMP, line)
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000 if m else None


def phase_peaks(log_text: str, series: list[tuple[float, int, int]]) -> list[tuple[str, float, float]]:
    """Peak (sum, largest) MB per phase, the phases delimited by the first timestamped log line of each."""
    starts = []
    lines = log_text.splitlines()
    for name, pattern in PHASES:
        hit = next((t for t in map(_stamp, [ln for ln in lines if re.search(pattern, ln)]) if t is not None), None)
        if hit is not None:
            starts.append((name, hit))
    # the evaluator logs only when it finishes: its start is that time minus its duration
    for line in lines:
        m = re.search(r"SupervisedEvaluator - INFO - Engine run finished. Time taken: (\d+):(\d+):([0-9.]+)", line)
        if m and _stamp(line) is not None:
            took = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
            starts.append(("validation (whole volumes)", _stamp(line) - took))
            starts.append(("after validation", _stamp(line)))
            break
    starts.sort(key=lambda x: x[1])
    out = []
    for i, (name, t0) in enumerate(starts):
        t1 = starts[i + 1][1] if i + 1 < len(starts) else float("inf")
        inside = [(s, m) for t, s, m in series if t0 <= t < t1]
        if inside:
            out.append((name, max(s for s, _ in inside) / 1024, max(m for _, m in inside) / 1024))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="folder for the phantom and the run (default: a temporary one)")
    ap.add_argument("--n_labeled", type=int, default=1)
    ap.add_argument("--n_unlabeled", type=int, default=2)
    ap.add_argument("--n_validation", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="num_threads of training and registration")
    ap.add_argument("--workers", type=int, default=1, help="registration_workers and num_workers")
    ap.add_argument("--report", default=None, help="write a markdown table here")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="ct_training_memory_")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from scripts.data.ct_phantom import ensure_ct_phantom_dataset

    t0 = time.time()
    datalist = ensure_ct_phantom_dataset(
        work / "data", n_labeled=args.n_labeled, n_unlabeled=args.n_unlabeled, n_validation=args.n_validation, size="ct"
    )
    render_s = time.time() - t0
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['configs/train.yaml','configs/dataset_synapse.yaml']",
        "--datalist_file",
        datalist,
        "--num_iterations",
        str(args.iterations),
        "--val_interval",
        str(args.iterations),
        "--num_threads",
        str(args.threads),
        "--registration_threads",
        str(args.threads),
        "--registration_workers",
        str(args.workers),
        "--num_workers",
        str(args.workers),
        "--ckpt_dir",
        str(work / "models"),
        "--output_root",
        str(work / "eval"),
        "--registration_root",
        str(work / "registration"),
    ]
    log_path = work / "train.log"
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            raise
        finally:
            sampler.stop.set()
            sampler.join()
    total_s = time.time() - start
    text = log_path.read_text(errors="replace")
    if rc:
        raise SystemExit(f"training failed (exit {rc}); see {log_path}")
    its = [float(x) for x in re.findall(r"([0-9.]+)s/it", text)]
    per_it = its[-1] if its else float("nan")
    reg = re.findall(r"registration[^\n]*?(\d+) pairs?", text)
    n_train = args.n_labeled + args.n_unlabeled
    rows = {
        "volumes (labeled / unlabeled / validation)": f"{args.n_labeled} / {args.n_unlabeled} / {args.n_validation}",
        "rendering the phantom (s)": f"{render_s:.0f}",
        "training command, wall (s), registration included": f"{total_s:.0f}",
        "s / iteration (batch 24, patch 224, last tqdm rate)": f"{per_it:.1f}",
        "peak memory of all processes (summed PSS, MB)": f"{sampler.peak_sum / 1024:.0f}",
        "peak resident memory of the largest process (MB)": f"{sampler.peak_max / 1024:.0f}",
    }
    per_volume_mb = 512 * 512 * 100 * 4 * 2 / 2**20  # float32 image + label in the cache
    extra = 18 - n_train
    estimate = sampler.peak_sum / 1024 + extra * per_volume_mb * 1.5  # unlabeled volumes also cache a registered label
    phases = phase_peaks(text, sampler.series)
    with open(work / "memory.csv", "w") as fh:
        fh.write("time,sum_pss_mb,largest_rss_mb\n")
        fh.writelines(f"{t:.1f},{a / 1024:.0f},{b / 1024:.0f}\n" for t, a, b in sampler.series)
    lines = (
        [
            f"# CCT-R training on CT-sized phantom volumes ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
            f"{os.cpu_count()} cores, {args.threads} thread(s), load average at the end {os.getloadavg()[0]:.1f})",
            "",
            "Command: `python benchmarks/ct_training_memory.py " + " ".join(sys.argv[1:]) + "`",
            "",
            "| | |",
            "|---|---:|",
        ]
        + [f"| {k} | {v} |" for k, v in rows.items()]
        + [
            "",
            "| phase (from the training log) | peak summed PSS (MB) | peak RSS, largest process (MB) |",
            "|---|---:|---:|",
        ]
        + [f"| {n} | {a:.0f} | {b:.0f} |" for n, a, b in phases]
        + [
            "",
            "PSS (proportional set size) splits pages shared by the training process and its forked data "
            "loader / registration workers between them, so the sum is the group's use of the machine's memory.",
            "",
            f"Synapse has 18 training volumes: {extra} more CT-sized volumes in the training caches add about "
            f"{per_volume_mb:.0f}-{1.5 * per_volume_mb:.0f} MB each (float32 image and label(s), about 100 slices), "
            f"so a full Synapse run should peak near {estimate / 1024:.1f} GB of summed PSS (extrapolated, not measured). "
            "Real Synapse volumes have 85-200 slices: scale the cache part by the slice count.",
        ]
    )
    print("\n".join(lines))
    if reg:
        print("registration pairs in the log:", reg[-1])
    if args.report:
        Path(args.report).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
