"""What every registration engine takes and returns, and how an engine is chosen by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .transform import PairTransform


@dataclass(frozen=True)
class PairSpec:
    """One registration to compute: ``T_ij`` with fixed = i, moving = j (image paths)."""

    fixed_id: str
    fixed_path: str
    moving_id: str
    moving_path: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.fixed_id, self.moving_id)


#: status of a pair whose volume could not be read: not a registration failure, retried on the next run
INPUT_ERROR = "input_error"


@dataclass
class PairResult:
    """Outcome of one pair: a transform, or ``status == "failed"`` (the registration diverged, too little
    overlap, ...) or ``status == INPUT_ERROR`` (a volume could not be read) with the ``reason``."""

    fixed_id: str
    moving_id: str
    transform: PairTransform | None
    status: str = "ok"
    reason: str = ""
    metric: float = float("nan")
    seconds: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.transform is not None


class RegistrationEngine(Protocol):
    """Computes a batch of pairwise transforms; never raises for a single bad pair."""

    name: str

    def settings(self) -> dict:
        """The settings that determine the result (used to key the output folder)."""

    def register_batch(self, pairs: list[PairSpec]) -> list[PairResult]:
        """One :class:`PairResult` per input pair, in order."""


def make_engine(name: str, **settings) -> RegistrationEngine:
    """``"torch"`` (batched PyTorch, the default) or ``"sitk"`` (SimpleITK reference)."""
    if name == "torch":
        from .torch_engine import TorchRegistrationEngine

        return TorchRegistrationEngine(**settings)
    if name == "sitk":
        from .sitk_engine import SitkRegistrationEngine

        return SitkRegistrationEngine(**settings)
    raise ValueError(f"unknown registration engine {name!r}; expected 'torch' or 'sitk'")
