"""configs/multi_gpu_train.yaml: CCT-R under torchrun with DistributedDataParallel, 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests.cross_teaching_fixtures import FAST, ROOT, make_rsl_datalist


def test_cct_r_under_torchrun_two_processes(tmp_path):
    """CCT-R with SCL: DDP keeps the networks and also the projector heads (outside DDP) identical."""
    data = make_rsl_datalist(tmp_path / "data", n_validation=2)  # one validation volume per process
    run_dir = tmp_path / "run"
    overrides = [f"--{k}={json.dumps(v).replace(' ', '')}" for k, v in FAST.items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['configs/train.yaml','configs/variant_no_reps.yaml','configs/multi_gpu_train.yaml']",
        "--bundle_root",
        str(run_dir),
        "--datalist_file",
        data["rsl"],
        "--num_iterations",
        "2",
        "--val_interval",
        "2",
        "--cl_threshold",
        "0.0",
        "--cl_num_anchors",
        "50",
        "--cl_num_negatives",
        "50",
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    models = run_dir / "models"
    rank0 = torch.load(models / "train_state.pt", map_location="cpu", weights_only=False)
    rank1 = torch.load(models / "train_state_rank1.pt", map_location="cpu", weights_only=False)
    assert rank0["trainer"]["iteration"] == rank1["trainer"]["iteration"] == 2
    # DDP keeps both networks identical on every process ...
    for name, value in rank0["network"].items():
        torch.testing.assert_close(rank1["network"][name], value, msg=name)
    # ... and the projector heads, which live outside DDP, are broadcast and gradient-averaged too
    assert any(k.startswith("projectors.a.") for k in rank0["contrastive"])
    for name, value in rank0["contrastive"].items():
        torch.testing.assert_close(rank1["contrastive"][name], value, msg=name)
    # ... while each process draws its own slices
    assert not torch.equal(rank0["rng"]["torch"], rank1["rng"]["torch"])
    model = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert not any(".module." in k for k in model)  # the unwrapped ensemble, loadable by inference
    assert set(model) == set(rank0["network"])
    (outputs,) = (run_dir / "eval").glob("training_*")  # one output folder for the run, not one per process
    history = json.loads((outputs / "pseudo_label_dice.json").read_text())
    assert [r["iteration"] for r in history] == [2]  # rank 0 only
