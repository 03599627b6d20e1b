"""benchmarks/cpu_step_profile.py sorts the profiled operators into dense kernels and the rest (the
Amdahl bound of issue 13's float32 target rests on that split)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_step_profile import is_dense, profile_step  # noqa: E402


def test_convolutions_and_matrix_products_are_dense_and_nothing_else():
    for name in (
        "aten::convolution_backward",
        "aten::mkldnn_convolution",
        "aten::_slow_conv2d_forward",
        "aten::mm",
        "aten::bmm",
        "aten::addmm",
    ):
        assert is_dense(name), name
    for name in (
        "aten::copy_",
        "aten::native_batch_norm",
        "aten::_softmax",
        "aten::add",
        "aten::cat",
        "aten::roll",
        "aten::gelu_backward",
    ):
        assert not is_dense(name), name


def test_a_profiled_swin_step_has_both_kinds_of_work():
    r = profile_step("swin", 32, 2)
    assert r["total"] > 0 and 0 < r["dense"] < r["total"]
    assert r["forward_gflop"] > 0
    assert any("conv" in k for k, _ in r["top"])
