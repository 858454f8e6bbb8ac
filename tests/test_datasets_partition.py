"""Site partitions (natural, Dirichlet, size) and subject-level splits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from privseg.datasets import Subject, partition_sites, split_subjects


def _subjects(n: int, seed: int = 0) -> list[Subject]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = np.zeros((2, 4, 4), np.uint8)
        label.flat[: rng.integers(0, 32)] = 1
        out.append(
            Subject(
                subject_id=f"s{i:03d}",
                site="A" if i % 3 else "B",
                image=np.zeros((1, 2, 4, 4), np.float32),
                label=label,
                meta={"pathology": "P" if i % 2 else "N", "gestational_age": 20 + i % 17},
            )
        )
    return out


def test_natural():
    subjects = _subjects(9)
    assignment, desc = partition_sites(subjects, "natural")
    assert assignment == {s.subject_id: s.site for s in subjects}
    assert desc["subjects_per_site"] == {"A": 6, "B": 3}


@pytest.mark.parametrize("method", ["dirichlet", "size"])
def test_reproducible_by_seed_and_covering(method):
    subjects = _subjects(60)
    a, desc = partition_sites(subjects, method, n_sites=4, alpha=0.5, seed=3)
    b, _ = partition_sites(list(reversed(subjects)), method, n_sites=4, alpha=0.5, seed=3)
    c, _ = partition_sites(subjects, method, n_sites=4, alpha=0.5, seed=4)
    assert a == b and a != c
    assert set(a) == {s.subject_id for s in subjects}
    assert set(a.values()) == {"site0", "site1", "site2", "site3"}
    assert sum(desc["subjects_per_site"].values()) == 60 and desc["method"] == method


def _skew(assignment: dict, subjects: list[Subject], key: str) -> float:
    """Mean over sites of the share of the site's most common attribute value."""
    by_site: dict[str, Counter] = {}
    for s in subjects:
        by_site.setdefault(assignment[s.subject_id], Counter())[s.meta[key]] += 1
    return float(np.mean([max(c.values()) / sum(c.values()) for c in by_site.values()]))


def test_dirichlet_alpha_controls_attribute_skew():
    subjects = _subjects(400)
    low, high = [], []
    for seed in range(5):
        a, _ = partition_sites(subjects, "dirichlet", 4, 0.05, "pathology", seed)
        low.append(_skew(a, subjects, "pathology"))
        a, _ = partition_sites(subjects, "dirichlet", 4, 1000.0, "pathology", seed)
        high.append(_skew(a, subjects, "pathology"))
    assert np.mean(low) > 0.85  # small alpha: sites dominated by one pathology
    assert np.mean(high) < 0.6  # large alpha: each site near the global 50/50


def test_dirichlet_shares_follow_the_dirichlet_mean():
    subjects = _subjects(80)
    shares = []
    for seed in range(200):
        a, desc = partition_sites(subjects, "dirichlet", 4, 1.0, "pathology", seed)
        counts = desc["bin_counts_per_site"]
        shares.append([counts[f"site{k}"][0] / 40 for k in range(4)])
    shares = np.array(shares)
    # Dirichlet(1,1,1,1): each share has mean 1/4 and variance (1/4)(3/4)/5 = 0.0375
    assert np.allclose(shares.mean(axis=0), 0.25, atol=0.05)
    assert np.allclose(shares.var(axis=0), 0.0375, atol=0.015)


def test_dirichlet_numeric_and_label_volume_bins():
    subjects = _subjects(40)
    _, desc = partition_sites(subjects, "dirichlet", 2, 0.5, "gestational_age", 0, n_bins=3)
    assert len(desc["bins"]) == 3 and desc["attribute"] == "gestational_age"
    _, desc = partition_sites(subjects, "dirichlet", 3, 0.5, None, 0)
    assert desc["attribute"] == "label_volume" and len(desc["bins"]) == 3


def test_size_skew_and_bad_arguments():
    subjects = _subjects(100)
    _, desc = partition_sites(subjects, "size", 5, 0.1, seed=1)
    sizes = sorted(desc["subjects_per_site"].values())
    assert min(sizes) >= 1 and sizes[-1] > 3 * sizes[0]
    with pytest.raises(ValueError, match="n_sites"):
        partition_sites(subjects, "dirichlet")
    with pytest.raises(ValueError, match="unknown partition"):
        partition_sites(subjects, "random", 2)
    with pytest.raises(ValueError, match="cannot give"):
        partition_sites(subjects[:3], "size", 4)


def test_split_deterministic_disjoint_and_sized():
    ids = [f"s{i:02d}" for i in range(50)]
    tr, va, te = split_subjects(ids, 0.2, 0.1, seed=0)
    assert (len(tr), len(va), len(te)) == (35, 10, 5)
    assert set(tr) | set(va) | set(te) == set(ids) and not set(tr) & set(va)
    assert (tr, va, te) == split_subjects(list(reversed(ids)), 0.2, 0.1, seed=0)
    assert (tr, va, te) != split_subjects(ids, 0.2, 0.1, seed=1)


def test_split_stratified():
    ids = [f"s{i:02d}" for i in range(40)]
    site = {sid: "A" if i < 30 else "B" for i, sid in enumerate(ids)}
    tr, va, te = split_subjects(ids, 0.2, 0.2, seed=0, stratify_by=site)
    assert (len(tr), len(va), len(te)) == (24, 8, 8)
    assert Counter(site[s] for s in te) == {"A": 6, "B": 2}
    with pytest.raises(ValueError):
        split_subjects(ids, 0.6, 0.5, seed=0)
