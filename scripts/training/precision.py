"""The training precision each device gets by default (``amp: auto`` in ``configs/train.yaml``).

* CUDA: float16 autocast with a gradient scaler (MONAI's trainers, ``amp: true``);
* a CPU with bfloat16 units (AMX or AVX512-BF16, read from the CPU's flags): bfloat16 autocast, about
  1.5-2x faster per iteration than float32 on this project's machines, with the same Dice at the
  ACDC screens (``benchmarks/results/cpu_amp_speed.md``; every full-budget number of
  ``docs/results.md`` since 0.4.x was measured with it);
* any other CPU: float32 (emulated bfloat16 is slower than float32 there).

``--amp false`` keeps float32 everywhere, ``--amp true`` forces autocast. Validation and inference
run float32 on a CPU whatever the setting (the configs turn their autocast on for CUDA only).

MONAI's ``SupervisedTrainer`` (``ls``, ``fs``) autocasts on CUDA only; :class:`CpuAutocastInferer` gives its
training forward the bfloat16 autocast on a CPU (since 0.9.0; before, ``ls`` trained float32 on a CPU while
every other variant trained bfloat16).
"""

from __future__ import annotations

import functools
import os

import torch
from monai.inferers import SimpleInferer

__all__ = ["cpu_has_bf16", "default_amp", "CpuAutocastInferer"]

#: CPU flags (Linux ``/proc/cpuinfo``) of native bfloat16 matrix units.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16); False where it cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in BF16_FLAGS)
    except OSError:
        return False
    return False


def default_amp(device, setting="auto") -> bool:
    """``amp`` for ``device``: the setting when it is a boolean (or ``"true"`` / ``"false"``), else by the device."""
    if isinstance(setting, bool):
        return setting
    text = str(setting).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", "null"):
        return False
    if text != "auto":
        raise ValueError(f"amp must be true, false or auto, got {setting!r}")
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    if kind == "cpu":
        return os.environ.get("CCT_R_CPU_BF16", "") != "0" and cpu_has_bf16()
    return False


class CpuAutocastInferer(SimpleInferer):
    """MONAI's ``SimpleInferer`` whose forward runs under bfloat16 autocast when ``enabled`` and the input is on
    a CPU; the logits come back float32, so the loss is computed in float32 (as autocast does for losses). On
    CUDA it is ``SimpleInferer`` itself (MONAI's trainer autocasts there)."""

    def __init__(self, enabled: bool = False) -> None:
        super().__init__()
        self.enabled = bool(enabled)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if not (self.enabled and inputs.device.type == "cpu"):
            return super().__call__(inputs, network, *args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = super().__call__(inputs, network, *args, **kwargs)
        return out.float()
