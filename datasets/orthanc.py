"""A private Orthanc PACS on a loopback port, for tests, demos and a site's local PACS.

Orthanc (Jodogne 2018, J. Digit. Imaging 31:283) with its DICOMweb plugin is started with a
generated configuration: its own storage folder, a free loopback HTTP port, the DICOM (DIMSE)
server off, remote access refused, and no authentication (loopback only). It is stopped, and
waited for, when the context exits.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from privseg.processes import stop_process

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc: its base URL and its DICOMweb root."""

    url: str
    storage: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"


def orthanc_binary() -> str | None:
    """Path of the ``Orthanc`` executable, or None when it is not installed."""
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()), None
    )


def dicomweb_plugin() -> Path | None:
    """Path of Orthanc's DICOMweb plugin (Debian package ``orthanc-dicomweb``), or None."""
    for d in PLUGIN_DIRS:
        p = Path(d) / DICOMWEB_PLUGIN
        if p.is_file():
            return p
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {proc.returncode}; log {log}:\n"
                               + log.read_text(errors="replace")[-2000:])
        try:
            with urllib.request.urlopen(f"{url}/dicom-web/studies", timeout=1.0):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"Orthanc at {url} did not answer within {timeout:.0f}s; log {log}")


@contextmanager
def local_orthanc(workdir: Path, timeout: float = 30.0) -> Iterator[OrthancServer]:
    """Run an Orthanc with DICOMweb on 127.0.0.1 (storage under ``workdir``) for the block.

    Raises RuntimeError when Orthanc or its DICOMweb plugin is not installed or does not start.
    """
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None or plugin is None:
        raise RuntimeError("Orthanc with its DICOMweb plugin is not installed "
                           "(Debian: apt-get install orthanc orthanc-dicomweb)")
    workdir = Path(workdir)
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = {
        "Name": "privseg-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpDescribeErrors": True,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    log = workdir / "orthanc.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, str(cfg)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log, timeout)
        yield OrthancServer(url, storage)
    finally:
        stop_process(proc)
