"""Which pairs to register: labeled <-> unlabeled (RSL), REPS partners, labeled <-> evaluation volumes."""

from __future__ import annotations

import random

from .engine import PairSpec


def _both(a: dict, b: dict) -> list[PairSpec]:
    return [PairSpec(a["id"], a["image"], b["id"], b["image"]), PairSpec(b["id"], b["image"], a["id"], a["image"])]


def plan_pairs(
    labeled: list[dict],
    unlabeled: list[dict],
    evaluation: list[dict] | None = None,
    reps_partners: int | str | None = None,
    seed: int = 0,
) -> list[PairSpec]:
    """Ordered, de-duplicated pairs, grouped by fixed volume.

    Args:
        labeled, unlabeled, evaluation: datalist entries (``id``, ``image``).
        reps_partners: ``None``/``0``: no extra pairs; ``"all"``: every ordered pair of training
            volumes (labeled + unlabeled); an int k: k random partners per training volume (both
            directions), deterministic for ``seed``.
    """
    pairs: list[PairSpec] = []
    for q in labeled:
        for u in unlabeled:
            pairs += _both(u, q)
        for v in evaluation or []:
            pairs += _both(v, q)
    train = labeled + unlabeled
    if reps_partners == "all":
        pairs += [
            PairSpec(a["id"], a["image"], b["id"], b["image"]) for a in train for b in train if a["id"] != b["id"]
        ]
    elif reps_partners:
        k = int(reps_partners)
        if k < 0:
            raise ValueError(f"reps_partners must be None, 'all' or a non-negative int, got {reps_partners!r}")
        rng = random.Random(seed)
        for a in train:
            others = [b for b in train if b["id"] != a["id"]]
            for b in rng.sample(others, min(k, len(others))):
                pairs += _both(a, b)
    seen: dict[tuple[str, str], PairSpec] = {}
    for p in pairs:
        seen.setdefault(p.key, p)
    return sorted(seen.values(), key=lambda p: (p.fixed_id, p.moving_id))
