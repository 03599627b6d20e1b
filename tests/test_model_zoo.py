"""The MONAI Model Zoo's checks, in the project's own code (issue 37).

The bundle is laid out as the zoo lays bundles out (``models/<name>/`` holding ``configs/``, ``scripts/``,
``docs/``, ``LICENSE``), trained on a small phantom for a few iterations the way the zoo's unit tests run
bundles (``create_workflow``, ``initialize``, ``check_properties``, ``run``, ``finalize``, in this process),
then put through what the zoo's ``ci/verify_bundle.py`` checks: the required and preferred files, version
and changelog, the metadata against the schema (the offline copy in ``tests/data``), the inference
workflow's properties, the network's input and output shapes, and export (by tracing: SwinUNETR in 2D
cannot be scripted, which the metadata and the model card say, so the zoo lists the bundle in its
``exclude_verify_torchscript_list``). The weights travel as the zoo brings them: ``large_files.yml``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from monai.apps.utils import download_url
from monai.bundle import ckpt_export, create_workflow, verify_metadata, verify_net_in_out

from scripts.data.phantom import ensure_phantom_dataset
from scripts.publishing.large_files import MODEL_FILES, large_files, md5
from tests.test_bundle import FAST, ROOT

SCHEMA = ROOT / "tests" / "data" / "meta_schema_offline.json"
FAST_SETTINGS = {FAST[i][2:]: yaml.safe_load(FAST[i + 1]) for i in range(0, len(FAST), 2)}


def _lay_out(root: Path) -> Path:
    """The bundle as ``models/<name>/`` of the zoo repository (no weights yet)."""
    bundle = root / "models" / "cct_r_segmentation"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("configs", "scripts", "docs"):
        shutil.copytree(ROOT / name, bundle / name, ignore=ignore)
    for name in ("LICENSE", "README.md"):
        shutil.copy(ROOT / name, bundle / name)
    return bundle


def _workflow(bundle: Path, kind: str, **override):
    config = bundle / "configs" / ("train.yaml" if kind == "train" else "inference.yaml")
    return create_workflow(
        config_file=str(config),
        workflow_type=kind,
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle),
        **override,
    )


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> str:
    return ensure_phantom_dataset(
        tmp_path_factory.mktemp("zoo_data"), n_labeled=2, n_unlabeled=1, n_validation=1, n_test=1, seed=3
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom) -> Path:
    """Trained in the zoo's unit-test pattern: fake data, a few iterations, in this process."""
    bundle = _lay_out(tmp_path_factory.mktemp("zoo"))
    workflow = _workflow(
        bundle, "train", datalist_file=phantom, num_iterations=4, val_interval=2, progress=False, **FAST_SETTINGS
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return bundle


def test_train_properties_are_checked_without_registering(tmp_path, phantom):
    bundle = _lay_out(tmp_path)
    workflow = _workflow(bundle, "train", datalist_file=phantom, **FAST_SETTINGS)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert not (bundle / "registration").exists()  # building the trainer registers nothing
    assert workflow.dataset_dir == str(Path(phantom).parent) and workflow.train_inferer is not None
    assert workflow.val_interval == workflow.parser.get_parsed_content("val_interval")


def test_trained_bundle_infers_in_the_zoo_pattern(trained, phantom, tmp_path):
    assert all((trained / f).stat().st_size > 0 for f in MODEL_FILES)
    workflow = _workflow(trained, "infer", datalist_file=phantom, output_dir=str(tmp_path / "out"))
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()  # the default run id, as the zoo's tests call it
    workflow.finalize()
    assert len(list((tmp_path / "out").glob("*_seg.nii.gz"))) == 1  # the phantom's one test volume


def test_the_zoo_verify_checks_pass(trained, tmp_path):
    # files: necessary and preferred (ci/verify_bundle.py's lists)
    for name in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.yaml"):
        assert (trained / name).is_file(), name
    meta = json.loads((trained / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    verify_metadata(meta_file=str(trained / "configs" / "metadata.json"), filepath=str(SCHEMA))
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(trained / "configs" / "metadata.json"),
        config_file=str(trained / "configs" / "inference.yaml"),
        bundle_root=str(trained),
        n=2,
    )
    # TorchScript: excluded as the zoo excludes it, and said so where a contributor looks
    assert (
        "TorchScript" in meta["description"]
        and "exclude_verify_torchscript_list" in (trained / "docs" / "README.md").read_text()
    )
    out = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(out),
        ckpt_file=str(trained / "models" / "model.pt"),
        meta_file=str(trained / "configs" / "metadata.json"),
        config_file=str(trained / "configs" / "inference.yaml"),
        bundle_root=str(trained),
        key_in_ckpt="",
        use_trace=True,
        input_shape=[1, 1, 32, 32],
    )
    traced = torch.jit.load(str(out))
    assert traced(torch.rand(1, 1, 32, 32)).shape == (1, 4, 32, 32)


def test_large_files_bring_the_weights_into_a_bare_bundle(trained, tmp_path):
    """The zoo's way: large_files.yml names both model files with their hashes; downloading them into a bundle
    without weights (here from a file:// address) restores exactly the trained files."""
    listing = large_files(
        url=(trained / "models").as_uri(), models_dir=trained / "models", out=tmp_path / "large_files.yml"
    )
    rows = yaml.safe_load(listing.read_text())["large_files"]
    assert [r["path"] for r in rows] == list(MODEL_FILES) and all(r["hash_type"] == "md5" for r in rows)
    bare = tmp_path / "bare"
    for row in rows:
        download_url(
            url=row["url"], filepath=str(bare / row["path"]), hash_val=row["hash_val"], hash_type=row["hash_type"]
        )
        assert md5(bare / row["path"]) == md5(trained / row["path"])
    with pytest.raises(ValueError, match="model_config.json: missing or empty"):
        (bare / "models" / "model_config.json").unlink()
        large_files(url="https://example.org/m", models_dir=bare / "models", out=tmp_path / "again.yml")
    assert not (tmp_path / "again.yml").exists()
