"""A data set's file index: which files make which subject, before anything is decoded.

Each real-data loader first builds a :class:`Manifest` from its publisher's folder layout
(cheap: directory listing and small text files only). Validation (:mod:`.validate`),
preprocessing (:mod:`.preprocess`) and caching (:mod:`.cache`) all work from it, and
``privseg data check`` uses the same manifest without loading anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from privseg.datasets.base import DatasetOptions
from privseg.datasets.faults import Fault

Reader = Literal["nifti", "photo"]


@dataclass
class Case:
    """The files of one subject.

    ``images`` holds one file per channel (BraTS: t1, t1ce, t2, flair), or a single file that
    may itself be 4D with the channels last (MSD multi-modal tasks). ``label`` is the label
    map (None only for unlabelled data, which loaders do not return for training).
    """

    subject_id: str
    site: str
    images: tuple[Path, ...]
    label: Path | None
    meta: dict = field(default_factory=dict)

    @property
    def files(self) -> tuple[Path, ...]:
        return self.images + ((self.label,) if self.label is not None else ())


@dataclass
class Manifest:
    """Everything known about a data set from its layout alone.

    ``label_values`` are the raw values allowed in label files; ``label_map`` maps each to its
    contiguous class index (``class_names[i]`` names class ``i``). ``faults`` are layout faults
    found while indexing (missing files, unreadable index files).
    """

    name: str
    root: Path
    cases: list[Case]
    class_names: list[str]
    label_values: tuple[int, ...]
    label_map: dict[int, int]
    in_channels: int
    reader: Reader = "nifti"
    description: str = ""
    eval_regions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)


ManifestBuilder = Callable[[DatasetOptions, Path], Manifest]

_BUILDERS: dict[str, ManifestBuilder] = {}


def register_manifest(name: str) -> Callable[[ManifestBuilder], ManifestBuilder]:
    """Decorator registering the function that indexes data set ``name``'s files."""

    def wrap(fn: ManifestBuilder) -> ManifestBuilder:
        _BUILDERS[name] = fn
        return fn

    return wrap


def get_manifest_builder(name: str) -> ManifestBuilder | None:
    """The indexer of data set ``name``, or None for data sets without files (phantom)."""
    import privseg.datasets  # noqa: F401  (registers all)

    return _BUILDERS.get(name)


def identity_map(n: int) -> dict[int, int]:
    """Label map for data sets whose labels are already ``0..n-1``."""
    return {i: i for i in range(n)}


def missing(path: Path, what: str) -> Fault:
    """A fault for a file the layout requires but that is not there."""
    return Fault(str(path), f"missing {what}")


def select_cases(cases: list[Case], max_subjects: int | None) -> list[Case]:
    """Cases sorted by subject id, cut to the first ``max_subjects`` (None: all)."""
    cases = sorted(cases, key=lambda c: c.subject_id)
    return cases if max_subjects is None else cases[:max_subjects]


def is_hidden(path: Path) -> bool:
    """macOS AppleDouble (``._x``) and other dot files, which publishers' tarballs carry."""
    return path.name.startswith(".")
