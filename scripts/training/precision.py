"""The training precision each device gets by default (``amp: auto`` in ``configs/train.yaml``).

* CUDA: float16 autocast with a gradient scaler (MONAI's trainers, ``amp: true``);
* a CPU with bfloat16 units (AMX or AVX512-BF16, read from the CPU's flags): bfloat16 autocast, about
  1.5-2x faster per iteration than float32 on this project's machines, with the same Dice at the
  ACDC screens (``benchmarks/results/cpu_amp_speed.md``; every full-budget number of
  ``docs/results.md`` since 0.4.x was measured with it);
* any other CPU: float32 (emulated bfloat16 is slower than float32 there).

``--amp false`` keeps float32 everywhere, ``--amp true`` forces autocast. Validation and inference
run float32 on a CPU whatever the setting (the configs turn their autocast on for CUDA only).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["cpu_has_bf16", "default_amp"]

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
