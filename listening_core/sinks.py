"""Where received audio goes: :class:`AudioFrame` and the sink classes.

A listening session hands every user's frames to one :class:`AudioSink`, in order per user,
from one delivery thread (never the socket reader's, so a slow sink cannot make packets drop).

- :class:`AudioSink`: the base: ``on_audio``, ``on_rtcp``, ``cleanup``.
- :class:`AudioHandlingSink`: the seed's validation procedure (wrap-aware, per user and SSRC)
  in front of ``on_valid_audio``: a frame that would go backwards is dropped and counted.
- :class:`AudioFileSink`: one :class:`AudioFile` per user, all aligned on the session timeline.
- :class:`AudioFile`: one user's track streamed to disk through soundfile as frames arrive,
  silence where the user was silent, so tracks drop into an editor side by side.
"""

from __future__ import annotations

import abc
import collections
import enum
import logging
import os
import pathlib
import re
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from .errors import ListeningError
from .rtp import seq_diff

if TYPE_CHECKING:
    import discord

_log = logging.getLogger(__name__)

__all__ = [
    "FRAME_BYTES",
    "FRAME_SAMPLES",
    "SAMPLE_RATE",
    "AudioFile",
    "AudioFileSink",
    "AudioFrame",
    "AudioHandlingSink",
    "AudioSink",
    "FrameKind",
    "RtcpPacket",
    "SessionInfo",
    "SinkError",
    "safe_filename",
]

SAMPLE_RATE = 48_000
CHANNELS = 2
FRAME_SAMPLES = 960
FRAME_BYTES = FRAME_SAMPLES * CHANNELS * 2


class SinkError(ListeningError):
    """A sink failed; the session stops that sink and passes this (with the cause) to ``after``."""


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


def safe_filename(name: str, *, fallback: str = "user", max_length: int = 80) -> str:
    """A file-name component made from ``name`` (say a user name) that cannot escape a directory.

    Control characters, path separators and anything but letters, digits, ``. - _`` and spaces are
    replaced; leading dots are removed (no hidden files, no ``..``); empty results use ``fallback``.
    """
    cleaned = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in name)
    cleaned = _UNSAFE.sub("_", cleaned).strip(" .")
    cleaned = re.sub(r"\s+", " ", cleaned)[:max_length].strip(" .")
    return cleaned or fallback


class AudioFile:
    """One user's track, written to disk through soundfile as frames arrive.

    Frames are written at their session position; the stretch between the end of the file and a
    frame's position is filled with silence, so the file always starts at session sample 0.
    :meth:`pad_to` extends it with silence to the session's end. Memory does not grow with the
    session: nothing is kept but the open file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        format: str = "WAV",
        subtype: str | None = "PCM_16",
        channels: int = CHANNELS,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        import soundfile

        self.path = pathlib.Path(path)
        self.channels = channels
        self.sample_rate = sample_rate
        self.frames_written = 0  # samples per channel written, silence included
        self.done = False
        self._lock = threading.Lock()
        self._file = soundfile.SoundFile(
            self.path, "w", samplerate=sample_rate, channels=channels, format=format, subtype=subtype
        )
        self._silence = bytes(FRAME_BYTES)

    def write(self, frame: AudioFrame) -> None:
        """Write ``frame`` at its position (silence before it if needed; overlap is cut)."""
        if frame.pcm is None:
            raise SinkError(f"{type(self).__name__} needs PCM; the frame of user {frame.user_id} has none")
        with self._lock:
            if self.done:
                raise SinkError(f"{self.path} is already closed")
            gap = frame.position - self.frames_written
            pcm = frame.pcm
            if gap < 0:
                pcm = pcm[-gap * CHANNELS * 2 :]  # overlaps what is written: keep only the new part
                if not pcm:
                    return
            elif gap > 0:
                self._write_silence(gap)
            self._write_pcm(pcm)

    def pad_to(self, samples: int) -> None:
        """Extend the file with silence up to ``samples`` (no-op if it is already that long)."""
        with self._lock:
            if samples > self.frames_written and not self.done:
                self._write_silence(samples - self.frames_written)

    def _write_silence(self, samples: int) -> None:
        chunk = len(self._silence) // (CHANNELS * 2)
        while samples > 0:
            n = min(samples, chunk)
            self._write_pcm(self._silence[: n * CHANNELS * 2])
            samples -= n

    def _write_pcm(self, pcm: bytes) -> None:
        import numpy as np

        data = np.frombuffer(pcm, dtype="<i2").reshape(-1, CHANNELS)
        if self.channels == 1:
            data = ((data[:, 0].astype(np.int32) + data[:, 1]) // 2).astype(np.int16).reshape(-1, 1)
        self._file.write(data)
        self.frames_written += data.shape[0]

    def flush(self) -> None:
        """Push what is written to the operating system (readable after a crash up to here)."""
        with self._lock:
            if not self.done:
                self._file.flush()

    def cleanup(self) -> None:
        """Close the file and mark it done (idempotent)."""
        with self._lock:
            if not self.done:
                self.done = True
                self._file.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} samples={self.frames_written} done={self.done}>"


class AudioFileSink(AudioHandlingSink):
    """One :class:`AudioFile` per user in ``directory``, aligned on the session timeline.

    File names come from ``template`` (``{user}``, ``{user_id}``, ``{guild_id}``, ``{channel_id}``)
    made safe with :func:`safe_filename`; collisions get ``-2``, ``-3``… At cleanup every file is
    padded to the session's end, so all tracks have the same length. Subclasses choose the format
    by overriding :meth:`open_file` (or the class attributes).
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
    ) -> None:
        super().__init__()
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.template = template
        self.channels = channels
        self.files: dict[int, AudioFile] = {}
        self._names: set[str] = set()
        self._session: SessionInfo | None = None
        self._end = 0

    def on_start(self, session: SessionInfo) -> None:
        self._session = session

    def on_stop(self, end: int) -> None:
        self.extend_to(end)

    def file_name(self, frame: AudioFrame) -> str:
        """The (unique, safe) file name of ``frame``'s user."""
        user = frame.member.display_name if frame.member is not None else str(frame.user_id)
        session = self._session
        raw = self.template.format(
            user=user,
            user_id=frame.user_id,
            guild_id=session.guild_id if session else "",
            channel_id=session.channel_id if session else "",
        )
        base = safe_filename(raw, fallback=str(frame.user_id))
        name, n = base, 1
        while name.lower() in self._names:
            n += 1
            name = f"{base}-{n}"
        self._names.add(name.lower())
        return name + self.extension

    def open_file(self, frame: AudioFrame) -> AudioFile:
        """Create the file for ``frame``'s user."""
        path = self.directory / self.file_name(frame)
        return AudioFile(path, format=self.format, subtype=self.subtype, channels=self.channels)

    def on_valid_audio(self, frame: AudioFrame) -> None:
        audio_file = self.files.get(frame.user_id)
        if audio_file is None:
            audio_file = self.files[frame.user_id] = self.open_file(frame)
        audio_file.write(frame)
        self._end = max(self._end, frame.end)

    def cleanup(self) -> None:
        errors: list[BaseException] = []
        for audio_file in self.files.values():
            try:
                audio_file.pad_to(self._end)
            except Exception as exc:  # one user's failing file must not cost the others theirs
                errors.append(exc)
            finally:
                audio_file.cleanup()
        if errors:
            raise SinkError(f"{len(errors)} file(s) could not be finished: {errors[0]}") from errors[0]

    def extend_to(self, samples: int) -> None:
        """Make every track at least ``samples`` long (the session's end) at cleanup."""
        self._end = max(self._end, samples)
