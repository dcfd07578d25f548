"""The receiver's shell: its threads, against a real voice connection on the loopback Discord.

- a decoding worker that stops reading its pipe (a pool whose ``submit`` blocks) must not stall
  the socket listener discord.py's reader thread calls: the send blocked under the lock that
  listener needed, so one slow worker stopped every datagram of the connection;
- the counts a decoded batch brings (corrupt frames concealed) must not be lost to the counts
  the session makes at the same time: the pool's result thread updated :class:`UserStats`
  without the lock the other threads held, and an increment of ``concealed`` could be lost. The
  test parks the result thread in the middle of its increment while the session conceals a lost
  frame, which lost one deterministically;
- an idle session's receiver thread sleeps: it used to wake every 5 ms whatever happened; so does
  its pool's result thread, which woke every 0.5 s;
- ``wait_for_listen_ready`` is woken by the session's end (it polled every 10 ms) and keeps its
  timeout.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from concurrent.futures import Future
from typing import Any

from listening_core import AudioFrame, AudioSink, FrameKind
from listening_core.crypto import OPUS_SILENCE, transport_cipher
from listening_core.pool import AudioProcessPool
from listening_core.receiver import UserStats
from listening_core.rtp import RtpHeader
from listening_core.sinks import FRAME_SAMPLES
from listening_core.testing import FaultConfig, LocalDiscord, Schedule
from listening_core.testing.clients import close_client, join_voice
from listening_core.testing.media import Spurt, load_pcm
from listening_core.unpacker import CONCEALED, DECODE, OK

PCM = bytes(FRAME_SAMPLES * 4)


class FakePool:
    """Stands in for an :class:`~listening_core.pool.AudioProcessPool` of one worker: answers
    each batch from its own result thread (PCM of silence; with ``corrupt``, the first frame of
    every third batch's first received frame as corrupt, concealed). With ``block``, ``submit`` blocks, as a
    pipe send does when the worker stopped reading, until :attr:`unblock` is set."""

    def __init__(self, *, block: bool = False, corrupt: bool = False) -> None:
        self.block, self.corrupt = block, corrupt
        self.entered, self.unblock = threading.Event(), threading.Event()
        self._batches: queue.SimpleQueue[tuple[Future[Any], list[Any]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._answer, name="fake-pool-results", daemon=True)
        self.thread.start()

    def worker_for(self, key: Any) -> int:
        return 0

    def release(self, keys: list[Any]) -> None:
        pass

    def submit(self, worker: int, jobs: list[Any]) -> Future[Any]:
        if self.block:
            self.entered.set()
            self.unblock.wait(30)
        future: Future[Any] = Future()
        self._batches.put((future, jobs))
        return future

    def shutdown(self) -> None:
        self._batches.put(None)

    def _answer(self) -> None:
        n = 0
        while (item := self._batches.get()) is not None:
            future, jobs = item
            answers = [(OK, PCM)] * len(jobs)
            decodes = [i for i, job in enumerate(jobs) if job[1] == DECODE]
            if self.corrupt and n % 3 == 0 and decodes:
                answers[decodes[0]] = (CONCEALED, PCM)
            n += 1
            future.set_result(answers)


class Kinds(AudioSink):
    def __init__(self) -> None:
        self.kinds: dict[int, collections.Counter[FrameKind]] = collections.defaultdict(collections.Counter)

    def on_audio(self, frame: AudioFrame) -> None:
        self.kinds[frame.user_id][frame.kind] += 1


async def _stop(vc: Any) -> None:
    vc.stop_listening()
    await vc.wait_for_listen_ready(timeout=20)


async def test_a_worker_that_stops_reading_does_not_stall_the_socket_listener() -> None:
    pcm = load_pcm("alice")[48_000 * 4 // 5 :]
    pool = FakePool(block=True)
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await join_voice(local)
        try:
            await asyncio.sleep(0.3)
            vc.listen(Kinds(), pool=pool)
            receiver = vc._receiver
            speaking = alice.speak(Schedule([Spurt(0.0, pcm[: 48_000 * 4])]))
            assert await asyncio.to_thread(pool.entered.wait, 10)  # a send is blocked now
            await asyncio.sleep(0.1)
            cipher = transport_cipher(vc.mode, bytes(vc.secret_key))
            packet = cipher.seal_rtp(
                RtpHeader(False, 120, 7, 7 * 960, alice.ssrc), OPUS_SILENCE, counter=1 << 31
            )
            returned = threading.Event()

            def reader() -> None:  # what discord.py's socket reader thread does with a datagram
                receiver.on_datagram(packet)
                returned.set()

            threading.Thread(target=reader, daemon=True).start()
            stalled = not await asyncio.to_thread(returned.wait, 2.0)
            pool.unblock.set()
            await speaking
            await _stop(vc)
            assert not stalled, "the socket listener waited for a decoding worker's pipe"
        finally:
            pool.unblock.set()
            pool.shutdown()
            await close_client(client)


async def test_decoded_counts_are_not_lost_to_the_session_counting_at_the_same_time() -> None:
    pcm = load_pcm("alice")[48_000 * 4 // 5 :]
    pool = FakePool(corrupt=True)
    parked, wrote, go = threading.Event(), threading.Event(), threading.Event()

    class RacyStats(UserStats):
        """Parks the pool's result thread once, in the middle of ``concealed += 1``, until
        another thread has counted a concealed frame too."""

        def __getattribute__(self, name: str) -> Any:
            value = object.__getattribute__(self, name)
            if name == "concealed" and threading.current_thread() is pool.thread and not parked.is_set():
                parked.set()  # the value is read; it is written back plus one when this returns
                go.wait(5)
            return value

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "concealed" and parked.is_set() and threading.current_thread() is not pool.thread:
                wrote.set()
            object.__setattr__(self, name, value)

    async with LocalDiscord(faults=FaultConfig(seed=13, loss=0.15)) as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await join_voice(local)
        try:
            await asyncio.sleep(0.3)
            sink = Kinds()
            vc.listen(sink, pool=pool)
            vc._receiver.stats[alice.user_id] = RacyStats()
            speaking = alice.speak(Schedule([Spurt(0.0, pcm[: 48_000 * 4 * 3])]))
            if await asyncio.to_thread(parked.wait, 5):
                await asyncio.to_thread(wrote.wait, 5)
            go.set()
            await speaking
            await asyncio.sleep(0.3)
            await _stop(vc)
            stats = vc.listening_stats()[alice.user_id]
            kinds = sink.kinds[alice.user_id]
            assert stats.corrupt > 0 and stats.lost > 0
            # every concealed frame the sink got is counted: lost ones and corrupt ones alike
            assert stats.concealed == kinds[FrameKind.PLC], (stats, kinds)
            assert stats.frames == sum(kinds.values())
        finally:
            go.set()
            pool.shutdown()
            await close_client(client)


async def test_an_idle_session_sleeps() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await join_voice(local)
        try:
            await asyncio.sleep(0.3)
            vc.listen(Kinds(), pool=FakePool())
            receiver = vc._receiver
            await asyncio.sleep(0.5)
            before = receiver.wakeups
            await asyncio.sleep(2.0)
            woke = receiver.wakeups - before
            await _stop(vc)
            assert woke <= 10, f"an idle session's receiver thread woke {woke} times in 2 s"
        finally:
            await close_client(client)


async def test_an_idle_session_wakes_neither_the_receiver_nor_the_pools_result_thread() -> None:
    # the pool's result thread woke every 0.5 s whatever happened
    pool = AudioProcessPool(1)
    pool.start(1)
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await join_voice(local)
        try:
            await asyncio.sleep(0.3)
            vc.listen(Kinds(), pool=pool)
            receiver = vc._receiver
            await asyncio.sleep(0.5)
            before = receiver.wakeups, pool.wakeups
            await asyncio.sleep(2.0)
            woke = receiver.wakeups - before[0], pool.wakeups - before[1]
            await _stop(vc)
            assert woke[0] <= 10, f"an idle session's receiver thread woke {woke[0]} times in 2 s"
            assert woke[1] == 0, f"an idle session's pool result thread woke {woke[1]} times in 2 s"
        finally:
            pool.shutdown()
            await close_client(client)


async def test_wait_for_listen_ready_wakes_when_the_session_finishes_and_keeps_its_timeout() -> None:
    release = threading.Event()

    class SlowCleanup(Kinds):
        wants_pcm = False

        def cleanup(self) -> None:
            release.wait(10)

    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await join_voice(local)
        try:
            vc.listen(SlowCleanup())
            receiver = vc._receiver
            vc.stop_listening()
            try:
                await vc.wait_for_listen_ready(timeout=0.3)
            except TimeoutError:
                timed_out = True
            else:
                timed_out = False
            assert timed_out and not receiver.finished.is_set()
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, release.set)
            started = loop.time()
            await vc.wait_for_listen_ready(timeout=10)
            assert receiver.finished.is_set() and loop.time() - started < 2.0
            await vc.wait_for_listen_ready(timeout=0)  # finished: returns at once
        finally:
            release.set()
            await close_client(client)
