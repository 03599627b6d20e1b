"""Compact, crash-safe storage of pairwise transforms (one folder per engine settings).

Layout of a store folder::

    settings.json           the engine settings that produced it (the folder name is derived from them)
    batches/batch_NNNNN.npz one file per committed batch (written atomically), while a run is going
    transforms.npz          consolidated table: fixed_ids, moving_ids, matrices (N, 4, 4) RAS world,
                            status ("ok"/"failed"), reason, metric, seconds
    fields.h5               consolidated displacement fields, one dataset per pair
                            ("<fixed_id>|<moving_id>", shape (3, gi, gj, gk), attribute "affine")

A killed run loses at most the batch in flight: every batch file appears whole or not at all,
and on restart the finished pairs (including failed ones, with their reason) are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from ..data.atomic_io import atomic_path, write_json
from .engine import INPUT_ERROR, PairResult
from .transform import PairTransform

_BATCH = re.compile(r"^batch_(\d+)\.npz$")


class StoreError(ValueError):
    """A store file is unreadable or inconsistent."""


def settings_key(settings: dict) -> str:
    """A short stable folder name for ``settings``: ``<engine>_<affine|deformable>_<hash8>``."""
    text = json.dumps(settings, sort_keys=True)
    kind = "deformable" if settings.get("deformable") or settings.get("bspline") else "affine"
    return f"{settings.get('engine', 'engine')}_{kind}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def field_key(fixed_id: str, moving_id: str) -> str:
    """HDF5 dataset name of the field of pair (fixed, moving)."""
    return f"{fixed_id}|{moving_id}"


@dataclass
class TransformTable:
    """All stored pairs of one store, in memory."""

    fixed_ids: list[str] = field(default_factory=list)
    moving_ids: list[str] = field(default_factory=list)
    matrices: np.ndarray = field(default_factory=lambda: np.zeros((0, 4, 4)))
    status: list[str] = field(default_factory=list)
    reason: list[str] = field(default_factory=list)
    metric: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fields: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {(f, m): n for n, (f, m) in enumerate(zip(self.fixed_ids, self.moving_ids))}

    def __len__(self) -> int:
        return len(self.fixed_ids)

    def keys(self) -> list[tuple[str, str]]:
        return list(zip(self.fixed_ids, self.moving_ids))

    def get(self, fixed_id: str, moving_id: str) -> PairTransform | None:
        """``T_ij`` for fixed i, moving j; ``None`` when missing or failed."""
        n = self._index.get((fixed_id, moving_id))
        if n is None or self.status[n] != "ok":
            return None
        f = self.fields.get(field_key(fixed_id, moving_id))
        if f is None:
            return PairTransform(self.matrices[n])
        return PairTransform(self.matrices[n], f[0], f[1])

    def failures(self) -> list[dict]:
        """``[{"fixed", "moving", "status", "reason"}]`` for every failed pair (``failed`` or ``input_error``)."""
        return [
            {"fixed": f, "moving": m, "status": s, "reason": r}
            for f, m, s, r in zip(self.fixed_ids, self.moving_ids, self.status, self.reason)
            if s != "ok"
        ]

    def as_torch(self, dtype=torch.float32) -> tuple[list[tuple[str, str]], torch.Tensor, torch.Tensor]:
        """``(keys, matrices (N, 4, 4), ok (N,) bool)`` as torch tensors (RAS world ``T_ij``)."""
        ok = torch.tensor([s == "ok" for s in self.status], dtype=torch.bool)
        return self.keys(), torch.as_tensor(self.matrices, dtype=dtype), ok

    @classmethod
    def from_results(cls, results: list[PairResult]) -> "TransformTable":
        mats = np.stack([r.transform.matrix if r.transform is not None else np.full((4, 4), np.nan) for r in results])
        fields = {
            field_key(r.fixed_id, r.moving_id): (r.transform.field, r.transform.field_affine)
            for r in results
            if r.transform is not None and r.transform.field is not None
        }
        return cls(
            [r.fixed_id for r in results],
            [r.moving_id for r in results],
            mats.reshape(-1, 4, 4),
            [r.status for r in results],
            [r.reason for r in results],
            np.asarray([r.metric for r in results], dtype=np.float64),
            np.asarray([r.seconds for r in results], dtype=np.float64),
            fields,
        )

    @staticmethod
    def merge(tables: list["TransformTable"]) -> "TransformTable":
        """Concatenate tables; a pair present twice keeps its last occurrence."""
        last: dict[tuple[str, str], tuple[int, int]] = {}
        for t, table in enumerate(tables):
            for n, key in enumerate(table.keys()):
                last[key] = (t, n)
        order = sorted(last.values())
        fields: dict = {}
        for table in tables:
            fields.update(table.fields)
        pick = lambda attr: [getattr(tables[t], attr)[n] for t, n in order]  # noqa: E731
        return TransformTable(
            pick("fixed_ids"),
            pick("moving_ids"),
            np.asarray(pick("matrices"), dtype=np.float64).reshape(-1, 4, 4),
            pick("status"),
            pick("reason"),
            np.asarray(pick("metric"), dtype=np.float64),
            np.asarray(pick("seconds"), dtype=np.float64),
            fields,
        )


def _write_npz(path: Path, table: TransformTable, with_fields: bool) -> None:
    arrays = dict(
        fixed_ids=np.asarray(table.fixed_ids, dtype=str),
        moving_ids=np.asarray(table.moving_ids, dtype=str),
        matrices=np.asarray(table.matrices, dtype=np.float64),
        status=np.asarray(table.status, dtype=str),
        reason=np.asarray(table.reason, dtype=str),
        metric=table.metric,
        seconds=table.seconds,
    )
    if with_fields:
        for n, (key, (fld, aff)) in enumerate(table.fields.items()):
            arrays[f"field_key_{n}"] = np.asarray(key)
            arrays[f"field_{n}"] = fld
            arrays[f"field_affine_{n}"] = aff
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _read_npz(path: Path) -> TransformTable:
    try:
        with np.load(path, allow_pickle=False) as z:
            fields = {}
            n = 0
            while f"field_{n}" in z.files:
                fields[str(z[f"field_key_{n}"])] = (z[f"field_{n}"], z[f"field_affine_{n}"])
                n += 1
            return TransformTable(
                [str(s) for s in z["fixed_ids"]],
                [str(s) for s in z["moving_ids"]],
                z["matrices"].reshape(-1, 4, 4),
                [str(s) for s in z["status"]],
                [str(s) for s in z["reason"]],
                z["metric"],
                z["seconds"],
                fields,
            )
    except (OSError, KeyError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable transform table ({exc})") from exc


class TransformStore:
    """A store folder (see module docstring) for one set of engine settings."""

    def __init__(self, root: str | os.PathLike, settings: dict | None = None) -> None:
        self.root = Path(root)
        self.batch_dir = self.root / "batches"
        if settings is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / "settings.json"
            if path.exists():
                old = json.loads(path.read_text())
                if old != json.loads(json.dumps(settings)):
                    raise StoreError(f"{path}: store was made with other settings {old}, not {settings}")
            else:
                write_json(path, settings)

    @property
    def table_path(self) -> Path:
        return self.root / "transforms.npz"

    @property
    def fields_path(self) -> Path:
        return self.root / "fields.h5"

    def _batch_files(self) -> list[Path]:
        if not self.batch_dir.is_dir():
            return []
        return sorted(p for p in self.batch_dir.iterdir() if _BATCH.match(p.name))

    def commit(self, results: list[PairResult]) -> Path | None:
        """Write one batch of results atomically; returns the batch file (``None`` if empty)."""
        if not results:
            return None
        self.batch_dir.mkdir(parents=True, exist_ok=True)
        numbers = [int(_BATCH.match(p.name).group(1)) for p in self._batch_files()]
        path = self.batch_dir / f"batch_{(max(numbers) + 1) if numbers else 0:05d}.npz"
        _write_npz(path, TransformTable.from_results(results), with_fields=True)
        return path

    def load(self) -> TransformTable:
        """Consolidated table plus any batches committed after the last consolidation."""
        tables = []
        if self.table_path.exists():
            table = _read_npz(self.table_path)
            if self.fields_path.exists():
                table.fields.update(read_fields(self.fields_path))
            tables.append(table)
        tables += [_read_npz(p) for p in self._batch_files()]
        return TransformTable.merge(tables) if tables else TransformTable()

    def done(self) -> set[tuple[str, str]]:
        """Keys of all finished pairs (succeeded, or failed to register); a pair whose volume could not be
        read (``INPUT_ERROR``) is not finished: the next run registers it again."""
        table = self.load()
        return {k for k, s in zip(table.keys(), table.status) if s != INPUT_ERROR}

    def consolidate(self) -> TransformTable:
        """Fold all batches into ``transforms.npz`` (+ ``fields.h5``), then delete the batch files."""
        table = self.load()
        batches = self._batch_files()
        if batches or not self.table_path.exists():
            if table.fields:
                write_fields(self.fields_path, table.fields)
            _write_npz(self.table_path, table, with_fields=False)
            for p in batches:
                p.unlink(missing_ok=True)
            if self.batch_dir.is_dir() and not any(self.batch_dir.iterdir()):
                self.batch_dir.rmdir()
        return table


def write_fields(path: Path, fields: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """All displacement fields in one HDF5 file, atomically."""
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            for key, (fld, aff) in fields.items():
                ds = h5.create_dataset(
                    key.replace("/", "_"), data=np.asarray(fld, dtype=np.float32), compression="gzip"
                )
                ds.attrs["affine"] = np.asarray(aff, dtype=np.float64)
                ds.attrs["key"] = key


def read_fields(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Inverse of :func:`write_fields`."""
    try:
        with h5py.File(path, "r") as h5:
            return {str(ds.attrs["key"]): (ds[()], np.asarray(ds.attrs["affine"])) for ds in h5.values()}
    except OSError as exc:
        raise StoreError(f"{path}: unreadable field file ({exc})") from exc


def load_transforms_torch(root: str | os.PathLike, dtype=torch.float32):
    """All stored affine parts of a store as torch: ``(keys, matrices (N, 4, 4), ok (N,))``."""
    return TransformStore(root).load().as_torch(dtype)
