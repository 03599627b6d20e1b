"""Prediction files: MONAI's NIfTI writer, made atomic."""

from __future__ import annotations

from monai.data import NibabelWriter

from scripts.data.atomic_io import atomic_path


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that writes to a temporary name and renames on success.

    Pass it to ``SaveImaged(writer=...)`` so that an interrupted inference run never leaves a
    truncated prediction behind.
    """

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        with atomic_path(filename) as tmp:
            super().write(str(tmp), verbose=verbose, **obj_kwargs)
