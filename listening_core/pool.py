"""``AudioProcessPool``: decoding spread over processes, each speaker pinned to one of them.

Modelled on :class:`concurrent.futures.ProcessPoolExecutor`: :meth:`submit` sends a batch of
decode jobs to one worker and returns a :class:`~concurrent.futures.Future` of the answers. Workers
start lazily, on the first stream assigned to them. Each stream (a speaker's SSRC in one session)
is pinned to the least-loaded worker when first seen, so one speaker's frames always reach the same
decoder in order, and speakers are decoded in parallel. One pool may serve many voice clients.

A worker that dies is noticed by the result thread: the futures of the batches it had in flight
fail with :class:`WorkerDied` (the receiver conceals those frames, so timelines stay aligned),
its streams stay pinned to its slot and a new worker takes the slot on the next submit. A batch
a worker could not decode at all (libopus missing in the worker, a bug) fails its future with
the worker's exception, logged at ERROR once per message; the worker stays.

libopus is loaded in the calling process when the pool is made, so a machine without it gets
:class:`~listening_core.opus.LibopusNotFound`, with the command that installs it, from
``AudioProcessPool()`` (and so from ``vc.listen``), not a session of concealed silence.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import selectors
import sys
import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import PoolClosed, WorkerDied
from .opus import load_libopus
from .unpacker import CLOSE, AudioUnpacker, DecodeAnswer, DecodeJob

_log = logging.getLogger(__name__)

__all__ = ["AudioProcessPool", "PoolClosed", "WorkerDied"]

_WINDOWS = sys.platform == "win32"


@dataclass
class _Worker:
    index: int
    process: AudioUnpacker | None = None
    conn: multiprocessing.connection.Connection | None = None
    pending: collections.deque[tuple[int, Future[list[DecodeAnswer]]]] = field(
        default_factory=collections.deque
    )
    streams: set[Hashable] = field(default_factory=set)
    restarts: int = 0
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    """Orders sends on this worker's pipe; never held with the pool's lock waiting (see submit)."""


class AudioProcessPool:
    """A pool of :class:`~listening_core.unpacker.AudioUnpacker` processes.

    ``max_workers`` defaults to the number of CPUs. Use as a context manager or call
    :meth:`shutdown`; a pool that ``listen`` made for itself is shut down with the session.

    Raises :class:`~listening_core.opus.LibopusNotFound` (saying how to install libopus) when
    libopus cannot be loaded: the workers load it the same way and could not decode anything.
    """

    def __init__(self, max_workers: int | None = None) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        load_libopus()  # here, in the caller, before any process or pipe exists
        self.max_workers: int = max_workers or os.cpu_count() or 1
        self._workers = [_Worker(i) for i in range(self.max_workers)]
        self._pins: dict[Hashable, int] = {}
        self._lock = threading.RLock()
        self._answered = threading.Condition(self._lock)
        """Notified (under the pool's lock) whenever a batch in flight is answered or failed."""
        self._batch_ids = 0
        self._closed = False
        self._stopped_collecting = False
        self._result_thread: threading.Thread | None = None
        self._wakeup_r, self._wakeup_w = multiprocessing.Pipe(duplex=False)
        self._reported: set[str] = set()
        self.restarts: int = 0
        """Workers replaced after they died, over the pool's life."""
        self.wakeups: int = 0
        """How many times the result thread woke up (diagnostics: an idle pool never wakes)."""

    def __enter__(self) -> AudioProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- streams -----------------------------------------------------------------------------

    def worker_for(self, key: Hashable) -> int:
        """The worker ``key``'s stream is pinned to (chosen, least loaded, on first use)."""
        with self._lock:
            index = self._pins.get(key)
            if index is None:
                index = min(self._workers, key=lambda w: (len(w.streams), w.index)).index
                self._pins[key] = index
                self._workers[index].streams.add(key)
            return index

    def release(self, keys: list[Hashable]) -> None:
        """Forget streams: their decoders are closed in the workers."""
        by_worker: dict[int, list[DecodeJob]] = collections.defaultdict(list)
        with self._lock:
            for key in keys:
                index = self._pins.pop(key, None)
                if index is not None:
                    self._workers[index].streams.discard(key)
                    if self._workers[index].process is not None:
                        by_worker[index].append((key, CLOSE, None, 0))
        for index, jobs in by_worker.items():
            if not self._closed:
                self.submit(index, jobs)

    def start(self, workers: int = 1) -> None:
        """Start up to ``workers`` processes now instead of on first use (it takes ~0.1 s each)."""
        with self._lock:
            for worker in self._workers[: min(workers, self.max_workers)]:
                self._ensure_process(worker)

    @property
    def processes(self) -> list[int]:
        """PIDs of the running workers."""
        with self._lock:
            return [
                w.process.pid for w in self._workers if w.process is not None and w.process.pid is not None
            ]

    # -- work --------------------------------------------------------------------------------

    def submit(self, worker: int, jobs: list[DecodeJob]) -> Future[list[DecodeAnswer]]:
        """Send ``jobs`` to ``worker``; the future gets one answer per job, in order."""
        future: Future[list[DecodeAnswer]] = Future()
        w = self._workers[worker]
        # The pipe send happens outside the pool's lock: it blocks when the pipe is full, which
        # happens when the worker is itself blocked sending answers, and the thread that reads
        # those answers needs the pool's lock. (Holding it here deadlocked the session under
        # load.) The worker's send lock keeps the pending list in the pipe's order.
        with w.send_lock:
            with self._lock:
                if self._closed:
                    raise PoolClosed("the AudioProcessPool was shut down")
                self._ensure_process(w)
                self._batch_ids += 1
                batch_id = self._batch_ids
                w.pending.append((batch_id, future))
                conn = w.conn
            try:
                assert conn is not None
                conn.send((batch_id, jobs))
            except (BrokenPipeError, OSError):
                with self._lock:
                    if w.conn is conn:
                        self._worker_died(w)
        return future

    def _ensure_process(self, w: _Worker) -> None:
        if w.process is not None and w.process.is_alive():
            return
        if w.process is not None:
            self._worker_died(w)
        parent, child = multiprocessing.Pipe(duplex=True)
        process = AudioUnpacker(child, w.index)
        process.start()
        child.close()
        w.process, w.conn = process, parent
        self._ensure_result_thread()
        self._wake()

    def _worker_died(self, w: _Worker) -> None:
        """Fail what ``w`` had in flight and forget its process (a new one starts on demand)."""
        if w.process is None:
            return
        exitcode = w.process.exitcode
        _log.warning(
            "decoding worker %d (pid %s) died (exit code %s); %d batch(es) in flight are concealed, "
            "a new worker takes its place",
            w.index,
            w.process.pid,
            exitcode,
            len(w.pending),
        )
        if w.conn is not None:
            w.conn.close()
        w.process, w.conn = None, None
        w.restarts += 1
        self.restarts += 1
        while w.pending:
            _, future = w.pending.popleft()
            future.set_exception(WorkerDied(f"decoding worker {w.index} died with this batch in flight"))
        self._answered.notify_all()

    # -- results -----------------------------------------------------------------------------

    def _ensure_result_thread(self) -> None:
        if self._result_thread is None or not self._result_thread.is_alive():
            self._result_thread = threading.Thread(
                target=self._collect, name="listening-core-pool-results", daemon=True
            )
            self._result_thread.start()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wakeup_w.send_bytes(b"")

    def _collect(self) -> None:
        # Sleeps until a worker answers or dies, or the pool wakes it (a worker started, the pool
        # stops): no timeout, so an idle pool's result thread never wakes. The selector is kept
        # while the set of pipes stays the same (making one per wait cost more than the answer).
        selector: selectors.BaseSelector | None = None
        watched: dict[Any, _Worker] = {}
        try:
            while True:
                with self._lock:
                    if self._stopped_collecting or (
                        self._closed and not any(w.pending for w in self._workers)
                    ):
                        return
                    wanted: dict[Any, _Worker] = {}
                    for w in self._workers:
                        if w.conn is not None:
                            wanted[w.conn] = w
                        if w.process is not None:
                            wanted[w.process.sentinel] = w
                if _WINDOWS:
                    # select() there takes sockets only: wait() knows pipes and process handles
                    try:
                        ready: list[Any] = multiprocessing.connection.wait([self._wakeup_r, *wanted])
                    except (OSError, ValueError):  # a pipe closed under us (see below)
                        self.wakeups += 1
                        continue
                    watched = wanted
                elif selector is None or wanted.keys() != watched.keys():
                    # made afresh whenever a pipe comes or goes: a closed descriptor's number may
                    # be reused by the next worker's
                    if selector is not None:
                        selector.close()
                    selector = selectors.DefaultSelector()
                    selector.register(self._wakeup_r, selectors.EVENT_READ)
                    watched = {}
                    for obj, w in wanted.items():
                        try:
                            selector.register(obj, selectors.EVENT_READ)
                        except (ValueError, OSError):  # closed since the lists were made
                            continue
                        watched[obj] = w
                if not _WINDOWS:
                    assert selector is not None
                    try:
                        ready = [key.fileobj for key, _ in selector.select()]
                    except (OSError, ValueError):
                        # a pipe another thread closed after the lists above were made (its worker
                        # died under a submit): woken by that death, the lists are made again
                        self.wakeups += 1
                        selector.close()
                        selector = None
                        continue
                self.wakeups += 1
                for obj in ready:
                    if obj is self._wakeup_r:
                        try:
                            while self._wakeup_r.poll():
                                self._wakeup_r.recv_bytes()
                        except (EOFError, OSError):
                            return
                        continue
                    worker = watched.get(obj)
                    if worker is None:
                        continue
                    if isinstance(obj, int):  # a sentinel: the process ended
                        with self._lock:
                            if worker.conn is not None and worker.conn in watched:
                                self._drain(worker)
                            if worker.process is not None and not worker.process.is_alive():
                                self._worker_died(worker)
                    else:
                        # (a conn whose worker died since is not read: see _receive)
                        self._receive(worker, obj if worker.conn is obj else None)
        finally:
            if selector is not None:
                selector.close()

    def _drain(self, w: _Worker) -> None:
        conn = w.conn
        while conn is not None and w.conn is conn:
            try:
                if not conn.poll():
                    return
            except (EOFError, OSError):
                return
            self._receive(w, conn)

    def _receive(self, w: _Worker, conn: multiprocessing.connection.Connection | None) -> None:
        if conn is None or w.conn is not conn:
            # its worker died since (the closed pipe woke the wait): a read would wait on the
            # pipe of the worker that took the slot, which may have nothing to say
            return
        try:
            batch_id, answers = conn.recv()
        except (EOFError, OSError):
            with self._lock:
                if w.conn is conn:
                    self._worker_died(w)
            return
        with self._lock:
            if not w.pending or w.pending[0][0] != batch_id:
                _log.error("decoding worker %d answered batch %s out of order", w.index, batch_id)
                return
            _, future = w.pending.popleft()
            self._answered.notify_all()
        if not isinstance(answers, BaseException):
            future.set_result(answers)
            return
        # the worker could not decode this batch at all (libopus missing there...): say it once
        report = f"{type(answers).__name__}: {answers}"
        with self._lock:
            first = report not in self._reported and len(self._reported) < 100
            self._reported.add(report)
        if first:
            _log.error("decoding worker %d could not decode a batch: %s", w.index, report)
        future.set_exception(answers)

    # -- shutdown ----------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, timeout: float = 5.0) -> None:
        """Stop every worker (after in-flight batches are answered when ``wait``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
        deadline = time.monotonic() + timeout
        if wait:
            with self._lock:  # the result thread notifies each answer (or death) it handles
                self._answered.wait_for(
                    lambda: not any(w.pending for w in workers), max(0.0, deadline - time.monotonic())
                )
        # Stop the result thread first: it must not take the workers' exit for a death (and forget
        # them, w.process = None, under our feet), nor wait on sentinels we are about to close.
        self._stopped_collecting = True
        self._wake()
        if self._result_thread is not None:
            self._result_thread.join(2.0)
        with self._lock:
            owned = [(w, w.process, w.conn) for w in workers]
            for w, _, conn in owned:
                # a worker with answers still unread may be blocked writing them and would never
                # read this: it is killed below instead
                if conn is not None and not w.pending:
                    with contextlib.suppress(OSError):
                        conn.send(None)
        for w, process, conn in owned:
            if process is not None:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join(1.0)
                process.close()
            if conn is not None:
                conn.close()
            with self._lock:
                while w.pending:
                    _, future = w.pending.popleft()
                    future.set_exception(PoolClosed("the AudioProcessPool was shut down"))
                w.process, w.conn = None, None
        self._wakeup_r.close()
        self._wakeup_w.close()

    def __repr__(self) -> str:
        return f"<AudioProcessPool workers={len(self.processes)}/{self.max_workers} closed={self._closed}>"
