"""Prediction files: MONAI's NIfTI writer, made atomic and faithful to the input's header codes."""

from __future__ import annotations

import numpy as np
from monai.data import NibabelWriter

from scripts.data.atomic_io import atomic_path


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that writes to a temporary name and renames on success, and keeps
    the input's ``qform_code`` / ``sform_code``.

    Pass it to ``SaveImaged(writer=...)`` so that an interrupted inference run never leaves a
    truncated prediction behind. MONAI's writer always stamps both codes 1 (scanner); a prediction
    of a file with, say, qform 0 / sform 2 (aligned) then claims another coordinate meaning than its
    image. The codes come from the metadata that ``LoadImaged`` read from the input.
    """

    def set_metadata(self, meta_dict=None, resample: bool = True, **options):
        self._codes = None
        if meta_dict is not None and "qform_code" in meta_dict and "sform_code" in meta_dict:
            self._codes = tuple(int(np.asarray(meta_dict[k]).reshape(-1)[0]) for k in ("qform_code", "sform_code"))
        super().set_metadata(meta_dict, resample=resample, **options)

    def create_backend_obj(self, data_array, affine=None, dtype=None, **kwargs):
        img = super().create_backend_obj(data_array, affine=affine, dtype=dtype, **kwargs)
        codes = getattr(self, "_codes", None)
        if codes is not None:
            # NibabelWriter.write calls set_sform(affine, code=1) and set_qform(affine, code=1) on this
            # object before saving: keep the affine it passes, use the input's codes instead of 1
            set_sform, set_qform = img.set_sform, img.set_qform
            img.set_sform = lambda a, code=None, **kw: set_sform(a, code=codes[1], **kw)
            img.set_qform = lambda a, code=None, **kw: set_qform(a, code=codes[0], **kw)
        return img

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        with atomic_path(filename) as tmp:
            super().write(str(tmp), verbose=verbose, **obj_kwargs)
