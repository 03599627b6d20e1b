"""The one reader of the training losses: device-side sums, one host copy every ``log_every`` iterations.

Reading a loss on the host (``float(loss)``, ``loss.item()``) makes the host wait for the device to
finish the iteration; done by every handler at every iteration (progress bar, TensorBoard, MLflow,
curves, the non-finite check) it keeps a GPU idle between iterations. :class:`LossLog` is the only
handler that reads them:

* at every iteration it adds the loss and every loss term of ``engine.state.output`` to sums that
  stay on the device (non-finite values are counted, not summed), and appends the batch's volume ids
  to a short host-side list (they come from the loader, not from the device);
* every ``log_every`` iterations and at the last iteration of each epoch it copies all sums to the host in one
  stacked copy and publishes host floats: :attr:`loss` and :attr:`terms` (means over the iterations
  since the last copy), :meth:`epoch_means` (for the curves); the progress bar, the stats and
  TensorBoard handlers and MLflow read those (``configs/train.yaml``), never the device.

**Non-finite losses** (``scripts.training.nonfinite_guard``): at ``LOSS_COMPLETED`` (before backward)
the loss's finiteness is computed on the device and handed to each fused optimizer as its
``found_inf``, so a NaN/inf iteration's update is skipped *on the device* (as a gradient scaler
does: the parameters and the optimizer state stay as they were). The next host copy reports it:
:class:`scripts.training.nonfinite_guard.NonFiniteLossError`, naming the first such iteration and
its batch's volumes, before any validation or checkpoint of that epoch. An optimizer that cannot
skip on the device (not ``fused``) gets the old behaviour: the loss is read at once and the run
stops before the update.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from scripts.training.nonfinite_guard import NonFiniteLossError, batch_volume_ids, nonfinite_message

__all__ = ["LossLog"]


def _optimizers(engine: Engine) -> list:
    opts = getattr(engine, "_optimizers", None)
    if callable(opts):
        return [o for o in opts() if o is not None]
    opt = getattr(engine, "optimizer", None)
    return [opt] if opt is not None else []


def _fused(optimizer) -> bool:
    return all(bool(g.get("fused")) for g in getattr(optimizer, "param_groups", [{}]))


def _scaler_active(engine: Engine) -> bool:
    scaler = getattr(engine, "scaler", None)
    return bool(getattr(engine, "amp", False) and scaler is not None and scaler.is_enabled())


class LossLog:
    """Sum the losses on the device; copy them to the host every ``log_every`` iterations (module docstring).

    Args:
        log_every: iterations between host copies (and log lines).
        state_path: the training-state checkpoint named in a non-finite message (where to resume from).
        loss_key: the loss in ``engine.state.output``.
    """

    def __init__(self, log_every: int = 50, state_path: str | None = None, loss_key: str = "loss") -> None:
        self.log_every = max(1, int(log_every))
        self.state_path = state_path
        self.loss_key = loss_key
        self.loss: float | None = None  # mean loss since the previous copy (host)
        self.terms: dict[str, float] = {}  # mean of each term since the previous copy (host)
        self.iteration = 0  # the iteration of the last copy
        self._names: list[str] = []
        self._sum: torch.Tensor | None = None  # device: (T,) sums of the finite values
        self._count: torch.Tensor | None = None  # device: (T,) how many were finite
        self._bad: torch.Tensor | None = None  # device: [non-finite losses, first such iteration (or -1)]
        self._ids: deque[tuple[int, list[str]]] = deque(maxlen=self.log_every)
        self._epoch: dict[str, list[float]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.loss_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.flush)

    # ------------------------------------------------------------------ non-finite losses
    def _loss(self, engine: Engine) -> torch.Tensor | None:
        out = engine.state.output
        if isinstance(out, Mapping) and self.loss_key in out:
            return torch.as_tensor(out[self.loss_key]).detach()
        if isinstance(out, (list, tuple)) and out and isinstance(out[0], Mapping) and self.loss_key in out[0]:
            return torch.as_tensor(out[0][self.loss_key]).detach()
        return None

    def loss_completed(self, engine: Engine) -> None:
        loss = self._loss(engine)
        if loss is None:
            return
        opts = _optimizers(engine)
        if not opts or not all(
            _fused(o) for o in opts
        ):  # cannot skip on the device: read it now, stop before the update
            if not bool(torch.isfinite(loss).all()):
                raise NonFiniteLossError(
                    nonfinite_message(
                        engine.state.iteration,
                        float(loss.float().mean()),
                        batch_volume_ids(engine.state.batch),
                        self.state_path,
                    )
                )
            return
        bad = (~torch.isfinite(loss.float())).any()
        if self._bad is None:
            self._bad = torch.tensor([0, -1], dtype=torch.long, device=loss.device)
        first = torch.where((self._bad[1] < 0) & bad, engine.state.iteration, self._bad[1])
        self._bad = torch.stack([self._bad[0] + bad.long(), first])
        if not _scaler_active(engine):  # a gradient scaler hands its own found_inf to the optimizers
            flag = bad.float()
            for opt in opts:
                opt.found_inf = flag  # the fused step skips the update where it is 1
                opt.grad_scale = None

    # ------------------------------------------------------------------ sums and copies
    def iteration_completed(self, engine: Engine) -> None:
        for opt in _optimizers(engine):  # the flag applies to this iteration's step only
            for attr in ("found_inf", "grad_scale"):
                if attr in opt.__dict__:
                    delattr(opt, attr)
        out = engine.state.output
        values: dict[str, torch.Tensor] = {}
        loss = self._loss(engine)
        if loss is not None:
            values["loss"] = loss.float().reshape(-1).mean()
        if isinstance(out, Mapping):
            for k, v in (out.get("terms") or {}).items():
                values[k] = torch.as_tensor(v).detach().float().reshape(-1).mean()
        if values:
            if list(values) != self._names:
                self._merge_names(list(values), next(iter(values.values())).device)
            stacked = torch.stack(
                [values[k].to(self._sum.device) if k in values else self._sum.new_zeros(()) for k in self._names]
            )
            finite = torch.isfinite(stacked)
            self._sum += torch.where(finite, stacked, 0.0)
            self._count += finite.long()
        self._ids.append((engine.state.iteration, batch_volume_ids(engine.state.batch)))
        if self.log_now(engine):
            self.flush(engine)

    def log_now(self, engine: Engine, _event=None) -> bool:
        """Whether this iteration gets the host copy: every ``log_every`` iterations and each epoch's last one
        (so a short run logs too); the other handlers' ``iteration_log`` filter."""
        it, length = engine.state.iteration, engine.state.epoch_length or 0
        return it % self.log_every == 0 or (length > 0 and it % length == 0)

    def _merge_names(self, names: list[str], device) -> None:
        """A term seen for the first time (rare: the first iteration, or a term that starts later)."""
        old = dict(zip(self._names, range(len(self._names))))
        new = self._names + [n for n in names if n not in old]
        s = torch.zeros(len(new), device=device)
        c = torch.zeros(len(new), dtype=torch.long, device=device)
        if self._sum is not None and old:
            s[: len(self._names)] = self._sum.to(device)
            c[: len(self._names)] = self._count.to(device)
        self._names, self._sum, self._count = new, s, c

    def flush(self, engine: Engine) -> None:
        """The one host copy: publish the means since the last copy; raise on a non-finite loss."""
        if self._sum is None and self._bad is None:
            return
        parts = [] if self._sum is None else [self._sum.double(), self._count.double()]
        if self._bad is not None:
            parts.append(self._bad.double())
        host = torch.cat(parts).tolist()  # one stacked copy (the only device read of the training loop)
        n = len(self._names)
        if self._bad is not None and host[2 * n] > 0:
            self._raise(engine, int(host[2 * n]), int(host[2 * n + 1]))
        means = {}
        for i, k in enumerate(self._names):
            total, count = host[i], host[n + i]
            means[k] = total / count if count else math.nan
            epoch = self._epoch.setdefault(k, [0.0, 0.0])
            epoch[0] += total
            epoch[1] += count
        self.loss = means.pop("loss", None)
        self.terms = means
        self.iteration = engine.state.iteration
        if self._sum is not None:
            self._sum.zero_()
            self._count.zero_()

    def _raise(self, engine: Engine, count: int, iteration: int) -> None:
        ids = next((i for it, i in self._ids if it == iteration), None)
        raise NonFiniteLossError(
            nonfinite_message(iteration, math.nan, ids, self.state_path, skipped=True, count=count)
        )

    def epoch_started(self, engine: Engine) -> None:
        self._epoch = {}

    def epoch_means(self) -> dict[str, float]:
        """Mean of the loss and of each term over the current epoch's iterations (host floats)."""
        return {k: s / c for k, (s, c) in self._epoch.items() if c}  # sums of finite values over their counts

    # ------------------------------------------------------------------ what the other handlers read
    def scalars(self, _output=None) -> dict[str, float]:
        """``{"train_loss": ..., term: ...}`` of the last copy (for MLflow / TensorBoard ``output_transform``)."""
        out = {} if self.loss is None else {"train_loss": self.loss}
        out.update(self.term_values())
        return out

    def train_loss(self, _output=None) -> float:
        """The mean loss of the last copy (for the stats handlers' ``output_transform``)."""
        return math.nan if self.loss is None else float(self.loss)

    def term_values(self, _output=None) -> dict[str, float]:
        """The terms of the last copy (for TensorBoard)."""
        return {k: v for k, v in self.terms.items() if math.isfinite(v)}
