"""Which volumes to segment: an explicit list, a folder, or a section of a datalist.

Every input is checked (readable, 3D) before inference starts, so a bad file in the middle of a
folder fails at once with its name instead of after an hour of predictions.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from scripts.data.data_checks import DataCheckError, check_image_file
from scripts.data.datalist import load_datalist


def collect_inputs(
    input_files: Sequence[str] | str | None = None,
    input_dir: str | None = None,
    pattern: str = "*.nii*",
    datalist: str | None = None,
    section: str = "test",
) -> list[dict]:
    """Return ``[{"image": path, ...}]`` for inference, from the first of these that is given.

    Args:
        input_files: explicit NIfTI paths (a single path is accepted too).
        input_dir: a folder; files matching ``pattern`` (sorted) are taken.
        pattern: glob pattern inside ``input_dir``.
        datalist: a datalist JSON; the entries of ``section`` are taken (labels kept, for evaluation).
        section: the datalist section to use.

    Raises:
        DataCheckError: no input found, or an input that is missing, unreadable or not 3D.
    """
    if input_files:
        files = [input_files] if isinstance(input_files, (str, os.PathLike)) else list(input_files)
        items = [{"image": os.path.abspath(f)} for f in files]
        origin = "input_files"
    elif input_dir:
        if not os.path.isdir(input_dir):
            raise DataCheckError([f"{input_dir}: input_dir is not a folder"])
        items = [{"image": f} for f in sorted(glob.glob(os.path.join(os.path.abspath(input_dir), pattern)))]
        origin = f"{input_dir} (pattern {pattern!r})"
    elif datalist:
        items = load_datalist(datalist, section)
        origin = f"{datalist} section {section!r}"
    else:
        raise DataCheckError(["no inference input: set input_files, input_dir or datalist"])
    if not items:
        raise DataCheckError([f"{origin}: no input volume found"])
    problems: list[str] = []
    for item in items:
        try:
            check_image_file(item["image"])
        except DataCheckError as e:
            problems.extend(e.problems)
    if problems:
        raise DataCheckError(problems, source=origin)
    return items
