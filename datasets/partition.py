"""Site partitions for federated runs: which subject lives at which (simulated) clinic.

``natural`` keeps each subject's own site (FeTA: Zurich / Vienna; BraTS 2018-2020:
institution). ``dirichlet`` simulates attribute skew the way federated learning benchmarks
do (Hsu et al. 2019; Li et al. 2022, NIID-Bench): subjects are binned by an attribute (a meta
field such as gestational age or pathology, or the foreground label volume), and each bin is
shared among ``n_sites`` in proportions drawn from a symmetric Dirichlet(alpha); small alpha
gives sites dominated by few bins, large alpha near-identical sites. ``size`` draws site sizes
from Dirichlet(alpha) and assigns subjects at random (quantity skew only). Every partition is
a function of the subjects and the seed alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np

from privseg.datasets.base import Subject

Method = Literal["natural", "dirichlet", "size"]
LABEL_VOLUME = "label_volume"
MAX_DRAWS = 1000


def partition_sites(
    subjects: Sequence[Subject],
    method: Method = "natural",
    n_sites: int | None = None,
    alpha: float = 0.5,
    attribute: str | None = None,
    seed: int = 0,
    *,
    n_bins: int | None = None,
    min_per_site: int = 1,
) -> tuple[dict[str, str], dict]:
    """Assign subjects to sites; returns (subject_id -> site, description for the run record).

    ``attribute`` (dirichlet only) is a ``Subject.meta`` key or ``"label_volume"`` (default:
    number of foreground voxels). Numeric attributes with more than ``n_bins`` distinct values
    are cut into ``n_bins`` quantile bins (default: ``n_sites``); other values are categories,
    missing values a category of their own. Draws are repeated (up to 1000 times) until every
    site holds at least ``min_per_site`` subjects.
    """
    subjects = sorted(subjects, key=lambda s: s.subject_id)
    ids = [s.subject_id for s in subjects]
    if len(set(ids)) != len(ids):
        raise ValueError("subject ids are not unique")
    desc: dict = {"method": method, "seed": seed}
    if method == "natural":
        assignment = {s.subject_id: s.site for s in subjects}
    elif method in ("dirichlet", "size"):
        if n_sites is None or n_sites < 1:
            raise ValueError(f"partition {method!r} needs n_sites >= 1")
        if alpha <= 0:
            raise ValueError("alpha must be positive")
        if n_sites * min_per_site > len(subjects):
            raise ValueError(
                f"{len(subjects)} subjects cannot give {n_sites} sites {min_per_site} each"
            )
        rng = np.random.default_rng(seed)
        if method == "size":
            bins = np.zeros(len(subjects), dtype=int)
            bin_names = ["all"]
        else:
            attribute = attribute or LABEL_VOLUME
            bins, bin_names = _bins(subjects, attribute, n_bins or n_sites)
        by_bin = method == "dirichlet"
        site_of = _dirichlet_assign(bins, n_sites, alpha, rng, min_per_site, by_bin=by_bin)
        names = [f"site{k}" for k in range(n_sites)]
        assignment = {sid: names[k] for sid, k in zip(ids, site_of, strict=True)}
        desc.update(n_sites=n_sites, alpha=alpha, min_per_site=min_per_site)
        if method == "dirichlet":
            desc.update(attribute=attribute, bins=bin_names)
            desc["bin_counts_per_site"] = {
                names[k]: [int(np.sum((site_of == k) & (bins == b))) for b in range(len(bin_names))]
                for k in range(n_sites)
            }
    else:
        raise ValueError(f"unknown partition method {method!r}; use natural, dirichlet or size")
    desc["subjects_per_site"] = dict(sorted(Counter(assignment.values()).items()))
    return assignment, desc


def _attribute_values(subjects: Sequence[Subject], attribute: str) -> list:
    if attribute == LABEL_VOLUME:
        return [int(np.count_nonzero(np.asarray(s.label))) for s in subjects]
    return [s.meta.get(attribute) for s in subjects]


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _bins(subjects: Sequence[Subject], attribute: str, n_bins: int) -> tuple[np.ndarray, list]:
    """Bin index per subject and a name per bin."""
    values = _attribute_values(subjects, attribute)
    missing = [v is None or (_is_number(v) and bool(np.isnan(v))) for v in values]
    present = [v for v, m in zip(values, missing, strict=True) if not m]
    if not present:
        raise ValueError(f"no subject has attribute {attribute!r}")
    numeric = all(_is_number(v) for v in present)
    if numeric and len(set(present)) > n_bins:
        edges = np.quantile(np.asarray(present, dtype=float), np.linspace(0, 1, n_bins + 1))
        inner = edges[1:-1]
        names = [f"[{edges[i]:.4g}, {edges[i + 1]:.4g}]" for i in range(n_bins)]
        keys = [
            n_bins if m else int(np.searchsorted(inner, float(v), side="right"))
            for v, m in zip(values, missing, strict=True)
        ]
    else:
        cats = sorted({str(v) for v in present})
        names = list(cats)
        keys = [
            len(cats) if m else cats.index(str(v))
            for v, m in zip(values, missing, strict=True)
        ]
    if any(k == len(names) for k in keys):
        names.append("missing")
    return np.asarray(keys, dtype=int), names


def _dirichlet_assign(
    bins: np.ndarray,
    n_sites: int,
    alpha: float,
    rng: np.random.Generator,
    min_per_site: int,
    by_bin: bool,
) -> np.ndarray:
    """Site index per subject: each bin split among sites by a Dirichlet(alpha) draw."""
    site_of = np.zeros(len(bins), dtype=int)
    for _ in range(MAX_DRAWS):
        for b in np.unique(bins):
            members = np.flatnonzero(bins == b)
            members = members[rng.permutation(len(members))]
            p = rng.dirichlet(np.full(n_sites, alpha))
            if not by_bin:  # size skew: sizes from p, but at least min_per_site each
                spare = len(members) - n_sites * min_per_site
                counts = min_per_site + _largest_remainder(p * spare)
            else:
                counts = _largest_remainder(p * len(members))
            site_of[members] = np.repeat(np.arange(n_sites), counts)
        if np.bincount(site_of, minlength=n_sites).min() >= min_per_site:
            return site_of
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw gave every one of {n_sites} sites "
        f"{min_per_site} subject(s); raise alpha or lower n_sites"
    )


def _largest_remainder(x: np.ndarray) -> np.ndarray:
    """Integers summing to round(sum(x)), each the floor or ceiling of its share."""
    base = np.floor(x).astype(int)
    rest = int(round(float(x.sum()))) - int(base.sum())
    order = np.argsort(-(x - base), kind="stable")
    base[order[:rest]] += 1
    return base
