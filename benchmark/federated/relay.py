"""A userspace TCP relay for one site's link: delay, rate, loss and outages; bytes counted.

The testbed (:mod:`privseg.federated.testbed`) puts one relay between each site's SuperNode and
the SuperLink. It shapes what the kernel cannot (this machine's kernel has no ``netem``; without
root there is no ``tc`` at all) and it counts the bytes that really cross the link, in each
direction, with their time. Modelled as a link with a FIFO queue, per direction (Hemminger 2005,
"Network emulation with NetEm", the model ``netem`` implements in the kernel):

- each chunk read from one side is delivered to the other ``delay_s`` after it arrived;
- at ``rate`` bytes/s, chunks are serialised one after another (a chunk of ``n`` bytes
  occupies the link for ``n / rate`` s, so the delivered rate never exceeds ``rate``);
- a lost chunk is what TCP makes of a lost packet: delivered one retransmission timeout
  (:data:`RTO_S`, Linux's minimum) late, everything behind it waiting (head-of-line);
- while the link is down new connections are refused (accepted and closed at once) and open
  ones stall: nothing is delivered until it is up again.

"up" is the site's direction towards the SuperLink, "down" the SuperLink's towards the site.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from dataclasses import dataclass, field

#: Linux's minimum TCP retransmission timeout (``TCP_RTO_MIN``, 200 ms)
RTO_S = 0.2
#: bytes read from a socket at a time
CHUNK = 16384
#: send buffer of the relay's sockets: small, so that a write completes when the bytes are
#: on the wire (not in an autotuned buffer of megabytes), also under a kernel shaper (tbf)
SEND_BUFFER = 65536
DIRECTIONS = ("up", "down")


@dataclass
class Shaping:
    """What the relay adds to a link, per direction (see the module doc)."""

    delay_s: float = 0.0
    rate_bytes_s: float | None = None
    loss: float = 0.0

    def describe(self) -> str:
        """e.g. ``delay 100 ms, 1.25e+06 B/s, loss 1%`` (``none`` when it adds nothing)."""
        parts = ([f"delay {1000 * self.delay_s:g} ms"] if self.delay_s else []) + (
            [f"{8 * self.rate_bytes_s / 1e6:g} Mbit/s"] if self.rate_bytes_s else []) + (
            [f"loss {100 * self.loss:g}% (as retransmission delay)"] if self.loss else [])
        return ", ".join(parts) or "none"


@dataclass
class Transfer:
    """One chunk delivered: wall-clock time (``time.time()``), direction, bytes."""

    t: float
    direction: str
    n: int


@dataclass
class _Link:
    stall_until: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS,
                                                                               0.0))
    refuse_until: float = 0.0


class LinkRelay:
    """Relay TCP connections from ``listen`` to ``target`` through a shaped link.

    Runs its own asyncio loop in a daemon thread (:meth:`start` / :meth:`stop`); the fault
    controls (:meth:`set_down`, :meth:`stall`) and the counters (:attr:`transfers`,
    :meth:`traffic`) may be used from any thread.
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int],
                 shaping: Shaping | None = None, seed: int | None = None):
        self.listen = listen
        self.target = target
        self.shaping = shaping or Shaping()
        self.rng = random.Random(seed)
        self.transfers: list[Transfer] = []
        self.refused = 0
        self.connections = 0
        self._link = _Link()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> int:
        """Listen and serve in a background thread; returns the port listened on."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"relay-{self.listen[1]}")
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, *self.listen), self._loop).result(10)
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Close the listener and every relayed connection; stop the thread."""
        if self._loop is None:
            return

        async def close() -> None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._loop = None

    # -- faults ------------------------------------------------------------------------------
    def set_down(self, seconds: float) -> None:
        """The link is down for ``seconds`` from now: new connections refused, open ones
        stall in both directions."""
        until = time.monotonic() + seconds
        with self._lock:
            self._link.refuse_until = max(self._link.refuse_until, until)
            for d in DIRECTIONS:
                self._link.stall_until[d] = max(self._link.stall_until[d], until)

    def stall(self, direction: str, seconds: float) -> None:
        """Deliver nothing in ``direction`` ("up"/"down") for ``seconds`` from now (a site
        whose answer is late: a straggler); connections are not refused."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        with self._lock:
            self._link.stall_until[direction] = max(self._link.stall_until[direction],
                                                    time.monotonic() + seconds)

    # -- counters ----------------------------------------------------------------------------
    def traffic(self, t0: float, t1: float) -> dict:
        """Bytes delivered in ``[t0, t1)`` (wall clock) per direction, with the times of the
        first and last chunk of each direction (None when nothing crossed)."""
        with self._lock:
            rows = [x for x in self.transfers if t0 <= x.t < t1]
        out: dict = {}
        for d in DIRECTIONS:
            ts = [x.t for x in rows if x.direction == d]
            out[f"bytes_{d}"] = sum(x.n for x in rows if x.direction == d)
            out[f"first_{d}"] = min(ts) if ts else None
            out[f"last_{d}"] = max(ts) if ts else None
        return out

    def transfer_log(self) -> dict[str, list[list[float]]]:
        """Every chunk delivered, per direction: ``[wall-clock time, bytes]``."""
        with self._lock:
            return {d: [[round(x.t, 4), x.n] for x in self.transfers if x.direction == d]
                    for d in DIRECTIONS}

    # -- relaying ----------------------------------------------------------------------------
    async def _handle(self, c_reader: asyncio.StreamReader,
                      c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        s_writer = None
        try:
            if time.monotonic() < self._link.refuse_until:
                self.refused += 1
                return
            try:
                s_reader, s_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self.connections += 1
            for w in (c_writer, s_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(self._pipe(c_reader, s_writer, "up"),
                                 self._pipe(s_reader, c_writer, "down"))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (c_writer, s_writer):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        """One direction: read as it comes, deliver each chunk when the link model says."""
        queue: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(CHUNK):
                    queue.put_nowait((time.monotonic(), data))
            finally:
                queue.put_nowait(None)

        reading = asyncio.ensure_future(read())
        s = self.shaping
        free_at = 0.0  # when the link has finished serialising the previous chunk
        try:
            while (item := await queue.get()) is not None:
                arrived, data = item
                due = arrived + s.delay_s
                if s.loss and self.rng.random() < s.loss:
                    due += RTO_S
                if s.rate_bytes_s:
                    free_at = max(due, free_at) + len(data) / s.rate_bytes_s
                    due = free_at
                while (wait := max(due, self._link.stall_until[direction])
                       - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                with self._lock:
                    self.transfers.append(Transfer(time.time(), direction, len(data)))
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            reading.cancel()
