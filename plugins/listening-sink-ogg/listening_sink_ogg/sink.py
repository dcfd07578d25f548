"""The ``ogg-opus`` sink: one Ogg Opus file per speaker, the received Opus packets untouched."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from listening_core.sinks import (
    SPEAKER_PLACEHOLDERS,
    AudioFrame,
    AudioHandlingSink,
    FileNamer,
    SessionInfo,
    SinkError,
    check_template,
)

from .ogg import GAPS, OggOpusWriter

__all__ = ["OggOpusOptions", "OggOpusSink"]

_log = logging.getLogger(__name__)

VERSION = "0.1.0.dev0"


@dataclass(frozen=True)
class OggOpusOptions:
    """Options of the ``ogg-opus`` sink."""

    directory: Path = field(
        default=Path("recordings"), metadata={"help": "folder for the files (created if missing)"}
    )
    template: str = field(
        default="{user}",
        metadata={
            "help": "file name without '.opus': {user} (display name), {user_id}, {guild_id}, {channel_id}, "
            "{started}; made safe, never overwrites a file (-2, -3… instead)"
        },
    )
    flush_interval: float = field(
        default=1.0,
        metadata={"help": "seconds at most that received audio waits in memory before it is written"},
    )
    gaps: Literal["fill", "granule"] = field(
        default="fill",
        metadata={
            "help": "how pauses, late starts and lost frames are written: 'fill' (Opus silence and "
            "concealment packets, RFC 7845 4.1: every player keeps the timeline) or 'granule' "
            "(granule jumps: smaller files, only granule-aware readers keep the timeline)"
        },
    )

    def __post_init__(self) -> None:
        if not 0 < self.flush_interval <= 60:
            raise ValueError(f"flush_interval must be in (0, 60] seconds, got {self.flush_interval}")
        if self.gaps not in GAPS:
            raise ValueError(f"gaps must be one of {', '.join(map(repr, GAPS))}, got {self.gaps!r}")
        check_template(self.template, SPEAKER_PLACEHOLDERS)


@dataclass(eq=False)
class _Track:
    user_id: int
    path: Path
    writer: OggOpusWriter | None
    error: BaseException | None = None
    skipped: int = 0
    """Frames that had no Opus: a concealment packet each with ``gaps='fill'``, a gap with ``'granule'``."""


class OggOpusSink(AudioHandlingSink):
    """One ``.opus`` file per speaker in ``directory``: every received Opus packet stored as is.

    Nothing is decoded or re-encoded (``wants_pcm = False``: the receiver skips decoding too).
    Packets sit at their session positions through granule positions (see
    :mod:`listening_sink_ogg.ogg` for the convention): every file runs from session sample 0 to the
    session's end. With ``gaps='fill'`` (the default) pauses are Opus silence packets and lost
    frames packets that make the decoder conceal them, so every player keeps the timeline; with
    ``gaps='granule'`` both are jumps between pages. Pages are written as frames
    arrive and at least every ``flush_interval`` seconds, so memory stays flat and a crash costs
    at most that much. A speaker whose file cannot be written (disk full...) loses nothing already
    written and does not stop the others; the failure is raised at cleanup and reaches ``after``.

    ``OggOpusSink(OggOpusOptions(...))``, ``OggOpusSink(directory=...)`` or
    ``vc.listen("ogg-opus", options={...})``.
    """

    wants_pcm: ClassVar[bool] = False
    extension: ClassVar[str] = ".opus"

    def __init__(self, options: OggOpusOptions | None = None, **overrides: object) -> None:
        super().__init__()
        options = options or OggOpusOptions()
        if overrides:
            if "directory" in overrides and not isinstance(overrides["directory"], Path):
                overrides["directory"] = Path(str(overrides["directory"]))
            options = dataclasses.replace(options, **overrides)  # type: ignore[arg-type]
        self.options = options
        self.directory = Path(options.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tracks: dict[int, _Track] = {}
        self.session: SessionInfo | None = None
        self._namer = FileNamer(self.directory, options.template, self.extension)
        self._end = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False

    # -- what users read

    @property
    def files(self) -> dict[int, Path]:
        """User id → the path of that speaker's file."""
        return {user_id: track.path for user_id, track in self.tracks.items()}

    @property
    def errors(self) -> dict[int, BaseException]:
        """User id → why that speaker's file stopped being written (empty when all went well)."""
        return {user_id: track.error for user_id, track in self.tracks.items() if track.error is not None}

    # -- AudioSink

    def on_start(self, session: SessionInfo) -> None:
        self.session = session

    def on_valid_audio(self, frame: AudioFrame) -> None:
        with self._lock:
            if self._closed:
                return
            self._end = max(self._end, frame.end)
            track = self.tracks.get(frame.user_id)
            if track is None:
                track = self.tracks[frame.user_id] = self._open(frame)
            writer = track.writer
            if writer is None:
                return
            if not frame.opus:
                track.skipped += 1  # lost (the receiver counts it in its stats)
                if writer.gaps == "granule":
                    return  # a gap in the file
            now = time.monotonic()
            try:
                if frame.opus:
                    writer.write(frame.opus, frame.position, now)
                else:
                    writer.lost(frame.position, frame.end - frame.position, now)
                if (
                    writer.pending_since is not None
                    and now - writer.pending_since >= self.options.flush_interval
                ):
                    writer.flush()
            except Exception as exc:
                self._fail(track, exc)

    def on_stop(self, end: int) -> None:
        with self._lock:
            self._end = max(self._end, end)

    def cleanup(self) -> None:
        self._stop.set()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(5)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for track in self.tracks.values():
                if track.writer is None:
                    continue
                try:
                    track.writer.finish(self._end)
                except Exception as exc:
                    self._fail(track, exc)
        failed = [track for track in self.tracks.values() if track.error is not None]
        if failed:
            first = failed[0].error
            assert first is not None
            names = ", ".join(f"{track.path.name} (user {track.user_id}): {track.error}" for track in failed)
            raise SinkError(
                f"ogg-opus: {len(failed)} of {len(self.tracks)} file(s) could not be written completely; "
                f"each holds what was written before the error: {names}"
            ) from first

    # -- internals

    def file_name(self, frame: AudioFrame) -> str:
        """The (unique, safe) file name of ``frame``'s speaker: the core's :class:`FileNamer`, so never
        over an existing file (or through a link planted in the directory)."""
        return self._namer.for_speaker(frame, self.session)

    def _open(self, frame: AudioFrame) -> _Track:
        path = self.directory / self.file_name(frame)
        track = _Track(frame.user_id, path, None)
        gaps = self.options.gaps
        timeline = (
            "pauses are granule jumps"
            if gaps == "granule"
            else "pauses are Opus silence, lost frames concealment (RFC 7845 4.1)"
        )
        comments = [
            "ENCODER=listening-sink-ogg (Opus packets as received: not decoded, not re-encoded)",
            f"LISTENING_CORE_USER_ID={frame.user_id}",
            f"LISTENING_CORE_TIMELINE=granule 0 is session sample 0 (48 kHz); {timeline}",
        ]
        if frame.member is not None:
            comments.insert(0, f"ARTIST={frame.member.display_name}")
        session = self.session
        if session is not None:
            started = datetime.datetime.fromtimestamp(session.started_at, datetime.UTC)
            comments.append(f"DATE={started.isoformat(timespec='milliseconds')}")
            comments.append(f"LISTENING_CORE_STARTED_AT={session.started_at:.6f}")
            if session.guild_id is not None:
                comments.append(f"LISTENING_CORE_GUILD_ID={session.guild_id}")
            if session.channel_id is not None:
                comments.append(f"LISTENING_CORE_CHANNEL_ID={session.channel_id}")
        file = None
        try:
            # "xb": refuse to write through anything that appeared at this name since it was chosen
            file = open(path, "xb", buffering=0)  # noqa: SIM115 - owned by the writer until finish()
            track.writer = OggOpusWriter(
                file,
                serial=frame.user_id,
                vendor=f"listening-sink-ogg {VERSION}",
                comments=comments,
                gaps=gaps,
            )
        except Exception as exc:
            if file is not None:
                file.close()
            self._fail(track, exc)
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_loop, name=f"listening-sink-ogg-flush-{id(self):x}", daemon=True
            )
            self._flusher.start()
        return track

    def _fail(self, track: _Track, exc: BaseException) -> None:
        """Stop writing ``track`` (what is on disk stays); the error is raised at cleanup (lock held)."""
        if track.error is None:
            track.error = exc
        writer, track.writer = track.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                _log.debug("closing %s after a failed write also failed", track.path, exc_info=True)
        _log.error(
            "ogg-opus: cannot write %s (user %d), its recording stops here; the others go on: %r",
            track.path,
            track.user_id,
            exc,
        )

    def _flush_loop(self) -> None:
        interval = self.options.flush_interval
        while not self._stop.wait(min(interval / 4, 0.25)):
            now = time.monotonic()
            with self._lock:
                if self._closed:
                    return
                for track in self.tracks.values():
                    writer = track.writer
                    if writer is None or writer.pending_since is None:
                        continue
                    if now - writer.pending_since >= interval:
                        try:
                            writer.flush()
                        except Exception as exc:
                            self._fail(track, exc)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.directory} speakers={len(self.tracks)}>"
