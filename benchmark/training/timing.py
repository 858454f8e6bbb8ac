"""Step timing and GPU busy time without stalling the GPU.

A training loop that calls ``torch.cuda.synchronize()`` after every step to time it also stops
the host from queueing the next step (and loading its batch) while the GPU works. Here steps
are timed by CUDA events, read once per epoch, and the GPU's busy share is sampled from NVML
(``torch.cuda.utilization``: the percentage of time a kernel was running, as ``nvidia-smi``
reports it) by a background thread. On CPU both fall back to wall-clock time / nothing.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StepTimer:
    """Per-step durations: CUDA events on a GPU (no host sync), wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._wall: list[float] = []

    @contextmanager
    def step(self) -> Iterator[None]:
        """Time the enclosed step."""
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self._events.append((begin, end))
        else:
            t0 = time.perf_counter()
            yield
            self._wall.append(time.perf_counter() - t0)

    def collect(self) -> list[float]:
        """Seconds per step since the last call (waits for the GPU once, here)."""
        if self.cuda:
            if self._events:
                self._events[-1][1].synchronize()
            out = [b.elapsed_time(e) / 1e3 for b, e in self._events]
            self._events = []
            return out
        out, self._wall = self._wall, []
        return out


class GpuBusySampler:
    """Mean NVML GPU utilisation (%) while training runs; ``None`` on CPU or without NVML.

    Sampling starts on construction and stops on :meth:`stop` or when a ``with`` block exits.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.5):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        if device.type != "cuda":
            return
        try:
            torch.cuda.utilization(device)
        except Exception:  # no pynvml / NVML not reachable: report nothing rather than guess
            return
        self._device, self._interval = device, interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.samples.append(float(torch.cuda.utilization(self._device)))

    def stop(self) -> None:
        """Stop sampling (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> GpuBusySampler:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def mean_percent(self) -> float | None:
        """Mean of the samples taken, or ``None`` if none were."""
        self.stop()
        return statistics.fmean(self.samples) if self.samples else None


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; ``None`` elsewhere).

    Read at the start of a run it is what came before it: the interpreter's start, the
    imports and the command line (for a sweep worker, its earlier runs too).
    """
    try:
        with open("/proc/self/stat") as f:
            # field 22 (starttime, clock ticks after boot) follows the ')' closing the name
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
