"""Registration as the first step of ``run training``: the datalist the trainer reads, with registered labels.

``configs/train.yaml`` declares a :class:`TrainingRegistration` and reads its :attr:`datalist` (the
datalist training uses) and :attr:`registration_dir` (the transforms REPS reads). Which one applies:

1. registration not needed (no RSL, no REPS, or no unlabeled volume): the input datalist, unchanged;
2. ``registration_dir`` given (``--registration_dir``): that folder's ``rsl_datalist.json``, as
   written by ``run registration`` (the two-step path);
3. a datalist whose unlabeled entries already carry ``registered_label`` (e.g. ``--datalist_file
   registration/<run>/rsl_datalist.json``): used as it is; its folder holds the transforms;
4. otherwise the :class:`~scripts.registration.runner.RegistrationRunner` runs here, in
   ``registration/<engine settings>_<datalist content hash>/``, with its progress bar. A finished
   folder is reused as it is, a killed run resumes with the pairs it had stored, and a QC montage
   (``qc_montage.png``) shows the registered labels over their targets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from scripts.data.datalist import read_datalist
from scripts.registration.runner import checked_rsl_partners, fused_datalist_name
from scripts.user_errors import BundleInputError

__all__ = ["RegistrationSetupError", "TrainingRegistration"]

logger = logging.getLogger(__name__)


class RegistrationSetupError(BundleInputError):
    """A registration folder or datalist that cannot serve the training run."""


class TrainingRegistration:
    """Resolve (and when needed compute) the registrations a training run uses.

    Args:
        datalist: the input datalist (JSON path).
        output_root: where registration folders are created (``<bundle_root>/registration``).
        rsl: registration supervision is on (needs registered labels).
        reps: REPS is on (needs the transforms among training volumes).
        registration_dir: an existing registration output folder to use instead of registering.
        reps_partners: REPS partners per volume when registering here (``"all"`` or a number).
        random_partner: use ``rsl_datalist_random.json`` (a random labeled partner, the no-BRS ablation).
        rsl_partners: k > 1 uses ``rsl_datalist_top<k>.json`` (RSL from the majority vote of the k best
            BRS partners' registered labels); 1: the best partner's (the paper).
        runner_kwargs: the remaining :class:`~scripts.registration.runner.RegistrationRunner` arguments
            (engine, engine_settings, brs, workers, num_threads, num_classes, evaluation_sections, ...).
    """

    def __init__(
        self,
        datalist: str | os.PathLike,
        output_root: str | os.PathLike,
        rsl: bool = True,
        reps: bool = False,
        registration_dir: str | os.PathLike | None = None,
        reps_partners: int | str | None = 4,
        random_partner: bool = False,
        montage: bool = True,
        rsl_partners: int = 1,
        **runner_kwargs,
    ) -> None:
        self.source = str(datalist)
        self.output_root = Path(output_root)
        self.rsl, self.reps = bool(rsl), bool(reps)
        self.given_dir = registration_dir
        self.reps_partners = reps_partners if self.reps else None
        self.random_partner = bool(random_partner)
        try:
            self.rsl_partners = checked_rsl_partners(rsl_partners)
        except ValueError as e:
            raise RegistrationSetupError(str(e)) from None
        if self.random_partner and self.rsl_partners > 1:
            raise RegistrationSetupError(
                "brs_random_partner and rsl_partners > 1 exclude each other: "
                "one random partner, or a vote of the k best"
            )
        self.montage = bool(montage)
        self.runner_kwargs = runner_kwargs
        self._resolved: tuple[str, str | None] | None = None

    @property
    def needed(self) -> bool:
        return self.rsl or self.reps

    @property
    def datalist_name(self) -> str:
        if self.random_partner:
            return "rsl_datalist_random.json"
        return fused_datalist_name(self.rsl_partners) if self.rsl_partners > 1 else "rsl_datalist.json"

    @property
    def datalist(self) -> str:
        """The datalist training reads (registering first when needed)."""
        return self._resolve()[0]

    @property
    def registration_dir(self) -> str | None:
        """The registration folder (transforms for REPS), or ``None`` when there is none."""
        return self._resolve()[1]

    def _resolve(self) -> tuple[str, str | None]:
        if self._resolved is None:
            self._resolved = self._choose()
            logger.info(
                "training datalist: %s%s",
                self._resolved[0],
                f" (registrations in {self._resolved[1]})" if self._resolved[1] else "",
            )
        return self._resolved

    def _choose(self) -> tuple[str, str | None]:
        if not self.needed:
            return self.source, None
        if self.given_dir:
            folder = Path(self.given_dir)
            datalist = folder / self.datalist_name
            if not datalist.is_file():
                raise RegistrationSetupError(
                    f"{folder}: registration_dir has no {self.datalist_name}; give the output folder of "
                    "'run registration', or leave registration_dir unset to register here"
                )
            self._check_same_volumes(datalist)
            self._check_transforms(folder)
            return str(datalist), str(folder)
        unlabeled = read_datalist(self.source).get("unlabeled", [])
        if not unlabeled:  # nothing to register: the unlabeled half has no volume (the trainer says so)
            return self.source, None
        if all("registered_label" in e for e in unlabeled) and self.datalist_name == "rsl_datalist.json":
            folder = Path(self.source).resolve().parent
            self._check_transforms(folder)
            return self.source, str(folder) if (folder / "transforms.npz").exists() else None
        return self._register()

    def _check_same_volumes(self, folder_datalist: Path) -> None:
        """A given folder's datalist replaces the input one, so it must split the same volumes the same way.

        Otherwise a folder made from another datalist (say 7 labeled patients, given to a 1-labeled run) would
        silently train on its labeled, unlabeled and validation volumes instead of the ones asked for.
        """
        given, mine = read_datalist(folder_datalist), read_datalist(self.source)
        for section in ("training", "unlabeled", "validation"):
            theirs = {str(e.get("image")) for e in given.get(section, [])}
            ours = {str(e.get("image")) for e in mine.get(section, [])}
            if theirs != ours:
                extra, missing = sorted(theirs - ours), sorted(ours - theirs)
                detail = "; ".join(
                    f"{len(names)} {what} (e.g. {names[0]})"
                    for names, what in ((extra, f"not in {self.source}"), (missing, "missing"))
                    if names
                )
                raise RegistrationSetupError(
                    f"{folder_datalist.parent}: registration_dir was made from another datalist: its {section!r} "
                    f"volumes differ from those of {self.source}: {detail}; give the folder 'run registration' "
                    "wrote for this datalist, or leave registration_dir unset to register here"
                )

    def _check_transforms(self, folder: Path) -> None:
        """REPS reads the transforms of the registration folder (``transforms.npz``)."""
        if self.reps and not (folder / "transforms.npz").exists():
            raise RegistrationSetupError(
                f"{folder}: REPS needs the registration transforms (transforms.npz) there; pass the folder of a finished "
                "'run registration' as --registration_dir, or a datalist without registered labels to register here"
            )

    def _register(self) -> tuple[str, str]:
        from scripts.registration.runner import RegistrationRunner

        runner = RegistrationRunner(
            self.source,
            self.output_root,
            reps_partners=self.reps_partners,
            random_partner_datalist=self.random_partner,
            rsl_partners=self.rsl_partners,
            **self.runner_kwargs,
        )
        logger.info("registration before training: %s", runner.output_dir)
        runner.run()
        folder = runner.output_dir
        montage = folder / self.datalist_name.replace("rsl_datalist", "qc_montage").replace(".json", ".png")
        if self.montage and not (runner.reused and montage.exists()):
            from scripts.registration.qc_montage import write_qc_montage

            write_qc_montage(folder / self.datalist_name, montage)
        return str(folder / self.datalist_name), str(folder)
