"""``AudioReceiver``: the shell of one listening session, from datagram to sink.

The pure part, what a datagram means and when something is due, is a
:class:`~listening_core.session.ReceiveSession`; this shell owns the threads around it:

- discord.py's socket reader thread calls :meth:`AudioReceiver.on_datagram`, which stamps the
  datagram with its arrival time, queues it and, only if the receiver thread is asleep with
  nothing to do, wakes it. It takes no lock and never waits.
- the receiver thread is the session's only caller: it sleeps until a datagram comes or the
  session's next deadline (a jitter deadline, a start window, a DAVE retry, a speaking timeout)
  is due, then feeds the session what was queued, sends each worker its decode jobs (one batch
  per worker, at most once per ``ListenOptions.tick`` while audio flows), applies decoded
  batches and hands frames to the delivery thread. It owns every counter (:class:`UserStats`):
  the pool's result thread only queues its answers and wakes it. A silent session sleeps.
- the delivery thread calls the sink, in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .crypto import TransportCipher, transport_cipher
from .pool import AudioProcessPool, WorkerDied
from .session import MAX_UNMAPPED, Events, ListenOptions, ReceiveSession, UserStats
from .sinks import FRAME_SAMPLES, AudioFrame, AudioSink, FrameKind, RtcpPacket, SessionInfo
from .timeline import SessionClock
from .unpacker import DECODE, FEC, PLC, DecodeAnswer, DecodeJob

if TYPE_CHECKING:
    from .session import DaveOpener
    from .ssrc_map import SsrcMap
    from .stream import StreamState
    from .voice_client import VoiceClient

_log = logging.getLogger(__name__)

__all__ = ["AudioReceiver", "ListenOptions", "ReceiverLink", "UserStats"]

#: Kept under its old name: at most this many unannounced SSRCs are tracked at once.
_MAX_UNMAPPED = MAX_UNMAPPED


class ReceiverLink(Protocol):
    """The narrow view of a voice connection a receiver gets (``VoiceClient.listening_link()``)."""

    @property
    def channel_id(self) -> int:
        """The voice channel listened to."""
        ...

    @property
    def guild_id(self) -> int | None:
        """Its guild."""
        ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The bot's event loop."""
        ...

    @property
    def ssrcs(self) -> SsrcMap:
        """What the voice gateway said about SSRCs."""
        ...

    @property
    def dave(self) -> DaveOpener:
        """Opens DAVE frames with the connection's current keys."""
        ...

    def transport_keys(self) -> tuple[str | None, Any]:
        """The transport encryption mode and secret key (either ``None`` before the handshake)."""
        ...

    def member(self, user_id: int) -> Any:
        """The guild member ``user_id``, or ``None``."""
        ...

    def dispatch(self, event: str, user_id: int) -> None:
        """Dispatch ``on_<event>(member, vc)`` on the bot's event loop (thread-safe)."""
        ...

    def attach(self, receiver: AudioReceiver) -> None:
        """Start handing datagrams to ``receiver.on_datagram``."""
        ...

    def detach(self, receiver: AudioReceiver) -> None:
        """Stop handing datagrams to ``receiver``."""
        ...

    def keep_task(self, task: asyncio.Task[Any]) -> None:
        """Keep a reference to ``task`` (the awaitable an async ``after`` returned) until it ends."""
        ...


@dataclass(frozen=True, slots=True)
class _Stop:
    end: int  # the session sample at which listening stopped


_session_ids = iter(range(1, 1 << 62))

_PAUSE, _RESUME = "pause", "resume"
_OPS = {FrameKind.FEC: FEC, FrameKind.PLC: PLC}


class AudioReceiver(threading.Thread):
    """Runs one listening session of a :class:`~listening_core.voice_client.VoiceClient`."""

    def __init__(
        self,
        voice_client: VoiceClient,
        sink: AudioSink,
        *,
        pool: AudioProcessPool | None,
        after: Callable[..., Any] | None,
        options: ListenOptions | None = None,
        own_pool: bool = False,
        on_finished: Callable[..., Any] | None = None,
    ) -> None:
        link: ReceiverLink = voice_client.listening_link()
        super().__init__(name=f"listening-core-receiver-{link.channel_id}", daemon=True)
        self.voice_client = voice_client
        self._link = link
        self.sink = sink
        self.options: ListenOptions = options or ListenOptions()
        self.after = after
        self._on_finished = on_finished
        self.loop: asyncio.AbstractEventLoop = link.loop
        self.session_id: int = next(_session_ids)
        self.wants_pcm: bool = bool(getattr(sink, "wants_pcm", True))
        self.pool: AudioProcessPool | None = pool if self.wants_pcm else None
        self._own_pool = own_pool and self.pool is not None
        self.started_at: float = time.time()
        self.session: ReceiveSession = ReceiveSession(
            self.options, time.monotonic(), link.ssrcs, link.dave, session_id=self.session_id
        )
        self._paused = False
        self._stopped_at: float | None = None
        self._stopping = threading.Event()
        self._closed = False
        self._finished = threading.Event()
        self._finished_lock = threading.Lock()
        self._finished_callbacks: list[Callable[[], None]] = []
        # datagrams (data, arrival, cipher) and pause/resume, in arrival order; any thread appends
        self._inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        # decoded batches (frames, future), from the pool's result thread
        self._results: collections.deque[tuple[list[AudioFrame], Future[list[DecodeAnswer]]]] = (
            collections.deque()
        )
        self._wake = threading.Event()
        self._idle = False  # the receiver thread sleeps with nothing to do: a datagram wakes it
        self._inflight = 0
        self._jobs: dict[int, list[DecodeJob]] = {}
        self._meta: dict[int, list[AudioFrame]] = {}
        self._workers: dict[int, tuple[Hashable, int]] = {}  # ssrc -> (stream key, worker)
        self._last_flush = float("-inf")
        self._delivery: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._delivery_thread = threading.Thread(
            target=self._deliver, name=f"listening-core-delivery-{link.channel_id}", daemon=True
        )
        self._cipher: TransportCipher | None = None
        self._cipher_key: tuple[str, bytes] | None = None
        self.wakeups: int = 0
        """How many times the receiver thread woke up (diagnostics: an idle session barely wakes)."""
        self.error: BaseException | None = None
        self._sink_failed = False

    # -- what the session holds, for diagnostics -------------------------------------------------

    @property
    def clock(self) -> SessionClock:
        """The session's sample clock (sample 0: when listening started)."""
        return self.session.clock

    @property
    def stats(self) -> collections.defaultdict[int, UserStats]:
        """Per-user counts, by user id (written by the receiver thread only)."""
        return self.session.stats

    @property
    def unattributed(self) -> collections.Counter[str]:
        """Drops no user could be named for, by reason."""
        return self.session.unattributed

    @property
    def _streams(self) -> dict[int, StreamState]:
        return self.session.streams

    @property
    def _unmapped(self) -> dict[int, Any]:
        return self.session.unmapped

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        link = self._link
        info = SessionInfo(guild_id=link.guild_id, channel_id=link.channel_id, started_at=self.started_at)
        try:
            self.sink.on_start(info)
        except Exception as exc:
            self._sink_error(exc)
        self._delivery_thread.start()
        link.ssrcs.subscribe(self._wake.set)  # a held SSRC may be attributed now
        super().start()
        link.attach(self)

    @property
    def finished(self) -> threading.Event:
        """Set once the sink was cleaned up and ``after`` was called."""
        return self._finished

    def when_finished(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` once :attr:`finished` is set (now, if it is), on the thread that
        sets it; returns a function that forgets it (for a waiter that gave up). ``callback``
        must not raise, nor wait."""
        with self._finished_lock:
            if not self._finished.is_set():
                self._finished_callbacks.append(callback)

                def forget() -> None:
                    with self._finished_lock, contextlib.suppress(ValueError):
                        self._finished_callbacks.remove(callback)

                return forget
        callback()
        return lambda: None

    def _set_finished(self) -> None:
        with self._finished_lock:
            self._finished.set()
            callbacks, self._finished_callbacks = self._finished_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _log.exception("listening session %d: a when_finished callback raised", self.session_id)

    def pause(self) -> None:
        """Discard audio from now on (what is pending is delivered); the timeline keeps running."""
        self._paused = True
        self._inbox.append((_PAUSE, time.monotonic()))
        self._wake.set()

    def resume(self) -> None:
        """Receive again after :meth:`pause`; each stream starts a fresh jitter buffer, so what was
        discarded while paused is neither counted as lost nor concealed."""
        self._paused = False
        self._inbox.append((_RESUME, time.monotonic()))
        self._wake.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (or the sink failed); the session is winding down."""
        return self._stopping.is_set()

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` was called and :meth:`resume` not yet (incoming audio is discarded)."""
        return self._paused

    def stop(self) -> None:
        """End the session: every frame received so far is delivered, then the sink is cleaned up."""
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._stopping.set()
        self._wake.set()

    # -- datagrams (discord.py's socket reader thread) ---------------------------------------

    def on_datagram(self, data: bytes) -> None:
        """Socket listener: queues the datagram; never raises, never waits (it runs on
        discord.py's reader thread)."""
        if self._closed:
            return
        try:
            now = time.monotonic()
            cipher = self._transport()
        except Exception:
            _log.exception("listening session %d: unexpected error on a datagram", self.session_id)
            return
        if self._closed:  # the session ended while this datagram was on its way: not counted
            return
        self._inbox.append((data, now, cipher))
        if self._idle:
            self._idle = False
            self._wake.set()

    def _transport(self) -> TransportCipher | None:
        mode, key = self._link.transport_keys()
        if not mode or not key:
            return None
        raw = bytes(key)
        if self._cipher_key != (mode, raw):
            self._cipher = transport_cipher(mode, raw)
            self._cipher_key = (mode, raw)
        return self._cipher

    # -- the receiver thread -------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug here must not end the session silently
            _log.exception("listening session %d: error in the receiver thread", self.session_id)
        finally:
            self._closed = True
            self._finish()

    def _loop(self) -> None:
        tick = self.options.tick
        grace_end: float | None = None
        wake = self._wake
        while True:
            wake.clear()
            now = time.monotonic()
            busy = self._step(now)
            if self._stopping.is_set():
                if grace_end is None:
                    # datagrams already in the socket when stop() was called are still read
                    grace_end = (self._stopped_at or now) + self.options.stop_grace
                if now >= grace_end:
                    return
            due = self.session.next_deadline()
            until = float("inf") if due is None else due
            if self._jobs:
                until = min(until, self._last_flush + tick)
            if grace_end is not None:
                until = min(until, grace_end)
            if busy:
                # audio flows: gather what comes for a tick, then handle it as one batch
                until = min(until, now + tick)
            else:
                self._idle = True
                if self._inbox:  # something came between the step and now
                    self._idle = False
                    continue
            timeout = until - time.monotonic()
            if timeout > 0:
                wake.wait(None if timeout == float("inf") else timeout)
            self._idle = False
            self.wakeups += 1

    def _step(self, now: float) -> bool:
        """Feed the session what came, let it release what is due, hand out what it produced.
        Returns whether anything came."""
        session = self.session
        busy = False
        results = self._results
        while results:
            busy = True
            self._apply(*results.popleft())
        inbox = self._inbox
        while inbox:
            busy = True
            item = inbox.popleft()
            first = item[0]
            if first is _PAUSE:
                session.pause(item[1])
            elif first is _RESUME:
                session.resume()
            else:
                try:
                    session.transport = item[2]
                    session.datagram(first, item[1])
                except Exception:
                    _log.exception("listening session %d: unexpected error on a datagram", self.session_id)
                    session.unattributed["receiver-error"] += 1
        try:
            session.tick(now)
        except Exception:
            _log.exception("listening session %d: error in the receiver tick", self.session_id)
        self._hand_out(session.drain())
        if self._jobs and (now - self._last_flush >= self.options.tick or self._stopping.is_set()):
            self._flush_jobs(now)
        return busy

    def _hand_out(self, events: Events) -> None:
        """Queue decode jobs, or deliver frames; deliver RTCP; dispatch speaking changes."""
        link = self._link
        for user_id, speaking in events.speaking:
            self._dispatch("listening_speaking_start" if speaking else "listening_speaking_stop", user_id)
        for packet in events.rtcp:
            self._delivery.put(packet)
        if not events.frames:
            return
        if self.pool is None:
            frames = []
            for frame, _ in events.frames:
                frame.member = link.member(frame.user_id)
                frames.append(frame)
            self._delivery.put(frames)
            return
        workers = self._workers
        for frame, payload in events.frames:
            pinned = workers.get(frame.ssrc)
            if pinned is None:
                stream_key: Hashable = (self.session_id, frame.ssrc)
                pinned = workers[frame.ssrc] = (stream_key, self.pool.worker_for(stream_key))
            key, worker = pinned
            jobs = self._jobs.get(worker)
            if jobs is None:
                jobs = self._jobs[worker] = []
                self._meta[worker] = []
            jobs.append((key, _OPS.get(frame.kind, DECODE), payload, FRAME_SAMPLES))
            self._meta[worker].append(frame)

    def _flush_jobs(self, now: float) -> None:
        """Send each worker its batch (a send may block on a full pipe: no lock is held here)."""
        assert self.pool is not None
        self._last_flush = now
        jobs, meta = self._jobs, self._meta
        self._jobs, self._meta = {}, {}
        for worker, batch in jobs.items():
            frames = meta[worker]
            try:
                future = self.pool.submit(worker, batch)
            except Exception as exc:
                self.session.decoded(frames, None, ("decoder-error", exc))
                self._deliver_frames(frames)
                continue
            self._inflight += 1
            future.add_done_callback(functools.partial(self._on_decoded, frames))

    def _on_decoded(self, frames: list[AudioFrame], future: Future[list[DecodeAnswer]]) -> None:
        """The pool's result thread: queue the answers for the receiver thread, which counts."""
        self._results.append((frames, future))
        self._wake.set()

    def _apply(self, frames: list[AudioFrame], future: Future[list[DecodeAnswer]]) -> None:
        """Attach PCM to frames (or conceal them, if their worker died) and deliver them."""
        self._inflight -= 1
        exc = future.exception()
        if exc is not None:
            reason = "decoder-died" if isinstance(exc, WorkerDied) else "decoder-error"
            self.session.decoded(frames, None, (reason, exc))
        else:
            self.session.decoded(frames, future.result())
        self._deliver_frames(frames)

    def _deliver_frames(self, frames: list[AudioFrame]) -> None:
        member = self._link.member
        for frame in frames:
            frame.member = member(frame.user_id)
        self._delivery.put(frames)

    def _finish(self) -> None:
        self._link.detach(self)
        self._link.ssrcs.unsubscribe(self._wake.set)
        now = time.monotonic()
        try:
            self._step(now)
            self._hand_out(self.session.finish(now))
            if self._jobs:
                self._flush_jobs(now)
        except Exception:
            _log.exception("listening session %d: error while finishing", self.session_id)
        deadline = time.monotonic() + 10.0
        while self._inflight > 0:
            while self._results:
                self._apply(*self._results.popleft())
            if self._inflight <= 0:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.wait(left)
            self._wake.clear()
        if self.pool is not None:
            keys: list[Any] = [key for key, _ in self._workers.values()]
            with contextlib.suppress(Exception):  # the pool may have been shut down by its owner
                self.pool.release(keys)
            if self._own_pool:
                self.pool.shutdown()
        self._delivery.put(_Stop(self.clock.sample_at(self._stopped_at or time.monotonic())))
        self._delivery.put(None)
        self._delivery_thread.join()
        if self._on_finished is not None:
            self._on_finished(self.sink, error=self.error)
        self._call_after()

    # -- delivery thread -----------------------------------------------------------------------

    def _deliver(self) -> None:
        sink = self.sink
        while True:
            item = self._delivery.get()
            if item is None:
                break
            if self._sink_failed:
                continue
            try:
                if isinstance(item, RtcpPacket):
                    sink.on_rtcp(item)
                elif isinstance(item, _Stop):
                    sink.on_stop(item.end)
                else:
                    for frame in item:
                        sink.on_audio(frame)
            except Exception as exc:
                self._sink_error(exc)
        try:
            sink.cleanup()
        except Exception as exc:
            self._sink_error(exc)

    def _sink_error(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._sink_failed = True
        _log.error(
            "listening session %d: the sink %r failed and was stopped: %r", self.session_id, self.sink, exc
        )
        # Nothing more can reach a failed sink: end the session now, so after() hears of it.
        self.stop()

    def _call_after(self) -> None:
        after, error = self.after, self.error
        loop = self.loop
        link = self._link

        def call() -> None:
            try:
                if after is not None:
                    result = after(self.sink, error)
                    if inspect.isawaitable(result):
                        link.keep_task(loop.create_task(_await(result)))
            except Exception:
                _log.exception("the after callback of listen() raised")
            finally:
                self._set_finished()

        if loop.is_closed():
            self._set_finished()
            return
        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:  # the loop is closing
            self._set_finished()

    # -- helpers ----------------------------------------------------------------------------------

    def _dispatch(self, event: str, user_id: int) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closing
            self._link.dispatch(event, user_id)


async def _await(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:
        _log.exception("the after callback of listen() raised")
