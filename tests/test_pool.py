"""AudioProcessPool under a flood: sends and answers crossing in full pipes must not deadlock."""

from __future__ import annotations

import threading
from concurrent.futures import wait

from listening_core.pool import AudioProcessPool
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
