"""Graph capture of the networks' training passes (``graph_capture``): ``torch.compile``, CUDA graphs on CUDA.

With the training step free of host reads and its shapes static (one batch shape per network and iteration,
:mod:`scripts.data.device_slices`), each trained network's *training* forward (and with it its backward) can be
compiled once and replayed. :class:`GraphCapture` compiles each network with ``torch.compile`` --
``mode="reduce-overhead"`` on CUDA, which records the compiled kernels as CUDA graphs (one launch per graph
instead of one per kernel: what a host-bound step needs), and the default mode elsewhere. The networks
themselves are not replaced: checkpoints, the evaluators, inference and weight averaging use them as they are;
only the trainer's passes go through the compiled callables, which share their parameters.

What the passes carry along stays in the capture: the feature taps (SCL/REPS/TAC) are forward hooks, which the
compiler traces into the graph, and the weak-to-strong feature dropout is one persistent hook set per pass
(:func:`scripts.training.weak_to_strong.feature_dropout`), so a steady-state iteration does not recompile.
Two things of MONAI's networks would split the graph: ``torch.jit.isinstance`` in ``BasicUNet``'s up-sampling
blocks (``UpCat``), and SwinUNETR's NumPy size check (the bundle's ``SwinUNETR2D`` checks in plain Python). A
captured network's ``UpCat`` blocks get :func:`upcat_forward` instead (the same computation; it also pads only
where sizes differ, where ``UpCat`` pads by zero everywhere): with it the U-Net is one graph, and inductor
compiles its backward, which it does not with ``UpCat``'s zero ``replicate`` pads (torch 2.13 on this bundle's
CPU: a stride check fails in ``replication_pad2d_backward``).

Fallback: if compiling or running a captured pass raises (an unsupported operation, a compiler missing on the
machine, a CUDA-graph failure), :meth:`GraphCapture.fall_back` logs the reason once, every network runs eagerly
from then on, and the trainer repeats that iteration eagerly (so a genuine error in the step still surfaces, from
the eager run). ``graph_capture`` is off by default: on by default only once it is measured on a GPU.

``aot_eager`` captures the default step (SCL taps, weak-to-strong, SwinUNETR) and replays it without
recompiling (tests/test_graph_capture.py). The one-network baselines that train with MONAI's
``SupervisedTrainer`` (``ls``, ``fs``) run eagerly whatever ``graph_capture`` says (MONAI's own ``compile``
switch has no fallback).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.basic_unet import UpCat
from torch import nn

__all__ = ["GraphCapture", "capture_mode", "compile_kwargs", "upcat_forward"]

logger = logging.getLogger(__name__)


def capture_mode(device: torch.device | str) -> str:
    """``torch.compile``'s mode for the training device: CUDA graphs (``reduce-overhead``) on CUDA, else default."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def upcat_forward(self: UpCat, x: torch.Tensor, x_e: torch.Tensor | None) -> torch.Tensor:
    """``UpCat.forward`` without ``torch.jit.isinstance`` and with the one-voxel pad only where sizes differ."""
    x_0 = self.upsample(x)
    if x_e is None:
        return self.convs(x_0)
    if self.is_pad:
        dims = x.ndim - 2
        pad = [0] * (2 * dims)
        for i in range(dims):
            pad[2 * i + 1] = int(x_e.shape[-i - 1] != x_0.shape[-i - 1])
        if any(pad):
            x_0 = F.pad(x_0, pad, "replicate")
    return self.convs(torch.cat([x_e, x_0], dim=1))


def _capture_friendly(network: nn.Module) -> None:
    """Give the network's ``UpCat`` blocks :func:`upcat_forward` (one graph, see the module's docstring)."""
    for module in network.modules():
        if isinstance(module, UpCat):
            module.forward = types.MethodType(upcat_forward, module)


def compile_kwargs(device: torch.device | str, backend: str | Callable = "inductor") -> dict:
    """``torch.compile``'s arguments for a training pass on ``device``: static shapes, and the mode where the
    backend takes one (inductor)."""
    kwargs = {"backend": backend, "dynamic": False}
    if backend == "inductor":
        kwargs["mode"] = capture_mode(device)
    return kwargs


class GraphCapture:
    """The compiled training passes of a trainer's networks, with a fallback to eager execution.

    Args:
        networks: the networks whose training passes are captured (``None`` entries are skipped).
        enabled: ``False``: nothing is compiled and :meth:`forward` calls the networks themselves.
        device: the training device (chooses the mode).
        backend: ``torch.compile``'s backend, a name (``inductor``: generated kernels; ``aot_eager``: the same capture
            without generating kernels, e.g. to check that a step captures without a compiler) or a compiler function.
    """

    def __init__(
        self,
        networks: Sequence[nn.Module | None],
        enabled: bool,
        device: torch.device | str = "cpu",
        backend: str | Callable = "inductor",
    ) -> None:
        self.enabled = bool(enabled)
        self.backend = backend
        self.mode = capture_mode(device)
        self.failure: str | None = None
        self._compiled: dict[int, nn.Module] = {}
        if self.enabled:
            for net in networks:
                if net is not None:
                    _capture_friendly(net)
                    self._compiled[id(net)] = torch.compile(net, **compile_kwargs(device, backend))

    @property
    def active(self) -> bool:
        """Whether passes currently go through the compiled networks."""
        return bool(self._compiled)

    def forward(self, network: nn.Module) -> nn.Module:
        """The callable for a training pass of ``network``: its compiled version while capture is active."""
        return self._compiled.get(id(network), network)

    def fall_back(self, error: BaseException) -> None:
        """Stop capturing (every network runs eagerly from now on) and log why, once; ``error`` itself is raised
        again when the passes were not captured (then it is an error of the step, not of the capture)."""
        if not self.active:
            raise error
        text = " ".join(str(error).split())  # the compiler's message spans lines (the cause after "raised:")
        self.failure = f"{type(error).__name__}: {text[:300]}"
        self._compiled.clear()
        logger.warning(
            "graph_capture: capturing the training passes failed (%s); the networks run eagerly from now on and this "
            "iteration is repeated eagerly (set graph_capture false to skip the attempt)",
            self.failure,
        )

    def describe(self) -> str:
        """One line for the log: what runs the training passes."""
        if not self.enabled:
            return "off (eager)"
        if self.failure is not None:
            return f"off after a failure ({self.failure})"
        name = self.backend if isinstance(self.backend, str) else getattr(self.backend, "__name__", repr(self.backend))
        return f"torch.compile backend {name}, mode {self.mode}"
