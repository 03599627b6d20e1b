"""Which volumes to segment (an explicit list, a folder, or a section of a datalist), and for evaluation
which label goes with each image (two folders or two lists, matched by name).

Every input is checked (readable, 3D) before inference starts, so a bad file in the middle of a
folder fails at once with its name instead of after an hour of predictions. Evaluation refuses
images without a label and labels without an image instead of scoring something else.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from scripts.data.data_checks import DataCheckError, check_image_file
from scripts.data.datalist import LABEL_SUFFIXES, load_datalist, match_labels


def collect_inputs(
    input_files: Sequence[str] | str | None = None,
    input_dir: str | None = None,
    pattern: str = "*.nii*",
    datalist: str | None = None,
    section: str = "test",
    intensity: dict | None = None,
) -> list[dict]:
    """Return ``[{"image": path, ...}]`` for inference, from the first of these that is given.

    Args:
        input_files: explicit NIfTI paths (a single path is accepted too).
        input_dir: a folder; files matching ``pattern`` (sorted) are taken.
        pattern: glob pattern inside ``input_dir``.
        datalist: a datalist JSON; the entries of ``section`` are taken (labels kept, for evaluation).
        section: the datalist section to use.
        intensity: the model's intensity normalisation spec (an input constant after it is refused).

    Raises:
        DataCheckError: no input found, or an input that is missing, unreadable, not 3D, or constant.
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
            check_image_file(item["image"], intensity=intensity)
        except DataCheckError as e:
            problems.extend(e.problems)
    if problems:
        raise DataCheckError(problems, source=origin)
    return items


def collect_labeled_inputs(
    image_files: Sequence[str] | str | None = None,
    label_files: Sequence[str] | str | None = None,
    image_dir: str | None = None,
    label_dir: str | None = None,
    pattern: str = "*.nii*",
    datalist: str | None = None,
    section: str = "validation",
    intensity: dict | None = None,
) -> list[dict]:
    """``[{"image": path, "label": path}]`` for evaluation, from the first of these that is given.

    * ``image_files`` + ``label_files``: two lists of the same length, paired in order;
    * ``image_dir`` + ``label_dir``: files matched by name: ``case.nii.gz`` with ``case.nii.gz``,
      ``case_gt``, ``case_seg`` or ``case_label`` (one folder for both works too, with those suffixes);
    * ``datalist``: the entries of ``section`` (each must have a label).

    Raises:
        DataCheckError: no input, a list or folder missing, an image without a label or a label
            without an image (all named), an unreadable / non-3D file, or a constant image (``intensity``:
            the model's normalisation spec).
    """
    as_list = lambda x: [x] if isinstance(x, (str, os.PathLike)) else list(x or [])  # noqa: E731
    problems: list[str] = []
    if image_files or label_files:
        images, labels = as_list(image_files), as_list(label_files)
        if len(images) != len(labels):
            raise DataCheckError(
                [
                    f"image_files has {len(images)} files and label_files {len(labels)}: "
                    "give one label per image, in the same order"
                ]
            )
        items = [{"image": os.path.abspath(i), "label": os.path.abspath(l)} for i, l in zip(images, labels)]
        origin = "image_files / label_files"
    elif image_dir or label_dir:
        if not (image_dir and label_dir):
            raise DataCheckError(["evaluation of folders needs both image_dir (or input_dir) and label_dir"])
        for folder, what in ((image_dir, "image_dir"), (label_dir, "label_dir")):
            if not os.path.isdir(folder):
                raise DataCheckError([f"{folder}: {what} is not a folder"])
        image_map, label_of, label_map = match_labels(Path(image_dir), Path(label_dir), pattern)
        items = []
        for stem, path in image_map.items():
            if label_of[stem] is None:
                problems.append(
                    f"{path}: no label for this image in {label_dir} (looked for {stem} and {stem} + {'/'.join(LABEL_SUFFIXES)})"
                )
            else:
                items.append({"image": str(path), "label": str(label_of[stem])})
        used = set(label_of.values()) | set(image_map.values())  # in one folder the images are there too
        unused = [p for p in label_map.values() if p not in used]
        problems += [f"{p}: a label with no matching image in {image_dir}" for p in unused]
        origin = f"{image_dir} + {label_dir}"
    elif datalist:
        items = load_datalist(datalist, section)
        problems += [
            f"{datalist} section {section!r}: entry {e.get('id', e['image'])} has no label"
            for e in items
            if not e.get("label")
        ]
        origin = f"{datalist} section {section!r}"
    else:
        raise DataCheckError(
            ["no evaluation input: set image_dir + label_dir, image_files + label_files, or datalist_file"]
        )
    if not items and not problems:
        raise DataCheckError([f"{origin}: no image found"])
    for item in items:
        for key in ("image", "label"):
            try:
                check_image_file(item[key], intensity=intensity if key == "image" else None, role=key)
            except DataCheckError as e:
                problems.extend(e.problems)
    if problems:
        raise DataCheckError(problems, source=origin)
    return items
