"""A sweep worker process: trains the runs the runner sends it, one at a time.

Protocol (one JSON object per line): the runner writes ``{"index": i, "config": {...}}`` to the
worker's stdin; the worker answers on its stdout with ``started``, then ``finished`` (status
``complete`` or ``skipped``) or ``failed`` (with the error). Everything else the run prints goes
to stderr (the runner sends it to a log file), so the protocol stream stays clean. A worker is
killed when its runner dies (Linux), so an interrupted sweep leaves no orphans training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
import traceback


def _die_with_parent() -> None:
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def summarize(record: dict) -> dict:
    """The few numbers the runner prints for a finished run."""
    test = record.get("test") or {}
    priv = record.get("privacy") or {}
    eps = priv.get("epsilon")
    return {
        "run_id": record.get("run_id"),
        "mean_dice": test.get("mean_dice"),
        "mean_hd95": test.get("mean_hd95"),
        "epsilon": None if eps in (None, "inf") or (isinstance(eps, float) and math.isinf(eps))
        else eps,
        "private": bool(priv.get("enabled")),
        "total_s": (record.get("timing") or {}).get("total_s"),
        "audit_epsilon_lower": (record.get("audit") or {}).get("epsilon_lower"),
    }


def main() -> int:
    _die_with_parent()
    # Ctrl-C reaches the whole process group: the runner stops the workers and prints how to
    # resume; a worker's own KeyboardInterrupt would only leave a traceback in its log.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep the protocol on the original stdout; route fd 1 (prints from any library) to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import warnings

    warnings.filterwarnings("ignore")

    def send(**event) -> None:
        proto.write(json.dumps(event) + "\n")
        proto.flush()

    from privseg.config import parse_config
    from privseg.record import read_record, run_dir
    from privseg.run import run

    send(event="ready", pid=os.getpid())
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        index = job["index"]
        start = time.perf_counter()
        try:
            cfg = parse_config(job["config"], source=f"sweep run {index}")
            existing = read_record(run_dir(cfg.output.dir, cfg.run_id()))
            if existing is not None:
                send(event="finished", index=index, status="skipped",
                     summary=summarize(existing), seconds=0.0)
                continue
            send(event="started", index=index, run_id=cfg.run_id(), pid=os.getpid())
            print(f"=== run {index} {cfg.run_id()} {cfg.name}", file=sys.stderr, flush=True)
            record = run(cfg, progress=False)
            send(event="finished", index=index, status="complete", summary=summarize(record),
                 seconds=time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - a failed run is reported, the worker goes on
            traceback.print_exc()
            send(event="failed", index=index, error=f"{type(e).__name__}: {e}",
                 seconds=time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
