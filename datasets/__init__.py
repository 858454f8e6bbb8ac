"""Data set registry (``privseg.datasets``): the phantom plus real data loaders."""

from privseg.datasets import brats, dicom, feta, msd, pets, phantom  # noqa: F401  (registers)
from privseg.datasets.base import (
    DatasetOptions,
    Subject,
    SubjectSet,
    get_dataset_entry,
    list_datasets,
    load_dataset,
    register_dataset,
)
from privseg.datasets.check import check_dataset, data_check_report, summarise
from privseg.datasets.faults import DataValidationError, Fault
from privseg.datasets.partition import partition_sites
from privseg.datasets.split import split_subjects

__all__ = [
    "DataValidationError",
    "DatasetOptions",
    "Fault",
    "Subject",
    "SubjectSet",
    "check_dataset",
    "data_check_report",
    "get_dataset_entry",
    "list_datasets",
    "load_dataset",
    "partition_sites",
    "register_dataset",
    "split_subjects",
    "summarise",
]
