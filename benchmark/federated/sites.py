"""Which subjects each site holds, and its own train / validation / test split.

Every site splits *its own* subjects (``split_subjects`` on that site's ids alone, with the run
seed), so a clinic that holds only its own scans computes exactly the split the simulation
computes for it: nothing about other sites' subjects is needed. The global test set is the
union of the sites' test subjects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from privseg.config import RunConfig
from privseg.datasets import SubjectSet
from privseg.datasets.base import Subject
from privseg.datasets.partition import partition_sites
from privseg.datasets.split import split_subjects


@dataclass
class SiteData:
    """One site's subjects, split."""

    name: str
    index: int
    train: list[Subject]
    val: list[Subject]
    test: list[Subject]

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def site_seed(seed: int, site: str) -> int:
    """A site's own seed (its loader, noise and crop randomness), derived from the run seed."""
    return int(hashlib.sha256(f"{seed}:{site}".encode()).hexdigest()[:8], 16)


def partition(cfg: RunConfig, subject_set: SubjectSet) -> tuple[dict[str, str], dict]:
    """subject id -> site name, and the partition's description (``partition_sites``)."""
    fed = cfg.setting.federated
    assert fed is not None
    return partition_sites(subject_set.subjects, fed.partition, fed.n_sites, fed.partition_alpha,
                           fed.partition_attribute, cfg.seed)


def build_sites(cfg: RunConfig, subject_set: SubjectSet) -> tuple[dict[str, SiteData], dict]:
    """All sites of the federation (simulation): name -> :class:`SiteData`; plus the partition."""
    assignment, desc = partition(cfg, subject_set)
    names = sorted(set(assignment.values()))
    by_id = subject_set.by_id()
    d = cfg.dataset
    sites = {}
    for i, name in enumerate(names):
        ids = [sid for sid, s in assignment.items() if s == name]
        tr, va, te = split_subjects(ids, d.val_fraction, d.test_fraction, cfg.seed)
        sites[name] = SiteData(name, i, [by_id[x] for x in tr], [by_id[x] for x in va],
                               [by_id[x] for x in te])
    return sites, desc


def build_site(cfg: RunConfig, subject_set: SubjectSet, site: str) -> SiteData:
    """One site's data (deployment): the subjects the partition puts at ``site``."""
    sites, _ = build_sites(cfg, subject_set)
    if site not in sites:
        raise ValueError(f"site {site!r} holds no subjects; sites here: {', '.join(sites)}")
    return sites[site]
