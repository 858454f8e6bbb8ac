"""The run record: one self-contained JSON file per run, written atomically.

A record is written to a temporary file in the same directory, flushed, fsynced and renamed
over ``record.json``: a crash leaves either no record or the previous complete one, never a
half-written file that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

RECORD_NAME = "record.json"
RECORD_SCHEMA = 1


def run_dir(output_dir: str | Path, run_id: str) -> Path:
    """Directory holding one run's record, checkpoint and W&B files."""
    return Path(output_dir) / run_id


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings/None and numpy scalars as Python ones (JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return json_safe(obj.item())
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(directory: Path, record: dict) -> Path:
    """Atomically write ``record`` (marked complete) as ``directory/record.json``."""
    record = {"schema": RECORD_SCHEMA, "status": "complete", **record}
    path = Path(directory) / RECORD_NAME
    atomic_write_text(path, json.dumps(json_safe(record), indent=2, sort_keys=False))
    return path


def read_any_record(directory: Path) -> dict | None:
    """The record in ``directory`` whatever its status (``complete`` or ``failed``: a run
    that could not go on), or None if there is none."""
    path = Path(directory) / RECORD_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def read_record(directory: Path) -> dict | None:
    """The complete record in ``directory``, or None if there is none (or it failed)."""
    record = read_any_record(directory)
    return record if record is not None and record.get("status") == "complete" else None


def last_validation_dice(record: dict) -> float | None:
    """The mean Dice of a run's last validation (its ``history``), or None: what a tuning
    sweep selects on, read alike from records and from W&B summaries."""
    vals = [row["val_mean_dice"] for row in record.get("history") or []
            if row.get("val_mean_dice") is not None]
    return vals[-1] if vals else None


def environment(device: str) -> dict:
    """Versions and hardware that a reviewer needs to reproduce a run."""
    import monai
    import opacus
    import torch

    import privseg

    env = {
        "privseg": privseg.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "monai": monai.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env
