"""A deployed run's record of what was spent so far, kept on disk while the run goes on.

A ServerApp that stops cleanly writes a record, complete or failed
(:func:`privseg.federated.server.failed_run_record`). One that is killed cannot: in
Flower's default ``subprocess`` isolation it dies with its SuperLink (a ``kill -9`` of the
SuperLink, a lost machine), and the sites' spend would then be written down nowhere but in
their own ledgers. So the ServerApp rewrites ``progress.json`` beside the record whenever a
round's fit instructions go out and whenever its replies are in: the failed record it would
write if it stopped there, with status ``running``. Its ε counts every step of every round the
sites were sent, the round in flight included
(:meth:`~privseg.federated.server.RecordingStrategy.sample_epsilon_bounds`). When no record
comes, the operator's side (:func:`privseg.federated.federation.run_federation`, so
``privseg federated run`` and the testbed) turns the progress into the run's failed record.
"""

from __future__ import annotations

import json
from pathlib import Path

from privseg.record import atomic_write_text, json_safe, write_record

PROGRESS_NAME = "progress.json"


def write_progress(directory: Path, record: dict) -> Path:
    """Atomically (re)write ``directory/progress.json`` from a would-be failed ``record``."""
    path = Path(directory) / PROGRESS_NAME
    atomic_write_text(path, json.dumps(json_safe({**record, "status": "running"}), indent=2))
    return path


def read_progress(directory: Path) -> dict | None:
    """The progress of the run in ``directory``, or None if there is none."""
    path = Path(directory) / PROGRESS_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def clear_progress(directory: Path) -> None:
    """Remove the progress once the run's own record is written."""
    (Path(directory) / PROGRESS_NAME).unlink(missing_ok=True)


def record_from_progress(directory: Path, flower_run: int, reason: str) -> dict | None:
    """Write the failed record of Flower run ``flower_run`` from its progress, when its
    ServerApp stopped without writing one; None if there is no progress of that run."""
    progress = read_progress(directory)
    if progress is None or progress.get("federated", {}).get("transport", {}).get(
            "flower_run_id") != flower_run:
        return None
    record = {**progress, "status": "failed", "error": f"{reason}; {progress.get('error')}"}
    write_record(Path(directory), record)
    clear_progress(directory)
    return record
