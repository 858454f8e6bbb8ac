"""Faults found in a data set's files, and the error that stops a run on them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    """One problem with one file (or folder): where it is and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DataValidationError(ValueError):
    """Raised by a loader when its files have faults; lists every fault, one per line."""

    def __init__(self, faults: list[Fault], dataset: str = "") -> None:
        self.faults = list(faults)
        what = f"dataset {dataset!r}" if dataset else "dataset"
        lines = [f"{what}: {len(self.faults)} fault(s) in the input files:"]
        lines += [f"  - {f}" for f in self.faults]
        super().__init__("\n".join(lines))
