"""Command-line values (strings from fire) are read the way YAML means them."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from scripts.config_values import flag, optional

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("false", False),
        ("False", False),
        ("no", False),
        ("0", False),
        ("off", False),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        (True, True),
        (False, False),
        (0, False),
        (None, False),
    ],
)
def test_flag_reads_yaml_spellings(text, expected):
    assert flag(text) is expected


def test_flag_refuses_other_strings_by_name():
    with pytest.raises(ValueError, match="amp: expected true or false, got 'maybe'"):
        flag("maybe", "amp")


@pytest.mark.parametrize("text", ["null", "None", "none", "~"])
def test_optional_reads_null(text):
    assert optional(text) is None
    assert optional(0.8) == 0.8 and optional("fade") == "fade"


def _parser(files, **overrides):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    parser.update(overrides)  # what `monai.bundle run ... --key value` does with fire's strings
    return parser


def test_command_line_false_and_null_switch_things_off():
    """`--amp false`, `--flip_augmentation false`, `--crop_min_scale null`, `--cl_joint_space false`,
    `--deformable false` and `--resume false` as the strings the command line passes."""
    p = _parser(
        ["train.yaml"],
        amp="false",
        flip_augmentation="false",
        crop_min_scale="null",
        cl_joint_space="false",
        deformable="false",
        resume="false",
        brs_random_partner="false",
        registration_dir="null",
    )
    names = [type(t).__name__ for t in p.get_parsed_content("train#slice_transforms")]
    assert "RandScaleCropd" not in names
    assert [type(t).__name__ for t in p.get_parsed_content("train#augmentation").transforms[0].transforms] == [
        "RandRotate90d"
    ]
    for key in ("train#trainer#amp", "validate#evaluator#amp", "monitor#handler#amp"):
        assert p.get_parsed_content(key) is False, key
    assert p.get_parsed_content("registration_torch_settings#deformable") is False
    assert p.get_parsed_content("registration_stage#random_partner") is False
    assert p.get_parsed_content("registration_stage#registration_dir") is None
    assert p.get_parsed_content("contrastive#term#joint") is False
    # and "true" switches them on
    p = _parser(["train.yaml"], amp="true", cl_joint_space="true", deformable="true")
    assert p.get_parsed_content("train#trainer#amp") is True
    # MONAI's evaluator autocasts to "cuda" only: on a CPU it stays off instead of warning at every validation
    cuda = p.get_parsed_content("device").type == "cuda"
    assert p.get_parsed_content("validate#evaluator#amp") is cuda
    assert p.get_parsed_content("registration_torch_settings#deformable") is True
    assert p.get_parsed_content("contrastive#term#joint") is True


def test_inference_amp_false_from_the_command_line():
    p = _parser(["inference.yaml"], amp="false")
    assert p.get_parsed_content("evaluator#amp") is False
    p = _parser(["inference.yaml"], amp="true")
    assert p.get_parsed_content("evaluator#amp") is (p.get_parsed_content("device").type == "cuda")


def test_use_reps_and_progress_false_from_the_command_line():
    p = _parser(["train.yaml"], use_reps="false", progress="false")
    assert p.get_parsed_content("registration_stage#reps", lazy=False, instantiate=False) is False
    assert p.get_parsed_content("contrastive#term#registered_weight") == 0.0
    assert p.get_parsed_content("contrastive#term#class_weight") == 1.0
    assert p.get_parsed_content("train#progress#progress") is False


def _boolean_switches() -> set[str]:
    """Every top-level key that some config sets to true / false: a switch a user may flip on the command line."""
    import yaml

    keys = set()
    for path in (ROOT / "configs").rglob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict):
            keys |= {k for k, v in data.items() if isinstance(v, bool)}
    return keys - {"is_main_process"}  # computed from the process rank, never given on the command line


# what may stand before a switch: flag() itself, or a function that reads its argument through flag()
# (model_config.largest_component: tests/test_largest_component.py checks it does; weight_average.teacher_on:
# tests/test_ema_teacher.py)
READERS = ("flag(", "model_config.largest_component(@model_config, ", "weight_average.teacher_on(")


def test_every_boolean_switch_is_read_through_flag():
    """A bare `@switch` would take the command line's 'false' as true: every use must go through flag()."""
    import re

    switches = _boolean_switches()
    assert {"use_reps", "resume", "deformable", "flip_augmentation", "cl_joint_space", "progress"} <= switches
    bare = []
    for path in (ROOT / "configs").rglob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"@(\w+)\b", line):
                if m.group(1) in switches and not line[: m.start()].endswith(READERS):
                    bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bare, "switches read without scripts.config_values.flag:\n" + "\n".join(bare)


def test_inference_flip_tta_from_the_command_line(tmp_path):
    # an empty model folder: the built-in model config, not that of a model the README's first command
    # may have trained in the bundle root (models/model_config.json) before the tests run
    ckpt = str(tmp_path)
    assert _parser(["inference.yaml"], flip_tta="true", ckpt_dir=ckpt).get_parsed_content("inferer").flip_tta is True
    assert _parser(["inference.yaml"], flip_tta="false", ckpt_dir=ckpt).get_parsed_content("inferer").flip_tta is False
    ct_model = _parser(["inference.yaml"], flip_tta="true", ckpt_dir=ckpt)
    ct_model["default_model_config"]["flip_augmentation"] = False  # a model trained without mirror flips
    with pytest.raises(Exception) as info:
        ct_model.get_parsed_content("inferer")
    error = info.value
    while error.__cause__ is not None:  # the config parser wraps it; the bundle's entry shows the innermost
        error = error.__cause__
    assert "without mirror flips" in str(error)


@pytest.mark.parametrize(
    "overlays,expected",
    [
        ([], 1.0),  # the default (0.5.0) trains with the weak-to-strong term
        (["variant_cct_r.yaml"], 0.0),  # the paper's settings
        (["variant_cts.yaml"], 0.0),
        (["variant_cps.yaml"], 0.0),
        (["variant_uamt.yaml"], 0.0),
        (["variant_uamt_rsl.yaml"], 0.0),
        (["variant_mcsc.yaml"], 0.0),
        (["variant_tac.yaml"], 0.0),
        (["variant_ls.yaml"], 0.0),
        (["variant_ls.yaml", "variant_fs.yaml"], 0.0),
        (["variant_cts.yaml", "variant_w2s.yaml"], 1.0),  # w2s.yaml adds it back to a baseline
    ],
)
def test_weak_to_strong_is_on_by_default_and_pinned_off_in_the_paper_settings_and_baselines(overlays, expected):
    parser = _parser(["train.yaml"] + overlays)
    assert float(parser.get_parsed_content("w2s_weight")) == expected
