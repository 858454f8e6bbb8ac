"""A testbed site's own PACS: an Orthanc holding the data set, as DICOM MR + SEG.

``python -m privseg.federated.site_pacs WORKDIR NAME OPTIONS_JSON CACHE_DIR`` starts an Orthanc
(:func:`privseg.datasets.orthanc.local_orthanc`, loopback of wherever it runs: inside the site's
network namespace in the testbed), uploads data set ``NAME`` into it
(:func:`privseg.datasets.pacs_upload.upload_dataset`), writes the DICOMweb root to
``WORKDIR/url`` and serves until SIGTERM, when Orthanc is stopped. The site's SuperNode then
reads its subjects over DICOMweb (the ``pacs`` data set) instead of from files.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

#: the phantom is stored preprocessed: read it back as stored (see the ``pacs`` data set)
AS_STORED = {"crop_foreground": False, "normalize": False}


def serve(workdir: Path, name: str, options: dict, cache_dir: Path) -> None:
    """Run the site's PACS holding data set ``name`` until SIGTERM/SIGINT."""
    from privseg.datasets.orthanc import local_orthanc
    from privseg.datasets.pacs_upload import upload_dataset

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with local_orthanc(workdir / "orthanc") as server:
        upload_dataset(name, options, None, server.dicomweb, cache_dir)
        (workdir / "url.tmp").write_text(server.dicomweb)
        (workdir / "url.tmp").rename(workdir / "url")
        stop.wait()


def pacs_dataset(dataset: dict, url: str) -> dict:
    """The ``pacs`` data set config that reads back what :func:`serve` uploaded from
    ``dataset`` (same dims, fractions and cache)."""
    out = {k: v for k, v in dataset.items() if k not in ("name", "options", "root")}
    return {**out, "name": "pacs", "options": {"url": url, **AS_STORED}}


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4]))
