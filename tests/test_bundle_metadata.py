"""Model Zoo tooling: metadata schema, network input/output shapes, TorchScript export."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from tests.test_bundle import ROOT, bundle, ok

SCHEMA = ROOT / "tests" / "data" / "meta_schema_offline.json"


def test_verify_metadata_passes():
    proc = ok(bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA)))
    assert "verified with no error" in proc.stdout + proc.stderr


def test_verify_metadata_catches_a_missing_field(tmp_path):
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    del meta["required_packages_version"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    proc = bundle("verify_metadata", "--meta_file", str(bad), "--filepath", str(SCHEMA))
    assert proc.returncode != 0 and "required_packages_version" in proc.stderr


def test_metadata_versions_match_requirements():
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    assert pins["monai"] == meta["monai_version"]
    assert pins["torch"] == meta["pytorch_version"]
    assert pins["numpy"] == meta["numpy_version"]
    for name, version in meta["required_packages_version"].items():
        assert pins[name.lower()] == version, name


def test_verify_net_in_out():
    proc = ok(
        bundle(
            "verify_net_in_out",
            "network_def",
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.yaml",
            "--n",
            "2",
        )
    )
    assert "verified with no error" in proc.stdout + proc.stderr


def test_metadata_output_channels_match_network():
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == parser.get_parsed_content("num_classes")
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == parser.get_parsed_content(
        "class_names"
    )


LS_MODEL = {
    "variant": "ls",
    "networks": {
        "a": {
            "type": "BasicUNet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 4,
            "features": [16, 32, 64, 128, 256, 16],
            "dropout": 0.0,
        }
    },
    "patch_size": [96, 96],
    "class_names": ["background", "RV", "myocardium", "LV"],
    "intensity": {"type": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0},
}


@pytest.mark.parametrize("model", ["default", "ls"])
def test_ckpt_export_torchscript(tmp_path, model):
    """The default CCT-R pair exports by tracing (SwinUNETR is not scriptable), an LS U-Net by scripting."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    extra = []
    if model == "ls":
        config = tmp_path / "model_config.json"
        config.write_text(json.dumps(LS_MODEL))
        parser["model_config_file"] = str(config)
        extra = ["--model_config_file", str(config)]
    net = parser.get_parsed_content("network_def")
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "model.ts"
    args = [
        "ckpt_export",
        "network_def",
        "--filepath",
        str(out),
        "--ckpt_file",
        str(ckpt),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.yaml",
        "--key_in_ckpt",
        "",
        *extra,
    ]
    if model == "default":
        args += ["--use_trace", "True", "--input_shape", "[1,1,96,96]"]
    ok(bundle(*args))
    scripted = torch.jit.load(str(out))
    x = torch.rand(1, 1, 96, 96)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-5)


EXPRESSION_NAME = re.compile(r"\bscripts(?:\.\w+)+")


def _expression_names(config_file) -> set[str]:
    """Dotted ``scripts.`` names used inside ``$`` expressions (``_target_`` names are imported by MONAI itself)."""
    names = set()
    for line in config_file.read_text().splitlines():
        code = line.split("#", 1)[0]
        if "$" in code and "$import" not in code:
            names.update(EXPRESSION_NAME.findall(code[code.index("$") :]))
    return names


@pytest.mark.parametrize("entry", ["train.yaml", "inference.yaml", "evaluate.yaml", "registration.yaml"])
def test_every_scripts_name_in_an_expression_is_loaded_by_the_imports(entry):
    """An expression evaluates ``scripts.a.b.f`` as attributes of the imported package, so ``scripts.a.b`` must be
    among the config's ``imports`` (a test process may have imported it by chance; a fresh bundle run has not).
    Overlays without imports of their own (variants, datasets) run on top of train.yaml."""
    configs = ROOT / "configs"
    imports = [
        line.split("$import", 1)[1].strip()
        for line in (configs / entry).read_text().splitlines()
        if line.startswith("- $import")
    ]
    files = [configs / entry]
    if entry == "train.yaml":
        files += [f for f in configs.glob("*.yaml") if "imports:" not in f.read_text()]
    names = sorted(set().union(*(_expression_names(f) for f in files)))
    assert names, entry
    probe = (
        "import importlib, sys\n"
        f"for module in {imports!r}:\n    importlib.import_module(module)\n"
        "import scripts\nmissing = []\n"
        f"for name in {names!r}:\n"
        "    value = scripts\n"
        "    for part in name.split('.')[1:]:\n"
        "        if not hasattr(value, part):\n"
        "            missing.append(name)\n"
        "            break\n"
        "        value = getattr(value, part)\n"
        "print(missing)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"{entry}: not loaded by its imports: {proc.stdout.strip()}"
