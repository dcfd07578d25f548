"""Live streams: a session's audio as ``async for`` loops in the bot's event loop.

:class:`LiveSink` is a sink like any other (``vc.listen([live, "wav"])`` records files and
streams from one decode). Open streams on it, in the event loop, whenever you like:

- :meth:`LiveSink.frames` → :class:`FrameStream`: every member's :class:`AudioFrame`\\s, or one
  member's, in the order the session delivers them (in order per member);
- :meth:`LiveSink.pcm` → :class:`PcmStream`: :class:`PcmChunk`\\s of s16le PCM at a chosen rate and
  channel count (16 kHz mono is what speech engines take), per member, resampled through
  :mod:`listening_core.resample` and placed on the session timeline.

Both are async iterators and async context managers (``async with live.pcm() as chunks:``
closes the stream on the way out; a stream that is just dropped is closed when it is garbage).
A stream sees the frames delivered after it was opened. When the session ends every stream
ends: what it holds is handed out, then ``StopAsyncIteration``. Cancelling the task that
iterates is clean: the stream stays usable, or is closed by its ``async with``.

Threads: the session's delivery thread only appends each frame to a deque; the first frame of a
batch schedules one drain in the event loop (``loop.call_soon_threadsafe``), which hands the
whole batch to every open stream. Nothing here ever waits for a consumer: each stream has a
bounded queue (``maxsize`` frames) and a consumer that falls behind loses the oldest frames of
its queue, counted per member in :attr:`LiveSink.overflow` (and in ``vc.listening_stats()[user]
.dropped["stream-overflow"]``) and logged at WARNING the first time for each member.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import SinkError
from .frames import CHANNELS, SAMPLE_RATE, AudioFrame, SessionInfo
from .sinks.base import AudioSink, MultiSink

if TYPE_CHECKING:
    import discord
    import numpy as np

    from .resample import Resampler

_log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAXSIZE",
    "OVERFLOW_REASON",
    "FrameStream",
    "LiveSink",
    "PcmChunk",
    "PcmStream",
    "live_overflow",
]

DEFAULT_MAXSIZE = 3000
"""Frames a stream holds for a consumer that has not taken them yet: a minute of one member,
0.6 s of a hundred (about 12 MB of PCM when full)."""

OVERFLOW_REASON = "stream-overflow"
"""The reason under which ``vc.listening_stats()[user].dropped`` counts frames a live stream dropped."""

_END = object()  # the session ended: queued after its last frame


def _user_id(member: discord.abc.Snowflake | int | None) -> int | None:
    if member is None or isinstance(member, int):
        return member
    user_id = getattr(member, "id", None)
    if not isinstance(user_id, int):
        raise TypeError(f"member must be a discord member, user or user id, not {type(member).__name__}")
    return user_id


class LiveSink(AudioSink):
    """A sink that hands the session's frames to async iterators in the event loop.

    ``maxsize`` is the default queue bound of the streams opened on it. It serves one session
    (like a file sink); once that session ends, streams opened on it end at once.
    """

    wants_pcm: ClassVar[bool] = True

    def __init__(self, *, maxsize: int = DEFAULT_MAXSIZE) -> None:
        _check_maxsize(maxsize)
        self.maxsize = maxsize
        self.overflow: collections.Counter[int] = collections.Counter()
        """Frames dropped from streams whose consumer fell behind, by user id (all streams)."""
        self._warned: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: weakref.WeakSet[_Stream] = weakref.WeakSet()
        self._pending: collections.deque[Any] = collections.deque()  # delivery thread -> loop
        self._scheduled = False
        self._ended = False  # set in the loop once _END was drained (or no loop ever was)
        self._cleaned = False

    def __repr__(self) -> str:
        return f"<LiveSink streams={len(self._streams)} overflow={sum(self.overflow.values())}>"

    # -- consumer side (event loop) --------------------------------------------------------------

    def frames(
        self, member: discord.abc.Snowflake | int | None = None, *, maxsize: int | None = None
    ) -> FrameStream:
        """A stream of every member's frames (or only ``member``'s: a member, user or user id)."""
        return FrameStream(self, _user_id(member), self.maxsize if maxsize is None else maxsize)

    def pcm(
        self,
        member: discord.abc.Snowflake | int | None = None,
        *,
        rate: int = 16_000,
        channels: int = 1,
        maxsize: int | None = None,
    ) -> PcmStream:
        """A stream of :class:`PcmChunk`\\s at ``rate`` Hz with ``channels`` (1: the mean of left
        and right; 2: as received), of every member (or only ``member``)."""
        return PcmStream(self, _user_id(member), self.maxsize if maxsize is None else maxsize, rate, channels)

    @property
    def ended(self) -> bool:
        """Whether the session ended and its last frame was handed to the streams."""
        return self._ended

    def _open(self, stream: _Stream) -> None:
        loop = asyncio.get_running_loop()  # raises outside the loop: streams belong to one
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("all streams of a LiveSink must be opened in the same event loop")
        if self._ended:
            stream._end()
        else:
            self._streams.add(stream)

    def _close(self, stream: _Stream) -> None:
        self._streams.discard(stream)

    def _overflowed(self, frame: AudioFrame) -> None:
        user_id = frame.user_id
        self.overflow[user_id] += 1
        if user_id not in self._warned:
            self._warned.add(user_id)
            _log.warning(
                "a live stream's consumer fell behind: the oldest frames of user %d are dropped "
                "(counted in vc.listening_stats()[%d].dropped[%r]); consume faster or open the "
                "stream with a larger maxsize",
                user_id,
                user_id,
                OVERFLOW_REASON,
            )

    def _drain(self) -> None:
        self._scheduled = False  # first: a frame appended from now on schedules another drain
        pending = self._pending
        batch = [pending.popleft() for _ in range(len(pending))]
        streams = list(self._streams)
        for item in batch:
            if item is _END:
                self._ended = True
                for stream in streams:
                    stream._end()
                self._streams = weakref.WeakSet()
                break
            for stream in streams:
                stream._offer(item)
        for stream in streams:
            stream._wake()

    # -- session side (delivery thread) ----------------------------------------------------------

    def on_start(self, session: SessionInfo) -> None:
        """Refuse a second session: a LiveSink serves one."""
        if self._cleaned:
            raise SinkError("a LiveSink serves one listening session; make a new one for the next")

    def on_audio(self, frame: AudioFrame) -> None:
        """Queue ``frame`` for the open streams (none open, or the loop gone: nothing to do)."""
        if self._ended or not self._streams:
            return
        self._pending.append(frame)
        if not self._scheduled:
            self._scheduled = True
            self._post()

    def cleanup(self) -> None:
        """The session ended: every stream ends after the frames it holds."""
        self._cleaned = True
        if self._loop is None:
            self._ended = True  # no stream was ever opened; one opened from now on ends at once
            if self._loop is None:  # still none: a stream opened meanwhile gets _END below
                return
        self._pending.append(_END)
        self._scheduled = True
        self._post()

    def _post(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed: nobody is left to consume
            self._pending.clear()
            self._ended = True


def _check_maxsize(maxsize: int) -> None:
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
        raise ValueError(f"maxsize must be a whole number of frames >= 1, got {maxsize!r}")


class _Stream:
    """One consumer's bounded queue of frames on a :class:`LiveSink`."""

    __slots__ = (
        "__weakref__",
        "_closed",
        "_ended",
        "_queue",
        "_sink",
        "_user_id",
        "_waiter",
        "dropped",
        "maxsize",
    )

    def __init__(self, sink: LiveSink, user_id: int | None, maxsize: int) -> None:
        _check_maxsize(maxsize)
        self._sink = sink
        self._user_id = user_id
        self.maxsize: int = maxsize
        self.dropped: int = 0
        """Frames this stream dropped because its consumer fell behind."""
        self._queue: collections.deque[AudioFrame] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._closed = False
        sink._open(self)

    def _offer(self, frame: AudioFrame) -> None:
        if self._user_id is not None and frame.user_id != self._user_id:
            return
        queue = self._queue
        queue.append(frame)
        if len(queue) > self.maxsize:
            self.dropped += 1
            self._sink._overflowed(queue.popleft())

    def _end(self) -> None:
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> collections.deque[AudioFrame]:
        """The queue, once it holds a frame; ``StopAsyncIteration`` once it never will."""
        queue = self._queue
        while not queue:
            if self._ended or self._closed:
                raise StopAsyncIteration
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return queue

    def close(self) -> None:
        """Stop receiving: what the stream holds is discarded and iteration ends."""
        if not self._closed:
            self._closed = True
            self._sink._close(self)
            self._queue.clear()
            self._wake()

    async def aclose(self) -> None:
        """:meth:`close`, as an async generator has it."""
        self.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> Any:
        return self


class FrameStream(_Stream):
    """``async for frame in live.frames(member)``: :class:`AudioFrame`\\s as the session delivers
    them (see :mod:`listening_core.live`). Frames are shared with the session's other sinks:
    read them, do not change them."""

    __slots__ = ()

    async def __anext__(self) -> AudioFrame:
        return (await self._wait()).popleft()


@dataclass(frozen=True, slots=True)
class PcmChunk:
    """Some of one member's audio (a frame's worth or more) at the stream's rate and channels.

    ``position`` is the session sample (48 kHz, like :attr:`AudioFrame.position`) of its first
    sample. A member's chunks follow each other without a gap while they speak; a new talk
    spurt (or frames dropped by an overflow) starts a new run of chunks at its own position.
    """

    user_id: int
    member: discord.Member | None
    position: int
    pcm: bytes
    """Interleaved s16le samples at :attr:`rate`."""
    rate: int
    channels: int

    @property
    def samples(self) -> int:
        """Samples per channel in :attr:`pcm`."""
        return len(self.pcm) // (2 * self.channels)

    @property
    def start(self) -> float:
        """Session seconds of the first sample (0 = when ``listen`` started)."""
        return self.position / SAMPLE_RATE

    @property
    def end(self) -> float:
        """Session seconds just after the last sample."""
        return self.start + self.samples / self.rate


class _Track:
    """One member's run of contiguous frames, resampled as one stream."""

    __slots__ = ("member", "next", "out", "resampler", "start")

    def __init__(self, start: int, resampler: Resampler | None, member: discord.Member | None) -> None:
        self.start = start  # session sample where the run began
        self.next = start  # session sample the next contiguous frame starts at
        self.out = 0  # output samples handed out since start
        self.resampler = resampler
        self.member = member


class PcmStream(_Stream):
    """``async for chunk in live.pcm(rate=16000, channels=1)``: :class:`PcmChunk`\\s of every
    member (or one), see :mod:`listening_core.live`.

    Conversion runs in the event loop as chunks are taken, so a stream nobody reads costs
    nothing but its queue. Each time the consumer has taken every chunk, the frames queued
    meanwhile are converted together: one chunk per member and run of contiguous frames (a
    frame's worth when the consumer keeps up, more when it lags, which makes resampling cheaper
    per frame). The resampler holds back a few milliseconds until the run goes on or ends."""

    __slots__ = ("_np", "_out", "_resample", "_tracks", "channels", "rate")

    def __init__(self, sink: LiveSink, user_id: int | None, maxsize: int, rate: int, channels: int) -> None:
        if isinstance(rate, bool) or not isinstance(rate, int) or not 8_000 <= rate <= 192_000:
            raise ValueError(f"rate must be a whole number of Hz from 8000 to 192000, got {rate!r}")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 (mono) or 2 (stereo), got {channels!r}")
        import numpy

        from . import resample

        self._np = numpy
        self._resample = resample
        self.rate: int = rate
        self.channels: int = channels
        self._tracks: dict[int, _Track] = {}
        self._out: collections.deque[PcmChunk] = collections.deque()
        super().__init__(sink, user_id, maxsize)

    async def __anext__(self) -> PcmChunk:
        while not self._out:
            try:
                queue = await self._wait()
            except StopAsyncIteration:
                if not self._closed:
                    self._flush_all()
                if not self._out:
                    raise
                break
            self._convert(queue)
        return self._out.popleft()

    def _convert(self, queue: collections.deque[AudioFrame]) -> None:
        """Everything queued, as one chunk per member and run of contiguous frames."""
        by_user: dict[int, list[AudioFrame]] = {}
        while queue:
            frame = queue.popleft()
            if frame.pcm is not None:  # None only where a session does not decode (LiveSink does)
                by_user.setdefault(frame.user_id, []).append(frame)
        for user_id, frames in by_user.items():
            run = [frames[0]]
            for frame in frames[1:]:
                if frame.position != run[-1].end:
                    self._convert_run(user_id, run)
                    run = []
                run.append(frame)
            self._convert_run(user_id, run)

    def _convert_run(self, user_id: int, run: list[AudioFrame]) -> None:
        first = run[0]
        track = self._tracks.get(user_id)
        if track is None or first.position != track.next:
            if track is not None:
                self._flush(user_id, track)
            resampler = None
            if self.rate != SAMPLE_RATE:
                resampler = self._resample.Resampler(SAMPLE_RATE, self.rate, self.channels)
            track = self._tracks[user_id] = _Track(first.position, resampler, first.member)
        member = run[-1].member
        if member is not None:
            track.member = member
        track.next = run[-1].end
        pcm = b"".join(f.pcm for f in run if f.pcm is not None)
        if track.resampler is None and self.channels == CHANNELS:
            self._emit(user_id, track, pcm, len(pcm) // (2 * CHANNELS))
            return
        np = self._np
        samples = np.frombuffer(pcm, dtype="<i2").reshape(-1, CHANNELS)
        if self.channels == 1:
            samples = samples.mean(axis=1, dtype=np.float64)
        if track.resampler is None:
            self._emit_array(user_id, track, samples)
        else:
            self._emit_array(user_id, track, track.resampler.process(samples))

    def _emit_array(self, user_id: int, track: _Track, samples: np.ndarray) -> None:
        np = self._np
        if len(samples):
            pcm = np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes()
            self._emit(user_id, track, pcm, len(samples))

    def _emit(self, user_id: int, track: _Track, pcm: bytes, samples: int) -> None:
        position = track.start + track.out * SAMPLE_RATE // self.rate
        track.out += samples
        self._out.append(PcmChunk(user_id, track.member, position, pcm, self.rate, self.channels))

    def _flush(self, user_id: int, track: _Track) -> None:
        if track.resampler is not None:
            self._emit_array(user_id, track, track.resampler.flush())

    def _flush_all(self) -> None:
        tracks, self._tracks = self._tracks, {}
        for user_id, track in tracks.items():
            self._flush(user_id, track)


def live_overflow(sink: AudioSink) -> collections.Counter[int]:
    """Frames dropped by the live streams of ``sink`` (a :class:`LiveSink`, or a
    :class:`~listening_core.sinks.MultiSink` holding some), by user id."""
    total: collections.Counter[int] = collections.Counter()
    for live in _live_sinks(sink):
        total.update(live.overflow)
    return total


def _live_sinks(sink: AudioSink) -> Iterable[LiveSink]:
    if isinstance(sink, LiveSink):
        yield sink
    elif isinstance(sink, MultiSink):
        for inner in sink.sinks.values():
            yield from _live_sinks(inner)
