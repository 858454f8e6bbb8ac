"""What every data set hands the engine: an indexed list of subjects in memory.

The privacy unit is the subject (one patient / one scan), so data sets are indexed by subject,
never by slice or patch. Each loader returns a :class:`SubjectSet` of preprocessed volumes;
the engine draws 2D slices or 3D patches from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict


@dataclass
class Subject:
    """One privacy unit: a preprocessed image volume and its label map.

    ``image`` is float32 ``[C, D, H, W]``; ``label`` is integer ``[D, H, W]`` with values in
    ``range(num_classes)``. Natively 2D data has ``D == 1``. 2D mode slices along ``D``.
    """

    subject_id: str
    site: str
    image: np.ndarray
    label: np.ndarray
    meta: dict = field(default_factory=dict)


@dataclass
class SubjectSet:
    """A loaded data set: its subjects plus what a model needs to know about them."""

    name: str
    subjects: list[Subject]
    class_names: list[str]
    in_channels: int
    description: str = ""
    # Classes to report as the challenge does (e.g. BraTS WT/TC/ET), as name -> label values.
    # Empty means per-class Dice over ``class_names[1:]``.
    eval_regions: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def by_id(self) -> dict[str, Subject]:
        return {s.subject_id: s for s in self.subjects}


class DatasetOptions(BaseModel):
    """Base for each data set's typed options; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Callable[..., SubjectSet]
    options: type[DatasetOptions]
    dims: tuple[int, ...]
    description: str
    needs_root: bool


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str,
    *,
    options: type[DatasetOptions],
    description: str,
    dims: tuple[int, ...] = (2, 3),
    needs_root: bool = True,
) -> Callable:
    """Decorator registering a loader ``loader(options, root: Path | None, cache_dir: Path)``.

    ``options`` is the pydantic model validating the config's ``dataset.options``.
    """

    def wrap(loader: Callable[..., SubjectSet]) -> Callable[..., SubjectSet]:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = DatasetEntry(name, loader, options, tuple(dims), description, needs_root)
        return loader

    return wrap


def list_datasets() -> list[str]:
    """Names of registered data sets."""
    _ensure_loaded()
    return sorted(_DATASETS)


def get_dataset_entry(name: str) -> DatasetEntry:
    """Registry entry for ``name``; a KeyError lists the registered names."""
    _ensure_loaded()
    try:
        return _DATASETS[name]
    except KeyError:
        raise KeyError(
            f"unknown dataset {name!r}; registered: {', '.join(sorted(_DATASETS))}"
        ) from None


def load_dataset(
    name: str, options: dict | DatasetOptions, root: str | Path | None, cache_dir: Path
) -> SubjectSet:
    """Validate ``options`` and load data set ``name`` (from cache when possible)."""
    entry = get_dataset_entry(name)
    opts = options if isinstance(options, DatasetOptions) else entry.options(**(options or {}))
    if entry.needs_root and root is None:
        raise ValueError(f"dataset {name!r} needs dataset.root (the downloaded folder)")
    return entry.loader(opts, Path(root) if root is not None else None, Path(cache_dir))


def _ensure_loaded() -> None:
    import privseg.datasets  # noqa: F401
