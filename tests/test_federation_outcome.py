"""``privseg federated run`` reports the run's real outcome when ``flwr`` loses the SuperLink
(issue 18: a SuperLink restarted mid-run, the run completed, ``flwr run`` exited 1)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from test_federated import tiny

from privseg.config import parse_config
from privseg.federated import federation
from privseg.record import run_dir, write_record

LOST = "Successfully started run 7\nConnection to the SuperLink is unavailable\n"


def fake_flwr(tmp_path: Path, monkeypatch, output: str, code: int) -> None:
    """``flwr`` replaced by a script that prints ``output`` and exits ``code``."""
    script = tmp_path / "flwr"
    script.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {code}\n")
    script.chmod(0o755)
    monkeypatch.setattr(federation, "flower_command", lambda name: str(script))


def write_later(directory: Path, record: dict, after_s: float) -> threading.Thread:
    """The ServerApp's record landing ``after_s`` seconds from now."""
    def land():
        time.sleep(after_s)
        write_record(directory, record)
    t = threading.Thread(target=land)
    t.start()
    return t


def run(cfg, tmp_path, wait):
    return federation.run_federation(cfg, 3, superlink="127.0.0.1:9", output_dir=tmp_path /
                                     "runs", lost_wait=wait)


@pytest.fixture
def cfg(tmp_path):
    return parse_config(tiny(tmp_path))


def test_lost_connection_then_the_record_lands_is_success(cfg, tmp_path, monkeypatch):
    fake_flwr(tmp_path, monkeypatch, LOST, 1)
    monkeypatch.setattr(federation, "RECORD_GRACE_S", 0.5)
    directory = run_dir(tmp_path / "runs", cfg.run_id())
    t = write_later(directory, {"run_id": cfg.run_id(), "marker": "done",
                                "federated": {"transport": {"flower_run_id": 7}}}, 1.5)
    record = run(cfg, tmp_path, wait=20)
    t.join()
    assert record["marker"] == "done" and record["status"] == "complete"


def test_lost_connection_and_a_failed_record_is_failure(cfg, tmp_path, monkeypatch):
    fake_flwr(tmp_path, monkeypatch, LOST, 1)
    directory = run_dir(tmp_path / "runs", cfg.run_id())
    write_record(directory, {"status": "failed", "error": "RuntimeError: round 2: 1 of 3",
                             "rounds_done": 1, "federated": {"transport": {"flower_run_id": 7}}})
    with pytest.raises(RuntimeError, match="failed after 1 round.*round 2: 1 of 3"):
        run(cfg, tmp_path, wait=5)


def test_another_runs_record_is_not_this_runs_outcome(cfg, tmp_path, monkeypatch):
    fake_flwr(tmp_path, monkeypatch, LOST, 1)
    monkeypatch.setattr(federation, "RECORD_GRACE_S", 0.5)
    directory = run_dir(tmp_path / "runs", cfg.run_id())
    write_record(directory, {"federated": {"transport": {"flower_run_id": 6}}})
    with pytest.raises(RuntimeError, match="run 7 left no record.*exit 1"):
        run(cfg, tmp_path, wait=1)


def test_a_run_that_never_started_fails_at_once(cfg, tmp_path, monkeypatch):
    fake_flwr(tmp_path, monkeypatch, "Connection to the SuperLink is unavailable\n", 1)
    with pytest.raises(RuntimeError, match="`flwr run` failed \\(exit 1\\)"):
        run(cfg, tmp_path, wait=600)
