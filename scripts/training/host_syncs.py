"""Find the operations of a training step that make the host wait for the device.

On a GPU, an operation whose *result size or value* the host needs (``.item()``, ``bool(tensor)``,
``nonzero``, ``unique``, boolean-mask indexing, ``repeat_interleave`` with tensor repeats, a copy
to the CPU) blocks the Python thread until every queued kernel has run, so the host can no longer
run ahead and the device idles between launches. :class:`HostSyncCounter` is a
``TorchDispatchMode`` that records every ATen operation dispatched inside it; run on the CPU it sees
the same operations as on a GPU (the code path is shared), so a test can assert that a steady-state
iteration issues none of the synchronising ones. ``Tensor.tolist()`` and ``.numpy()`` of a device
tensor (which dispatch no operation a CPU run could see) are caught by a function mode entered with
it: on a CUDA run only, like device -> host copies; on a CPU run a tensor's device cannot tell a
device value from host metadata (MONAI's own losses call ``tolist()`` on host-made ``arange``). On a CUDA
device it also catches device -> host copies (``_to_copy`` / ``copy_`` whose result is on the CPU while an input is not).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "HostSyncCounter"]

#: ATen overload packets that need a device value on the host (any arguments).
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t), .tolist()
        "aten::nonzero",
        "aten::nonzero_static_",
        "aten::argwhere",
        "aten::unique",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::masked_select",
        "aten::equal",  # torch.equal returns a Python bool
        "aten::is_nonzero",
        "aten::_assert_async",
    }
)


def _bool_index(args) -> bool:
    """Whether an ``index`` / ``index_put`` call indexes with a boolean mask (its size depends on the data)."""
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
    )


#: Tensor methods that copy a tensor's data to the host without an ATen op a CPU run would see.
HOST_READ_METHODS = ("tolist", "numpy")


class _HostReads(TorchFunctionMode):
    """``Tensor.tolist()`` / ``.numpy()`` (on the CPU they read memory directly, no op is dispatched)."""

    def __init__(self, counter: "HostSyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READ_METHODS and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            self.counter._record(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchDispatchMode):
    """Count dispatched ATen operations, and the synchronising ones by name.

    Attributes after the ``with`` block: ``ops`` (every op packet -> count), ``syncs`` (synchronising
    op -> count) and ``total`` (all ops).
    """

    def __init__(self, where: bool = False) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.where: Counter[str] | None = (
            Counter() if where else None
        )  # the calling line of each sync (with where=True)

    def _record(self, name: str) -> None:
        self.syncs[name] += 1
        if self.where is not None:
            import traceback

            stack = [f for f in traceback.extract_stack()[:-3] if "host_syncs" not in f.filename]
            own = [f for f in stack if "site-packages" not in f.filename]
            line = f"{own[-1].filename.rsplit('/', 2)[-1]}:{own[-1].lineno}" if own else "?"
            if stack and stack[-1] is not (own[-1] if own else None):  # inside a library: name where too
                line += f" via {stack[-1].filename.rsplit('site-packages/', 1)[-1]}:{stack[-1].lineno}"
            self.where[f"{name} @ {line}"] += 1

    def __enter__(self):
        self._reads = _HostReads(self)
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._reads.__exit__(*exc)
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.ops[name] += 1
        if name in SYNC_OPS:
            self._record(name)
        elif name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl") and _bool_index(
            args
        ):
            self._record(f"{name} (boolean mask)")
        elif (
            name == "aten::repeat_interleave"
            and kwargs.get("output_size") is None
            and (len(args) == 1 or (len(args) > 1 and isinstance(args[1], torch.Tensor)))
        ):
            self._record(f"{name} (tensor repeats)")
        out = func(*args, **kwargs)
        if name in ("aten::_to_copy", "aten::copy_") and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            src = args[1] if name == "aten::copy_" and len(args) > 1 else (args[0] if args else None)
            if isinstance(src, torch.Tensor) and src.device.type != "cpu":
                self._record(f"{name} (device -> host)")
        return out
