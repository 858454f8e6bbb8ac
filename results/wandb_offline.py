"""W&B runs read from their offline folders, shaped like the W&B public API's runs.

An offline run (``offline-run-*/run-ID.wandb``) holds what ``wandb sync`` would upload: the
run's config, name and group, its summary and its exit code. :class:`OfflineApi` serves those
runs through the one method of ``wandb.Api`` that :func:`privseg.results.store.load_wandb`
calls, so the W&B path of the results store can be checked against the records of the same
runs without a W&B server (and a user can tabulate offline runs before syncing them).

The ``.wandb`` file is W&B's transaction log: a 7-byte header, then LevelDB-log framed
protobuf ``Record`` messages in 32 KiB blocks.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7  # ":W&B", magic (uint16), version (uint8)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _frames(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


@dataclass
class OfflineRun:
    """The parts of a ``wandb.apis.public.Run`` the results store reads."""

    id: str
    name: str
    group: str | None
    state: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _update(target: dict, items) -> None:
    for it in items:
        key = it.key or "/".join(it.nested_key)
        if key:
            target[key] = json.loads(it.value_json)


def read_offline_run(folder: str | Path) -> OfflineRun:
    """The run in one ``offline-run-*`` folder (its config, summary, name, group, state)."""
    from wandb.proto import wandb_internal_pb2 as pb

    folder = Path(folder)
    logs = sorted(folder.glob("*.wandb"))
    if not logs:
        raise FileNotFoundError(f"{folder}: no .wandb file")
    run = OfflineRun(id="", name="", group=None, state="running", path=folder)
    for frame in _frames(logs[0]):
        rec = pb.Record()
        rec.ParseFromString(frame)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.id, run.name = rec.run.run_id, rec.run.display_name or rec.run.run_id
            run.group = rec.run.run_group or None
            _update(run.config, rec.run.config.update)
        elif kind == "config":
            _update(run.config, rec.config.update)
        elif kind == "summary":
            _update(run.summary, rec.summary.update)
        elif kind == "exit":
            run.state = "finished" if rec.exit.exit_code == 0 else "failed"
    return run


def offline_run_dirs(root: str | Path) -> list[Path]:
    """Every ``offline-run-*`` folder holding a ``.wandb`` file under ``root``."""
    return sorted(d for d in Path(root).rglob("offline-run-*")
                  if d.is_dir() and any(d.glob("*.wandb")))


class OfflineApi:
    """``wandb.Api`` stand-in over the offline runs under ``root`` (``runs()`` only)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def runs(self, path: str, filters: dict | None = None) -> list[OfflineRun]:
        """The offline runs under ``root`` (``path``, the W&B project, is not checked);
        ``filters={"group": G}`` keeps one group, as the W&B API does."""
        runs = [read_offline_run(d) for d in offline_run_dirs(self.root)]
        group = (filters or {}).get("group")
        return [r for r in runs if group is None or r.group == group]
