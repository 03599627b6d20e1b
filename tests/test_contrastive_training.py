"""Two iterations of CCT-R + SCL + REPS (and CTS + MCSC) on the tiny phantom, through the bundle configs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.data.phantom import load_phantom_subjects, true_transform
from scripts.registration.engine import PairResult
from scripts.registration.store import TransformStore
from scripts.registration.transform import PairTransform
from tests.cross_teaching_fixtures import FAST, ROOT, make_rsl_datalist

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("phantom")
    paths = make_rsl_datalist(root)
    subjects = load_phantom_subjects(Path(paths["plain"]).parent)
    listed = json.loads(Path(paths["rsl"]).read_text())
    ids = [e["id"] for s in ("training", "unlabeled") for e in listed[s]]
    store = TransformStore(root / "registration", settings={"engine": "truth"})
    store.commit(
        [PairResult(i, j, PairTransform(true_transform(subjects[i], subjects[j]))) for i in ids for j in ids if i != j]
    )
    store.consolidate()
    shutil.copy(paths["rsl"], root / "registration" / "rsl_datalist.json")  # a registration folder (--registration_dir)
    return {**paths, "registration": str(root / "registration")}


def _parser(run_dir: Path, files: list[str], datalist: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    parser.update(
        {
            **FAST,
            "bundle_root": str(run_dir),
            "datalist_file": datalist,
            "num_iterations": 2,
            "val_interval": 2,
            "monitor_max_volumes": 0,
            **overrides,
        }
    )
    return parser


def _in_bundle(work):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return work()
    finally:
        os.chdir(cwd)


def _train(run_dir: Path, files: list[str], datalist: str, **overrides) -> ConfigParser:
    parser = _parser(run_dir, files, datalist, **overrides)
    _in_bundle(lambda: parser.get_parsed_content("train#trainer").run())
    return parser


def test_cct_r_with_scl_and_reps_trains_and_keeps_the_model_loadable(tmp_path, data):
    parser = _train(
        tmp_path,
        ["train.yaml"],
        data["rsl"],
        registration_dir=data["registration"],
        rsl_weight=1.0,  # off in the default since 0.8.0; on here, with every other term
        cl_num_anchors=50,
        cl_num_negatives=50,
    )
    trainer, term = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("contrastive#module")
    assert trainer.state.iteration == 2
    terms = trainer.state.output["terms"]
    assert {"cl_a", "cl_b", "rsl_a", "sup_b"} <= set(terms)
    assert all(np.isfinite(float(terms[k])) and float(terms[k]) > 0 for k in ("cl_a", "cl_b"))
    assert 0.0 <= float(terms["reps_found_joint"]) <= 1.0  # logged REPS coverage
    # one bank (the joint space) holds both networks' maps of the last slices: volume keys 0..V-1 for A,
    # V..2V-1 for B, within twice the (M+K)/5 capacity
    v = len(term.correspondence)
    assert term.joint and set(term.banks) == {"joint"}
    keys = term.banks["joint"].keys()
    assert 0 < len(keys) <= 2 * term.capacity
    assert {k for k, _ in keys if k < v} and {(k - v, s) for k, s in keys if k >= v} == {
        (k, s) for k, s in keys if k < v
    }
    # projectors train with their networks' optimizers and are checkpointed outside the networks
    proj_ids = {id(p) for p in term.projector_parameters("a")}
    assert proj_ids <= {id(p) for g in parser.get_parsed_content("optimizer").param_groups for p in g["params"]}
    state = torch.load(tmp_path / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    assert any(k.startswith("projectors.b.") for k in state["contrastive"])
    # the REPS bank is part of the training checkpoint: a resumed run starts from the same slices
    saved = state["contrastive"]["_extra_state"]["banks"]["joint"]
    assert [tuple(k) for k in saved["keys"]] == keys and len(saved["features"]) == len(keys)
    fresh = _parser(tmp_path / "fresh", ["train.yaml"], data["rsl"], registration_dir=data["registration"])
    fresh = _in_bundle(lambda: fresh.get_parsed_content("contrastive#module"))
    assert fresh.banks == {}
    fresh.load_state_dict(state["contrastive"])
    assert fresh.banks["joint"].keys() == keys
    slots = [int(term.banks["joint"].slot_of[k]) for k in keys]
    torch.testing.assert_close(fresh.banks["joint"].features[: len(keys)], term.banks["joint"].features[slots])
    old_format = {k: v for k, v in state["contrastive"].items() if k != "_extra_state"}
    fresh.load_state_dict(old_format)  # a checkpoint written before the banks were saved: empty banks
    assert fresh.banks == {}
    model = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert model.keys() == parser.get_parsed_content("network_def").state_dict().keys()


def test_cts_with_mcsc_trains(tmp_path, data):
    parser = _train(
        tmp_path, ["train.yaml", "variant_mcsc.yaml"], data["plain"], **{"contrastive#term#mcsc_max_samples": 64}
    )
    terms = parser.get_parsed_content("train#trainer").state.output["terms"]
    assert "rsl_a" not in terms and float(terms["cl_a"]) > 0 and float(terms["cl_b"]) > 0
    # MCSC's one space: both students get the one loss over their pixels together
    assert parser.get_parsed_content("contrastive#module").joint and float(terms["cl_a"]) == float(terms["cl_b"])


@pytest.mark.parametrize(
    "files, trained, banks",
    [
        (["train.yaml", "variant_uamt_rsl.yaml"], {"a"}, {"a"}),  # UAMT + RSL+SCL+REPS
        (["train.yaml", "variant_cps.yaml"], {"a", "b"}, {"joint"}),  # CPS + RSL+SCL+REPS (joint space)
    ],
    ids=["uamt", "cps"],
)
def test_table3_rows_with_rsl_scl_reps_train(tmp_path, data, files, trained, banks):
    # rsl_reliability none: with the fixture's two unlabeled volumes the BRS rank gives one of them weight 0, and a
    # batch of its slices alone would have no RSL term to check
    parser = _train(
        tmp_path,
        files,
        data["rsl"],
        registration_dir=data["registration"],
        rsl_weight=1.0,
        cl_weight=0.001,
        use_reps=True,
        cl_num_anchors=50,
        cl_num_negatives=50,
        rsl_reliability="none",
    )
    terms = parser.get_parsed_content("train#trainer").state.output["terms"]
    term = parser.get_parsed_content("contrastive#module")
    assert {f"cl_{k}" for k in trained} <= set(terms) and all(float(terms[f"cl_{k}"]) > 0 for k in trained)
    assert "rsl_a" in terms and float(terms["rsl_a"]) > 0
    assert set(term.banks) == banks  # the UA-MT teacher is an EMA copy: no contrastive branch, no bank


def test_per_network_contrastive_spaces_stay_reachable(tmp_path, data):
    parser = _train(
        tmp_path,
        ["train.yaml"],
        data["rsl"],
        registration_dir=data["registration"],
        cl_joint_space=False,
        cl_num_anchors=50,
        cl_num_negatives=50,
    )
    term = parser.get_parsed_content("contrastive#module")
    terms = parser.get_parsed_content("train#trainer").state.output["terms"]
    assert not term.joint and set(term.banks) == {"a", "b"} and len(term.banks["a"]) <= term.capacity
    assert {"reps_found_a", "reps_found_b"} <= set(terms)


def test_amp_path_runs_on_cpu_in_bfloat16(tmp_path, data):
    """The trainer's mixed-precision path (both networks, every loss term, the REPS bank) under CPU bfloat16
    autocast: it runs, the networks really compute in bfloat16, and the losses stay finite."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.yaml")])
    parser.update(
        {
            **FAST,
            "bundle_root": str(tmp_path),
            "datalist_file": data["rsl"],
            "num_iterations": 2,
            "val_interval": 2,
            "monitor_max_volumes": 0,
            "registration_dir": data["registration"],
            "cl_num_anchors": 50,
            "cl_num_negatives": 50,
            "rsl_weight": 1.0,  # every loss term, RSL included (off in the default since 0.8.0)
            "amp": True,
        }
    )
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        trainer = parser.get_parsed_content("train#trainer")
        dtypes = set()
        for net in (parser.get_parsed_content("net_a"), parser.get_parsed_content("net_b")):
            net.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
        trainer.run()
    finally:
        os.chdir(cwd)
    assert trainer.amp and trainer.state.iteration == 2 and dtypes == {torch.bfloat16}
    terms = trainer.state.output["terms"]
    assert {"sup_a", "cps_b", "rsl_a", "cl_a", "cl_b"} <= set(terms)
    assert all(np.isfinite(float(v)) for v in terms.values()) and float(terms["cl_b"]) > 0
    assert len(parser.get_parsed_content("contrastive#module").banks["joint"]) > 0


@pytest.mark.parametrize("amp", [True, False])
def test_ls_trains_in_the_precision_of_the_other_variants_on_cpu(tmp_path, data, amp):
    """MONAI's SupervisedTrainer (``ls``) autocasts on CUDA only: its training forward gets bfloat16 on a CPU
    from the config's inferer when amp is on, float32 when off; the logits reach the loss as float32."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "variant_ls.yaml")])
    parser.update(
        {
            **FAST,
            "bundle_root": str(tmp_path),
            "datalist_file": data["plain"],
            "num_iterations": 2,
            "val_interval": 2,
            "amp": amp,
        }
    )
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        trainer = parser.get_parsed_content("train#trainer")
        dtypes, losses = set(), []
        trainer.network.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
        trainer.loss_function.register_forward_pre_hook(lambda m, args: losses.append(args[0].dtype))
        trainer.run()
    finally:
        os.chdir(cwd)
    assert trainer.state.iteration == 2 and np.isfinite(float(trainer.state.output["loss"].detach()))
    assert dtypes == {torch.bfloat16 if amp else torch.float32}
    assert set(losses) == {torch.float32}
