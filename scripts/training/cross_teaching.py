"""The two-network semi-supervised trainer: CCT-R, CTS, CPS and UA-MT on one ignite engine.

:class:`CrossTeachingTrainer` is MONAI's ``SupervisedTrainer`` with its own iteration step. Every
batch holds labeled slices ``x_l, y`` and unlabeled slices ``x_u`` (+ registered labels ``r``),
see :mod:`scripts.data.semi_supervised_data`. Each network runs *once* on ``[x_l; x_u]``; then

* ``cross_teaching`` (CTS; CCT-R when ``rsl_weight > 0``), networks A (a CNN) and B (a Transformer),
  each with its optimizer::

      L_A = L_sup(A(x_l), y) + w_cps(i) * Dice(A(x_u), argmax B(x_u)) + w_rsl * L_sup(A(x_u), r)
      L_B = L_sup(B(x_l), y) + w_cps(i) * Dice(B(x_u), argmax A(x_u)) + w_rsl * L_sup(B(x_u), r)

* ``cps``: the same with ``CE(A(x_u), argmax B(x_u))`` as the cross term (two U-Nets in the paper);
  with a ``pseudo_label_teacher`` (two students), ``argmax B'(x_u)`` and ``argmax A'(x_u)`` instead, ``A'`` / ``B'``
  the EMA copies of the students (and so for every other pseudo-label below);
* ``mean_teacher`` (UA-MT): A is the student, B its EMA teacher (no optimizer)::

      L_A = L_sup(A(x_l), y) + w_cps(i) * MSE_mask(A(x_u), teacher) + w_rsl * L_sup(A(x_u), r)

  with the uncertainty threshold rising from 0.75 to 1.0 of ``uncertainty_max`` over training;
* ``none``: one network A (no B, no peer), trained by the supervised loss on ``x_l`` plus the
  optional terms below on ``x_u`` (TAC: ``configs/variant_tac.yaml``)::

      L_A = L_sup(A(x_l), y) + w_tac * R_A + w_rsl * L_sup(A(x_u), r)

The pseudo-label targets carry no gradient, so ``L_A`` only reaches A's weights and ``L_B`` only
B's: one backward pass of ``L_A + L_B`` gives each network its own gradient, and each optimizer
steps its own network. The poly LR schedules are ``LrScheduleHandler`` s attached in the config,
one per optimizer. ``w_cps(i)`` is :class:`scripts.training.consistency_weight.RampUpWeight` (or any
``iteration -> weight`` callable) at the 0-based iteration ``i``. ``L_sup`` is the supervised loss
of ``train.yaml`` (Dice + CE). With ``amp``, forward and losses run under autocast (CUDA: float16,
and one ``GradScaler`` scales the summed loss and steps both optimizers; CPU: bfloat16, no scaler).

With a ``contrastive`` term (:class:`scripts.contrastive.contrastive_term.ContrastiveTerm`: SCL, SCL + REPS or
MCSC on decoder features) and ``contrastive_weight`` ``w_cl > 0``, each trained network's loss gains
``w_cl * L_cl``, computed from the same forward pass (labels: ground truth on the labeled half, the
peer's argmax on the unlabeled half; the UA-MT teacher's for the student). With two students the
term's ``pair`` gives both losses at once (CCT-R's joint space: one loss over both networks' pixels).

With weak-to-strong consistency (``w2s_weight`` ``w_ws > 0``; two-student methods), each network's
loss also gains ``w_ws * (CE_conf(net(strong x_u), peer's weak argmax) + CE_conf(net_fp(x_u), peer's
weak argmax)) / 2`` (:mod:`scripts.training.weak_to_strong`: the strong view is intensity jitter, blur
and CutMix of the unlabeled slices; ``net_fp`` drops channels of the bottleneck; CE only where the
peer's top-1 probability reaches ``w2s_threshold``); RSL then uses the strong view, its registered
labels CutMixed alike.

With an ``affinity`` term (:class:`scripts.contrastive.task_affinity.TaskAffinityConsistency`, TAC's
unpaired consistency ``R`` on network A's enhanced skip features) and ``affinity_weight`` ``w_tac > 0``,
A's loss gains ``w_tac * R_A`` (any method; B, a Transformer, has no enhancement layers).

The engine output (``engine.state.output``) is ``{"loss": L_A + L_B, "terms": {name: value}}``
with every loss term, ``w_cps`` and (UA-MT) the fraction of certain pixels, all detached.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from monai.inferers import SimpleInferer
from torch import nn
from torch.optim import Optimizer

from scripts.data.semi_supervised_data import SemiSupervisedBatch, SemiSupervisedPrepareBatch
from scripts.training.consistency_weight import RampUpWeight, sigmoid_ramp_up
from scripts.training.graph_capture import GraphCapture
from scripts.training.mean_teacher import ema_update, noisy_teacher_predictions, unwrap
from scripts.training.semi_supervised_losses import (
    PseudoLabelCELoss,
    PseudoLabelDiceLoss,
    SelectedSamplesLoss,
    UncertaintyMaskedMSE,
    label_agreement,
)
from scripts.training.weak_to_strong import (
    StrongPerturbation,
    confident_cross_entropy,
    feature_dropout,
    has_batch_statistics,
)

__all__ = ["CONSISTENCY_METHODS", "CrossTeachingTrainer"]

#: The unsupervised terms the trainer implements.
CONSISTENCY_METHODS = ("cross_teaching", "cps", "mean_teacher", "none")
#: The methods that train two peers (the others: a student and its teacher, or one network).
TWO_STUDENTS = ("cross_teaching", "cps")


def _weight_at(weight, iteration: int) -> float:
    """A loss weight at the 0-based ``iteration``: a schedule ``w(i)`` (e.g. ``RampUpWeight``) or a constant."""
    return float(weight(iteration) if callable(weight) else weight)


def _check_term(name: str, term, weight: float, kind: str) -> None:
    """``<name>_weight`` must be >= 0, and > 0 needs a term."""
    if float(weight) < 0:
        raise ValueError(f"{name}_weight must be >= 0, got {weight!r}")
    if float(weight) > 0 and term is None:
        raise ValueError(f"{name}_weight > 0 needs a{'n' if name[0] in 'aeiou' else ''} {name} term ({kind})")


class CrossTeachingTrainer(SupervisedTrainer):
    """Train two networks (or a student and its mean teacher) on half-labeled, half-unlabeled batches.

    Args:
        device: the training device.
        max_epochs: ignite epochs (one epoch = one validation interval).
        train_data_loader: a :class:`scripts.data.semi_supervised_data.SemiSupervisedLoader`.
        net_a: network A (the CNN; the UA-MT student).
        optimizer_a: A's optimizer.
        net_b: network B (the Transformer in CTS/CCT-R, a second U-Net in CPS, the EMA teacher in UA-MT);
            ``None`` for ``none`` (one network).
        optimizer_b: B's optimizer; must be ``None`` for ``mean_teacher`` (the teacher is not trained) and ``none``.
        supervised_loss: ``L_sup(logits, label)`` (Dice + CE); also the registration-supervision loss.
        consistency: ``"cross_teaching"``, ``"cps"``, ``"mean_teacher"`` or ``"none"`` (one network).
        consistency_weight: ``w_cps``: a callable of the 0-based iteration, or a constant.
        rsl_weight: ``w_rsl``; 0 switches registration supervision off (the batches' registered
            labels, if any, are then ignored). Positive needs registered labels in every batch.
        epoch_length: iterations per epoch (default: ``len(train_data_loader)``).
        prepare_batch: turns a loader batch into a :class:`SemiSupervisedBatch` (default:
            :class:`scripts.data.semi_supervised_data.SemiSupervisedPrepareBatch`).
        train_handlers: ignite / MONAI handlers, as for ``SupervisedTrainer``.
        amp: mixed precision (autocast on the training device: float16 + gradient scaling on CUDA, bfloat16 on CPU).
        ema_decay: UA-MT teacher EMA decay.
        uncertainty_passes, noise_std, noise_clip: UA-MT teacher noise passes.
        uncertainty_max: UA-MT threshold scale; the threshold is ``(0.75 + 0.25 ramp(i)) * uncertainty_max``
            (``ln 2`` in the reference implementation).
        num_iterations: the ramp length of the UA-MT threshold; defaults to ``consistency_weight.total``.
        contrastive: the contrastive term (``None``: off); its projector parameters must be in the optimizers.
        contrastive_weight: ``w_cl``; 0 switches the contrastive term off.
        affinity: TAC's consistency term on network A (``None``: off).
        affinity_weight: ``w_tac``, a number or a schedule ``w(i)`` of the 0-based iteration (e.g.
            :class:`scripts.training.consistency_weight.RampUpWeight`); 0 (or ``max_weight`` 0) switches it off.
        rsl_schedule: ``"constant"`` (``w_rsl`` throughout) or ``"fade"``: ``w_rsl * (1 - ramp(i))`` with
            the cross-teaching ramp ``exp(-5 (1 - i / N)^2)``: registered labels lead early and hand over
            to the peers' pseudo-labels as the cross-teaching weight rises (``N``: ``num_iterations``).
        rsl_quality: ``"rank"`` (each registered label weighs its BRS-rank weight, from the registration datalist) or
            ``"agreement"`` (two students): that weight times ``(1 - ramp(i)) + ramp(i) * q``, where ``q`` is the
            slice's agreement (mean foreground Dice) between its registered label and the students' consensus (the
            argmax of their mean probabilities on the weak view) and ``ramp`` is cross teaching's: registered labels
            count fully at the start and, as the students take over, only as far as the students agree with them.
        w2s_weight: ``w_ws``, weak-to-strong consistency (two students); 0 switches it off.
        w2s_threshold: the peer's top-1 probability a pseudo-label pixel needs.
        w2s_dropout: channel dropout of the feature-perturbed pass.
        strong_perturbation: the strong view (default :class:`scripts.training.weak_to_strong.StrongPerturbation`).
        unlabeled_scale: every term beyond the supervised one (cross teaching, RSL, contrastive, weak-to-strong, TAC) is
            multiplied by this factor (1: as the terms' own weights say).
        unlabeled_warmup: iterations at the start in which that factor is 0 (the supervised loss alone).
        pseudo_label_teacher: two students only: a module with ``net_a`` / ``net_b`` (the EMA copy of both students,
            ``weight_average.average`` with ``ema_teacher: true``, :func:`scripts.training.weight_average.teacher_on`)
            whose logits on the unlabeled slices replace the peers' own as the source of every pseudo-label (cross
            teaching's argmax, the weak-to-strong targets, the contrastive labels, RSL's agreement): A learns from B's
            average and B from A's. ``None``: the peers.
        w2s_batched: run each network once per iteration on ``[x_l; x_u; strong view; x_u]`` (the feature dropout on
            the last quarter only) instead of three passes; the same mathematics for networks whose normalisation is
            per sample (instance / layer norm: the bundle's U-Net and SwinUNETR). A network with BatchNorm keeps the
            separate passes, whatever this says, so that its batch statistics stay those of each view alone.
        graph_capture: compile the trained networks' training passes (:mod:`scripts.training.graph_capture`:
            ``torch.compile``, CUDA graphs on CUDA), falling back to eager passes if capture fails.
        capture_backend: ``torch.compile``'s backend for ``graph_capture`` (``inductor``; ``aot_eager`` captures
            without generating kernels).
        inferer: how a network is applied to a batch of slices (default ``SimpleInferer``: the whole patch at once).
        non_blocking, amp_kwargs, optim_set_to_none: as for ``SupervisedTrainer``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        net_a: nn.Module,
        optimizer_a: Optimizer,
        net_b: nn.Module | None,
        supervised_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        consistency: str = "cross_teaching",
        optimizer_b: Optimizer | None = None,
        consistency_weight: Callable[[int], float] | float = 0.1,
        rsl_weight: float = 0.0,
        epoch_length: int | None = None,
        prepare_batch: Callable | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        ema_decay: float = 0.99,
        uncertainty_passes: int = 8,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        uncertainty_max: float = math.log(2.0),
        num_iterations: int | None = None,
        contrastive: Callable | None = None,
        contrastive_weight: float = 0.0,
        affinity: Callable | None = None,
        affinity_weight: float | Callable[[int], float] = 0.0,
        rsl_schedule: str = "constant",
        rsl_quality: str = "rank",
        w2s_weight: float = 0.0,
        w2s_threshold: float = 0.95,
        w2s_dropout: float = 0.5,
        strong_perturbation: Callable | None = None,
        w2s_batched: bool = True,
        unlabeled_scale: float = 1.0,
        unlabeled_warmup: int = 0,
        pseudo_label_teacher: nn.Module | None = None,
        graph_capture: bool = False,
        capture_backend: str = "inductor",
        inferer: Callable | None = None,
        non_blocking: bool = False,
        amp_kwargs: dict | None = None,
        optim_set_to_none: bool = False,
    ) -> None:
        if consistency not in CONSISTENCY_METHODS:
            raise ValueError(f"consistency must be one of {CONSISTENCY_METHODS}, got {consistency!r}")
        if consistency == "mean_teacher" and optimizer_b is not None:
            raise ValueError(
                "mean_teacher: net_b is the EMA teacher of net_a and must have no optimizer (optimizer_b=None)"
            )
        if consistency == "none" and (net_b is not None or optimizer_b is not None):
            raise ValueError("none: one network is trained; net_b and optimizer_b must be None")
        if consistency not in ("mean_teacher", "none") and (net_b is None or optimizer_b is None):
            raise ValueError(f"{consistency}: both networks are trained; net_b and optimizer_b are required")
        if float(rsl_weight) < 0:
            raise ValueError(f"rsl_weight must be >= 0, got {rsl_weight!r}")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=net_a,
            optimizer=optimizer_a,
            loss_function=supervised_loss,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=SemiSupervisedPrepareBatch() if prepare_batch is None else prepare_batch,
            inferer=SimpleInferer() if inferer is None else inferer,
            train_handlers=train_handlers,
            amp=False,  # set below: MONAI builds a deprecated CUDA-only GradScaler that warns on a CPU
            decollate=False,  # the output is a dict of scalars; nothing to decollate
            amp_kwargs=amp_kwargs,
            optim_set_to_none=optim_set_to_none,
        )
        self.amp = bool(amp)
        self.scaler = self._new_scaler()
        self.net_b = net_b
        self.optimizer_b = optimizer_b
        self.consistency = consistency
        self.consistency_weight = consistency_weight
        self.rsl_weight = float(rsl_weight)
        self.rsl_loss = SelectedSamplesLoss(supervised_loss)
        cross = {"cross_teaching": PseudoLabelDiceLoss, "cps": PseudoLabelCELoss, "mean_teacher": UncertaintyMaskedMSE}
        self.cross_loss: nn.Module | None = cross[consistency]() if consistency in cross else None
        self.ema_decay = float(ema_decay)
        self.uncertainty_passes = int(uncertainty_passes)
        self.noise_std, self.noise_clip = float(noise_std), float(noise_clip)
        self.uncertainty_max = float(uncertainty_max)
        if num_iterations is None:
            num_iterations = consistency_weight.total if isinstance(consistency_weight, RampUpWeight) else None
        if consistency == "mean_teacher":
            if num_iterations is None:
                raise ValueError("mean_teacher: num_iterations is needed for the uncertainty threshold ramp")
            for p in unwrap(net_b).parameters():
                p.requires_grad_(False)
        self.num_iterations = num_iterations
        if rsl_schedule not in ("constant", "fade"):
            raise ValueError(f"rsl_schedule must be 'constant' or 'fade', got {rsl_schedule!r}")
        if rsl_schedule == "fade" and num_iterations is None:
            raise ValueError("rsl_schedule 'fade' needs num_iterations (or a RampUpWeight consistency_weight)")
        self.rsl_schedule = rsl_schedule
        if rsl_quality not in ("rank", "agreement"):
            raise ValueError(f"rsl_quality must be 'rank' or 'agreement', got {rsl_quality!r}")
        if rsl_quality == "agreement" and consistency not in TWO_STUDENTS:
            raise ValueError(f"rsl_quality 'agreement' needs two students (cross_teaching or cps), not {consistency!r}")
        if rsl_quality == "agreement" and num_iterations is None:
            raise ValueError("rsl_quality 'agreement' needs num_iterations (or a RampUpWeight consistency_weight)")
        self.rsl_quality = rsl_quality
        self._ramp_now = 0.0
        self._w_rsl_now = self.rsl_weight
        _check_term(
            "contrastive", contrastive, contrastive_weight, "scripts.contrastive.contrastive_term.ContrastiveTerm"
        )
        self.contrastive = contrastive
        self.contrastive_weight = float(contrastive_weight)
        self.contrastive_on = contrastive is not None and self.contrastive_weight > 0
        if self.contrastive_on and consistency == "none":
            raise ValueError("none: the contrastive terms need a peer's labels on the unlabeled half; use cl_weight 0")
        # w_tac: a number, or a schedule of the iteration (RampUpWeight: its max_weight decides whether it is on)
        peak = getattr(affinity_weight, "max_weight", 1.0) if callable(affinity_weight) else affinity_weight
        _check_term("affinity", affinity, peak, "scripts.contrastive.task_affinity.TaskAffinityConsistency")
        self.affinity = affinity
        self.affinity_weight = affinity_weight if callable(affinity_weight) else float(affinity_weight)
        self.affinity_on = affinity is not None and float(peak) > 0
        self._w_tac_now = 0.0
        if float(w2s_weight) < 0:
            raise ValueError(f"w2s_weight must be >= 0, got {w2s_weight!r}")
        if float(w2s_weight) > 0 and consistency not in TWO_STUDENTS:
            raise ValueError(
                f"weak-to-strong consistency needs two students (cross_teaching or cps), not {consistency!r}"
            )
        self.w2s_weight, self.w2s_threshold, self.w2s_dropout = (
            float(w2s_weight),
            float(w2s_threshold),
            float(w2s_dropout),
        )
        self.strong_perturbation = StrongPerturbation() if strong_perturbation is None else strong_perturbation
        if float(unlabeled_scale) < 0 or int(unlabeled_warmup) < 0:
            raise ValueError(
                f"unlabeled_scale and unlabeled_warmup must be >= 0, got {unlabeled_scale!r}, {unlabeled_warmup!r}"
            )
        self.unlabeled_scale, self.unlabeled_warmup = float(unlabeled_scale), int(unlabeled_warmup)
        self._unl_now = self.unlabeled_scale
        if pseudo_label_teacher is not None and consistency not in TWO_STUDENTS:
            raise ValueError(f"pseudo_label_teacher needs two students (cross_teaching or cps), not {consistency!r}")
        self.pseudo_label_teacher = pseudo_label_teacher
        nets = [net for net in (net_a, net_b) if net is not None]
        self.w2s_one_pass = bool(w2s_batched) and not any(has_batch_statistics(net) for net in nets)
        # the networks whose training passes run here (the UA-MT teacher's noisy passes stay eager)
        trained = [net_a] + ([net_b] if consistency != "mean_teacher" else [])
        self.capture = GraphCapture(trained, graph_capture, device, capture_backend)
        self._projectors_broadcast = False  # DDP: rank 0's projector heads sent to all at the first iteration

    def _new_scaler(self):
        """float16 on CUDA needs loss scaling; bfloat16 (the CPU's autocast type) does not. (MONAI's ``Trainer``
        builds the deprecated ``torch.cuda.amp.GradScaler`` whenever ``amp`` is on, which warns twice on a CPU.)"""
        return torch.amp.GradScaler("cuda") if self.amp and torch.device(self.state.device).type == "cuda" else None

    def run(self) -> None:  # type: ignore[override]
        """Train (a fresh gradient scaler per run, as MONAI's ``Trainer.run``, but only where one is needed)."""
        self.scaler = self._new_scaler()
        if self.capture.enabled:
            logging.getLogger(__name__).info("training passes: %s", self.capture.describe())
        Workflow.run(self)

    # ------------------------------------------------------------------ loss terms
    def w_rsl(self, iteration: int) -> float:
        """The RSL weight at the 0-based ``iteration``."""
        if self.rsl_schedule == "fade":
            return self.rsl_weight * (1.0 - sigmoid_ramp_up(iteration, self.num_iterations))
        return self.rsl_weight

    def w_tac(self, iteration: int) -> float:
        """TAC's weight at the 0-based ``iteration`` (a constant, or the ``affinity_weight`` schedule)."""
        return _weight_at(self.affinity_weight, iteration)

    def unlabeled_factor(self, iteration: int) -> float:
        """The factor of every unsupervised term at the 0-based ``iteration`` (0 during the warm-up)."""
        return 0.0 if iteration < self.unlabeled_warmup else self.unlabeled_scale

    def _with_factor(self, loss: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
        """``L_sup + f * (L - L_sup)``: the unsupervised part of ``loss`` scaled (unchanged when ``f`` is 1)."""
        if self._unl_now == 1.0:
            return loss
        return supervised + self._unl_now * (loss - supervised)

    def w_cps(self, iteration: int) -> float:
        """The consistency weight at the 0-based ``iteration``."""
        return _weight_at(self.consistency_weight, iteration)

    def _add_affinity(self, terms: dict, loss_a: torch.Tensor, out_a: torch.Tensor, batch, n: int) -> torch.Tensor:
        """``loss_a + w_tac * R_A`` (``terms["tac_a"] = R_A``) when TAC is on, else ``loss_a``."""
        if not self.affinity_on:
            return loss_a
        terms["tac_a"] = self.affinity(out_a, batch.label, n)
        return loss_a + self._w_tac_now * terms["tac_a"]

    def _pass(self, x: torch.Tensor, network: nn.Module) -> torch.Tensor:
        """A training pass of ``network`` on ``x`` (through its captured graph with ``graph_capture``)."""
        return self.inferer(x, self.capture.forward(network))

    def _rsl(
        self, logits_u: torch.Tensor, batch: SemiSupervisedBatch, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """RSL on the unlabeled logits; ``weight``: the per-slice weights (default: the batch's BRS-rank weights)."""
        if batch.registered_label is None:
            raise ValueError(
                "rsl_weight > 0 but the unlabeled batch has no 'registered_label': train on the registration "
                "step's rsl_datalist.json, with registered_label among the unlabeled transform keys"
            )
        weight = batch.registered_weight if weight is None else weight
        return self.rsl_loss(logits_u, batch.registered_label, batch.registered_valid, weight)

    def _rsl_weight(
        self, batch: SemiSupervisedBatch, probs_a: torch.Tensor | None, probs_b: torch.Tensor | None, terms: dict
    ) -> torch.Tensor | None:
        """The per-slice RSL weights: the BRS-rank weights, times the ramped agreement with ``rsl_quality agreement``."""
        if self.rsl_quality != "agreement" or batch.registered_label is None:
            return batch.registered_weight
        probs = probs_a + probs_b
        agreement = label_agreement(batch.registered_label, probs.argmax(1), probs.shape[1])
        terms["rsl_agreement"] = agreement.mean()
        factor = (1.0 - self._ramp_now) + self._ramp_now * agreement
        return factor if batch.registered_weight is None else batch.registered_weight.to(factor.dtype) * factor

    @torch.no_grad()
    def _teacher_logits(self, x_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pseudo-label teacher's logits of A and B on the unlabeled slices (``None`` without a teacher).

        Run before the students' passes, so that whatever feature taps the copies share are overwritten by the
        students' own maps before the contrastive term reads them."""
        teacher = self.pseudo_label_teacher
        if teacher is None:
            return None
        return self.inferer(x_u, teacher.net_a), self.inferer(x_u, teacher.net_b)

    def _two_students(self, batch: SemiSupervisedBatch, w: float) -> tuple[torch.Tensor, dict]:
        x, n = batch.images(), batch.num_labeled
        teacher = self._teacher_logits(batch.unlabeled_image)
        w2s_on = self.w2s_weight > 0
        views = None
        if w2s_on and self.w2s_one_pass:  # one pass per network over every view: [x_l; x_u; strong; x_u (dropout)]
            view = self.strong_perturbation(batch.unlabeled_image)
            u = batch.unlabeled_image.shape[0]
            x_all = torch.cat([x, view.image, batch.unlabeled_image])
            with feature_dropout(self.network, self.w2s_dropout, last=u):
                out_a, strong_a, fp_a = self._pass(x_all, self.network).split([x.shape[0], u, u])
            with feature_dropout(self.net_b, self.w2s_dropout, last=u):
                out_b, strong_b, fp_b = self._pass(x_all, self.net_b).split([x.shape[0], u, u])
            views = (view, strong_a, strong_b, fp_a, fp_b)
        else:
            out_a, out_b = self._pass(x, self.network), self._pass(x, self.net_b)
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        peer_a, peer_b = (out_a[n:], out_b[n:]) if teacher is None else teacher  # the pseudo-labels' sources
        terms = {
            "sup_a": self.loss_function(out_a[:n], batch.label),
            "sup_b": self.loss_function(out_b[:n], batch.label),
            "cps_a": self.cross_loss(out_a[n:], peer_b),
            "cps_b": self.cross_loss(out_b[n:], peer_a),
        }
        loss_a = terms["sup_a"] + w * terms["cps_a"]
        loss_b = terms["sup_b"] + w * terms["cps_b"]
        loss_a = self._add_affinity(terms, loss_a, out_a, batch, n)
        # the probabilities of each pseudo-label source (a network, or its EMA copy) on the unlabeled half, once
        need_probs = self.contrastive_on or w2s_on or (self.rsl_weight > 0 and self.rsl_quality == "agreement")
        probs_a = torch.softmax(peer_a.detach().float(), 1) if need_probs else None
        probs_b = torch.softmax(peer_b.detach().float(), 1) if need_probs else None
        rsl_weight = self._rsl_weight(batch, probs_a, probs_b, terms) if self.rsl_weight > 0 else None
        if self.contrastive_on:
            terms["cl_a"], terms["cl_b"] = self.contrastive.pair(out_a, probs_b, out_b, probs_a, batch)
            loss_a = loss_a + self.contrastive_weight * terms["cl_a"]
            loss_b = loss_b + self.contrastive_weight * terms["cl_b"]
        # last when the views take their own passes: those replace the feature maps the taps above read
        if w2s_on:
            w2s = self._weak_to_strong(probs_a, probs_b, batch, views, rsl_weight)
            terms.update(w2s)
            loss_a = loss_a + self.w2s_weight * 0.5 * (w2s["strong_a"] + w2s["fp_a"])
            loss_b = loss_b + self.w2s_weight * 0.5 * (w2s["strong_b"] + w2s["fp_b"])
        elif self.rsl_weight > 0:
            terms["rsl_a"] = self._rsl(out_a[n:], batch, rsl_weight)
            terms["rsl_b"] = self._rsl(out_b[n:], batch, rsl_weight)
        if self.rsl_weight > 0:
            loss_a = loss_a + self._w_rsl_now * terms["rsl_a"]
            loss_b = loss_b + self._w_rsl_now * terms["rsl_b"]
        loss_a, loss_b = self._with_factor(loss_a, terms["sup_a"]), self._with_factor(loss_b, terms["sup_b"])
        terms["loss_a"], terms["loss_b"] = loss_a, loss_b
        return loss_a + loss_b, terms

    def _weak_to_strong(
        self,
        probs_a: torch.Tensor,
        probs_b: torch.Tensor,
        batch: SemiSupervisedBatch,
        views: tuple | None = None,
        rsl_weight: torch.Tensor | None = None,
    ) -> dict:
        """Strong-view and feature-perturbed losses of both students (and RSL on the strong view).

        ``probs_a`` / ``probs_b``: the students' probabilities on the weak (unlabeled) view, detached. ``views``:
        ``(view, strong_a, strong_b, fp_a, fp_b)`` from the batched pass, or ``None`` to run the passes here."""
        x_u = batch.unlabeled_image
        conf_a, label_a = probs_a.max(dim=1)
        conf_b, label_b = probs_b.max(dim=1)
        if views is None:
            view = self.strong_perturbation(x_u)
            strong_a, strong_b = self._pass(view.image, self.network), self._pass(view.image, self.net_b)
            with feature_dropout(self.network, self.w2s_dropout):
                fp_a = self._pass(x_u, self.network)
            with feature_dropout(self.net_b, self.w2s_dropout):
                fp_b = self._pass(x_u, self.net_b)
        else:
            view, strong_a, strong_b, fp_a, fp_b = views
        t = self.w2s_threshold
        terms = {
            "strong_a": confident_cross_entropy(strong_a, view.mix(label_b), view.mix(conf_b), t),
            "strong_b": confident_cross_entropy(strong_b, view.mix(label_a), view.mix(conf_a), t),
            "fp_a": confident_cross_entropy(fp_a, label_b, conf_b, t),
            "fp_b": confident_cross_entropy(fp_b, label_a, conf_a, t),
            "confident_a": (conf_a >= t).float().mean(),  # share of pixels A teaches B with
            "confident_b": (conf_b >= t).float().mean(),
        }
        if self.rsl_weight > 0:
            if batch.registered_label is None:
                self._rsl(strong_a, batch)  # raises the missing-registered-label message
            label, valid = view.mix(batch.registered_label), view.mix_valid(batch.registered_valid)
            weight = view.mix_weight(batch.registered_weight if rsl_weight is None else rsl_weight)
            terms["rsl_a"] = self.rsl_loss(strong_a, label, valid, weight)
            terms["rsl_b"] = self.rsl_loss(strong_b, label, valid, weight)
        return terms

    def _mean_teacher(self, batch: SemiSupervisedBatch, w: float, iteration: int) -> tuple[torch.Tensor, dict]:
        x, n = batch.images(), batch.num_labeled
        out_a = self._pass(x, self.network)
        target, uncertainty = noisy_teacher_predictions(
            self.net_b, batch.unlabeled_image, self.uncertainty_passes, self.noise_std, self.noise_clip
        )
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        threshold = (0.75 + 0.25 * sigmoid_ramp_up(iteration, self.num_iterations)) * self.uncertainty_max
        terms = {
            "sup_a": self.loss_function(out_a[:n], batch.label),
            "cps_a": self.cross_loss(out_a[n:], target, uncertainty, threshold),
            "certain_fraction": (uncertainty < threshold).float().mean(),
        }
        loss_a = terms["sup_a"] + w * terms["cps_a"]
        if self.rsl_weight > 0:
            terms["rsl_a"] = self._rsl(out_a[n:], batch)
            loss_a = loss_a + self._w_rsl_now * terms["rsl_a"]
        loss_a = self._add_affinity(terms, loss_a, out_a, batch, n)
        if self.contrastive_on:
            terms["cl_a"] = self.contrastive("a", out_a, target, batch)
            loss_a = loss_a + self.contrastive_weight * terms["cl_a"]
        loss_a = self._with_factor(loss_a, terms["sup_a"])
        terms["loss_a"] = loss_a
        return loss_a, terms

    def _one_network(self, batch: SemiSupervisedBatch) -> tuple[torch.Tensor, dict]:
        x, n = batch.images(), batch.num_labeled
        out_a = self._pass(x, self.network)
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = {"sup_a": self.loss_function(out_a[:n], batch.label)}
        loss_a = terms["sup_a"]
        if self.rsl_weight > 0:
            terms["rsl_a"] = self._rsl(out_a[n:], batch)
            loss_a = loss_a + self._w_rsl_now * terms["rsl_a"]
        loss_a = self._add_affinity(terms, loss_a, out_a, batch, n)
        loss_a = self._with_factor(loss_a, terms["sup_a"])
        terms["loss_a"] = loss_a
        return loss_a, terms

    # ------------------------------------------------------------------ one iteration
    def _ddp_projector_parameters(self) -> list[torch.Tensor]:
        """The projector parameters when they must be kept in step across DDP processes, else ``[]``.

        The projector heads live outside the DDP-wrapped networks, so DDP neither broadcasts nor
        averages them: :meth:`_iteration` does (rank 0's weights at the first iteration, after any
        checkpoint was loaded; gradients averaged after every backward)."""
        dist = torch.distributed
        if not self.contrastive_on or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return []
        return list(self.contrastive.parameters())

    def _broadcast_projectors(self) -> None:
        for p in self._ddp_projector_parameters():
            torch.distributed.broadcast(p.data, src=0)

    def _average_projector_grads(self) -> None:
        params = self._ddp_projector_parameters()
        world = torch.distributed.get_world_size() if params else 1
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= world

    def _optimizers(self) -> list[Optimizer]:
        return [self.optimizer] + ([self.optimizer_b] if self.optimizer_b is not None else [])

    def _iteration(self, engine: CrossTeachingTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        iteration = engine.state.iteration - 1
        w = engine.w_cps(iteration)
        engine._w_rsl_now = engine.w_rsl(iteration)
        if engine.num_iterations is not None:
            engine._ramp_now = sigmoid_ramp_up(iteration, engine.num_iterations)
        engine._w_tac_now = engine.w_tac(iteration)
        engine._unl_now = engine.unlabeled_factor(iteration)
        engine.network.train()
        if engine.net_b is not None:
            engine.net_b.train()
        if not engine._projectors_broadcast:
            engine._broadcast_projectors()
            engine._projectors_broadcast = True

        def compute() -> tuple[torch.Tensor, dict]:
            if engine.consistency == "mean_teacher":
                return engine._mean_teacher(batch, w, iteration)
            if engine.consistency == "none":
                return engine._one_network(batch)
            return engine._two_students(batch, w)

        use_scaler = engine.amp and engine.scaler is not None and engine.scaler.is_enabled()

        def forward() -> tuple[torch.Tensor, dict]:
            for opt in engine._optimizers():
                opt.zero_grad(set_to_none=engine.optim_set_to_none)
            if engine.amp:  # CUDA: float16 (with the gradient scaler); CPU: bfloat16 autocast, no scaler needed
                with torch.autocast(torch.device(engine.state.device).type, **engine.amp_kwargs):
                    loss, terms = compute()
            else:
                loss, terms = compute()
            engine.state.output = {"loss": loss.detach()}
            return loss, terms

        def backward(loss: torch.Tensor) -> None:
            (engine.scaler.scale(loss) if use_scaler else loss).backward()
            engine._average_projector_grads()

        # with graph_capture, a failure of the captured passes (compiling or replaying, forward or backward) makes
        # every network eager and repeats this iteration eagerly; the handlers' events stay outside the retry
        try:
            loss, terms = forward()
        except Exception as err:
            engine.capture.fall_back(err)  # raises err again unless the passes were captured
            loss, terms = forward()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        try:
            backward(loss)
        except Exception as err:
            engine.capture.fall_back(err)  # raises err again unless the passes were captured
            loss, terms = forward()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            backward(loss)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        for opt in engine._optimizers():
            if use_scaler:
                engine.scaler.step(opt)
            else:
                opt.step()
        if use_scaler:
            engine.scaler.update()
        if engine.consistency == "mean_teacher":
            terms["ema_alpha"] = torch.tensor(
                ema_update(engine.net_b, engine.network, engine.ema_decay, engine.state.iteration)
            )
        terms["w_cps"] = torch.tensor(w)
        if engine.rsl_weight > 0:
            terms["w_rsl"] = torch.tensor(engine._w_rsl_now)
        if engine.affinity_on:
            terms["w_tac"] = torch.tensor(engine._w_tac_now)
        if engine.unlabeled_scale != 1.0 or engine.unlabeled_warmup > 0:
            terms["unlabeled_factor"] = torch.tensor(engine._unl_now)
        if engine.contrastive_on:
            for which, share in getattr(engine.contrastive, "reps_found", {}).items():
                terms[f"reps_found_{which}"] = torch.as_tensor(
                    share
                )  # anchors with a registered positive (device scalar)
        engine.state.output["terms"] = {k: v.detach().float() for k, v in terms.items()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
