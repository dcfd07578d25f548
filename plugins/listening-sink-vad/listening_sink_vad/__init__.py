"""The ``vad-segments`` sink: one WAV file per utterance per user, found with webrtcvad.

Each user's audio is downmixed to mono and cut into ``frame_ms`` frames that webrtcvad judges
speech or not (48 kHz, so nothing is resampled for detection). Hysteresis turns the verdicts
into utterances:

- an utterance starts at the first speech frame, with up to ``padding_ms`` of the audio before
  it (a ring buffer of frames; silence where the user sent nothing) as lead-in;
- it ends once ``max_silence_ms`` of non-speech follow its last speech frame (a user who stops
  sending is silent, up to the session's end); the speech end is moved back by webrtcvad's
  hangover, and ``padding_ms`` of what follows (at most what ``max_silence_ms`` held) is kept;
- an utterance whose speech is shorter than ``min_speech_ms`` is discarded.

Each utterance is streamed to ``{directory}/{template}.wav`` (mono, 48 or 16 kHz) once its speech
reaches ``min_speech_ms``, through the core's :class:`~listening_core.sinks.AudioFile` (soundfile;
16 kHz through the core's resampler); when it ends, the file is closed, a line is appended (and
flushed) to the JSON-lines manifest, and ``on_segment(segment)`` is called. Times are seconds on
the session timeline (0 = when ``listen`` started). An utterance still open when the session
stops is finished at cleanup.

In the event loop, :meth:`VadSegmentsSink.utterances` gives the same utterances as an async
iterator of :class:`Utterance` (the segment, the member, its PCM):
``async with sink.utterances() as utterances: async for u in utterances: ...``.

``on_segment`` runs on the session's delivery thread, which also hands every other frame to the
sink: it must return quickly (hand the segment to a queue, an executor or
``loop.call_soon_threadsafe``). An exception from it is logged and counted in
:attr:`VadSegmentsSink.callback_errors`; recording goes on.

Crash safety: a segment's audio goes to the operating system as the utterance goes on (held
back only by webrtcvad's hangover), and an open segment's WAV header is brought up to date every
``flush_interval`` seconds of audio (no fsync). After a kill, finished segments are complete and
listed in the manifest; the segment being written has no manifest line and holds the utterance
up to the kill, less the hangover: :func:`recover` fixes its header from its length.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import pathlib
import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from listening_core.hookspecs import SinkSpec, hookimpl
from listening_core.sinks import (
    SPEAKER_PLACEHOLDERS,
    AudioFile,
    AudioFrame,
    AudioHandlingSink,
    FileNamer,
    SessionInfo,
    SinkError,
    check_template,
    recover_file,
    safe_filename,
)

if TYPE_CHECKING:
    import discord

__all__ = [
    "Segment",
    "Utterance",
    "UtteranceStream",
    "VadOptions",
    "VadSegmentsSink",
    "listening_sinks",
    "recover",
]
__version__ = "0.1.0.dev0"

_log = logging.getLogger(__name__)

RATE = 48_000
# webrtcvad keeps saying "speech" for a few frames after speech ends (its hangover; vad_core.c,
# kOverHangMax1*/kOverHangMax2*, in frames of 10/20/30 ms): modes 0-1 and 2-3 share values. The
# reported speech end is moved back by it; the short one applies to bursts under 6 frames.
_HANGOVER_LONG = {0: {10: 14, 20: 7, 30: 5}, 2: {10: 9, 20: 5, 30: 3}}
_HANGOVER_SHORT = {0: {10: 8, 20: 4, 30: 3}, 2: {10: 6, 20: 3, 30: 2}}
# the file-name placeholders this sink fills (listening_core.sinks.PLACEHOLDERS says what each is)
_PLACEHOLDERS = (*SPEAKER_PLACEHOLDERS, "index", "start_ms")


@dataclass(frozen=True)
class Segment:
    """One finished utterance, as written to disk and to the manifest."""

    user_id: int
    user: str
    """The member's display name when the segment started (the user id if unknown)."""
    index: int
    """1, 2, 3… per user."""
    start: float
    """Session seconds of the file's first sample (lead-in padding included)."""
    end: float
    """Session seconds just after the file's last sample (tail padding included)."""
    speech_start: float
    """Session seconds where the first speech frame starts."""
    speech_end: float
    """Session seconds where the last speech frame ends."""
    file: str
    """The file name, relative to the sink's directory."""
    frames: int
    """Samples in the file (mono, at :attr:`sample_rate`): ``(end - start) * sample_rate``."""
    sample_rate: int
    path: Path = field(compare=False)
    """The file's full path."""

    @property
    def pcm(self) -> bytes:
        """The segment's audio, mono s16le at :attr:`sample_rate` (read from the file)."""
        import soundfile

        data, _ = soundfile.read(self.path, dtype="int16")
        return np.ascontiguousarray(data, dtype="<i2").tobytes()

    def manifest_line(self) -> dict[str, Any]:
        """The JSON object written to the manifest for this segment."""
        line = asdict(self)
        del line["path"]
        return line


@dataclass(frozen=True)
class Utterance:
    """One finished utterance, as :meth:`VadSegmentsSink.utterances` hands it out.

    Times are seconds on the session timeline (0 = when ``listen`` started), the segment's own.
    """

    segment: Segment
    """What was written to disk and to the manifest."""
    member: discord.Member | None = field(repr=False, compare=False)
    """The speaker (``None`` when the guild does not know them: see :attr:`user_id`)."""
    pcm: bytes = field(repr=False)
    """The segment file's audio: mono s16le at :attr:`sample_rate`, lead-in and tail included."""

    @property
    def user_id(self) -> int:
        """The speaker's user id."""
        return self.segment.user_id

    @property
    def start(self) -> float:
        """Session seconds of the first sample of :attr:`pcm`."""
        return self.segment.start

    @property
    def end(self) -> float:
        """Session seconds just after the last sample of :attr:`pcm`."""
        return self.segment.end

    @property
    def speech_start(self) -> float:
        """Session seconds where the speech starts (after the lead-in)."""
        return self.segment.speech_start

    @property
    def speech_end(self) -> float:
        """Session seconds where the speech ends (before the tail)."""
        return self.segment.speech_end

    @property
    def sample_rate(self) -> int:
        """Hz of :attr:`pcm` (the sink's ``sample_rate``)."""
        return self.segment.sample_rate


_END = object()  # the session ended: after the last utterance


class UtteranceStream:
    """``async for utterance in sink.utterances()``: finished :class:`Utterance`\\s in the order
    they finished, in the event loop it was opened in.

    The delivery thread never waits for it: it holds at most ``maxsize`` utterances and, when its
    consumer falls behind, drops the oldest (counted per user in
    :attr:`VadSegmentsSink.utterances_dropped`, logged at WARNING the first time for each user;
    the files and the manifest keep everything). When the session ends, what it holds is handed
    out, then iteration stops. It is an async context manager too: leaving it closes the stream.
    """

    def __init__(self, sink: VadSegmentsSink, maxsize: int) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a whole number of utterances >= 1, got {maxsize!r}")
        self._loop = asyncio.get_running_loop()  # raises outside the event loop
        self._sink = sink
        self.maxsize = maxsize
        self._queue: collections.deque[Utterance] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._closed = False

    def _put(self, item: Any) -> None:  # in the loop
        if self._closed:
            return
        if item is _END:
            self._ended = True
        else:
            self._queue.append(item)
            if len(self._queue) > self.maxsize:
                self._sink._dropped(self._queue.popleft())
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _post(self, item: Any) -> None:  # the delivery thread
        try:
            self._loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:  # the loop closed: nobody is left to consume
            self._closed = True

    def close(self) -> None:
        """Stop receiving utterances; iteration ends."""
        if not self._closed:
            self._closed = True
            self._sink._streams.discard(self)
            self._queue.clear()
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def aclose(self) -> None:
        """:meth:`close`, as an async generator has it."""
        self.close()

    def __aiter__(self) -> UtteranceStream:
        return self

    async def __anext__(self) -> Utterance:
        while not self._queue:
            if self._ended or self._closed:
                raise StopAsyncIteration
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    async def __aenter__(self) -> UtteranceStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class VadOptions:
    """Options of the ``vad-segments`` sink."""

    directory: Path = field(default=Path("segments"), metadata={"help": "where segments and the manifest go"})
    aggressiveness: int = field(
        default=2,
        metadata={"help": "webrtcvad mode, 0 (least) to 3 (most aggressive in rejecting non-speech)"},
    )
    frame_ms: Literal[10, 20, 30] = field(default=30, metadata={"help": "webrtcvad frame: 10, 20 or 30 ms"})
    padding_ms: int = field(
        default=200, metadata={"help": "audio kept before and after the speech (ring buffer of frames)"}
    )
    min_speech_ms: int = field(
        default=250, metadata={"help": "utterances with less speech than this are discarded"}
    )
    max_silence_ms: int = field(default=600, metadata={"help": "this much non-speech ends an utterance"})
    sample_rate: Literal[48000, 16000] = field(
        default=48000, metadata={"help": "segment files: 48000 or 16000 Hz (mono, 16-bit)"}
    )
    template: str = field(
        default="{user}-{index:04d}-{start_ms}",
        metadata={
            "help": "segment file name without extension: {user}, {user_id}, {index}, {start_ms}, "
            "{guild_id}, {channel_id}, {started}; made safe, '.wav' added; never overwrites a file (-2, -3… instead)"
        },
    )
    manifest: str = field(
        default="segments.jsonl", metadata={"help": "JSON-lines manifest in directory, appended to"}
    )
    on_segment: Callable[[Segment], Any] | None = field(
        default=None,
        metadata={"help": "called with each finished Segment, on the delivery thread: keep it quick"},
    )
    flush_interval: float = field(
        default=1.0, metadata={"help": "seconds of audio between flushes of an open segment file"}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.aggressiveness <= 3:
            raise ValueError(f"aggressiveness must be 0, 1, 2 or 3, got {self.aggressiveness}")
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms must be 10, 20 or 30, got {self.frame_ms}")
        if not 0 <= self.padding_ms <= 10_000:
            raise ValueError(f"padding_ms must be between 0 and 10000, got {self.padding_ms}")
        if not 0 <= self.min_speech_ms <= 3_600_000:
            raise ValueError(f"min_speech_ms must be between 0 and 3600000, got {self.min_speech_ms}")
        if not self.frame_ms <= self.max_silence_ms <= 60_000:
            raise ValueError(
                f"max_silence_ms must be between frame_ms ({self.frame_ms}) and 60000, got {self.max_silence_ms}"
            )
        if self.sample_rate not in (48000, 16000):
            raise ValueError(f"sample_rate must be 48000 or 16000, got {self.sample_rate}")
        if not 0.02 <= self.flush_interval <= 60:
            raise ValueError(f"flush_interval must be between 0.02 and 60 seconds, got {self.flush_interval}")
        if not self.manifest or safe_filename(self.manifest, fallback="") != self.manifest:
            raise ValueError(f"manifest must be a plain file name, got {self.manifest!r}")
        check_template(self.template, _PLACEHOLDERS)


_Frame = tuple[int, np.ndarray]  # (session position, mono int16 samples)


class _Utterance:
    """An utterance being collected for one user."""

    def __init__(self, start: int, speech_start: int) -> None:
        self.start = start
        self.speech_start = speech_start
        self.speech_end = speech_start
        # Frames not written yet: all of them until the file opens (speech < min_speech), then
        # the last speech frames (they may be webrtcvad's hangover) and the non-speech after them.
        self.held: collections.deque[_Frame] = collections.deque()
        self.tail_samples = 0  # non-speech after the last speech frame
        self.written_end = start  # session sample just after what went into the file
        self.writer: AudioFile | None = None
        self.name = ""
        self.index = 0


class _UserState:
    def __init__(self, user_id: int, vad: Any) -> None:
        self.user_id = user_id
        self.name = str(user_id)
        self.member: Any = None
        self.vad = vad
        self.partial = np.zeros(0, dtype=np.int16)  # mono samples of an incomplete VAD frame
        self.next_pos: int | None = None  # session sample just after the last sample received
        self.ring: collections.deque[_Frame] = collections.deque()
        self.utterance: _Utterance | None = None
        self.index = 0


class VadSegmentsSink(AudioHandlingSink):
    """Writes one WAV per utterance per user and a JSON-lines manifest (see the module docstring)."""

    def __init__(self, options: VadOptions | None = None) -> None:
        super().__init__()
        import webrtcvad  # noqa: F401 - fail early if missing

        self.options = options = options or VadOptions()
        self.directory = Path(options.directory)
        self.frame = options.frame_ms * RATE // 1000
        self.pad_frames = math.ceil(options.padding_ms / options.frame_ms)
        self.padding = round(options.padding_ms * RATE / 1000)
        self.min_speech = round(options.min_speech_ms * RATE / 1000)
        self.max_silence = round(options.max_silence_ms * RATE / 1000)
        table = 0 if options.aggressiveness < 2 else 2
        self._hang_long = _HANGOVER_LONG[table][options.frame_ms] * self.frame
        self._hang_short = _HANGOVER_SHORT[table][options.frame_ms] * self.frame
        self.segments: list[Segment] = []
        """Every segment written, in the order they finished (small: no audio)."""
        self.discarded = 0
        """Utterances dropped for having less than ``min_speech_ms`` of speech."""
        self.callback_errors = 0
        self.utterances_dropped: collections.Counter[int] = collections.Counter()
        """Utterances dropped from :meth:`utterances` streams whose consumer fell behind, by user id."""
        self._streams: weakref.WeakSet[UtteranceStream] = weakref.WeakSet()
        self._streams_ended = False
        self._streams_lock = threading.Lock()
        self._users: dict[int, _UserState] = {}
        # never a segment named like the manifest
        self._namer = FileNamer(
            self.directory, options.template, ".wav", placeholders=_PLACEHOLDERS, reserved=(options.manifest,)
        )
        self._session: SessionInfo | None = None
        self._manifest: Any = None
        self._failed: BaseException | None = None
        self._closed = False

    # -- the async stream

    def utterances(self, *, maxsize: int = 100) -> UtteranceStream:
        """Finished utterances as an async iterator in the running event loop (see
        :class:`UtteranceStream`): the ones that finish from now on, until the session ends."""
        stream = UtteranceStream(self, maxsize)
        with self._streams_lock:  # against _end_streams on the delivery thread
            ended = self._streams_ended
            if not ended:
                self._streams.add(stream)
        if ended:
            stream._put(_END)
        return stream

    def _dropped(self, utterance: Utterance) -> None:
        user_id = utterance.user_id
        self.utterances_dropped[user_id] += 1
        if self.utterances_dropped[user_id] == 1:
            _log.warning(
                "vad-segments: an utterance stream's consumer fell behind: the oldest utterances of "
                "user %d are dropped from it (the files and the manifest keep them; counted in "
                "VadSegmentsSink.utterances_dropped)",
                user_id,
            )

    def _stream_out(self, segment: Segment, member: Any) -> None:
        streams = list(self._streams)
        if not streams:
            return
        utterance = Utterance(segment, member, segment.pcm)  # read back once, on this thread
        for stream in streams:
            stream._post(utterance)

    def _end_streams(self) -> None:
        with self._streams_lock:
            self._streams_ended = True
            streams, self._streams = list(self._streams), weakref.WeakSet()
        for stream in streams:
            stream._post(_END)

    # -- lifecycle

    def on_start(self, session: SessionInfo) -> None:
        self._session = session
        self._open_manifest()

    def _open_manifest(self) -> Any:
        if self._manifest is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / self.options.manifest
            try:
                self._manifest = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in cleanup
            except OSError as exc:
                self._failed = exc
                raise SinkError(f"vad-segments: cannot open the manifest {path}: {exc}") from exc
        return self._manifest

    @property
    def manifest_path(self) -> pathlib.Path:
        """The JSON-lines manifest."""
        return self.directory / self.options.manifest

    def on_valid_audio(self, frame: AudioFrame) -> None:
        if frame.pcm is None:
            raise SinkError(f"vad-segments needs PCM; the frame of user {frame.user_id} has none")
        if self._failed is not None:
            raise SinkError(f"vad-segments failed earlier: {self._failed}")
        self._open_manifest()
        state = self._users.get(frame.user_id)
        if state is None:
            import webrtcvad

            state = self._users[frame.user_id] = _UserState(
                frame.user_id, webrtcvad.Vad(self.options.aggressiveness)
            )
        if frame.member is not None:
            state.name = frame.member.display_name
            state.member = frame.member
        stereo = np.frombuffer(frame.pcm, dtype="<i2").reshape(-1, 2).astype(np.int32)
        mono = ((stereo[:, 0] + stereo[:, 1]) >> 1).astype(np.int16)
        pos = frame.position
        if state.next_pos is None:
            # before their first frame the user was silent too: that silence can be lead-in
            state.next_pos = max(0, pos - self.pad_frames * self.frame)
        if pos > state.next_pos:
            self._feed_silence(state, pos - state.next_pos)
        elif pos < state.next_pos:  # overlaps what was fed: keep only the new part
            mono = mono[state.next_pos - pos :]
        self._feed(state, mono)

    def on_stop(self, end: int) -> None:
        """The session ended at ``end``: users were silent from their last frame up to there."""
        if self._failed is not None:
            return
        for state in self._users.values():
            if state.next_pos is not None and state.next_pos < end:
                self._feed_silence(state, end - state.next_pos)

    def cleanup(self) -> None:
        """Finish every open utterance, close the manifest."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        try:
            for state in self._users.values():
                try:
                    if self._failed is None:
                        self._finish(state)
                    else:
                        self._abandon(state)
                except Exception as exc:
                    errors.append(exc)
                    self._abandon(state)
        finally:
            self._end_streams()
        if self._manifest is not None:
            try:
                self._manifest.close()
            except OSError as exc:
                errors.append(exc)
        if errors and self._failed is None:
            raise SinkError(f"vad-segments: finishing failed: {errors[0]}") from errors[0]

    # -- the stream of one user

    def _feed_silence(self, state: _UserState, n: int) -> None:
        """The user sent nothing for ``n`` samples: that is non-speech."""
        f = self.frame
        while n > 0:
            if state.utterance is None and len(state.partial) == 0 and n > (self.pad_frames + 1) * f:
                skip = (n // f - self.pad_frames) * f  # nothing can happen in there: jump
                state.ring.clear()
                assert state.next_pos is not None
                state.next_pos += skip
                n -= skip
                continue
            k = min(n, f - len(state.partial)) if len(state.partial) else min(n, f)
            self._feed(state, np.zeros(k, dtype=np.int16))
            n -= k

    def _feed(self, state: _UserState, mono: np.ndarray) -> None:
        assert state.next_pos is not None
        f = self.frame
        data = np.concatenate([state.partial, mono]) if len(state.partial) else mono
        start = state.next_pos - len(state.partial)
        whole = len(data) - len(data) % f
        for i in range(0, whole, f):
            self._vad_frame(state, start + i, data[i : i + f])
        state.partial = data[whole:].copy()
        state.next_pos += len(mono)

    def _vad_frame(self, state: _UserState, pos: int, mono: np.ndarray) -> None:
        speech = state.vad.is_speech(mono.tobytes(), RATE)
        utt = state.utterance
        if utt is None:
            if not speech:
                state.ring.append((pos, mono))
                while len(state.ring) > self.pad_frames:
                    state.ring.popleft()
                return
            # the lead-in: the ring's frames that run contiguously into this one, up to padding
            lead: list[_Frame] = []
            expect = pos
            for fr in reversed(state.ring):
                if fr[0] + len(fr[1]) != expect or fr[0] + len(fr[1]) <= pos - self.padding:
                    break
                lead.append(fr)
                expect = fr[0]
            lead.reverse()
            if lead and lead[0][0] < pos - self.padding:  # trim to exactly padding
                p0, a0 = lead[0]
                cut = pos - self.padding - p0
                lead[0] = (p0 + cut, a0[cut:])
            state.ring.clear()
            utt = state.utterance = _Utterance(lead[0][0] if lead else pos, pos)
            utt.written_end = utt.start
            utt.held.extend(lead)
            utt.held.append((pos, mono))
            utt.speech_end = pos + len(mono)
        elif speech:
            utt.held.append((pos, mono))
            utt.tail_samples = 0
            utt.speech_end = pos + len(mono)
        else:
            utt.held.append((pos, mono))
            utt.tail_samples += len(mono)
            if utt.tail_samples >= self.max_silence:
                self._finish(state)
                return
        safe = utt.speech_end - self._hang_long  # in the file whatever the hangover turns out to be
        if utt.writer is None and safe - utt.speech_start >= self.min_speech:
            self._open_segment(state, utt)  # enough speech: stream from here on
        if utt.writer is not None:
            while utt.held and utt.held[0][0] + len(utt.held[0][1]) <= safe:
                self._write(utt, utt.held.popleft())

    def _open_segment(self, state: _UserState, utt: _Utterance) -> None:
        state.index += 1
        utt.name = self._namer.take(
            self._session,
            fallback=f"{state.user_id}-{state.index:04d}",
            user=state.name,
            user_id=state.user_id,
            index=state.index,
            start_ms=round(utt.start * 1000 / RATE),
        )
        utt.index = state.index
        path = self.directory / utt.name
        try:
            utt.writer = AudioFile(
                path,
                channels=1,
                sample_rate=self.options.sample_rate,
                flush_interval=self.options.flush_interval,
            )
        except SinkError as exc:
            self._failed = exc
            raise SinkError(f"vad-segments: {exc}") from exc

    def _write(self, utt: _Utterance, fr: _Frame, limit: int | None = None) -> None:
        pos, mono = fr
        if limit is not None:
            mono = mono[: max(0, limit - pos)]
        assert utt.writer is not None and pos == utt.written_end, (pos, utt.written_end)
        try:
            utt.writer.write_samples(mono)  # flushed every flush_interval s of audio
        except SinkError as exc:
            self._failed = exc
            raise SinkError(f"vad-segments: {exc}") from exc
        utt.written_end = pos + len(mono)

    def _finish(self, state: _UserState) -> None:
        """End the user's utterance: write the tail padding, close, manifest line, callback."""
        utt = state.utterance
        if utt is None:
            return
        state.utterance = None
        # where speech really ended: before webrtcvad's hangover (which has passed only if some
        # non-speech followed; an utterance cut by the session's stop keeps all its speech)
        flagged = utt.speech_end - utt.speech_start
        hang = self._hang_long if flagged >= 6 * self.frame else self._hang_short
        if utt.tail_samples == 0:
            hang = 0
        speech_end = max(utt.speech_start + min(self.frame, flagged), utt.speech_end - hang)
        end = min(speech_end + self.padding, utt.speech_end + utt.tail_samples)
        if utt.writer is None and speech_end - utt.speech_start >= self.min_speech:
            self._open_segment(state, utt)
        if utt.writer is None:  # less than min_speech of speech
            self.discarded += 1
        for fr in utt.held:
            if utt.writer is not None and fr[0] < end:
                self._write(utt, fr, limit=end)
            elif fr[0] >= end:
                state.ring.append(fr)
        while len(state.ring) > self.pad_frames:
            state.ring.popleft()
        if utt.writer is None:
            return
        writer = utt.writer
        try:
            writer.cleanup()  # the resampler's tail, then close
        except SinkError as exc:
            self._failed = exc
            raise SinkError(f"vad-segments: {exc}") from exc
        segment = Segment(
            user_id=state.user_id,
            user=state.name,
            index=utt.index,
            start=utt.start / RATE,
            end=utt.written_end / RATE,
            speech_start=utt.speech_start / RATE,
            speech_end=speech_end / RATE,
            file=utt.name,
            frames=writer.frames_written,
            sample_rate=self.options.sample_rate,
            path=writer.path,
        )
        manifest = self._open_manifest()
        try:
            manifest.write(json.dumps(segment.manifest_line(), ensure_ascii=False) + "\n")
            manifest.flush()
        except OSError as exc:
            self._failed = exc
            raise SinkError(f"vad-segments: writing the manifest {self.manifest_path} failed: {exc}") from exc
        self.segments.append(segment)
        self._stream_out(segment, state.member)
        callback = self.options.on_segment
        if callback is not None:
            try:
                callback(segment)
            except Exception:
                self.callback_errors += 1
                _log.exception("vad-segments: on_segment raised for %s (recording goes on)", segment.file)

    def _abandon(self, state: _UserState) -> None:
        """After a failure: close what is open without writing more."""
        utt, state.utterance = state.utterance, None
        if utt is not None and utt.writer is not None:
            try:
                utt.writer.cleanup()
            except SinkError:
                _log.debug("closing %s after a failure failed too", utt.writer.path, exc_info=True)

    def __repr__(self) -> str:
        return f"<VadSegmentsSink {self.directory} segments={len(self.segments)}>"


def recover(path: str | os.PathLike[str]) -> int:
    """Fix the header of a segment WAV left by a killed process from its length; returns its samples."""
    return recover_file(path)


@hookimpl
def listening_sinks() -> list[SinkSpec]:
    """The sinks of listening-sink-vad."""
    return [
        SinkSpec(
            "vad-segments",
            VadSegmentsSink,
            VadOptions,
            "one WAV per utterance per user (webrtcvad) and a JSON-lines manifest",
        )
    ]
