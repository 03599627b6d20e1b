"""Orchestration of a registration run (the object ``configs/registration.yaml`` calls).

``RegistrationRunner.run()``:

1. plans the pairs (labeled <-> unlabeled, optional REPS partners, labeled <-> evaluation volumes),
2. registers the pairs not yet in the store, batch by batch, committing each batch atomically
   (progress bar with ETA; a killed run resumes where it stopped),
3. consolidates the store, selects the best labeled partner of every unlabeled volume (BRS) and
   caches its propagated label on the unlabeled volume's grid,
4. writes ``rsl_datalist.json`` (the input datalist + ``registered_label``, ``partner``,
   ``brs_score`` per unlabeled entry), ``brs.json`` and ``summary.json``; with
   ``random_partner_datalist`` also ``rsl_datalist_random.json``, the same with a random labeled
   partner (registered both ways) instead of the BRS choice (the ablation's "+RSL" row); with
   ``rsl_partners`` k > 1 also ``rsl_datalist_top<k>.json``, whose registered label is the voxel-wise
   majority vote of the k best BRS partners' warped labels (ties to the better-ranked partner),
5. optionally evaluates the registration-only baseline on the evaluation sections.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from ..data.atomic_io import save_nifti, write_json
from ..data.datalist import load_datalist, read_datalist
from ..data.run_folders import lock_folder, release_folder
from ..worker_processes import exit_with_parent
from .baseline import run_baseline
from .brs import BestRegistrationSelector, usable
from .engine import PairSpec, make_engine
from .pairs import plan_pairs
from .propagation import PropagateLabeld, majority_vote
from .store import TransformStore, settings_key

logger = logging.getLogger(__name__)


class RegistrationRunner:
    """Compute, store and use the pairwise registrations of one datalist.

    Args:
        datalist: datalist JSON path.
        output_root: folder under which a sub-folder per settings key is created.
        engine: ``"torch"`` or ``"sitk"``.
        engine_settings: keyword arguments of the engine.
        batch_size: pairs per committed batch.
        reps_partners: see :func:`~scripts.registration.pairs.plan_pairs`.
        evaluation_sections: datalist sections registered with the labeled volumes for the baseline.
        brs: ``{"w_rmse": ..., "w_mi": ..., "spacing": ...}`` for :class:`BestRegistrationSelector`.
        propagation_mode: ``"nearest"`` or ``"onehot"``.
        top_k: also fuse the top-k BRS partners by majority vote in the baseline (0/1: off).
        rsl_partners: k > 1 also writes ``rsl_datalist_top<k>.json`` (RSL from the top-k vote; 1: off).
        num_classes: label classes including background (for one-hot propagation and fusion).
        num_threads: torch intra-op threads per process (``None``: leave as is).
        workers: processes registering batches in parallel (each with its own engine and volume
            cache; only the main process writes the store). ``0``/``1``: in this process. The CPU case:
            a torch engine on CUDA registers in this process (its batches already run in parallel).
        progress: show a progress bar.
    """

    def __init__(
        self,
        datalist: str | os.PathLike,
        output_root: str | os.PathLike,
        engine: str = "torch",
        engine_settings: dict | None = None,
        batch_size: int = 32,
        reps_partners: int | str | None = None,
        evaluation_sections: list[str] | tuple[str, ...] = ("validation",),
        brs: dict | None = None,
        propagation_mode: str = "nearest",
        top_k: int = 3,
        num_classes: int | None = None,
        num_threads: int | None = None,
        workers: int = 0,
        progress: bool = True,
        seed: int = 0,
        random_partner_datalist: bool = False,
        rsl_partners: int = 1,
    ) -> None:
        self.datalist = Path(datalist)
        self.engine_name, self.engine_kwargs = engine, dict(engine_settings or {})
        self.engine = make_engine(engine, **self.engine_kwargs)
        self.settings = self.engine.settings()
        # one folder per (engine settings, datalist content): runs on different datalists never overwrite
        # each other, and the same volumes under another datalist file name reuse the same registrations
        self.output_dir = Path(output_root) / f"{settings_key(self.settings)}_{datalist_key(self.datalist)}"
        self.batch_size = max(1, int(batch_size))
        self.reps_partners = reps_partners
        self.evaluation_sections = list(evaluation_sections or [])
        self.selector = BestRegistrationSelector(**dict(brs or {}))
        self.propagation_mode = propagation_mode
        self.top_k = int(top_k)
        self.num_classes = num_classes
        self.num_threads = num_threads
        self.workers = int(workers or 0)
        self.progress = progress
        self.seed = int(seed)
        self.random_partner_datalist = bool(random_partner_datalist)
        self.rsl_partners = checked_rsl_partners(rsl_partners)
        self.reused = False  # set by run(): True when an earlier run's outputs were complete

    # ------------------------------------------------------------------ data
    def _section(self, name: str) -> list[dict]:
        try:
            return load_datalist(self.datalist, name)
        except KeyError:
            return []

    def entries(self) -> tuple[list[dict], list[dict], list[dict]]:
        """(labeled, unlabeled, evaluation entries with a label)."""
        labeled = self._section("training")
        if not labeled:
            raise ValueError(f"datalist {self.datalist}: the 'training' (labeled) section is empty")
        evaluation = [e for s in self.evaluation_sections for e in self._section(s) if e.get("label")]
        return labeled, self._section("unlabeled"), evaluation

    def plan(self) -> list[PairSpec]:
        """All pairs this run needs."""
        labeled, unlabeled, evaluation = self.entries()
        return plan_pairs(labeled, unlabeled, evaluation, self.reps_partners, self.seed)

    # ------------------------------------------------------------------ registration
    def register(self, pairs: list[PairSpec] | None = None, max_batches: int | None = None) -> TransformStore:
        """Register the pending pairs batch by batch (each batch committed atomically)."""
        lock_folder(self.output_dir, "registration")
        store = TransformStore(self.output_dir, self.settings)
        pairs = self.plan() if pairs is None else pairs
        done = store.done()
        pending = [p for p in pairs if p.key not in done]
        threads = torch.get_num_threads()  # restored below: training may follow in this process
        if self.num_threads and self.workers <= 1:
            torch.set_num_threads(int(self.num_threads))
        bar = tqdm(
            total=len(pairs),
            initial=len(pairs) - len(pending),
            desc="registration",
            unit="pair",
            disable=not self.progress,
        )
        batches = [pending[s : s + self.batch_size] for s in range(0, len(pending), self.batch_size)]
        if max_batches is not None:
            batches = batches[:max_batches]

        def commit(results) -> None:
            store.commit(results)
            failed = sum(not r.ok for r in results)
            if failed:
                logger.warning("%d of %d pairs failed in this batch", failed, len(results))
            bar.update(len(results))

        on_gpu = getattr(getattr(self.engine, "device", None), "type", "cpu") == "cuda"
        if on_gpu and self.workers > 1:
            logger.info(
                "registration on %s: one process drives the GPU (workers=%d applies to the CPU case)",
                self.engine.device,
                self.workers,
            )
        try:
            if self.workers > 1 and not on_gpu:
                self._register_parallel(batches, commit)
            else:
                for batch in batches:
                    commit(self.engine.register_batch(batch))
        finally:
            bar.close()
            torch.set_num_threads(threads)
        return store

    def _register_parallel(self, batches: list[list[PairSpec]], commit) -> None:
        """Batches on ``workers`` processes; results committed here as they arrive."""
        args = (self.engine_name, self.engine_kwargs, self.num_threads or 1)
        ctx = multiprocessing.get_context("spawn")  # no fork after torch threads started
        with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=args) as pool:
            queue = list(batches)
            running = set()
            while queue or running:
                while queue and len(running) < 2 * self.workers:
                    running.add(pool.submit(_register_in_worker, queue.pop(0)))
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    commit(future.result())

    # ------------------------------------------------------------------ BRS + propagation
    def _propagate_parallel(self, propagate: PropagateLabeld, jobs: dict[tuple[str, str], dict]) -> None:
        """Warp the labels of ``jobs`` (``(target id, partner id) -> target entry``) into ``propagate``'s cache on
        ``workers`` processes, with a progress bar; the datalists are then written from the cache. One worker
        (or a single job): nothing here, the writing loop warps them one by one."""
        todo = [
            {**entry, "partner": partner}
            for (target, partner), entry in jobs.items()
            if not propagate.cache_path(target, partner).exists()
        ]
        if self.workers <= 1 or len(todo) < 2:
            return
        ctx = multiprocessing.get_context("spawn")  # no fork after torch threads started
        bar = tqdm(total=len(todo), desc="label propagation", unit="label")
        try:
            with ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_init_propagation_worker, initargs=(propagate,)
            ) as pool:
                for future in [pool.submit(_propagate_in_worker, item) for item in todo]:
                    future.result()
                    bar.update(1)
        finally:
            bar.close()

    def select(self, table, targets: list[dict], labeled: list[dict]) -> dict[str, list]:
        """BRS ranking of labeled partners for every target entry: ``id -> [BRSScore, ...]``."""
        partners = [q["id"] for q in labeled]
        return {t["id"]: self.selector.rank(table, t["id"], t["image"], partners) for t in targets}

    def completed_summary(self, pairs: list[PairSpec], with_baseline: bool) -> dict | None:
        """The stored summary when an earlier run finished every one of ``pairs`` and wrote its outputs."""
        outputs = ["summary.json", "rsl_datalist.json"] + (
            ["rsl_datalist_random.json"] if self.random_partner_datalist else []
        )
        if self.rsl_partners > 1:
            outputs.append(fused_datalist_name(self.rsl_partners))
        if not all((self.output_dir / name).exists() for name in outputs):
            return None
        done = TransformStore(self.output_dir, self.settings).done()
        if any(p.key not in done for p in pairs):
            return None
        try:
            summary = json.loads((self.output_dir / "summary.json").read_text())
        except ValueError:
            return None
        complete = summary.get("pairs") == len(pairs) and ("baseline" in summary) == with_baseline
        return summary if complete else None

    def run(self) -> dict:
        """The whole pipeline (see the module docstring); returns the summary it writes.

        A run whose pairs are all stored and whose outputs were written is not repeated: its summary
        is returned as it is. Trainings that start together on one registration folder take turns: the
        first registers (holding the folder's lock while it writes, not longer), the others wait for it
        and then reuse what it wrote."""
        labeled, unlabeled, evaluation = self.entries()
        pairs = plan_pairs(labeled, unlabeled, evaluation, self.reps_partners, self.seed)
        done = self.completed_summary(pairs, bool(evaluation))
        if done is None:
            lock_folder(self.output_dir, "registration", wait=True)
            try:
                done = self.completed_summary(pairs, bool(evaluation))  # written meanwhile by the one we waited for
                if done is None:
                    self.reused = False
                    return self._run(labeled, unlabeled, evaluation, pairs)
            finally:
                release_folder(self.output_dir)
        self.reused = True
        logger.info("registration: reusing %s (%d pairs, all done)", self.output_dir, len(pairs))
        return done

    def _run(self, labeled: list, unlabeled: list, evaluation: list, pairs: list[PairSpec]) -> dict:
        """Register the pending pairs, select partners, propagate labels, write the datalists and the summary."""
        logger.info("registration: writing %s (%d pairs)", self.output_dir, len(pairs))
        t0 = time.perf_counter()
        self.register(pairs)
        t_reg = time.perf_counter() - t0
        store = TransformStore(self.output_dir)
        table = store.consolidate()
        ranking = self.select(table, unlabeled, labeled)
        propagate = PropagateLabeld(
            "registered_label",
            table,
            {q["id"]: q["label"] for q in labeled},
            self.output_dir / "registered_labels",
            mode=self.propagation_mode,
            num_classes=self.num_classes,
        )
        data = read_datalist(self.datalist)

        def best_partner(ranked):  # BRS: the lowest round-trip score
            return next(iter(usable(ranked, 1)), None)

        rng = random.Random(self.seed)

        def random_partner(ranked):  # "+RSL" without BRS (ablation): any partner registered both ways
            registered = sorted(usable(ranked), key=lambda r: r.partner)
            return rng.choice(registered) if registered else None

        choices = {"rsl_datalist.json": best_partner}
        if self.random_partner_datalist:
            choices["rsl_datalist_random.json"] = random_partner
        unlabeled_entries = data.get("unlabeled", [])
        chosen_by_file = {
            filename: [choose(ranking.get(entry["id"], [])) for entry in unlabeled_entries]
            for filename, choose in choices.items()
        }
        jobs = {
            (entry["id"], chosen.partner): entry
            for picks in chosen_by_file.values()
            for entry, chosen in zip(unlabeled_entries, picks)
            if chosen is not None
        }
        if self.rsl_partners > 1:
            for entry in unlabeled_entries:
                for r in usable(ranking.get(entry["id"], []), self.rsl_partners):
                    jobs[(entry["id"], r.partner)] = entry
        self._propagate_parallel(propagate, jobs)
        for filename in choices:
            out_unlabeled = []
            for entry, chosen in zip(unlabeled_entries, chosen_by_file[filename]):
                entry = dict(entry)
                if chosen is None:
                    entry.update(registered_label=None, partner=None, brs_score=None)
                else:
                    entry = propagate({**entry, "partner": chosen.partner})
                    # relative to the datalist's folder (how datalists resolve paths): the folder can move
                    entry["registered_label"] = os.path.relpath(
                        os.path.abspath(entry["registered_label"]), os.path.abspath(self.output_dir)
                    )
                    entry["brs_score"] = float(chosen.score)
                out_unlabeled.append(entry)
            write_json(self.output_dir / filename, {**data, "unlabeled": out_unlabeled})
        if self.rsl_partners > 1:
            self._write_fused(data, ranking, propagate)
        write_json(self.output_dir / "brs.json", {t: [s.__dict__ for s in scores] for t, scores in ranking.items()})
        summary = {
            "settings": self.settings,
            "output_dir": str(self.output_dir),
            "pairs": len(pairs),
            "failed": table.failures(),
            "registration_seconds": t_reg,
            "median_seconds_per_pair": float(
                torch.tensor([s for s in table.seconds if math.isfinite(s)] or [math.nan]).median()
            ),
        }
        if evaluation:
            summary["baseline"] = run_baseline(
                table,
                labeled,
                evaluation,
                self.selector,
                self.output_dir / "baseline",
                self.top_k,
                self.propagation_mode,
                self.num_classes,
                read_class_names(self.datalist),
                read_label_mapping(self.datalist),
            )
        write_json(self.output_dir / "summary.json", summary)
        logger.info("registration done: %s", json.dumps({k: summary[k] for k in ("pairs", "registration_seconds")}))
        return summary

    def _write_fused(self, data: dict, ranking: dict[str, list], propagate: PropagateLabeld) -> None:
        """``rsl_datalist_top<k>.json``: each unlabeled volume's registered label is the majority vote of
        its k best-ranked partners' warped labels (fewer when fewer registered); ``partner`` and
        ``brs_score`` stay the best partner's (REPS, the RSL reliability weights), ``partners`` lists all."""
        k = self.rsl_partners
        out_dir = self.output_dir / "registered_labels"
        out_unlabeled = []
        for entry in data.get("unlabeled", []):
            entry = dict(entry)
            top = usable(ranking.get(entry["id"], []), k)
            if not top:
                entry.update(registered_label=None, partner=None, brs_score=None, partners=[])
                out_unlabeled.append(entry)
                continue
            path = out_dir / f"{entry['id']}__top{k}.nii.gz"
            if not path.exists():
                warped = [propagate({**entry, "partner": r.partner})["registered_label"] for r in top]
                images = [nib.load(w) for w in warped]
                fused = majority_vote([np.asarray(im.dataobj) for im in images], self.num_classes)
                save_nifti(fused, images[0].affine, path, dtype=np.uint8)
            entry.update(
                registered_label=os.path.relpath(os.path.abspath(path), os.path.abspath(self.output_dir)),
                partner=top[0].partner,
                brs_score=float(top[0].score),
                partners=[r.partner for r in top],
            )
            out_unlabeled.append(entry)
        write_json(self.output_dir / fused_datalist_name(k), {**data, "unlabeled": out_unlabeled})


def checked_rsl_partners(value: int | None) -> int:
    """``rsl_partners`` as a number: 1 (the best BRS partner; ``None`` too) or at least 3 (a vote)."""
    k = 1 if value is None else int(value)
    if k < 1 or k == 2:
        raise ValueError(
            f"rsl_partners must be 1 (the best BRS partner) or at least 3 (a majority vote), got {value}: "
            "a vote of 2 is the best partner's label (every disagreement is a tie it wins)"
        )
    return k


def fused_datalist_name(k: int) -> str:
    """The RSL datalist of the top-``k`` vote (``k > 1``)."""
    return f"rsl_datalist_top{int(k)}.json"


_WORKER_ENGINE = None
_WORKER_PROPAGATE: PropagateLabeld | None = None


def _init_propagation_worker(propagate: PropagateLabeld) -> None:
    """Process-pool initialiser of label propagation: the transforms arrive once per worker, one thread each."""
    global _WORKER_PROPAGATE
    exit_with_parent()
    torch.set_num_threads(1)
    _WORKER_PROPAGATE = propagate


def _propagate_in_worker(item: dict) -> str:
    return _WORKER_PROPAGATE(item)["registered_label"]


def _init_worker(engine: str, settings: dict, threads: int) -> None:
    """Process-pool initialiser: one engine (and volume cache) per worker process, which ends with its parent."""
    global _WORKER_ENGINE
    exit_with_parent()
    torch.set_num_threads(int(threads))
    _WORKER_ENGINE = make_engine(engine, **settings)


def _register_in_worker(batch: list[PairSpec]):
    return _WORKER_ENGINE.register_batch(batch)


def datalist_key(datalist: str | os.PathLike) -> str:
    """A short hash of what a datalist holds (its sections' entries with absolute paths), not its name."""
    data = read_datalist(datalist)
    sections = {s: data.get(s, []) for s in ("training", "unlabeled", "validation", "test")}
    return hashlib.sha1(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:10]


def read_label_mapping(datalist: str | os.PathLike) -> dict[int, int] | None:
    """The datalist's ``label_mapping`` (``{"orig": [...], "target": [...]}``) as ``{raw: class}``, or None."""
    mapping = read_datalist(datalist).get("label_mapping")
    if not mapping:
        return None
    return {int(o): int(t) for o, t in zip(mapping["orig"], mapping["target"])}


def read_class_names(datalist: str | os.PathLike) -> dict[int, str]:
    """Foreground class names of a datalist (``labels`` without background)."""
    labels = read_datalist(datalist).get("labels") or {"1": "1", "2": "2", "3": "3"}
    return {int(k): v for k, v in labels.items() if int(k) != 0}
