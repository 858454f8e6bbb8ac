"""Preprocessed-array cache: a second load decodes no file; changes invalidate it."""

from __future__ import annotations

import os

import nibabel
import numpy as np
import pytest
from datamakers import feta_files, make_feta, make_msd, make_pets

from privseg.datasets import load_dataset


def _no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a file was decoded on a cached load")

    monkeypatch.setattr(nibabel, "load", refuse)
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "open", refuse)


@pytest.mark.parametrize("kind", ["feta", "msd", "pets"])
def test_second_load_decodes_nothing(kind, tmp_path, monkeypatch):
    make = {"feta": make_feta, "msd": make_msd, "pets": make_pets}[kind]
    root = make(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_dataset(kind, {}, root, cache)
    _no_decoding(monkeypatch)
    second = load_dataset(kind, {}, root, cache)
    assert [s.subject_id for s in second.subjects] == [s.subject_id for s in first.subjects]
    for a, b in zip(first.subjects, second.subjects, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        assert a.meta == b.meta and a.site == b.site
    folders = list(cache.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith(f"{kind}-")
    assert not [p for p in folders[0].iterdir() if p.name.endswith(".tmp")]
    second.subjects[0].image[...] = 7.0  # copy-on-write: the cache files stay as they were
    third = load_dataset(kind, {}, root, cache)
    assert np.array_equal(third.subjects[0].image, first.subjects[0].image)


def test_changed_file_or_option_misses_the_cache(tmp_path):
    root = make_feta(tmp_path / "data", n_subjects=2)
    cache = tmp_path / "cache"
    load_dataset("feta", {}, root, cache)
    load_dataset("feta", {"crop_margin": 1}, root, cache)
    assert len(list(cache.iterdir())) == 2
    t2w, _ = feta_files(root, 0)
    st = t2w.stat()
    os.utime(t2w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_dataset("feta", {}, root, cache)
    assert len(list(cache.iterdir())) == 3


def test_incomplete_cache_is_rebuilt(tmp_path):
    root = make_feta(tmp_path / "data", n_subjects=2)
    cache = tmp_path / "cache"
    first = load_dataset("feta", {}, root, cache)
    folder = next(cache.iterdir())
    (folder / "index.json").unlink()  # as if interrupted before the index was written
    again = load_dataset("feta", {}, root, cache)
    assert np.array_equal(first.subjects[1].image, again.subjects[1].image)
    assert (folder / "index.json").is_file()
