"""Subject-level train / validation / test splits, deterministic by seed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping

import numpy as np


def split_subjects(
    subject_ids: Iterable[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify_by: Mapping[str, Hashable] | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """Split subjects (never slices) into sorted (train, val, test) id lists.

    The result depends only on the set of ids, the fractions and ``seed`` (not on the input
    order). Sizes are ``n * fraction`` rounded half up, for val and test. With ``stratify_by``
    (id -> stratum, e.g. site or pathology) each stratum is split in proportion, the rounding
    carried over between strata so the overall sizes stay as close to that as the strata
    allow.
    """
    ids = sorted(set(subject_ids))
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1:
        raise ValueError("val_fraction and test_fraction must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction + test_fraction must be below 1")
    rng = np.random.default_rng(seed)
    strata: dict[Hashable, list[str]] = defaultdict(list)
    for sid in ids:
        strata[stratify_by.get(sid) if stratify_by is not None else None].append(sid)
    train: list[str] = []
    val: list[str] = []
    test: list[str] = []
    seen = 0
    for key in sorted(strata, key=repr):
        members = [strata[key][i] for i in rng.permutation(len(strata[key]))]
        before = seen
        seen += len(members)
        n_test = min(_round(seen * test_fraction) - _round(before * test_fraction), len(members))
        n_val = _round(seen * val_fraction) - _round(before * val_fraction)
        n_val = min(n_val, len(members) - n_test)
        test += members[:n_test]
        val += members[n_test : n_test + n_val]
        train += members[n_test + n_val :]
    return sorted(train), sorted(val), sorted(test)


def _round(x: float) -> int:
    return int(np.floor(x + 0.5 + 1e-9))
