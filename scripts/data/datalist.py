"""Datalists: the JSON files that say which volumes a run trains, validates and tests on.

A datalist follows the MONAI / Medical Segmentation Decathlon layout, with one extra section::

    {"name": str, "modality": "MRI" | "CT", "labels": {"0": "background", "1": "RV", ...},
     "training":   [{"id": ..., "image": path, "label": path}, ...],          # labeled cases
     "unlabeled":  [{"id": ..., "image": path, "true_label": path}, ...],     # true_label optional,
                                                                              # for monitoring only
     "validation": [{"id": ..., "image": path, "label": path}, ...],
     "test":       [{"id": ..., "image": path, "label": path (optional)}, ...]}

Dataset-specific metadata may sit beside these keys (Synapse: ``label_mapping`` and
``intensity_window``). Paths are absolute or relative to the datalist file's folder; ``id`` is
unique across all sections.

This module holds the loader that every other component uses (:func:`load_datalist`,
:func:`load_datalist_info`) and the builders that write datalists for the supported data
layouts (:func:`build_acdc`, :func:`build_synapse`, :func:`build_folder`), also available from
the command line::

    python -m scripts.data.datalist acdc --root /data/ACDC --out data/acdc_7.json --labeled 7
    # other labeled patients:
    python -m scripts.data.datalist acdc --root /data/ACDC --out data/acdc_7_s1.json --labeled 7 --labeled_seed 1
    python -m scripts.data.datalist synapse --root /data/BTCV --out data/synapse_4.json --labeled 4
    python -m scripts.data.datalist folder --images imgs/ --labels segs/ --out data/mine.json --labeled 5
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from scripts.data.atomic_io import write_json
from scripts.user_errors import BundleInputError

__all__ = [
    "SECTIONS",
    "DatalistError",
    "is_path_key",
    "read_datalist",
    "load_datalist",
    "load_datalist_info",
    "build_acdc",
    "build_synapse",
    "build_folder",
    "summarize",
]

#: The sections of a datalist, in the order they are written.
SECTIONS: tuple[str, ...] = ("training", "unlabeled", "validation", "test")

#: Where the standard splits shipped with the bundle live.
SPLITS_DIR = Path(__file__).resolve().parents[2] / "configs" / "splits"

ACDC_LABELS = {"0": "background", "1": "RV", "2": "myocardium", "3": "LV"}

_NIFTI_SUFFIX = re.compile(r"\.nii(\.gz)?$")
LABEL_SUFFIXES = ("_gt", "_seg", "_label")


class DatalistError(BundleInputError):
    """A datalist file, or the data folder a builder reads, is not what it should be."""


class DatalistNotFoundError(DatalistError, FileNotFoundError):
    """A datalist, split file, data folder or case that does not exist."""


class DatalistSectionError(DatalistError, KeyError):
    """A datalist section that is not there."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def is_path_key(key: str) -> bool:
    """Whether an entry key holds a file path that is resolved against the datalist's folder."""
    return key in ("image", "label", "true_label") or key.endswith("_label") or key.endswith("_image")


def _resolve_entry(entry: Any, base: Path, where: str) -> dict:
    """Return a copy of one datalist entry with its path keys made absolute."""
    if isinstance(entry, (str, os.PathLike)):  # decathlon test lists may hold bare image paths
        entry = {"image": entry}
    if not isinstance(entry, Mapping):
        raise DatalistError(f"{where}: entry must be an object, got {type(entry).__name__}: {entry!r}")
    out = dict(entry)
    for key, value in out.items():
        if not is_path_key(key) or value is None:
            continue
        if isinstance(value, (str, os.PathLike)):
            out[key] = os.path.normpath(os.path.join(base, os.fspath(value)))
        elif isinstance(value, list) and all(isinstance(v, (str, os.PathLike)) for v in value):
            out[key] = [os.path.normpath(os.path.join(base, os.fspath(v))) for v in value]
        else:
            raise DatalistError(f"{where}: key {key!r} must be a path (string), got {value!r}")
    return out


def read_datalist(path: str | os.PathLike) -> dict:
    """Read a whole datalist, with the paths of every section resolved (a fresh copy).

    Raises:
        FileNotFoundError: the file does not exist.
        DatalistError: the file is not valid JSON, not a JSON object, or a section is not a list.
    """
    path = Path(path)
    if not path.is_file():
        raise DatalistNotFoundError(f"datalist {path} does not exist (or is not a file)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatalistError(f"datalist {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise DatalistError(f"datalist {path} must hold a JSON object, got {type(data).__name__}")
    base = path.resolve().parent
    for section in SECTIONS:
        if section not in data:
            continue
        items = data[section]
        if not isinstance(items, list):
            raise DatalistError(f"datalist {path}: section {section!r} must be a list, got {type(items).__name__}")
        data[section] = [_resolve_entry(e, base, f"datalist {path}, {section}[{i}]") for i, e in enumerate(items)]
    return data


def load_datalist(path: str | os.PathLike, section: str) -> list[dict]:
    """Load one section of a datalist as a list of entry dicts with absolute paths.

    Keys ``image``, ``label``, ``true_label`` and any key ending in ``_label`` or ``_image`` are
    resolved against the datalist's folder; the entries are copies, free to modify.

    Raises:
        FileNotFoundError: the datalist does not exist.
        DatalistError: the datalist is not valid JSON / not a datalist.
        KeyError: ``section`` is not in the datalist (the message names the available sections).
    """
    data = read_datalist(path)
    if section not in data or not isinstance(data[section], list):
        available = [k for k, v in data.items() if isinstance(v, list) and (k in SECTIONS or _is_entry_list(v))]
        raise DatalistSectionError(f"datalist {path} has no section {section!r}; available sections: {available}")
    items = data[section]
    if section not in SECTIONS:  # a custom section: resolve it the same way
        base = Path(path).resolve().parent
        items = [_resolve_entry(e, base, f"datalist {path}, {section}[{i}]") for i, e in enumerate(items)]
    return items


def _is_entry_list(value: list) -> bool:
    return all(isinstance(e, Mapping) and "image" in e for e in value)


def load_datalist_info(path: str | os.PathLike) -> dict:
    """The datalist's metadata: ``name``, ``modality``, ``labels`` (keys as strings), and any other
    non-section key the datalist carries (e.g. ``label_mapping``, ``intensity_window``)."""
    data = read_datalist(path)
    info = {k: v for k, v in data.items() if k not in SECTIONS}
    info.setdefault("name", Path(path).stem)
    info.setdefault("modality", None)
    labels = info.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise DatalistError(f"datalist {path}: 'labels' must be an object {{value: name}}, got {labels!r}")
    info["labels"] = {str(k): v for k, v in labels.items()}
    return info


def summarize(path: str | os.PathLike) -> str:
    """One line: the datalist path and the number of entries per section."""
    data = read_datalist(path)
    counts = ", ".join(f"{s} {len(data.get(s, []))}" for s in SECTIONS)
    return f"{path}: {data.get('name', '?')} ({data.get('modality', '?')}): {counts}"


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _write(out: str | os.PathLike | None, header: dict, sections: Mapping[str, list[dict]]) -> str:
    """Check ids are unique and write the datalist atomically; return its path."""
    if out is None:
        raise DatalistError("no output path given (out=...)")
    seen: dict[str, str] = {}
    for section, items in sections.items():
        for item in items:
            if item["id"] in seen:
                raise DatalistError(f"duplicate id {item['id']!r} in sections {seen[item['id']]!r} and {section!r}")
            seen[item["id"]] = section
    data = dict(header)
    for section in SECTIONS:
        data[section] = list(sections.get(section, []))
    write_json(out, data)
    return str(out)


def _load_split(name: str, split: str | os.PathLike | None) -> tuple[Path, dict]:
    path = Path(split) if split is not None else SPLITS_DIR / f"{name}.json"
    if not path.is_file():
        raise DatalistNotFoundError(f"split file {path} does not exist")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatalistError(f"split file {path} is not valid JSON: {err}") from err


def _abs(path: Path) -> str:
    return os.path.abspath(path)


# ----------------------------------------------------------------------------------------------
# ACDC
# ----------------------------------------------------------------------------------------------

_ACDC_FRAME = re.compile(r"^(patient\d{3})_frame(\d+)(_gt)?\.nii(\.gz)?$")


def _acdc_patient_dir(root: Path, patient: str) -> Path | None:
    """The patient's folder under ``root`` (also looks in the original download's sub-folders)."""
    for sub in ("", "training", "testing", "database/training", "database/testing"):
        folder = root / sub / patient
        if folder.is_dir():
            return folder
    return None


def _acdc_frames(folder: Path, patient: str) -> list[tuple[str, Path, Path | None]]:
    """``(frame id, image, gt or None)`` for every frame file of one patient, sorted by frame."""
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for f in folder.iterdir():
        m = _ACDC_FRAME.match(f.name)
        if not m or m.group(1) != patient:
            continue
        (labels if m.group(3) else images)[m.group(2)] = f
    if not images:
        raise DatalistError(f"ACDC patient folder {folder} holds no {patient}_frameNN.nii.gz image")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DatalistError(f"ACDC patient folder {folder}: ground truth without image for frame(s) {orphans}")
    return [(f"{patient}_frame{n}", images[n], labels.get(n)) for n in sorted(images, key=int)]


def build_acdc(
    root: str | os.PathLike,
    out: str | os.PathLike,
    labeled: int = 7,
    include_test: bool = True,
    split: str | os.PathLike | None = None,
    labeled_seed: int | None = None,
) -> str:
    """Write an ACDC datalist from the original layout ``root/patientNNN/patientNNN_frameNN[_gt].nii.gz``.

    Uses the standard split of ``configs/splits/acdc.json`` (or ``split``): 70 train, 10 validation and
    20 test patients. Every frame of the first ``labeled`` train patients (1, 3 and 7 use the standard
    labeled lists; any other count takes the first N of the train list, with a warning; with
    ``labeled_seed``, ``labeled`` patients drawn at random from the train list with that seed instead:
    another labeled split, as semi-supervised papers repeat them) goes to
    ``training``; the other train patients' frames go to ``unlabeled`` (with ``true_label`` where the
    ground truth exists); validation patients to ``validation``; test patients found under ``root`` to
    ``test`` (missing ones are skipped with a warning). Returns the datalist path.

    Raises:
        FileNotFoundError: ``root`` or a train/validation patient folder is missing.
        DatalistError: a labeled or validation frame has no ground truth, or ``labeled`` is out of range.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatalistNotFoundError(f"ACDC root {root} is not a folder")
    split_path, spec = _load_split("acdc", split)
    train, validation, test = spec["train"], spec["validation"], spec.get("test", [])
    labeled = int(labeled)
    if not 1 <= labeled <= len(train):
        raise DatalistError(f"labeled={labeled}: must be between 1 and {len(train)} (train patients in {split_path})")
    standard = spec.get("labeled", {})
    if labeled_seed is not None:
        drawn = set(random.Random(int(labeled_seed)).sample(list(train), labeled))
        labeled_ids = [p for p in train if p in drawn]
    elif str(labeled) in standard:
        labeled_ids = list(standard[str(labeled)])
        stray = [p for p in labeled_ids if p not in train]
        if stray:
            raise DatalistError(f"split file {split_path}: labeled patients {stray} are not in its train list")
    else:
        labeled_ids = list(train[:labeled])
        warnings.warn(
            f"labeled={labeled} is not a standard ACDC setting ({sorted(standard, key=int)} in {split_path}); "
            f"using the first {labeled} patients of the train list: {labeled_ids}",
            stacklevel=2,
        )

    sections: dict[str, list[dict]] = {s: [] for s in SECTIONS}

    def frames(patient: str, role: str) -> list[tuple[str, Path, Path | None]] | None:
        folder = _acdc_patient_dir(root, patient)
        if folder is None:
            if role == "test":
                return None
            raise DatalistNotFoundError(
                f"ACDC patient folder {root / patient} not found ({role} patient of {split_path})"
            )
        return _acdc_frames(folder, patient)

    for patient in train:
        for fid, image, gt in frames(patient, "train"):
            if patient in labeled_ids:
                if gt is None:
                    raise DatalistError(
                        f"labeled ACDC patient {patient}: no ground truth {fid}_gt.nii.gz in {image.parent}"
                    )
                sections["training"].append({"id": fid, "image": _abs(image), "label": _abs(gt)})
            else:
                entry = {"id": fid, "image": _abs(image)}
                if gt is not None:
                    entry["true_label"] = _abs(gt)
                sections["unlabeled"].append(entry)
    for patient in validation:
        for fid, image, gt in frames(patient, "validation"):
            if gt is None:
                raise DatalistError(
                    f"validation ACDC patient {patient}: no ground truth {fid}_gt.nii.gz in {image.parent}"
                )
            sections["validation"].append({"id": fid, "image": _abs(image), "label": _abs(gt)})
    if include_test:
        missing = []
        for patient in test:
            found = frames(patient, "test")
            if found is None:
                missing.append(patient)
                continue
            for fid, image, gt in found:
                entry = {"id": fid, "image": _abs(image)}
                if gt is not None:
                    entry["label"] = _abs(gt)
                sections["test"].append(entry)
        if missing:
            warnings.warn(f"{len(missing)} ACDC test patient(s) not under {root}, skipped: {missing}", stacklevel=2)

    header = {
        "name": f"ACDC_{labeled}labeled",
        "modality": "MRI",
        "labels": dict(spec.get("labels", ACDC_LABELS)),
        "labeled_patients": labeled_ids,
        **({"labeled_seed": int(labeled_seed)} if labeled_seed is not None else {}),
    }
    return _write(out, header, sections)


# ----------------------------------------------------------------------------------------------
# Synapse / BTCV
# ----------------------------------------------------------------------------------------------

_SYNAPSE_FILE = re.compile(r"^(img|label)(\d{4})(?:_0000)?\.nii(\.gz)?$")


def _find_synapse_files(root: Path, max_depth: int = 3) -> tuple[dict[str, Path], dict[str, Path]]:
    """Map case number -> image / label file for ``img00NN.nii.gz`` / ``label00NN.nii.gz`` under ``root``.

    Looks in ``root`` and its sub-folders (``img/``, ``label/``, ``imagesTr/``, ``labelsTr/``,
    ``RawData/Training/img`` ...) down to ``max_depth`` levels; a case found twice is an error.
    """
    found: dict[str, dict[str, Path]] = {"img": {}, "label": {}}
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= max_depth:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            m = _SYNAPSE_FILE.match(name)
            if not m:
                continue
            kind, case = m.group(1), m.group(2)
            path = Path(dirpath) / name
            if case in found[kind]:
                raise DatalistError(f"Synapse case {case} found twice under {root}: {found[kind][case]} and {path}")
            found[kind][case] = path
    return found["img"], found["label"]


def build_synapse(
    root: str | os.PathLike,
    out: str | os.PathLike,
    labeled: int = 4,
    num_validation: int = 0,
    split: str | os.PathLike | None = None,
) -> str:
    """Write a Synapse / BTCV multi-organ CT datalist (TransUNet split, 13->8 organ mapping).

    Files ``img00NN.nii.gz`` / ``label00NN.nii.gz`` are searched under ``root`` (directly, or in
    ``img/`` + ``label/``, ``imagesTr/`` + ``labelsTr/`` ... sub-folders). Of the 18 train cases of
    ``configs/splits/synapse.json`` (or ``split``), the first ``labeled`` go to ``training``, the last
    ``num_validation`` to ``validation`` and the rest to ``unlabeled`` (with ``true_label``); the 12 test
    cases go to ``test`` (missing ones are skipped with a warning). The datalist carries the split's
    ``label_mapping`` (raw BTCV values -> 8 organs; apply with MONAI's ``MapLabelValued``) and
    ``intensity_window`` (HU; apply with ``ScaleIntensityRanged``). Returns the datalist path.

    Raises:
        FileNotFoundError: ``root`` missing, or a train case's image or label missing.
        DatalistError: ``labeled`` / ``num_validation`` out of range, or a case found twice.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatalistNotFoundError(f"Synapse root {root} is not a folder")
    split_path, spec = _load_split("synapse", split)
    train, test = list(spec["train"]), list(spec["test"])
    labeled, num_validation = int(labeled), int(num_validation)
    if labeled < 1 or num_validation < 0 or labeled + num_validation > len(train):
        raise DatalistError(
            f"labeled={labeled}, num_validation={num_validation}: need labeled >= 1, num_validation >= 0 and "
            f"labeled + num_validation <= {len(train)} (train cases in {split_path})"
        )
    images, labels = _find_synapse_files(root)
    sections: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    val_cases = train[len(train) - num_validation :] if num_validation else []
    for i, case in enumerate(train):
        if case not in images:
            raise DatalistNotFoundError(f"Synapse train case {case}: no img{case}.nii.gz under {root}")
        if case not in labels:
            raise DatalistNotFoundError(f"Synapse train case {case}: no label{case}.nii.gz under {root}")
        image, label = _abs(images[case]), _abs(labels[case])
        if i < labeled:
            sections["training"].append({"id": f"case{case}", "image": image, "label": label})
        elif case in val_cases:
            sections["validation"].append({"id": f"case{case}", "image": image, "label": label})
        else:
            sections["unlabeled"].append({"id": f"case{case}", "image": image, "true_label": label})
    missing = []
    for case in test:
        if case not in images:
            missing.append(case)
            continue
        entry = {"id": f"case{case}", "image": _abs(images[case])}
        if case in labels:
            entry["label"] = _abs(labels[case])
        sections["test"].append(entry)
    if missing:
        warnings.warn(f"{len(missing)} Synapse test case(s) not under {root}, skipped: {missing}", stacklevel=2)
    header = {
        "name": f"Synapse_{labeled}labeled",
        "modality": "CT",
        "labels": dict(spec["labels"]),
        "label_mapping": {"orig": list(spec["label_mapping"]["orig"]), "target": list(spec["label_mapping"]["target"])},
        "intensity_window": list(spec["intensity_window"]),
    }
    return _write(out, header, sections)


# ----------------------------------------------------------------------------------------------
# Any folder of NIfTI files
# ----------------------------------------------------------------------------------------------


def _stem(name: str) -> str:
    return _NIFTI_SUFFIX.sub("", name)


def nifti_files(folder: Path, pattern: str) -> dict[str, Path]:
    """``{stem: path}`` of the NIfTI files in ``folder`` matching ``pattern``."""
    return {_stem(p.name): p for p in sorted(folder.glob(pattern)) if p.is_file() and _NIFTI_SUFFIX.search(p.name)}


def label_for(stem: str, label_files: Mapping[str, Path], same_folder: bool) -> Path | None:
    if not same_folder and stem in label_files:
        return label_files[stem]
    for suffix in LABEL_SUFFIXES:
        if stem + suffix in label_files:
            return label_files[stem + suffix]
    return None


def match_labels(
    image_dir: Path, label_dir: Path, pattern: str = "*.nii*"
) -> tuple[dict[str, Path], dict[str, Path | None], dict[str, Path]]:
    """Pair the images of ``image_dir`` with their labels in ``label_dir`` by name.

    Returns ``(images, label_of, labels)``: ``{case: image}`` (files matching ``pattern``; when both
    folders are one, the label files next to their images are not cases), ``{case: label or None}``
    (``case`` itself in another folder, else ``case`` + one of :data:`LABEL_SUFFIXES`) and every
    NIfTI file of ``label_dir`` (``{stem: path}``)."""
    same_folder = Path(label_dir).resolve() == Path(image_dir).resolve()
    image_files = nifti_files(Path(image_dir), pattern)
    label_files = nifti_files(Path(label_dir), "*.nii*")
    if same_folder:  # label files next to the images are not cases
        image_files = {
            s: p
            for s, p in image_files.items()
            if not any(s.endswith(x) and s[: -len(x)] in image_files for x in LABEL_SUFFIXES)
        }
    return image_files, {c: label_for(c, label_files, same_folder) for c in image_files}, label_files


def _read_ids(spec: Any, what: str) -> list[str] | int:
    """``labeled`` / ``validation`` / ``test`` argument -> a count or a list of case ids."""
    if isinstance(spec, bool):
        raise DatalistError(f"{what}={spec!r}: give a count or a list of case ids")
    if isinstance(spec, (int, np.integer)):
        if spec < 0:
            raise DatalistError(f"{what}={spec}: a count must be >= 0")
        return int(spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.is_file():
            lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
            return [ln for ln in lines if ln]
        return [s.strip() for s in os.fspath(spec).split(",") if s.strip()]
    if isinstance(spec, Iterable):
        return [str(s) for s in spec]
    raise DatalistError(f"{what}={spec!r}: give a count, a list of case ids or a text file with one id per line")


def _normalize_label_names(label_names: Any, label_paths: Iterable[Path]) -> dict[str, str]:
    if label_names is None:
        paths = list(label_paths)
        if not paths:
            return {"0": "background"}
        top = max(int(np.max(np.asanyarray(nib.load(p).dataobj))) for p in paths)
        return {"0": "background", **{str(v): f"class_{v}" for v in range(1, top + 1)}}
    if isinstance(label_names, Mapping):
        return {str(k): str(v) for k, v in label_names.items()}
    if isinstance(label_names, (list, tuple)):
        return {str(i): str(v) for i, v in enumerate(label_names)}
    raise DatalistError(f"label_names={label_names!r}: give {{value: name}} or a list of names (index = value)")


def build_folder(
    images: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    labeled: int | Sequence[str] | str = 1,
    validation: int | Sequence[str] | str = 0,
    test: int | Sequence[str] | str = 0,
    modality: str = "MRI",
    label_names: Mapping[str, str] | Sequence[str] | None = None,
    pattern: str = "*.nii*",
    name: str | None = None,
) -> str:
    """Write a datalist for any folder of 3D NIfTI images, with labels matched by file name.

    A case's id is its image file name without ``.nii[.gz]``. Its label is the file of the same name
    in ``labels``, or of the same stem plus ``_gt`` / ``_seg`` / ``_label`` (in ``labels``, or next
    to the images when ``labels`` is None; such label files are then not cases themselves).

    ``labeled``, ``validation`` and ``test`` each take a count or the case ids (a list, a
    comma-separated string, or a text file with one id per line; ``#`` starts a comment). Counts:
    ``test`` takes the last N cases (sorted by id); ``validation`` the last N labeled cases not in
    test; ``labeled`` the first N labeled cases not in test or validation. Every other case is
    ``unlabeled`` (with ``true_label`` when it has one). Cases without a label can only be unlabeled
    or test. ``label_names`` defaults to ``class_k`` names up to the largest label value found.
    Returns the datalist path.

    Raises:
        FileNotFoundError: a folder is missing.
        DatalistError: no image matches, unknown / unlabeled / overlapping ids, counts too large.
    """
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise DatalistNotFoundError(f"image folder {image_dir} is not a folder")
    label_dir = Path(labels) if labels is not None else image_dir
    if not label_dir.is_dir():
        raise DatalistNotFoundError(f"label folder {label_dir} is not a folder")
    image_files, case_label, _ = match_labels(image_dir, label_dir, pattern)
    if not image_files:
        raise DatalistError(f"no NIfTI image matching {pattern!r} in {image_dir}")
    case_ids = sorted(image_files)
    with_label = [c for c in case_ids if case_label[c] is not None]

    def check_ids(ids: list[str], what: str, need_label: bool) -> list[str]:
        unknown = [i for i in ids if i not in image_files]
        if unknown:
            raise DatalistError(f"{what}: unknown case id(s) {unknown} (cases are the images of {image_dir})")
        if need_label:
            unlabeled = [i for i in ids if case_label[i] is None]
            if unlabeled:
                raise DatalistError(f"{what}: case(s) {unlabeled} have no label in {label_dir}")
        return ids

    def pick(spec: list[str] | int, what: str, pool: list[str], from_end: bool, need_label: bool) -> list[str]:
        if isinstance(spec, list):
            return check_ids(spec, what, need_label)
        if spec > len(pool):
            raise DatalistError(f"{what}={spec}: only {len(pool)} eligible case(s) in {image_dir}")
        if spec == 0:
            return []
        return pool[len(pool) - spec :] if from_end else pool[:spec]

    test_ids = pick(_read_ids(test, "test"), "test", case_ids, True, False)
    val_pool = [c for c in with_label if c not in test_ids]
    val_ids = pick(_read_ids(validation, "validation"), "validation", val_pool, True, True)
    taken = set(test_ids) | set(val_ids)
    labeled_ids = pick(_read_ids(labeled, "labeled"), "labeled", [c for c in with_label if c not in taken], False, True)
    for a, b, ids_a, ids_b in (
        ("labeled", "validation", labeled_ids, val_ids),
        ("labeled", "test", labeled_ids, test_ids),
        ("validation", "test", val_ids, test_ids),
    ):
        both = sorted(set(ids_a) & set(ids_b))
        if both:
            raise DatalistError(f"case(s) {both} are both {a} and {b}")

    sections: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    for case in case_ids:
        image, label = _abs(image_files[case]), case_label[case]
        if case in test_ids:
            entry = {"id": case, "image": image, **({"label": _abs(label)} if label else {})}
            sections["test"].append(entry)
        elif case in val_ids:
            sections["validation"].append({"id": case, "image": image, "label": _abs(label)})
        elif case in labeled_ids:
            sections["training"].append({"id": case, "image": image, "label": _abs(label)})
        else:
            sections["unlabeled"].append({"id": case, "image": image, **({"true_label": _abs(label)} if label else {})})
    header = {
        "name": name or image_dir.resolve().name,
        "modality": modality,
        "labels": _normalize_label_names(label_names, [case_label[c] for c in with_label]),
    }
    return _write(out, header, sections)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _cli(builder):
    """Wrap a builder for fire: run it, then print the one-line summary instead of returning."""

    @functools.wraps(builder)
    def run(*args, **kwargs) -> None:
        print(summarize(builder(*args, **kwargs)))

    return run


def main(argv: list[str] | None = None) -> None:
    """``python -m scripts.data.datalist {acdc,synapse,folder} --root ... --out ...`` (``argv`` for tests)."""
    import fire

    fire.Fire({"acdc": _cli(build_acdc), "synapse": _cli(build_synapse), "folder": _cli(build_folder)}, command=argv)


if __name__ == "__main__":
    main()
