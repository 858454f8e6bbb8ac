"""Persistent cache of preprocessed subjects, so that files are decoded once.

A cache folder ``<cache_dir>/<dataset>-<key>/`` holds one ``.npy`` pair per subject and an
``index.json`` written last. The key hashes the data set name, its options, the cache format
version and every source file's path, size and modification time (plus each subject's site
and metadata), so editing, adding or removing a file, or changing an option, gives a new
folder. Every write is atomic (temporary file, then rename), so an interrupted run never
leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

from privseg.datasets.base import DatasetOptions, Subject
from privseg.datasets.manifest import Manifest

CACHE_VERSION = 1
INDEX = "index.json"


def _stat(path: Path) -> list:
    try:
        st = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def cache_key(manifest: Manifest, options: DatasetOptions) -> str:
    """Hash of everything the preprocessed arrays depend on."""
    cases = [[c.subject_id, c.site, c.meta, [_stat(p) for p in c.files]] for c in manifest.cases]
    return source_key(manifest.name, options, cases)


def source_key(name: str, options: DatasetOptions, sources: list) -> str:
    """Hash of a data set's name, options, the cache version and a description of its sources.

    File loaders describe each file by path, size and mtime; a PACS by its studies' UIDs and
    instance counts.
    """
    payload = {
        "version": CACHE_VERSION,
        "name": name,
        "options": options.model_dump(mode="json"),
        "cases": sources,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cache_path(cache_dir: Path, manifest: Manifest, options: DatasetOptions) -> Path:
    """The cache folder of this data set, with these options and these files."""
    return Path(cache_dir) / f"{manifest.name}-{cache_key(manifest, options)}"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` (.npy) atomically."""
    _atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def save_index(folder: Path, entries: list[dict], info: dict) -> None:
    """Write the index (last), which marks the cache folder complete."""
    blob = json.dumps({"info": info, "subjects": entries}, indent=1, default=str).encode()
    _atomic(folder / INDEX, lambda f: f.write(blob))


def file_stem(i: int, subject_id: str) -> str:
    """A file-system safe, unique stem for subject number ``i``."""
    return f"{i:05d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', subject_id)}"


def read_cache(folder: Path, mmap: bool = True) -> list[Subject] | None:
    """The cached subjects; None unless the folder is complete.

    Arrays are memory-mapped copy-on-write: writable (``torch.as_tensor`` accepts them without
    a warning), but writes stay in this process and never reach the cache files.
    """
    index = folder / INDEX
    if not index.is_file():
        return None
    try:
        entries = json.loads(index.read_text())["subjects"]
        mode = "c" if mmap else None
        return [
            Subject(
                subject_id=e["subject_id"],
                site=e["site"],
                image=np.load(folder / f"{e['stem']}.image.npy", mmap_mode=mode),
                label=np.load(folder / f"{e['stem']}.label.npy", mmap_mode=mode),
                meta=e["meta"],
            )
            for e in entries
        ]
    except (OSError, ValueError, KeyError):
        return None  # damaged cache: rebuild
