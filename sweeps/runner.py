"""The local sweep runner: expand a sweep file and train its runs in worker processes.

- Idempotent by run id: a run whose complete record exists is reported ``skipped`` and not
  trained again; a run killed mid-way has no complete record (records are written atomically
  at the end) and is trained again on the next invocation.
- ``parallel`` worker processes train at once; with several visible GPUs the workers are
  spread over them round-robin (``CUDA_VISIBLE_DEVICES``), on CPU the cores are shared out.
- A failed run (bad config, unsupported setting, exception, killed worker) is reported with its
  error and does not stop the others; :attr:`SweepResult.ok` is false if any failed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from privseg.record import read_record, run_dir
from privseg.sweeps.spec import Sweep, SweepRun, expand
from privseg.sweeps.worker import summarize


@dataclass
class RunOutcome:
    index: int
    label: str
    run_id: str | None
    status: str  # complete | skipped | failed
    error: str | None = None
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SweepResult:
    sweep: str
    output_dir: Path
    outcomes: list[RunOutcome]
    wall_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


def visible_gpus() -> list[str]:
    """GPU ids the workers may use: CUDA_VISIBLE_DEVICES if set, else all CUDA devices."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return []


def worker_env(slot: int, parallel: int, gpus: list[str]) -> dict[str, str]:
    """Environment of worker ``slot``: its GPU (round-robin) and one CPU thread, whatever
    ``parallel`` is, so that a run's numbers never depend on ``-j`` (the run itself pins torch
    to the same count, see :func:`privseg.training.setup.pin_cpu_threads`)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    env["OMP_NUM_THREADS"] = env.get("PRIVSEG_THREADS", "1")
    return env


class _Worker:
    """One worker subprocess and a thread that turns its stdout lines into events."""

    def __init__(self, slot: int, env: dict[str, str], log_path: Path, events: queue.Queue):
        self.slot = slot
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log: IO = open(log_path, "a")  # noqa: SIM115 - closed in close()
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "privseg.sweeps.worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, env=env, text=True, bufsize=1)
        self.current: SweepRun | None = None
        self.started_at = 0.0
        self._thread = threading.Thread(target=self._read, args=(events,), daemon=True)
        self._thread.start()

    def _read(self, events: queue.Queue) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                events.put((self, json.loads(line)))
            except json.JSONDecodeError:
                continue
        events.put((self, {"event": "exit"}))

    def submit(self, run: SweepRun) -> None:
        assert self.proc.stdin is not None and run.config is not None
        self.current = run
        self.started_at = time.perf_counter()
        job = {"index": run.index, "config": run.config.model_dump(mode="json")}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def close(self, kill: bool = False) -> None:
        try:
            if kill and self.proc.poll() is None:
                self.proc.kill()
            elif self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=None if not kill else 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def plan(sweep: Sweep, output_dir: str | None = None) -> tuple[list[SweepRun], dict[int, str]]:
    """Expanded runs and the status each has now: pending, complete, or invalid."""
    runs = expand(sweep, output_dir)
    status = {}
    for r in runs:
        if r.config is None:
            status[r.index] = "invalid"
        elif read_record(run_dir(r.config.output.dir, r.run_id)) is not None:
            status[r.index] = "complete"
        else:
            status[r.index] = "pending"
    return runs, status


def run_sweep(sweep: Sweep, *, parallel: int = 1, output_dir: str | None = None,
              console: Console | None = None, progress: bool = True) -> SweepResult:
    """Train every pending run of ``sweep``; report each as complete, skipped or failed."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    runs, status = plan(sweep, output_dir)
    out_dir = Path(next((r.config.output.dir for r in runs if r.config), output_dir or "runs"))
    outcomes: dict[int, RunOutcome] = {}
    for r in runs:
        if status[r.index] == "invalid":
            outcomes[r.index] = RunOutcome(r.index, r.label, None, "failed",
                                           error=f"invalid config: {r.error}")
        elif status[r.index] == "complete":
            rec = read_record(run_dir(r.config.output.dir, r.run_id)) or {}
            outcomes[r.index] = RunOutcome(r.index, r.label, r.run_id, "skipped",
                                           summary=summarize(rec))
    pending = [r for r in runs if status[r.index] == "pending"]
    # Two points of the sweep may be the same run (e.g. ε = ∞ ignores other privacy keys).
    seen: dict[str, int] = {}
    todo = []
    for r in pending:
        if r.run_id in seen:
            outcomes[r.index] = RunOutcome(r.index, r.label, r.run_id, "skipped",
                                           error=f"same run as #{seen[r.run_id]}")
        else:
            seen[r.run_id] = r.index
            todo.append(r)

    console.print(f"[bold]sweep[/] {sweep.name}: {len(runs)} runs, "
                  f"{sum(o.status == 'skipped' for o in outcomes.values())} already complete, "
                  f"{sum(o.status == 'failed' for o in outcomes.values())} invalid, "
                  f"{len(todo)} to train with {min(parallel, max(len(todo), 1))} worker(s) "
                  f"-> {out_dir}", highlight=False)
    for o in sorted(outcomes.values(), key=lambda o: o.index):
        if o.status == "failed":
            console.print(f"[red]✗ #{o.index} {o.label}: {o.error}[/]", highlight=False)

    if todo:
        _execute(sweep, todo, outcomes, parallel, out_dir, console, progress, len(runs))
    ordered = [outcomes[r.index] for r in runs]
    return SweepResult(sweep.name, out_dir, ordered, time.perf_counter() - t0)


def _execute(sweep: Sweep, todo: list[SweepRun], outcomes: dict[int, RunOutcome],
             parallel: int, out_dir: Path, console: Console, show: bool, n_total: int) -> None:
    gpus = visible_gpus()
    n_workers = max(1, min(parallel, len(todo)))
    log_dir = out_dir / ".sweeps" / sweep.name
    events: queue.Queue = queue.Queue()
    queue_runs = list(todo)
    workers: dict[int, _Worker] = {}
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, disable=not show, transient=False)
    done_before = len(outcomes)

    def spawn(slot: int) -> _Worker:
        w = _Worker(slot, worker_env(slot, n_workers, gpus), log_dir / f"worker-{slot}.log",
                    events)
        workers[slot] = w
        return w

    def feed(w: _Worker) -> None:
        if queue_runs:
            run = queue_runs.pop(0)
            w.submit(run)
            if show:
                bar.reset(slot_tasks[w.slot], total=None,
                          description=f"  worker {w.slot}: #{run.index} {run.label}")
        else:
            w.current = None
            w.close()
            if show:
                bar.update(slot_tasks[w.slot], description=f"  worker {w.slot}: done",
                           total=1, completed=1)

    def report(o: RunOutcome) -> None:
        outcomes[o.index] = o
        bar.advance(total_task)
        s = o.summary
        if o.status == "failed":
            console.print(f"[red]✗ #{o.index} {o.label}: {o.error}[/]", highlight=False)
            return
        dice = f"Dice {s['mean_dice']:.3f}" if s.get("mean_dice") is not None else ""
        eps = f"ε {s['epsilon']:.2f}" if s.get("epsilon") is not None else "non-private"
        if s.get("audit_epsilon_lower") is not None:
            eps += f", audited ε ≥ {s['audit_epsilon_lower']:.2f}"
        word = "done" if o.status == "complete" else "already complete"
        console.print(f"[green]✓[/] #{o.index} {o.label}: {dice}  {eps}  {word} "
                      f"({o.seconds:.0f} s)  run {o.run_id}", highlight=False)

    with bar:
        total_task = bar.add_task(f"[bold]{sweep.name}", total=n_total,
                                  completed=done_before)
        slot_tasks = {s: bar.add_task(f"  worker {s}: starting", total=None)
                      for s in range(n_workers)}
        for s in range(n_workers):
            spawn(s)
        live = set(range(n_workers))
        try:
            while live:
                try:
                    w, ev = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                kind = ev.get("event")
                if kind == "ready":
                    feed(w)
                elif kind == "started":
                    pass
                elif kind in ("finished", "failed"):
                    run = w.current
                    if run is None or run.index != ev.get("index"):
                        continue
                    o = RunOutcome(run.index, run.label, run.run_id,
                                   ev.get("status", "failed"), error=ev.get("error"),
                                   summary=ev.get("summary") or {},
                                   seconds=ev.get("seconds", 0.0))
                    if kind == "failed":
                        o.error = f"{o.error}  (log: {w.log_path})"
                    report(o)
                    w.current = None
                    feed(w)
                elif kind == "exit":
                    code = w.proc.wait()
                    if w.current is not None:
                        run = w.current
                        report(RunOutcome(run.index, run.label, run.run_id, "failed",
                                          error=f"worker process {w.proc.pid} "
                                                f"{_exit_reason(code)} during the run "
                                                f"(log: {w.log_path})",
                                          seconds=time.perf_counter() - w.started_at))
                        w.current = None
                        w.log.close()
                        if queue_runs:  # replace the dead worker
                            spawn(w.slot)
                            continue
                    elif code != 0 and queue_runs:
                        # died before taking a run (e.g. import error): fail the rest
                        for run in queue_runs:
                            report(RunOutcome(run.index, run.label, run.run_id, "failed",
                                              error=f"worker {_exit_reason(code)} before "
                                                    f"training (log: {w.log_path})"))
                        queue_runs.clear()
                    live.discard(w.slot)
        except KeyboardInterrupt:
            for w in workers.values():
                w.close(kill=True)
            raise
        finally:
            for w in workers.values():
                if w.proc.poll() is None:
                    w.close(kill=True)
