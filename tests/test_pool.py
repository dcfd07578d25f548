"""AudioProcessPool under a flood: sends and answers crossing in full pipes must not deadlock."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import wait
from typing import Any

import listening_core.pool as pool_module
from listening_core.pool import AudioProcessPool, PoolClosed, WorkerDied
from listening_core.unpacker import PLC


def test_a_flood_of_batches_does_not_deadlock() -> None:
    # Each batch carries 30 jobs with 2000-byte payloads (60 KB, about a pipe's worth) and asks
    # for 30 concealed 120 ms frames back (700 KB): the worker blocks writing answers while more
    # batches wait to be sent to it. The pool once held its lock while sending, and the thread
    # reading answers needed that lock before it read the next one: both sides stopped for good
    # (found by the benchmark at 350 speakers).
    pool = AudioProcessPool(1)
    pool.start(1)
    try:
        worker = pool.worker_for("speaker")
        jobs = [("speaker", PLC, bytes(2000), 5760)] * 30
        futures = []

        def flood() -> None:
            for _ in range(400):
                futures.append(pool.submit(worker, jobs))

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        sender.join(120)
        assert not sender.is_alive(), f"submit() is stuck after {len(futures)} batches: the pool deadlocked"
        done, not_done = wait(futures, timeout=120)
        assert not not_done, f"{len(not_done)} batches never answered"
        assert all(len(f.result()) == 30 for f in done)
    finally:
        pool.shutdown(wait=False)


def test_an_idle_pool_never_wakes_its_result_thread() -> None:
    # it woke every 0.5 s to look around, whatever happened
    with AudioProcessPool(1) as pool:
        pool.start(1)
        worker = pool.worker_for("speaker")
        pool.submit(worker, [("speaker", PLC, None, 960)]).result(10)
        time.sleep(0.2)
        before = pool.wakeups
        time.sleep(1.6)
        assert pool.wakeups == before, f"an idle pool's result thread woke {pool.wakeups - before} times"
        # and it still wakes for an answer
        assert len(pool.submit(worker, [("speaker", PLC, None, 960)]).result(10)) == 1


def test_shutdown_returns_as_soon_as_the_batches_in_flight_are_answered() -> None:
    pool = AudioProcessPool(1)
    pool.start(1)
    worker = pool.worker_for("speaker")
    futures = [pool.submit(worker, [("speaker", PLC, None, 5760)] * 20) for _ in range(20)]
    started = time.monotonic()
    pool.shutdown(wait=True, timeout=30)
    took = time.monotonic() - started
    assert all(len(f.result(0)) == 20 for f in futures)  # answered, not failed with PoolClosed
    assert took < 5, f"shutdown took {took:.2f} s"


def test_shutdown_waits_no_longer_than_its_timeout_for_a_stuck_worker() -> None:
    pool = AudioProcessPool(1)
    pool.start(1)
    worker = pool.worker_for("speaker")
    (pid,) = pool.processes
    os.kill(pid, signal.SIGSTOP)  # never answers
    try:
        future = pool.submit(worker, [("speaker", PLC, None, 960)])
        started = time.monotonic()
        pool.shutdown(wait=True, timeout=0.5)
        took = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert isinstance(future.exception(0), PoolClosed)
    assert 0.4 < took < 3.0, f"shutdown(timeout=0.5) took {took:.2f} s"


def test_a_killed_worker_fails_its_batches_at_once() -> None:
    with AudioProcessPool(1) as pool:
        pool.start(1)
        worker = pool.worker_for("speaker")
        (pid,) = pool.processes
        os.kill(pid, signal.SIGSTOP)
        future = pool.submit(worker, [("speaker", PLC, None, 960)])
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        assert isinstance(future.exception(5), WorkerDied)
        assert time.monotonic() - killed < 1.0
        # a new worker takes the slot
        assert len(pool.submit(worker, [("speaker", PLC, None, 960)]).result(10)) == 1
        assert pool.restarts == 1


def test_the_wait_based_collector_windows_uses_answers_and_notices_deaths(monkeypatch: Any) -> None:
    # On Windows select() takes sockets only, so the result thread waits with
    # multiprocessing.connection.wait there; the same duties, run here on that path.
    monkeypatch.setattr(pool_module, "_WINDOWS", True)
    with AudioProcessPool(1) as pool:
        pool.start(1)
        worker = pool.worker_for("speaker")
        assert len(pool.submit(worker, [("speaker", PLC, None, 960)] * 3).result(10)) == 3
        (pid,) = pool.processes
        os.kill(pid, signal.SIGSTOP)
        future = pool.submit(worker, [("speaker", PLC, None, 960)])
        os.kill(pid, signal.SIGKILL)
        assert isinstance(future.exception(5), WorkerDied)
        assert len(pool.submit(worker, [("speaker", PLC, None, 960)]).result(10)) == 1
        assert pool.restarts == 1
