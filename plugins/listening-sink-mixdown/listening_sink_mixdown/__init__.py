"""The ``mixdown`` sink: one WAV track of everyone, mixed on the session timeline.

Every user's frames are added, at their session positions, into a 32-bit accumulator; a stretch
is written out (saturated to 16 bits) once no later frame can touch it. Summing in ``int32``
and saturating once at the end is exactly "the clipped sum" of the aligned tracks: where the
sum exceeds the 16-bit range it is clamped to -32768/32767, never wrapped around (no
wrap-around distortion), and everywhere else it is the exact sum.

Memory is flat: only a window of ``horizon_ms`` (plus one flush block) is kept. A frame can
reach the sink late (a user whose DAVE key arrived late is delivered up to ~2 s behind the
others), so the window trails the latest frame by the horizon; a frame older than that is
mixed only from the window's start on, and counted in :attr:`MixdownSink.late` and logged.

The file starts at session sample 0 and ends at the session's end, at any length (RF64 past
4 GiB); it is written through the core's :class:`~listening_core.sinks.AudioFile`, hours in
which nobody speaks at once, as a hole in the file. Crash safety: the window is not final, but
it is not kept from the disk either: every ``flush_interval`` seconds of new audio,
the window's mix as it stands (from the first sample that changed) is written after the final
part of the file (:meth:`~listening_core.sinks.AudioFile.write_ahead`) and the WAV header
brought up to date (no fsync). A killed process leaves a valid WAV holding the mix of every
frame delivered up to about ``flush_interval`` before the kill; :func:`recover` fixes the header
of such a file from its length.
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from listening_core.hookspecs import SinkSpec, hookimpl
from listening_core.sinks import (
    CHANNELS,
    SAMPLE_RATE,
    SESSION_PLACEHOLDERS,
    AudioFile,
    AudioFrame,
    AudioHandlingSink,
    FileNamer,
    SessionInfo,
    SinkError,
    check_template,
    recover_file,
)

__all__ = ["MixdownOptions", "MixdownSink", "listening_sinks", "recover"]
__version__ = "0.1.0.dev0"

_log = logging.getLogger(__name__)

_IN_CHANNELS = CHANNELS
_STARTED_FORMAT = "%Y%m%dT%H%M%SZ"  # {started}: 20260301T120000Z, as this sink has always written it


@dataclass(frozen=True)
class MixdownOptions:
    """Options of the ``mixdown`` sink."""

    directory: Path = field(default=Path("recordings"), metadata={"help": "where the mixdown file goes"})
    filename: str = field(
        default="mixdown-{started}",
        metadata={
            "help": "file name without extension; {started} (UTC, 20260301T120000Z), {guild_id}, "
            "{channel_id}; made safe, '.wav' added; never overwrites a file (-2, -3… instead)"
        },
    )
    channels: int = field(default=2, metadata={"help": "2 (stereo) or 1 (mono: (left + right) / 2)"})
    horizon_ms: int = field(
        default=4000,
        metadata={"help": "how late a frame may arrive and still be mixed (ms behind the latest frame)"},
    )
    flush_interval: float = field(
        default=1.0, metadata={"help": "seconds of audio per write; the WAV header is updated at each"}
    )

    def __post_init__(self) -> None:
        if self.channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {self.channels}")
        if not 100 <= self.horizon_ms <= 60_000:
            raise ValueError(f"horizon_ms must be between 100 and 60000, got {self.horizon_ms}")
        if not 0.02 <= self.flush_interval <= 10:
            raise ValueError(f"flush_interval must be between 0.02 and 10 seconds, got {self.flush_interval}")
        check_template(self.filename, SESSION_PLACEHOLDERS, option="filename")


class MixdownSink(AudioHandlingSink):
    """Mixes every user into one WAV file, streamed (see the module docstring)."""

    def __init__(self, options: MixdownOptions | None = None) -> None:
        super().__init__()
        self.options = options = options or MixdownOptions()
        self.channels = options.channels
        self.horizon = round(options.horizon_ms * SAMPLE_RATE / 1000)
        self.block = max(960, round(options.flush_interval * SAMPLE_RATE))
        self.capacity = self.horizon + self.block + 2 * 960
        """Samples (per channel) the mixing window holds: fixed for the sink's lifetime."""
        self.path: pathlib.Path | None = None
        self.late: Counter[int] = Counter()
        """Per user: frames that arrived after their start had been written (mixed in part)."""
        self.late_samples = 0
        self._buf = np.zeros((self.capacity, _IN_CHANNELS), dtype=np.int32)
        self._base = 0  # session sample of _buf[0]: everything before it is in the file
        self._latest = 0  # end of the latest frame mixed
        self._filled = 0  # end of the audio added to the window: after it, the window is silence
        self._end = 0  # the session's end, once known
        # Crash safety: the window is put on disk ahead of the file's end (AudioFile.write_ahead)
        # every block of new audio, from the first sample changed since the last time.
        self._ahead_end = 0  # session sample just after what is on disk ahead
        self._ahead_mark = 0  # _latest when the window was last put on disk
        self._dirty_from: int | None = None  # earliest session sample mixed since then
        self._writer: AudioFile | None = None
        self._session: SessionInfo | None = None
        self._failed: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- what tests and tools look at

    @property
    def buffered(self) -> int:
        """Samples (per channel) mixed or pending in memory, not yet written: at most :attr:`capacity`."""
        return max(0, self._latest - self._base)

    @property
    def written(self) -> int:
        """Samples (per channel) in the file."""
        return self._base

    # -- the sink

    def on_start(self, session: SessionInfo) -> None:
        self._session = session
        self._open()

    def _open(self) -> AudioFile:
        if self._writer is None:
            opts = self.options
            directory = Path(opts.directory)
            directory.mkdir(parents=True, exist_ok=True)
            # Never over an existing file: two sessions started in the same second (two guilds
            # recorded into one directory) would otherwise write one file at once.
            namer = FileNamer(
                directory,
                opts.filename,
                ".wav",
                placeholders=SESSION_PLACEHOLDERS,
                started_format=_STARTED_FORMAT,
                option="filename",
            )
            self.path = directory / namer.take(self._session, fallback="mixdown")
            try:
                # flushed at every block written: a block is flush_interval s of audio or more
                self._writer = AudioFile(
                    self.path,
                    channels=self.channels,
                    sample_rate=SAMPLE_RATE,
                    flush_interval=self.block / SAMPLE_RATE,
                )
            except SinkError as exc:
                self._failed = exc
                raise SinkError(f"mixdown: {exc}") from exc
        return self._writer

    def on_valid_audio(self, frame: AudioFrame) -> None:
        if frame.pcm is None:
            raise SinkError(f"mixdown needs PCM; the frame of user {frame.user_id} has none")
        with self._lock:
            if self._failed is not None:
                raise SinkError(f"mixdown: {self.path} failed earlier: {self._failed}")
            self._open()
            data = np.frombuffer(frame.pcm, dtype="<i2").reshape(-1, _IN_CHANNELS)
            pos, end = frame.position, frame.position + data.shape[0]
            if end > self._latest:
                self._latest = end
            target = self._latest - self.horizon
            if target - self._base >= self.block:
                self._commit(target)
            if pos < self._base:
                cut = self._base - pos
                self.late[frame.user_id] += 1
                self.late_samples += min(cut, data.shape[0])
                if self.late[frame.user_id] == 1:
                    _log.warning(
                        "mixdown: a frame of user %d arrived %.2f s after its place was written "
                        "(horizon %d ms); only its part after %d was mixed. Further ones are counted "
                        "in MixdownSink.late",
                        frame.user_id,
                        cut / SAMPLE_RATE,
                        self.options.horizon_ms,
                        self._base,
                    )
                if cut >= data.shape[0]:
                    return
                data, pos = data[cut:], self._base
            i = pos - self._base
            self._buf[i : i + data.shape[0]] += data
            self._filled = max(self._filled, pos + data.shape[0])
            self._dirty_from = pos if self._dirty_from is None else min(self._dirty_from, pos)
            if self._latest - self._ahead_mark >= self.block:
                self._write_ahead()

    def _mixed(self, chunk: np.ndarray) -> np.ndarray:
        """Sums in the window, saturated to 16 bits once, in the file's channels."""
        if self.channels == 1:  # (left + right) / 2 of the sums, saturated once
            chunk = (chunk[:, 0].astype(np.int64) + chunk[:, 1]) // 2
        mixed: np.ndarray = np.clip(chunk, -32768, 32767).astype(np.int16)
        return mixed

    def _write_ahead(self) -> None:
        """Put the window's mix, as it stands, on disk after what is written (see AudioFile.write_ahead).

        Without it a killed process would lose the whole window (``horizon_ms`` and a block),
        which the sink holds back for frames that arrive late. Only what changed since the last
        time is written: from the earliest sample mixed since, or the end of what is ahead.
        """
        writer = self._open()
        changed = self._ahead_end if self._dirty_from is None else min(self._dirty_from, self._ahead_end)
        start = max(self._base, changed)
        out = self._mixed(self._buf[start - self._base : self._latest - self._base])
        try:
            writer.write_ahead(out, offset=start - self._base)
        except SinkError as exc:
            self._failed = exc
            raise SinkError(f"mixdown: {exc}") from exc
        self._ahead_end = max(self._ahead_end, self._latest)
        self._ahead_mark = self._latest
        self._dirty_from = None

    def _commit(self, target: int) -> None:
        """Write out session samples [base, target) (silence for what nobody filled)."""
        writer = self._open()
        while self._base < target:
            if self._base >= self._filled:
                # nobody spoke from here on: the window is all zeros, and so is the file up to
                # target, written as silence at once (a hole in the file) however long the gap
                try:
                    writer.pad_to(target)
                except SinkError as exc:
                    self._failed = exc
                    raise SinkError(f"mixdown: {exc}") from exc
                self._base = target
                break
            n = min(target - self._base, self.capacity)
            out = self._mixed(self._buf[:n])
            # Shift the window before writing: a failing write must not leave it half moved.
            self._buf[: self.capacity - n] = self._buf[n:]
            self._buf[self.capacity - n :] = 0
            self._base += n
            try:
                writer.write_samples(out)
            except SinkError as exc:
                self._failed = exc
                raise SinkError(f"mixdown: {exc}") from exc

    def on_stop(self, end: int) -> None:
        with self._lock:
            self._end = max(self._end, end)

    def cleanup(self) -> None:
        """Write what is left, pad to the session's end, fix the header and close."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
            try:
                if self._failed is None:
                    if writer is None:
                        writer = self._open()
                    self._commit(max(self._end, self._latest))
            finally:
                if writer is not None:
                    try:
                        writer.cleanup()
                    except SinkError as exc:
                        if self._failed is None:
                            self._failed = exc
                            raise SinkError(f"mixdown: closing {self.path} failed: {exc}") from exc
                if any(self.late.values()):
                    _log.warning(
                        "mixdown: %d frame(s) arrived too late to be mixed in full (%d samples lost); "
                        "raise horizon_ms",
                        sum(self.late.values()),
                        self.late_samples,
                    )

    def __repr__(self) -> str:
        return f"<MixdownSink {self.path} written={self._base} buffered={self.buffered}>"


def recover(path: str | os.PathLike[str]) -> int:
    """Fix the header of a mixdown WAV left by a killed process from its length; returns its samples."""
    return recover_file(path)


@hookimpl
def listening_sinks() -> list[SinkSpec]:
    """The sinks of listening-sink-mixdown."""
    return [
        SinkSpec(
            "mixdown",
            MixdownSink,
            MixdownOptions,
            "one WAV track of everyone, mixed on the session timeline (int32 sum saturated to 16 bits)",
        )
    ]
