"""Where received audio goes: :class:`AudioFrame` and the sink classes.

A listening session hands every user's frames to one :class:`AudioSink`, in order per user,
from one delivery thread (never the socket reader's, so a slow sink cannot make packets drop).

- :class:`AudioSink`: the base: ``on_audio``, ``on_rtcp``, ``cleanup``.
- :class:`MultiSink`: several sinks on one session (``vc.listen(["wav", "mixdown"])``); one
  that fails is stopped alone.
- :class:`AudioHandlingSink`: the seed's validation procedure (wrap-aware, per user and SSRC)
  in front of ``on_valid_audio``: a frame that would go backwards is dropped and counted.
- :class:`AudioFileSink`: one :class:`AudioFile` per user, all aligned on the session timeline.
- :class:`AudioFile`: one user's track streamed to disk through soundfile as frames arrive,
  silence where the user was silent, so tracks drop into an editor side by side; mono or
  stereo, 48 kHz or resampled (:mod:`listening_core.resample`); :meth:`AudioFile.convert`. Any
  length: a WAV is RIFF under 4 GiB and RF64 past it.
- :class:`FileSinkOptions`: the options the file sink plugins (wav, flac, mp3) share.
- :func:`recover_file`: make a file left by a killed process whole; :func:`convert_file`.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import enum
import errno
import logging
import os
import pathlib
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

from .errors import SinkError
from .rtp import seq_diff

if TYPE_CHECKING:
    import discord

_log = logging.getLogger(__name__)

__all__ = [
    "FILE_FORMATS",
    "FRAME_BYTES",
    "FRAME_SAMPLES",
    "MP3_SAMPLE_RATES",
    "SAMPLE_RATE",
    "AudioFile",
    "AudioFileSink",
    "AudioFrame",
    "AudioHandlingSink",
    "AudioSink",
    "FileSinkOptions",
    "FrameKind",
    "MultiSink",
    "RtcpPacket",
    "SessionInfo",
    "SinkError",
    "check_template",
    "convert_file",
    "mp3_bitrates",
    "mp3_compression_level",
    "recover_file",
    "safe_filename",
]

SAMPLE_RATE = 48_000
CHANNELS = 2
FRAME_SAMPLES = 960
FRAME_BYTES = FRAME_SAMPLES * CHANNELS * 2


class FrameKind(enum.Enum):
    """How a frame's audio was obtained."""

    RECEIVED = "received"
    """The packet arrived and was decoded."""
    SILENCE = "silence"
    """The packet arrived and was the Opus silence frame (senders end every spurt with five)."""
    FEC = "fec"
    """The packet was lost; rebuilt from the next packet's in-band FEC."""
    PLC = "plc"
    """The packet was lost (or its decoder died); concealed."""


@dataclass(slots=True)
class AudioFrame:
    """One 20 ms frame of one user's audio, placed on the session timeline.

    ``position`` is the session sample (48 kHz; sample 0 = the moment ``listen`` started) of the
    frame's first sample. ``pcm`` is 48 kHz stereo s16le (3840 bytes) when the sink wants PCM,
    else ``None``; ``opus`` is the received Opus frame (``None`` for FEC/PLC frames).
    """

    user_id: int
    ssrc: int
    sequence: int
    timestamp: int
    position: int
    kind: FrameKind
    pcm: bytes | None = None
    opus: bytes | None = None
    member: discord.Member | None = field(default=None, repr=False, compare=False)
    arrival: float | None = field(default=None, repr=False, compare=False)
    """``time.monotonic()`` when the packet arrived (``None`` for FEC/PLC frames): ``time.monotonic()
    - frame.arrival`` in ``on_audio`` is the frame's latency through the pipeline. The first frame
    of a talk spurt carries the receiver's estimate of its arrival free of delay spikes (never
    later than the real one), which is also what places it on the timeline."""

    @property
    def samples(self) -> int:
        """Samples per channel in this frame (960 for 20 ms)."""
        return len(self.pcm) // (CHANNELS * 2) if self.pcm is not None else FRAME_SAMPLES

    @property
    def end(self) -> int:
        """The session sample just after this frame."""
        return self.position + self.samples


@dataclass(slots=True, frozen=True)
class RtcpPacket:
    """A decrypted RTCP packet (compound packets are kept whole) from ``user_id`` (None if unknown)."""

    ssrc: int
    user_id: int | None
    packet_type: int
    data: bytes


class AudioSink(abc.ABC):
    """Receives a listening session's audio.

    ``on_audio`` is called for every frame, in order per user, from the session's delivery thread;
    ``on_rtcp`` for every RTCP packet; ``on_stop`` with the session's final sample after the last
    frame; ``cleanup`` once when the session ends. An exception from any of them stops this sink
    and reaches ``listen``'s ``after``. Set ``wants_pcm = False`` on sinks that only keep Opus:
    the session then skips decoding.
    """

    wants_pcm: ClassVar[bool] = True

    def on_start(self, session: SessionInfo) -> None:  # noqa: B027 - optional hook
        """Called once before the first frame with what is known about the session."""

    @abc.abstractmethod
    def on_audio(self, frame: AudioFrame) -> None:
        """Handle one frame."""

    def on_rtcp(self, packet: RtcpPacket) -> None:  # noqa: B027 - optional hook
        """Handle one decrypted RTCP packet (default: ignore it)."""

    def on_stop(self, end: int) -> None:  # noqa: B027 - optional hook
        """The session stopped at session sample ``end``; called after the last frame, before cleanup.

        File sinks extend every track to ``end`` so all tracks have the session's length.
        """

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        """The session ended: flush and close. Called exactly once."""


@dataclass(frozen=True)
class SessionInfo:
    """What a sink is told when a session starts."""

    guild_id: int | None
    channel_id: int | None
    started_at: float  # time.time() at sample 0
    sample_rate: int = SAMPLE_RATE
    channels: int = CHANNELS


def _unused_name(sink: object, taken: Container[str]) -> str:
    """``sink``'s class name, with ``-2``, ``-3``… if that is in ``taken``: its name in a MultiSink."""
    base = type(sink).__name__
    key, n = base, 2
    while key in taken:
        key, n = f"{base}-{n}", n + 1
    return key


class MultiSink(AudioSink):
    """Several sinks fed by one session: each gets every frame, RTCP packet and the stop.

    ``vc.listen(["wav", "mixdown"], options={"wav": {...}})`` builds one from installed sinks;
    ``MultiSink({"report": SessionReport(), "wav": my_sink})`` from instances. Audio is decoded
    once when any of them :attr:`~AudioSink.wants_pcm`. A sink that raises is cleaned up at once
    (its files keep what they hold), logged at ERROR and recorded in :attr:`errors`; the others go
    on. At cleanup a :class:`SinkError` naming every failed sink is raised, so ``after`` hears of
    it. When every sink has failed, the session ends.
    """

    def __init__(self, sinks: Mapping[str, AudioSink] | Iterable[AudioSink]) -> None:
        named = dict(sinks) if isinstance(sinks, Mapping) else {}
        if not isinstance(sinks, Mapping):
            for sink in sinks:
                named[_unused_name(sink, named)] = sink
        if not named:
            raise ValueError("MultiSink needs at least one sink")
        for key, sink in named.items():
            if not isinstance(sink, AudioSink):
                raise TypeError(f"MultiSink: {key!r} is a {type(sink).__name__}, not an AudioSink")
        self.sinks: dict[str, AudioSink] = named
        """The sinks by name, in the order they are called."""
        self.errors: dict[str, BaseException] = {}
        """The sinks that failed, by name, with their exception."""
        self._active = list(named.items())
        # Decoding is per session: decode when any sink wants PCM (an instance value here).
        setattr(self, "wants_pcm", any(s.wants_pcm for s in named.values()))  # noqa: B010

    def __getitem__(self, name: str) -> AudioSink:
        """The sink called ``name``."""
        return self.sinks[name]

    def __repr__(self) -> str:
        return f"<MultiSink {list(self.sinks)}>"

    def _fail(self, name: str, sink: AudioSink, exc: Exception) -> None:
        self.errors[name] = exc
        self._active = [(n, s) for n, s in self._active if s is not sink]
        _log.error("sink %r failed and was stopped (the other sinks go on): %r", name, exc)
        try:
            sink.cleanup()
        except Exception as cleanup_exc:
            _log.error("cleanup of the failed sink %r failed too: %r", name, cleanup_exc)
        if not self._active:
            raise SinkError(f"every sink failed: {self._describe_errors()}") from exc

    def _describe_errors(self) -> str:
        return "; ".join(f"{name}: {exc!r}" for name, exc in self.errors.items())

    def _each(self, call: Callable[[AudioSink], None]) -> None:
        for name, sink in list(self._active):
            try:
                call(sink)
            except Exception as exc:
                self._fail(name, sink, exc)

    def on_start(self, session: SessionInfo) -> None:
        """Start every sink."""
        self._each(lambda sink: sink.on_start(session))

    def on_audio(self, frame: AudioFrame) -> None:
        """Hand ``frame`` to every sink still running."""
        for name, sink in self._active:
            try:
                sink.on_audio(frame)
            except Exception as exc:
                self._fail(name, sink, exc)

    def on_rtcp(self, packet: RtcpPacket) -> None:
        """Hand ``packet`` to every sink still running."""
        self._each(lambda sink: sink.on_rtcp(packet))

    def on_stop(self, end: int) -> None:
        """Tell every sink still running that the session stopped at ``end``."""
        self._each(lambda sink: sink.on_stop(end))

    def cleanup(self) -> None:
        """Clean up every sink still running; raise :class:`SinkError` if any sink failed."""
        active, self._active = self._active, []
        for name, sink in active:
            try:
                sink.cleanup()
            except Exception as exc:
                self.errors[name] = exc
                _log.error("cleanup of sink %r failed: %r", name, exc)
        if self.errors:
            first = next(iter(self.errors.values()))
            raise SinkError(
                f"{len(self.errors)} of {len(self.sinks)} sinks failed: {self._describe_errors()}"
            ) from first


class AudioHandlingSink(AudioSink):
    """Validates frames before :meth:`on_valid_audio`: the seed's procedure, fixed.

    For each user and SSRC: the first frame is valid; the next sequence number is valid; a frame
    at or before the last valid one (wrap-aware, so 65535 → 0 is "next") is dropped and counted in
    :attr:`invalid`; a jump forward is accepted and counted in :attr:`gaps` (the receiver conceals
    every lost frame, so a gap means frames went missing upstream). Positions never go backwards
    for a user. The receiver already delivers in order; this is the guard that keeps a sink's
    output true if anything upstream ever does not.
    """

    def __init__(self) -> None:
        self._last_seq: dict[tuple[int, int], int] = {}
        self._last_end: dict[int, int] = {}
        self.invalid: collections.Counter[int] = collections.Counter()
        self.gaps: collections.Counter[int] = collections.Counter()

    def on_audio(self, frame: AudioFrame) -> None:
        key = (frame.user_id, frame.ssrc)
        last = self._last_seq.get(key)
        if last is not None:
            step = seq_diff(frame.sequence, last)
            if step <= 0:
                self.invalid[frame.user_id] += 1
                return
            if step > 1:
                self.gaps[frame.user_id] += 1
        end = self._last_end.get(frame.user_id)
        if end is not None and frame.position < end:
            # A new SSRC for this user (rejoin) placed over its previous frames: keep time moving.
            self.invalid[frame.user_id] += 1
            return
        self._last_seq[key] = frame.sequence
        self._last_end[frame.user_id] = frame.end
        self.on_valid_audio(frame)

    @abc.abstractmethod
    def on_valid_audio(self, frame: AudioFrame) -> None:
        """Handle a frame that passed validation."""


_UNSAFE = re.compile(r"[^\w.\- ]+", re.UNICODE)
# Windows device names, with or without an extension (COM¹-³ and LPT¹-³ included: Windows reserves them too)
_RESERVED = re.compile(r"(con|prn|aux|nul|com[\d¹²³]|lpt[\d¹²³])(\..*)?", re.IGNORECASE)
_MAX_NAME_BYTES = 200  # file systems allow 255 bytes; leave room for "-NN" and the extension


def safe_filename(name: str, *, fallback: str = "user", max_length: int = 80) -> str:
    """A file-name component made from ``name`` (say a user name) that cannot escape a directory.

    Control characters, path separators and anything but letters, digits, ``. - _`` and spaces are
    replaced; leading dots are removed (no hidden files, no ``..``); names Windows reserves
    (``CON``, ``NUL``…) get a ``_`` prefix; the result is at most ``max_length`` characters and
    200 bytes of UTF-8; empty results use ``fallback`` (made safe the same way).
    """
    cleaned = unicodedata.normalize("NFC", name)
    cleaned = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in cleaned)
    cleaned = _UNSAFE.sub("_", cleaned).strip(" .")
    cleaned = re.sub(r"\s+", " ", cleaned)[:max_length].strip(" .")
    while len(cleaned.encode()) > _MAX_NAME_BYTES:
        cleaned = cleaned[:-1].rstrip(" .")
    if _RESERVED.fullmatch(cleaned):
        cleaned = "_" + cleaned
    if not cleaned:
        return safe_filename(fallback) if fallback and fallback != name else "user"
    return cleaned


# --------------------------------------------------------------------------------------- formats

FILE_FORMATS: dict[str, tuple[str, str | None, str]] = {
    "wav": ("WAV", "PCM_16", ".wav"),
    "flac": ("FLAC", "PCM_16", ".flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", ".mp3"),
    "ogg": ("OGG", "VORBIS", ".ogg"),
    "opus": ("OGG", "OPUS", ".opus"),
}
"""Format names accepted by :func:`convert_file` / :meth:`AudioFile.convert`: soundfile's
``(format, subtype, extension)`` for each."""

MP3_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
"""The sample rates MPEG Layer III can store (MPEG-1, -2 and -2.5)."""

_MP3_BITRATES = {
    1: (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),  # MPEG-1: 32-48 kHz
    2: (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),  # MPEG-2: 16-24 kHz
    3: (8, 16, 24, 32, 40, 48, 56, 64),  # MPEG-2.5: 8-12 kHz
}
_MP3_RANGE = {1: (32, 320), 2: (8, 160), 3: (8, 64)}


def _mp3_version(sample_rate: int) -> int:
    return 1 if sample_rate >= 32000 else 2 if sample_rate >= 16000 else 3


def mp3_bitrates(sample_rate: int) -> tuple[int, ...]:
    """The constant bitrates (kbit/s) an MP3 at ``sample_rate`` can use."""
    return _MP3_BITRATES[_mp3_version(sample_rate)]


def mp3_compression_level(bitrate: int, sample_rate: int) -> float:
    """soundfile's ``compression_level`` (0…1) that makes libsndfile's LAME encoder use ``bitrate``.

    libsndfile maps the level linearly onto the bitrates of the MPEG version the sample rate
    implies and truncates: ``kbps = int(high - level * (high - low))`` with ``(low, high)`` =
    (32, 320) for 32-48 kHz (MPEG-1), (8, 160) for 16-24 kHz (MPEG-2), (8, 64) below (MPEG-2.5).
    This is the inverse, nudged so the truncation lands on ``bitrate``.
    """
    version = _mp3_version(sample_rate)
    if bitrate not in _MP3_BITRATES[version]:
        raise ValueError(
            f"bitrate {bitrate} kbit/s is not an MP3 bitrate at {sample_rate} Hz; use one of "
            + ", ".join(map(str, _MP3_BITRATES[version]))
        )
    low, high = _MP3_RANGE[version]
    return min(1.0, max(0.0, (high - bitrate - 1e-6) / (high - low)))


# libsndfile's SFC_UPDATE_HEADER_NOW: rewrite the header of a file being written.
_SFC_UPDATE_HEADER_NOW = 0x1060
_SFC_RF64_AUTO_DOWNGRADE = 0x1210  # sndfile.h; sf_command returns the new setting
_HEADER_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "W64", "AIFF", "CAF", "AU"})


def _rf64_auto_downgrade(sf_file: Any) -> None:
    """Have libsndfile write an RF64 file as a RIFF WAVE while it holds under 4 GiB."""
    import soundfile

    if not soundfile._snd.sf_command(sf_file._file, _SFC_RF64_AUTO_DOWNGRADE, soundfile._ffi.NULL, 1):
        raise SinkError("libsndfile refused SFC_RF64_AUTO_DOWNGRADE")


def _update_header(sf_file: object) -> None:
    """Make the on-disk header of a PCM container describe what is written so far (best effort)."""
    try:
        import soundfile

        snd, ffi = soundfile._snd, soundfile._ffi
        snd.sf_command(sf_file._file, _SFC_UPDATE_HEADER_NOW, ffi.NULL, 0)  # type: ignore[attr-defined]
    except Exception:  # a soundfile without these internals: recover_file() fixes the header instead
        pass


_SFE_SYSTEM = 2  # libsndfile's "System error": the operating system refused (disk full, EFBIG...)


def _error_text(exc: BaseException, sf_file: Any = None) -> str:
    """``exc`` as text, with libsndfile's own account of a system error ("No space left on device").

    soundfile reports a failing write or open as "System error." only; libsndfile keeps the
    operating system's message (for ``sf_file``, or from the last failed open).
    """
    text = f"{type(exc).__name__}: {exc}"
    if getattr(exc, "code", None) != _SFE_SYSTEM:
        return text
    try:
        import soundfile

        handle = sf_file._file if sf_file is not None else soundfile._ffi.NULL
        detail = soundfile._ffi.string(soundfile._snd.sf_strerror(handle)).decode(errors="replace")
    except Exception:  # a soundfile without these internals: the short message it is
        return text
    return f"{text} ({detail})" if detail and detail != "No Error." and detail not in text else text


# --------------------------------------------------------------------------------------- WAV files
#
# A RIFF WAVE file cannot describe more than 4 GiB (its sizes are 32 bits): 6.2 hours of 48 kHz
# stereo. RF64 (EBU Tech 3306) lifts that: "RF64" instead of "RIFF", and a ``ds64`` chunk, first
# after "WAVE", with the sizes in 64 bits. A file that may grow past 4 GiB reserves the ds64's
# room with a ``JUNK`` chunk of the same size (36 bytes), which every WAV reader skips; as long
# as the file stays under 4 GiB it is an ordinary RIFF WAVE (PCM ``fmt``, 80-byte header); when
# it outgrows that, the header is rewritten in place as RF64 (RIFF→RF64, JUNK→ds64), nothing moves.
#
# libsndfile can do this itself (format RF64, SFC_RF64_AUTO_DOWNGRADE), but its short files are
# not the WAV they were: a WAVE_FORMAT_EXTENSIBLE ``fmt`` and a ``fact`` chunk (112-byte header),
# which Python 3.11's ``wave`` module refuses ("unknown format: 65534"). So 16-bit PCM WAV, what
# every WAV sink writes, is written by :class:`_WavWriter`; libsndfile's RF64 is kept for the
# other WAV subtypes AudioFile may be asked for.

_U32 = 0xFFFFFFFF
_JUNK_FOR_DS64 = 28  # a ds64 chunk's payload with no table: RIFF size, data size, sample count, table length
_WAV_HEADER_BYTES = 12 + 8 + _JUNK_FOR_DS64 + 8 + 16 + 8  # RIFF/RF64, JUNK/ds64, fmt, data chunk header


def _wav_header(channels: int, sample_rate: int, data_bytes: int) -> bytes:
    """The 80-byte header of a 16-bit PCM WAV holding ``data_bytes`` of samples: RIFF (with the
    JUNK chunk that keeps room for a ds64) while it fits in 32 bits, RF64 beyond."""
    import struct

    align = 2 * channels
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, sample_rate, sample_rate * align, align, 16)
    riff_size = _WAV_HEADER_BYTES - 8 + data_bytes + data_bytes % 2
    if riff_size <= _U32:
        return (
            struct.pack("<4sI4s4sI", b"RIFF", riff_size, b"WAVE", b"JUNK", _JUNK_FOR_DS64)
            + bytes(_JUNK_FOR_DS64)
            + fmt
            + struct.pack("<4sI", b"data", data_bytes)
        )
    ds64 = struct.pack("<4sIQQQI", b"ds64", _JUNK_FOR_DS64, riff_size, data_bytes, data_bytes // align, 0)
    return struct.pack("<4sI4s", b"RF64", _U32, b"WAVE") + ds64 + fmt + struct.pack("<4sI", b"data", _U32)


class _WavWriter:
    """A 16-bit PCM WAV (RF64 once it outgrows 4 GiB) that :class:`AudioFile` writes itself.

    The part of soundfile's ``SoundFile`` that AudioFile uses (``write``, ``buffer_write``,
    ``seek``, ``flush``, ``close``), plus :meth:`update_header` and :meth:`skip`, which leaves
    silence as a hole in the file (sparse where the file system allows: an hour of silence
    before a member speaks takes no disk). The header always describes every whole sample on
    disk, audio written ahead of the write position included (as libsndfile's does).
    """

    def __init__(self, path: pathlib.Path, channels: int, sample_rate: int) -> None:
        self.channels = channels
        self.samplerate = sample_rate
        self._align = 2 * channels
        self._pos = 0  # samples: where the next write goes
        self._end = 0  # bytes of sample data on disk (a partial sample after a failed write included)
        self._fh = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        try:
            self._put(0, _wav_header(channels, sample_rate, 0))
        except BaseException:
            self._fh.close()
            raise

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def _put(self, offset: int, data: Any) -> None:
        """Write all of ``data`` at byte ``offset`` of the file (a short write is resumed)."""
        view = memoryview(data).cast("B")
        self._fh.seek(offset)
        done = 0
        try:
            while done < len(view):
                n = self._fh.write(view[done:])
                if not n:
                    raise OSError(f"writing {self._fh.name} made no progress")
                done += n
        finally:
            if offset >= _WAV_HEADER_BYTES:
                self._end = max(self._end, offset - _WAV_HEADER_BYTES + done)

    def buffer_write(self, data: Any, dtype: str) -> None:
        if dtype != "int16":
            raise ValueError(f"a 16-bit WAV takes int16 samples, not {dtype}")
        self._put(_WAV_HEADER_BYTES + self._pos * self._align, data)
        self._pos += len(data) // self._align

    def write(self, data: Any) -> None:
        import numpy as np

        samples = np.ascontiguousarray(data, dtype="<i2")
        if samples.ndim != 2 or samples.shape[1] != self.channels:
            raise ValueError(f"expected int16 samples shaped (n, {self.channels}), got {samples.shape}")
        self._put(_WAV_HEADER_BYTES + self._pos * self._align, samples)
        self._pos += samples.shape[0]

    def seek(self, frames: int) -> int:
        self._pos = frames
        return frames

    def skip(self, frames: int) -> None:
        """``frames`` samples of silence at the end of the file, as a hole (never over audio)."""
        if self._pos * self._align < self._end:
            raise ValueError("skip() would leave audio on disk after the write position in place")
        self._pos += frames
        self._end = self._pos * self._align
        self._fh.truncate(_WAV_HEADER_BYTES + self._end)

    def update_header(self) -> None:
        """Rewrite the header to describe every whole sample on disk."""
        self._put(0, _wav_header(self.channels, self.samplerate, self._end // self._align * self._align))

    def flush(self) -> None:
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh.closed:
            return
        try:
            self.update_header()
        finally:
            self._fh.close()


# --------------------------------------------------------------------------------------- AudioFile


class AudioFile:
    """One user's track, written to disk as frames arrive (16-bit WAV by :class:`_WavWriter`,
    other formats through soundfile).

    Frames are written at their session position; the stretch between the end of the file and a
    frame's position is filled with silence, so the file always starts at session sample 0.
    :meth:`pad_to` extends it with silence to the session's end. A sink that makes its own audio
    (a mix, an utterance) appends it with :meth:`write_samples` instead. Memory does not grow
    with the session: nothing is kept but the open file (and, when resampling, the filter's
    history).

    ``channels`` is 2 (as received) or 1 (left and right averaged). ``sample_rate`` is the file's
    rate: 48000 writes the received samples unchanged; any other rate goes through the streaming
    anti-aliased :class:`~listening_core.resample.Resampler`, delay-compensated so the track stays
    on the session timeline (``ceil(session samples * rate / 48000)`` samples in the end).

    Length: a WAV has no limit. It is an ordinary RIFF WAVE while it holds under 4 GiB (6.2 hours
    of 48 kHz stereo) and becomes RF64 in place when it grows past that, the 64-bit form of WAV
    that libsndfile (soundfile), sox and ffmpeg read. Silence at the end of a 16-bit WAV (a
    member not there yet, or quiet for a while) is left as a hole in the file: on file systems
    with sparse files it takes no disk, and it reads as zeros.

    Crash safety: audio goes to the operating system as it is written (in blocks of a quarter of
    a second), and every ``flush_interval`` seconds of audio a WAV header is rewritten to cover
    it, so a killed process leaves a file readable to about a second before the kill. The
    periodic flush does not ``fsync``: with hundreds of speakers, one ``fsync`` per file per
    second would stall delivery on a real disk; :meth:`flush` does, when you ask. A sink that
    holds audio back until it is final (a mix waiting for late frames) puts it on disk ahead of
    the end with :meth:`write_ahead`, so a crash does not cost what it held. After a crash,
    :func:`recover_file` makes any of these files whole again.

    A failing write (disk full, permissions…) closes the file, keeps what was written, sets
    :attr:`error` and raises :class:`SinkError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        format: str = "WAV",
        subtype: str | None = "PCM_16",
        channels: int = CHANNELS,
        sample_rate: int = SAMPLE_RATE,
        compression_level: float | None = None,
        bitrate_mode: str | None = None,
        flush_interval: float = 1.0,
    ) -> None:
        import soundfile

        from .resample import Resampler

        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 (mono) or 2 (stereo), got {channels}")
        self.path = pathlib.Path(path)
        self.format = format
        self.channels = channels
        self.sample_rate = sample_rate
        self.position = 0  # session samples (48 kHz) covered, silence included
        self.frames_written = 0  # samples per channel in the file (at sample_rate)
        self.done = False
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._resampler = (
            Resampler(SAMPLE_RATE, sample_rate, channels) if sample_rate != SAMPLE_RATE else None
        )
        self._flush_every = max(1, round(flush_interval * sample_rate)) if flush_interval > 0 else 0
        self._since_flush = 0
        # libsndfile 1.2.2's MP3 encoder copies only half of each 16-bit stereo block it is
        # given (a memcpy counted in samples, not bytes); its 32-bit path is right
        self._wide = format.upper() == "MP3"
        # Received stereo at 48 kHz goes to the file as it is: frames are gathered into blocks
        # (written as raw bytes, no array conversion) instead of one library call per 20 ms.
        self._fast = self._resampler is None and channels == CHANNELS and not self._wide
        self._pending = bytearray()
        self._extent = 0  # samples on disk, those written ahead of the end included
        wav = format.upper() == "WAV"
        # 16-bit PCM WAV is written here (RIFF, RF64 past 4 GiB; see _WavWriter); other WAV
        # subtypes go to libsndfile's RF64, which stays a (WAVE_FORMAT_EXTENSIBLE) RIFF WAV under 4 GiB.
        self._own = wav and (subtype or "PCM_16").upper() == "PCM_16"
        self._file: Any
        try:
            if self._own:
                self._file = _WavWriter(self.path, channels, sample_rate)
            else:
                self._file = soundfile.SoundFile(
                    self.path,
                    "w",
                    samplerate=sample_rate,
                    channels=channels,
                    format="RF64" if wav else format,
                    subtype=subtype,
                    compression_level=compression_level,
                    bitrate_mode=bitrate_mode,
                )
                if wav:
                    try:
                        _rf64_auto_downgrade(self._file)
                    except BaseException:
                        self._file.close()
                        raise
        except Exception as exc:
            self.error = exc
            self.done = True
            raise SinkError(f"cannot create {self.path}: {_error_text(exc)}") from exc

    @property
    def duration(self) -> float:
        """Seconds of audio in the file so far."""
        return self.frames_written / self.sample_rate

    def write(self, frame: AudioFrame) -> None:
        """Write ``frame`` at its position (silence before it if needed; overlap is cut)."""
        if frame.pcm is None:
            raise SinkError(f"{type(self).__name__} needs PCM; the frame of user {frame.user_id} has none")
        with self._lock:
            self._check_open()
            gap = frame.position - self.position
            pcm = frame.pcm
            if gap < 0:
                pcm = pcm[-gap * CHANNELS * 2 :]  # overlaps what is written: keep only the new part
                if not pcm:
                    return
            elif gap > 0:
                self._write_silence(gap)
            self._write_pcm(pcm)

    def write_samples(self, samples: Any) -> None:
        """Append 48 kHz int16 samples at the end of the file; :attr:`position` advances by their count.

        ``samples`` is shaped ``(n, 2)`` (stereo, as received) or ``(n,)`` / ``(n, 1)`` (mono): it
        goes to the file's channels (stereo averaged to mono, mono doubled to stereo) and rate
        like a frame's PCM does. For sinks that write audio they made themselves (a mix, an
        utterance) rather than one user's frames at their session positions.
        """
        data = _samples_block(samples)
        with self._lock:
            self._check_open()
            if len(data):
                self._write_block(data)

    def write_ahead(self, samples: Any, offset: int = 0) -> None:
        """Put audio that may still change on disk after the end of the file, without moving the end.

        For a sink that holds audio back until it is final (a mix waiting for late frames): what
        it holds reaches the disk too, and the header covers it, so a killed process leaves it in
        the file. ``samples`` (48 kHz int16, shaped as for :meth:`write_samples`) are written
        ``offset`` samples past the end of the file; everything between the end and ``offset``
        must have been written ahead before (``offset`` is at most :attr:`ahead`). The next
        :meth:`write_samples`, :meth:`write` or :meth:`pad_to` overwrites it from the end on; a
        file closed with audio still ahead of its end keeps that audio. Only for files at 48 kHz
        in a format with a header that can be rewritten (WAV).
        """
        data = _samples_block(samples)
        if self._resampler is not None or self.format.upper() not in _HEADER_FORMATS:
            raise ValueError(f"write_ahead needs a 48 kHz WAV file; {self.path} is {self.format}")
        with self._lock:
            self._check_open()
            if not 0 <= offset <= self.ahead:
                raise ValueError(f"offset {offset} is not in 0…{self.ahead}, the samples written ahead")
            if not len(data):
                return
            self._drain()
            end = self.frames_written
            try:
                self._file.seek(end + offset)
                self._file.write(self._layout(data))
                self._extent = max(self._extent, end + offset + len(data))
                self._update_header()
                self._file.seek(end)
            except Exception as exc:
                self._fail(exc, "writing ahead in")

    @property
    def ahead(self) -> int:
        """Samples on disk past the end of the file, put there by :meth:`write_ahead`."""
        return max(0, self._extent - self.frames_written)

    def pad_to(self, samples: int) -> None:
        """Extend the file with silence up to session sample ``samples`` (no-op if it is that long)."""
        with self._lock:
            if samples > self.position and not self.done:
                self._write_silence(samples - self.position)

    def _check_open(self) -> None:
        if self.done:
            if self.error is not None:
                raise SinkError(f"{self.path} failed earlier: {self.error}") from self.error
            raise SinkError(f"{self.path} is already closed")

    def _write_silence(self, samples: int) -> None:
        if self._own and self._resampler is None and samples >= _BLOCK_SAMPLES:
            self._write_hole(samples)
            return
        if self._fast:
            while samples > 0:
                n = min(samples, _BLOCK_SAMPLES)
                self._append(bytes(n * CHANNELS * 2), n)
                samples -= n
            return
        import numpy as np

        chunk = np.zeros((min(samples, SAMPLE_RATE), CHANNELS), dtype=np.int16)
        while samples > 0:
            n = min(samples, len(chunk))
            self._write_block(chunk[:n])
            samples -= n

    def _write_hole(self, samples: int) -> None:
        """Silence at the end of a 16-bit WAV: zeros over what was written ahead, a hole after it."""
        import numpy as np

        over = min(samples, self.ahead)
        if over:
            self._write_block(np.zeros((over, self.channels), dtype=np.int16))
            samples -= over
            if not samples:
                return
        self._drain()
        try:
            self._file.skip(samples)
        except Exception as exc:
            self._fail(exc, "writing")
        self.position += samples
        self.frames_written += samples
        self._since_flush += samples
        if self._flush_every and self._since_flush >= self._flush_every:
            self._flush()

    def _write_pcm(self, pcm: bytes) -> None:
        if self._fast:
            self._append(pcm, len(pcm) // (CHANNELS * 2))
            return
        import numpy as np

        self._write_block(np.frombuffer(pcm, dtype="<i2").reshape(-1, CHANNELS))

    def _append(self, pcm: bytes, samples: int) -> None:
        """Queue ``samples`` of file-ready PCM; written when a block is full or at a flush."""
        self._pending += pcm
        self.position += samples
        self.frames_written += samples
        self._since_flush += samples
        if len(self._pending) >= _BLOCK_BYTES:
            self._drain()
        if self._flush_every and self._since_flush >= self._flush_every:
            self._flush()

    def _drain(self) -> None:
        """Write what :meth:`_append` queued."""
        if not self._pending:
            return
        data = bytes(self._pending)
        self._pending.clear()
        try:
            self._file.buffer_write(data, dtype="int16")
        except Exception as exc:
            self._fail(exc, "writing")

    def _write_block(self, data: Any) -> None:
        """Write 48 kHz int16 samples (shape ``(n, 2)`` or ``(n, 1)``), converted to the file's layout."""
        import numpy as np

        count = data.shape[0]
        if self._resampler is None:
            out = self._layout(data)
        else:
            x = data.astype(np.float64)
            if x.shape[1] > self.channels:
                x = x.mean(axis=1, keepdims=True)
            elif x.shape[1] < self.channels:
                x = np.repeat(x, self.channels, axis=1)
            out = _to_int16(self._resampler.process(x))
        self._file_write(out)
        self.position += count

    def _layout(self, data: Any) -> Any:
        """48 kHz int16 samples ``(n, 1)`` or ``(n, 2)`` in the file's channels (no resampling)."""
        import numpy as np

        if data.shape[1] > self.channels:
            return ((data[:, 0].astype(np.int32) + data[:, 1]) // 2).astype(np.int16).reshape(-1, 1)
        return data if data.shape[1] == self.channels else np.repeat(data, self.channels, axis=1)

    def _file_write(self, out: Any) -> None:
        self._drain()
        if len(out):
            if self._wide:
                out = out.astype("<i4") << 16  # the same samples, as 32-bit
            try:
                self._file.write(out)
            except Exception as exc:
                self._fail(exc, "writing")
            self.frames_written += len(out)
            self._since_flush += len(out)
        if self._flush_every and self._since_flush >= self._flush_every:
            self._flush()

    def _fail(self, exc: BaseException, doing: str) -> None:
        self.error = exc
        self.done = True
        text = _error_text(exc, self._file)
        with contextlib.suppress(Exception):
            self._file.close()
        raise SinkError(f"{doing} {self.path} failed after {self.duration:.2f} s of audio: {text}") from exc

    def _flush(self, *, sync: bool = False) -> None:
        self._since_flush = 0
        self._drain()
        try:
            if self.format.upper() in _HEADER_FORMATS:
                self._update_header()
            if sync:
                self._file.flush()
        except Exception as exc:
            self._fail(exc, "flushing")

    def _update_header(self) -> None:
        if self._own:
            self._file.update_header()
        else:
            _update_header(self._file)

    def flush(self) -> None:
        """Push what is written to disk: a WAV header is brought up to date, then ``fsync``."""
        with self._lock:
            if not self.done:
                self._flush(sync=True)

    def cleanup(self) -> None:
        """Finish the file (the resampler's tail) and close it (idempotent).

        Raises :class:`SinkError` if the last writes or the close fail (the file is closed anyway).
        """
        with self._lock:
            if self.done:
                return
            self._drain()
            if self._resampler is not None:
                self._flush_every = 0
                self._file_write(_to_int16(self._resampler.flush()))
            self.done = True
            try:
                self._file.close()
            except Exception as exc:
                self.error = exc
                raise SinkError(f"closing {self.path} failed: {type(exc).__name__}: {exc}") from exc

    def convert(
        self,
        format: str,
        path: str | os.PathLike[str] | None = None,
        *,
        bitrate: int | None = None,
        compression_level: float | None = None,
    ) -> pathlib.Path:
        """Write this (finished) file in another format with soundfile, block by block; the new path.

        ``format`` is a key of :data:`FILE_FORMATS` (``"wav"``, ``"flac"``, ``"mp3"``, ``"ogg"``,
        ``"opus"``); ``path`` defaults to this file's path with the format's extension.
        """
        if not self.done:
            raise SinkError(f"{self.path} is still being written; convert it after the session")
        return convert_file(self.path, format, path, bitrate=bitrate, compression_level=compression_level)

    def __repr__(self) -> str:
        state = "failed" if self.error is not None else "done" if self.done else "open"
        return f"<{type(self).__name__} {self.path} samples={self.frames_written} {state}>"


_BLOCK_SAMPLES = 12_000  # 0.25 s: received PCM is written in blocks of this many samples
_BLOCK_BYTES = _BLOCK_SAMPLES * CHANNELS * 2


def _samples_block(samples: Any) -> Any:
    """``samples`` as an int16 array shaped ``(n, 1)`` or ``(n, 2)``; ValueError for anything else."""
    import numpy as np

    data = np.asarray(samples)
    if data.ndim == 1:
        data = data.reshape(-1, 1)
    if data.ndim != 2 or data.shape[1] not in (1, 2) or data.dtype != np.int16:
        raise ValueError(
            f"expected int16 samples shaped (n,), (n, 1) or (n, 2), got {data.dtype} {data.shape}"
        )
    return data


def _to_int16(x: Any) -> Any:
    import numpy as np

    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


# --------------------------------------------------------------------------------------- files


def convert_file(
    source: str | os.PathLike[str],
    format: str,
    destination: str | os.PathLike[str] | None = None,
    *,
    bitrate: int | None = None,
    compression_level: float | None = None,
    blocksize: int = 65536,
) -> pathlib.Path:
    """Re-encode ``source`` as ``format`` (a key of :data:`FILE_FORMATS`) through soundfile.

    Read and written in blocks of ``blocksize`` samples, so memory does not depend on the file's
    length. Same sample rate and channels. ``bitrate`` (kbit/s) applies to MP3 (constant
    bitrate, see :func:`mp3_compression_level`); ``compression_level`` (0…1) is soundfile's,
    for FLAC, Ogg and MP3. Returns the destination path (default: ``source`` with the format's
    extension); refuses to overwrite ``source``.
    """
    import soundfile

    key = format.lower().lstrip(".")
    if key not in FILE_FORMATS:
        raise ValueError(f"unknown format {format!r}; use one of {', '.join(FILE_FORMATS)}")
    sf_format, subtype, extension = FILE_FORMATS[key]
    source = pathlib.Path(source)
    dest = pathlib.Path(destination) if destination is not None else source.with_suffix(extension)
    if dest.resolve() == source.resolve():
        raise ValueError(f"converting {source} to {key} would overwrite it; give another path")
    info = soundfile.info(str(source))
    if key == "mp3":
        if info.samplerate not in MP3_SAMPLE_RATES:
            raise ValueError(f"MP3 cannot store {info.samplerate} Hz audio")
        if bitrate is not None:
            compression_level = mp3_compression_level(bitrate, info.samplerate)
    elif bitrate is not None:
        raise ValueError("bitrate applies to mp3 only")
    with soundfile.SoundFile(str(source)) as reader:
        writer: Any
        if key == "wav":  # written like AudioFile's WAV: no 4 GiB limit (RF64 past it)
            writer = _WavWriter(dest, reader.channels, reader.samplerate)
        else:
            writer = soundfile.SoundFile(
                str(dest),
                "w",
                samplerate=reader.samplerate,
                channels=reader.channels,
                format=sf_format,
                subtype=subtype,
                compression_level=compression_level,
                bitrate_mode="CONSTANT" if key == "mp3" and bitrate is not None else None,
            )
        try:
            while True:
                block = reader.read(blocksize, dtype="int16", always_2d=True)
                if not len(block):
                    break
                writer.write(block)
        finally:
            writer.close()
    return dest


def recover_file(path: str | os.PathLike[str]) -> int:
    """Make a file left behind by a killed process readable; returns the samples it now holds.

    - **WAV**: the RIFF and ``data`` sizes are set from the file's length (a partial last sample
      is cut off), in 64 bits: a file past 4 GiB becomes (or stays) RF64, its ``ds64`` chunk
      written where the header kept room for it; a WAV written before there was such room (an
      older listening-core past 4 GiB) is copied into an RF64 file that replaces it. PCM goes
      to the operating system as it is written, so everything written before the kill is kept.
      (libsndfile reads a file under 4 GiB even unrepaired, to its last flush; other readers
      need the sizes.)
    - **FLAC**: libFLAC writes the stream's length into its header only when the file is
      closed. The file is decoded up to the first damaged frame and re-encoded, losslessly,
      into a complete FLAC that replaces it (through a temporary file next to it). Lost: the
      samples the encoder still held (at most about 0.1 s).
    - **MP3**: already readable (a stream of frames); nothing to change. Lost: the samples LAME
      still held (a few frames).

    A file that was closed properly is left as it is. Idempotent.
    """
    import soundfile

    path = pathlib.Path(path)
    with path.open("rb") as fh:
        magic = fh.read(12)
    if magic[:4] in (b"RIFF", b"RF64") and magic[8:12] == b"WAVE":
        return _recover_wav(path)
    if magic[:4] == b"fLaC":
        return _recover_flac(path)
    with soundfile.SoundFile(str(path)) as f:
        return _count_readable(f)


def _count_readable(f: Any, sink: Any = None, blocksize: int = 4096) -> int:
    total = 0
    while True:
        try:
            block = f.read(blocksize, dtype="int16", always_2d=True)
        except Exception:  # a damaged last frame: everything before it counts
            break
        if not len(block):
            break
        if sink is not None:
            sink.write(block)
        total += len(block)
    return total


def _recover_wav(path: pathlib.Path) -> int:
    """Set a WAV's sizes from its length (see :func:`recover_file`); 64-bit throughout."""
    import struct

    with path.open("r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(0)
        rf64 = fh.read(4) == b"RF64"
        chunks: list[tuple[bytes, int, int]] = []  # (id, offset, size) of the chunks before the data
        fmt = ds64 = b""
        pos = 12
        while True:
            fh.seek(pos)
            head = fh.read(8)
            if len(head) < 8:
                raise SinkError(f"{path}: no data chunk; nothing to recover")
            chunk_id, chunk_size = head[:4], struct.unpack("<I", head[4:])[0]
            if chunk_id == b"data":
                data_start = pos + 8
                break
            if chunk_id == b"fmt ":
                fmt = fh.read(min(chunk_size, 64))
            elif chunk_id == b"ds64":
                ds64 = fh.read(min(chunk_size, 64))
            chunks.append((chunk_id, pos, chunk_size))
            pos += 8 + chunk_size + chunk_size % 2
        if len(fmt) < 14 or not struct.unpack("<H", fmt[12:14])[0]:
            raise SinkError(f"{path}: no fmt chunk before the data; not a WAV file this can repair")
        block_align = struct.unpack("<H", fmt[12:14])[0]
        declared = chunk_size
        if rf64 and chunk_size == _U32:
            if len(ds64) < 24:
                raise SinkError(f"{path}: an RF64 file without a ds64 chunk; not a WAV file this can repair")
            declared = struct.unpack("<Q", ds64[8:16])[0]
        data_size = (size - data_start) // block_align * block_align
        end = data_start + declared + declared % 2
        if declared != data_size and declared not in (0, _U32) and end < size and _chunks_to(fh, end, size):
            # a complete data chunk followed by other chunks: the file was closed properly
            return declared // block_align
        frames = data_size // block_align
        riff_size = data_start + data_size - 8
        if rf64 or riff_size > _U32:
            header = _rf64_header(fh, chunks, data_start, riff_size, data_size, frames)
            if header is None:  # no room for a ds64 chunk: rewrite the file with one
                fh.close()
                _rewrite_as_rf64(path, chunks, data_start, data_size, frames)
                return frames
            fh.truncate(data_start + data_size)
            fh.seek(0)
            if fh.read(len(header)) != header:
                fh.seek(0)
                fh.write(header)
            return frames
        if declared != data_size or struct.unpack("<I", _read_at(fh, 4, 4))[0] != riff_size:
            fh.truncate(data_start + data_size)
            fh.seek(data_start - 4)
            fh.write(struct.pack("<I", data_size))
            fh.seek(4)
            fh.write(struct.pack("<I", riff_size))
        return frames


def _read_at(fh: Any, offset: int, n: int) -> bytes:
    fh.seek(offset)
    data: bytes = fh.read(n)
    return data


def _chunks_to(fh: Any, pos: int, size: int) -> bool:
    """Whether the bytes from ``pos`` on are RIFF chunks ending with the file (not more samples)."""
    import struct

    for _ in range(64):
        if pos >= size:
            return pos - size in (0, 1)  # the last chunk's pad byte may be missing
        head = _read_at(fh, pos, 8)
        if len(head) < 8 or not all(0x20 <= c <= 0x7E for c in head[:4]):
            return False
        chunk_size = struct.unpack("<I", head[4:])[0]
        pos += 8 + chunk_size + chunk_size % 2
    return False


# Chunks a header rewritten as RF64 leaves out: room kept for a ds64, padding, and the 32-bit
# sample count that the ds64 replaces.
_DROPPED_CHUNKS = frozenset({b"ds64", b"JUNK", b"junk", b"PAD ", b"FLLR", b"fact"})


def _rf64_prefix(
    fh: Any, chunks: list[tuple[bytes, int, int]], riff_size: int, data_size: int, frames: int
) -> bytes:
    """RF64 marker, ds64 and the chunks that stay (``fmt`` and any others), as they go before the data."""
    import struct

    kept = b"".join(
        _read_at(fh, offset, 8 + n + n % 2)
        for chunk_id, offset, n in chunks
        if chunk_id not in _DROPPED_CHUNKS
    )
    ds64 = struct.pack("<4sIQQQI", b"ds64", _JUNK_FOR_DS64, riff_size, data_size, frames, 0)
    return struct.pack("<4sI4s", b"RF64", _U32, b"WAVE") + ds64 + kept


def _rf64_header(
    fh: Any,
    chunks: list[tuple[bytes, int, int]],
    data_start: int,
    riff_size: int,
    data_size: int,
    frames: int,
) -> bytes | None:
    """The file's header as RF64, in the room its header has now (``data_start`` bytes), or None."""
    import struct

    prefix = _rf64_prefix(fh, chunks, riff_size, data_size, frames)
    room = data_start - 8 - len(prefix)
    if room == 0:
        filler = b""
    elif room >= 8:
        filler = struct.pack("<4sI", b"JUNK", room - 8) + bytes(room - 8)
    else:
        return None
    return prefix + filler + struct.pack("<4sI", b"data", _U32)


def _next_data(fh: Any, pos: int, end: int) -> int:
    """Where data starts at or after ``pos`` in ``fh`` (``end`` if only a hole is left); ``pos``
    where the file system cannot say (no SEEK_DATA)."""
    seek_data = getattr(os, "SEEK_DATA", None)
    if seek_data is None:
        return pos
    try:
        return min(end, os.lseek(fh.fileno(), pos, seek_data))
    except OSError as exc:
        return end if exc.errno == errno.ENXIO else pos


def _rewrite_as_rf64(
    path: pathlib.Path, chunks: list[tuple[bytes, int, int]], data_start: int, data_size: int, frames: int
) -> None:
    """Copy a WAV whose header has no room for a ds64 (one written before RF64) into an RF64 file."""
    import shutil
    import struct

    tmp = path.with_name(f".{path.name}.recovering")
    try:
        # unbuffered: _next_data moves the descriptor's offset, every read seeks first
        with path.open("rb", buffering=0) as src, tmp.open("wb") as dst:
            riff_size = len(_rf64_prefix(src, chunks, 0, data_size, frames)) + data_size
            dst.write(
                _rf64_prefix(src, chunks, riff_size, data_size, frames) + struct.pack("<4sI", b"data", _U32)
            )
            pos, end = data_start, data_start + data_size
            zeros = bytes(1 << 20)
            while pos < end:
                data = _next_data(src, pos, end)  # a hole (silence) stays a hole
                if data > pos:
                    dst.seek(data - pos, os.SEEK_CUR)
                    pos = data
                    continue
                src.seek(pos)
                block = src.read(min(end - pos, len(zeros)))
                if not block:
                    raise SinkError(f"{path} shrank while being recovered")
                if block == (zeros if len(block) == len(zeros) else bytes(len(block))):
                    dst.seek(len(block), os.SEEK_CUR)  # so do zeros written out
                else:
                    dst.write(block)
                pos += len(block)
            dst.truncate()
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copymode(path, tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)


def _recover_flac(path: pathlib.Path) -> int:
    import soundfile

    with soundfile.SoundFile(str(path)) as reader:
        if 0 <= reader.frames < 2**62:  # the header knows its length: closed properly
            return int(reader.frames)
        tmp = path.with_name(f".{path.name}.recovering")
        try:
            with soundfile.SoundFile(
                str(tmp),
                "w",
                samplerate=reader.samplerate,
                channels=reader.channels,
                format="FLAC",
                subtype=reader.subtype,
            ) as writer:
                total = _count_readable(reader, writer, blocksize=1024)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    os.replace(tmp, path)
    return total


# --------------------------------------------------------------------------------------- the sink


_TEMPLATE_FIELDS = {"user": "u", "user_id": 1, "guild_id": 2, "channel_id": 3, "started": "s"}


def check_template(template: str) -> None:
    """Raise :class:`ValueError` if ``template`` uses anything but the file-name placeholders."""
    try:
        template.format(**_TEMPLATE_FIELDS)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"template {template!r} is invalid ({type(exc).__name__}: {exc}); the placeholders are "
            + ", ".join("{" + name + "}" for name in _TEMPLATE_FIELDS)
        ) from None


@dataclass(frozen=True)
class FileSinkOptions:
    """The options every file sink plugin (wav, flac, mp3) shares; plugins subclass it."""

    directory: pathlib.Path = field(
        default=pathlib.Path("recordings"), metadata={"help": "where the files go (created if missing)"}
    )
    template: str = field(
        default="{user}",
        metadata={
            "help": "file name without extension: {user} {user_id} {guild_id} {channel_id} {started}; "
            "made safe, never overwrites (-2, -3… on collisions)"
        },
    )
    channels: Literal[1, 2] = field(default=2, metadata={"help": "2 = stereo (as received), 1 = mono"})
    sample_rate: int = field(
        default=SAMPLE_RATE,
        metadata={
            "help": "Hz; 48000 is the received audio as is, other rates (16000 for speech) are resampled"
        },
    )
    flush_interval: float = field(
        default=1.0,
        metadata={"help": "seconds of audio between flushes to disk (crash safety); 0 = at the end"},
    )

    def __post_init__(self) -> None:
        check_template(self.template)
        if self.channels not in (1, 2):
            raise ValueError(f"channels must be 1 (mono) or 2 (stereo), got {self.channels}")
        if not 8000 <= self.sample_rate <= 192_000:
            raise ValueError(f"sample_rate must be between 8000 and 192000 Hz, got {self.sample_rate}")
        if self.flush_interval < 0:
            raise ValueError(f"flush_interval must be >= 0 seconds, got {self.flush_interval}")


class AudioFileSink(AudioHandlingSink):
    """One :class:`AudioFile` per user in ``directory``, aligned on the session timeline.

    File names come from ``template`` (``{user}``, ``{user_id}``, ``{guild_id}``, ``{channel_id}``,
    ``{started}``: the session's start, UTC, ``YYYYmmdd-HHMMSS``) made safe with
    :func:`safe_filename`; a name already used in this session or already on disk gets ``-2``,
    ``-3``… (existing files are never overwritten). At the end every file is padded to the
    session's end, so all tracks have the same length. A user who never sends a frame gets no
    file. Subclasses choose the format with the class attributes (``format``, ``subtype``,
    ``extension``) and :meth:`file_options`; file sink plugins build theirs with
    :meth:`from_options`.

    Failures are per file: when a user's file cannot be created or written (disk full,
    permissions), that file is closed with what it holds, the error is logged at once, the
    other users' files go on, and :meth:`cleanup` raises a :class:`SinkError` naming every
    failed file, which ``listen``'s ``after`` receives. :attr:`errors` has them by user id.
    """

    format: ClassVar[str] = "WAV"
    subtype: ClassVar[str | None] = "PCM_16"
    extension: ClassVar[str] = ".wav"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        template: str = "{user}",
        channels: int = CHANNELS,
        sample_rate: int = SAMPLE_RATE,
        flush_interval: float = 1.0,
    ) -> None:
        super().__init__()
        check_template(template)
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 (mono) or 2 (stereo), got {channels}")
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.template = template
        self.channels = channels
        self.sample_rate = sample_rate
        self.flush_interval = flush_interval
        self.files: dict[int, AudioFile] = {}
        self.errors: dict[int, BaseException] = {}
        self._names: set[str] = set()
        self._session: SessionInfo | None = None
        self._end = 0

    @classmethod
    def from_options(cls, options: FileSinkOptions) -> Self:
        """Build the sink from a plugin's options object (the ``SinkSpec`` factory)."""
        return cls(
            options.directory,
            template=options.template,
            channels=options.channels,
            sample_rate=options.sample_rate,
            flush_interval=options.flush_interval,
        )

    def on_start(self, session: SessionInfo) -> None:
        self._session = session

    def on_stop(self, end: int) -> None:
        self.extend_to(end)

    @property
    def paths(self) -> dict[int, pathlib.Path]:
        """Each user's file, by user id (failed ones included)."""
        return {user_id: f.path for user_id, f in self.files.items()}

    def file_name(self, frame: AudioFrame) -> str:
        """The (unique, safe) file name of ``frame``'s user."""
        import datetime

        user = frame.member.display_name if frame.member is not None else str(frame.user_id)
        session = self._session
        started = datetime.datetime.fromtimestamp(
            session.started_at if session else time.time(), datetime.UTC
        )
        raw = self.template.format(
            user=user,
            user_id=frame.user_id,
            guild_id=session.guild_id if session else "",
            channel_id=session.channel_id if session else "",
            started=started.strftime("%Y%m%d-%H%M%S"),
        )
        base = safe_filename(raw, fallback=str(frame.user_id))
        name, n = base, 1
        while name.lower() in self._names or os.path.lexists(self.directory / (name + self.extension)):
            n += 1
            name = f"{base}-{n}"
        self._names.add(name.lower())
        return name + self.extension

    def file_options(self) -> dict[str, Any]:
        """Extra keyword arguments for :class:`AudioFile` (``compression_level``, ``bitrate_mode``)."""
        return {}

    def open_file(self, frame: AudioFrame) -> AudioFile:
        """Create the file for ``frame``'s user."""
        path = self.directory / self.file_name(frame)
        return AudioFile(
            path,
            format=self.format,
            subtype=self.subtype,
            channels=self.channels,
            sample_rate=self.sample_rate,
            flush_interval=self.flush_interval,
            **self.file_options(),
        )

    def on_valid_audio(self, frame: AudioFrame) -> None:
        self._end = max(self._end, frame.end)
        user_id = frame.user_id
        if user_id in self.errors:
            return
        audio_file = self.files.get(user_id)
        try:
            if audio_file is None:
                audio_file = self.files[user_id] = self.open_file(frame)
            audio_file.write(frame)
        except Exception as exc:
            self._file_failed(user_id, audio_file, exc)

    def _file_failed(self, user_id: int, audio_file: AudioFile | None, exc: BaseException) -> None:
        self.errors[user_id] = exc
        where = audio_file.path if audio_file is not None else f"the file of user {user_id}"
        _log.error(
            "%s: %s failed; it is closed with what it holds and the other users' files go on: %s",
            type(self).__name__,
            where,
            exc,
        )
        if audio_file is not None:
            with contextlib.suppress(Exception):
                audio_file.cleanup()

    def cleanup(self) -> None:
        for user_id, audio_file in self.files.items():
            if user_id in self.errors:
                continue
            try:
                try:
                    audio_file.pad_to(self._end)
                finally:
                    audio_file.cleanup()
            except Exception as exc:  # one user's failing file must not cost the others theirs
                self._file_failed(user_id, audio_file, exc)
        if self.errors:
            failed = [str(self.files[u].path) if u in self.files else f"user {u}" for u in self.errors]
            first = next(iter(self.errors.values()))
            raise SinkError(
                f"{len(failed)} file(s) failed and hold only what was written before: "
                f"{', '.join(failed)}; first error: {first}"
            ) from first

    def extend_to(self, samples: int) -> None:
        """Make every track at least ``samples`` long (the session's end) at cleanup."""
        self._end = max(self._end, samples)
