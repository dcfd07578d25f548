"""A session report: who spoke when, as ``session.json`` and a ``timeline.png`` a person can check.

:class:`SessionReport` is a sink a recording bot attaches next to its other sinks. It keeps, per
user, the speech intervals (non-silence frames less than ``gap_ms`` apart merged), the number of
frames of each :class:`~listening_core.sinks.FrameKind` and a level envelope (one byte per 20 ms
frame). :meth:`SessionReport.write` writes ``session.json`` atomically (a live one while the
session runs, with ``finished=False``; the final one after it) and, at the end,
``timeline.png`` (:func:`render_timeline`, drawn by :mod:`listening_core.report_png`, which needs
Pillow: ``pip install 'listening-core[report]'``). :func:`load_report` reads a ``session.json`` back.

``session.json`` (format 1); times are seconds on the session timeline (0 = listening started),
rounded to milliseconds::

    {
      "format": 1,                        # this schema's version
      "finished": true,                   # false in the live reports written while listening
      "started_at": "2026-11-26T03:30:00.123Z",  # UTC, sample 0 (null if the session never started)
      "started_unix": 1795000000.123,     # the same as a unix time
      "duration": 42.5,                   # the session's length: its end once stopped, else the
                                          # end of the latest frame
      "now": 42.5,                        # the session time the report describes: the end of the
                                          # latest frame (while live, at least the wall-clock time
                                          # since sample 0); = duration once finished
      "sample_rate": 48000,
      "gap_ms": 200,                      # pauses up to this long do not split a speech interval
      "guild_id": 1, "channel_id": 2,     # null when unknown
      "members": [                        # sorted by first_audio (members without audio last)
        {"user_id": 10, "name": "alice",  # display name (the user id until a member was seen)
         "speaking": false,               # live only: audio ended within 300 ms of "now"
         "first_audio": 1.02,             # start of the first non-silence frame (null: none)
         "last_audio": 30.5,              # end of the last non-silence frame (null: none)
         "speech": [[1.02, 3.4], [10.0, 12.2]],  # [start, end) intervals of non-silence frames
         "speech_seconds": 4.58,          # the intervals' total length
         "frames": {"received": 0, "silence": 0, "fec": 0, "plc": 0},
         "stats": {...}}                  # UserStats.as_dict() (null if none); only when stats are given
      ],
      "files": [{"sink": "wav", "path": "wav/alice.wav", "bytes": 12345}],
                                          # path relative to the report's directory when inside it;
                                          # bytes null when the file is missing or not a file
      "timeline": "timeline.png",         # null while live, when not asked for, or when rendering failed
      "mixdown": "mix.wav",               # the mixdown file drawn in the timeline (null: none)
      ...                                 # the caller's ``extra`` keys
    }

Levels: each frame's peak absolute sample in dBFS, mapped linearly from -60 dBFS (0) to 0 dBFS
(255), so quiet speech is still visible. Memory per user stays flat: at most
:attr:`SessionReport.max_envelope` levels (128 KiB, 43 minutes at one level per frame); past it
every envelope is halved (the maximum of neighbours kept) and one level covers twice as many
frames.
"""

from __future__ import annotations

import array
import contextlib
import datetime
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .sinks import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, AudioSink, FrameKind, SessionInfo

if TYPE_CHECKING:
    from .receiver import UserStats
    from .report_png import render_timeline

_log = logging.getLogger(__name__)

__all__ = [
    "REPORT_FORMAT",
    "SPEAKING_WINDOW",
    "SessionReport",
    "load_report",
    "peak_level",
    "render_timeline",
]

REPORT_FORMAT = 1
"""The version of the ``session.json`` schema :meth:`SessionReport.write` writes."""

SPEAKING_WINDOW = 0.3
"""A live report shows a member as speaking if their audio ended this many seconds before "now"."""

_FLOOR_DB = 60.0  # levels span -60..0 dBFS
_FULL_SCALE = 32768.0
_KINDS = (FrameKind.RECEIVED, FrameKind.SILENCE, FrameKind.FEC, FrameKind.PLC)
_PILLOW_HINT = "pip install 'listening-core[report]'"


def peak_level(peak: int) -> int:
    """The envelope level (0-255) of a peak absolute sample: -60 dBFS or less is 0, 0 dBFS is 255."""
    if peak <= 0:
        return 0
    db = 20.0 * math.log10(min(peak, 32768) / _FULL_SCALE)
    return max(0, min(255, round(255.0 * (1.0 + db / _FLOOR_DB))))


def _levels_of(peaks: np.ndarray) -> np.ndarray:
    """:func:`peak_level` of an array of peaks, as ``uint8``."""
    safe = np.maximum(peaks.astype(np.float64), 1.0)
    db = 20.0 * np.log10(np.minimum(safe, _FULL_SCALE) / _FULL_SCALE)
    levels = np.clip(np.rint(255.0 * (1.0 + db / _FLOOR_DB)), 0, 255)
    levels[peaks <= 0] = 0
    return levels.astype(np.uint8)


def _pcm_peak(pcm: bytes) -> int:
    samples = np.frombuffer(pcm, dtype="<i2")
    if not samples.size:
        return 0
    return max(int(samples.max()), -int(samples.min()))


def _seconds(samples: int | float) -> float:
    return round(samples / SAMPLE_RATE, 3)


def _iso(unix: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class _Track:
    """One user's state in a report (guarded by the report's lock)."""

    user_id: int
    name: str | None = None
    frames: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # in _KINDS order
    speech: array.array[int] = field(default_factory=lambda: array.array("q"))  # start, end, start, end...
    envelope: bytearray = field(default_factory=bytearray)


@dataclass(slots=True, frozen=True)
class _TrackCopy:
    """A copy of a :class:`_Track`, taken under the lock."""

    user_id: int
    name: str
    frames: tuple[int, ...]
    speech: tuple[int, ...]
    envelope: bytes


@dataclass(slots=True, frozen=True)
class _State:
    """A consistent copy of a report's state."""

    session: SessionInfo | None
    latest: int
    end: int | None
    frames_per_level: int
    tracks: list[_TrackCopy]


class SessionReport(AudioSink):
    """Observes a listening session: who spoke when, per-user frame counts and a level envelope.

    Attach it next to the session's other sinks. ``on_audio`` runs on the session's delivery
    thread and costs a peak search over the frame's samples; :meth:`snapshot` and :meth:`write`
    may be called from any other thread (a bot writes a live ``session.json`` every second)
    while the session runs: the state is copied under a lock.

    A user's speech intervals are made of non-silence frames (received, FEC and PLC): a frame
    that starts at most ``gap_ms`` after the end of the previous one extends the interval, a
    later one starts a new interval. ``clock`` (default :func:`time.time`) gives live reports'
    "now" the wall-clock time since the session's start, so that a member who stopped speaking
    stops showing as speaking even when no frame arrives any more; ``None`` makes "now" purely
    the end of the latest frame.
    """

    wants_pcm: ClassVar[bool] = True

    max_envelope: int = 1 << 17
    """Levels kept per user before every envelope is halved (128 KiB; 43 minutes of frames)."""

    def __init__(self, *, gap_ms: int = 200, clock: Callable[[], float] | None = time.time) -> None:
        if gap_ms < 0:
            raise ValueError(f"gap_ms must be >= 0, got {gap_ms}")
        self.gap_ms = gap_ms
        self.clock = clock
        self._gap = gap_ms * SAMPLE_RATE // 1000
        self._lock = threading.Lock()
        self._tracks: dict[int, _Track] = {}
        self._bin = 1  # frames per envelope level
        self._latest = 0  # the end of the latest frame seen (session samples)
        self._end: int | None = None  # on_stop's end
        self.session: SessionInfo | None = None

    # -- the sink ----------------------------------------------------------------------------

    def on_start(self, session: SessionInfo) -> None:
        """Keep the session's start time (unix time of sample 0), guild and channel."""
        with self._lock:
            self.session = session

    def on_audio(self, frame: AudioFrame) -> None:
        """Count the frame, extend its user's speech intervals and envelope."""
        silent = frame.kind is FrameKind.SILENCE
        level = peak_level(_pcm_peak(frame.pcm)) if frame.pcm else 0
        name = frame.member.display_name if frame.member is not None else None
        position, end = frame.position, frame.end
        with self._lock:
            track = self._tracks.get(frame.user_id)
            if track is None:
                track = self._tracks[frame.user_id] = _Track(frame.user_id)
            if name is not None:
                track.name = name
            track.frames[_KINDS.index(frame.kind)] += 1
            self._latest = max(self._latest, end)
            if not silent:
                speech = track.speech
                if speech and position - speech[-1] <= self._gap:
                    speech[-1] = max(speech[-1], end)
                else:
                    speech.append(position)
                    speech.append(end)
            if level:
                index = max(0, position) // FRAME_SAMPLES // self._bin
                while index >= self.max_envelope:
                    self._halve()
                    index = max(0, position) // FRAME_SAMPLES // self._bin
                envelope = track.envelope
                if index >= len(envelope):
                    envelope.extend(bytes(index + 1 - len(envelope)))
                if level > envelope[index]:
                    envelope[index] = level

    def on_stop(self, end: int) -> None:
        """The session stopped at session sample ``end``: its duration."""
        with self._lock:
            self._end = end

    def _halve(self) -> None:
        """Halve every envelope's resolution (lock held)."""
        for track in self._tracks.values():
            levels = np.frombuffer(bytes(track.envelope) + b"\0" * (len(track.envelope) % 2), dtype=np.uint8)
            track.envelope = bytearray(levels.reshape(-1, 2).max(axis=1).tobytes())
        self._bin *= 2

    # -- reading it --------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether the session stopped (``on_stop`` was called)."""
        return self._end is not None

    def _copy(self) -> _State:
        with self._lock:
            tracks = [
                _TrackCopy(
                    t.user_id,
                    t.name if t.name is not None else str(t.user_id),
                    tuple(t.frames),
                    tuple(t.speech),
                    bytes(t.envelope),
                )
                for t in self._tracks.values()
            ]
            return _State(self.session, self._latest, self._end, self._bin, tracks)

    def snapshot(
        self,
        *,
        stats: Mapping[int, UserStats] | None = None,
        files: Iterable[tuple[str, Path]] = (),
        directory: Path | None = None,
        extra: Mapping[str, Any] | None = None,
        finished: bool | None = None,
    ) -> dict[str, Any]:
        """The report as ``session.json``'s content (see the module's documentation).

        ``stats``: the session's :class:`~listening_core.receiver.UserStats` by user id (users
        with stats but no frame are listed too). ``files``: ``(sink name, path)`` of the files
        the session wrote; paths inside ``directory`` are made relative to it. ``extra``: more
        keys. ``finished``: default, whether the session stopped.
        """
        return self._describe(
            self._copy(), stats=stats, files=files, directory=directory, extra=extra, finished=finished
        )

    def _describe(
        self,
        state: _State,
        *,
        stats: Mapping[int, UserStats] | None = None,
        files: Iterable[tuple[str, Path]] = (),
        directory: Path | None = None,
        extra: Mapping[str, Any] | None = None,
        finished: bool | None = None,
    ) -> dict[str, Any]:
        session, latest, end, tracks = state.session, state.latest, state.end, state.tracks
        done = end is not None if finished is None else finished
        duration = max(latest, end) if end is not None else latest
        now = duration
        if not done and session is not None and self.clock is not None:
            now = max(now, round((self.clock() - session.started_at) * SAMPLE_RATE))
        members = [self._member(t, now, done, stats) for t in tracks]
        if stats is not None:
            seen = {t.user_id for t in tracks}
            for user_id in stats:
                if user_id not in seen:
                    members.append(
                        self._member(_TrackCopy(user_id, str(user_id), (0,) * 4, (), b""), now, done, stats)
                    )
        members.sort(key=lambda m: (m["first_audio"] is None, m["first_audio"] or 0.0, m["user_id"]))
        data: dict[str, Any] = {
            "format": REPORT_FORMAT,
            "finished": done,
            "started_at": _iso(session.started_at) if session is not None else None,
            "started_unix": round(session.started_at, 3) if session is not None else None,
            "duration": _seconds(duration),
            "now": _seconds(now),
            "sample_rate": SAMPLE_RATE,
            "gap_ms": self.gap_ms,
            "guild_id": session.guild_id if session is not None else None,
            "channel_id": session.channel_id if session is not None else None,
            "members": members,
            "files": [_file_entry(sink, Path(path), directory) for sink, path in files],
        }
        if extra:
            data.update(extra)
        return data

    @staticmethod
    def _member(
        track: _TrackCopy, now: int, finished: bool, stats: Mapping[int, UserStats] | None
    ) -> dict[str, Any]:
        speech = track.speech
        intervals = [[_seconds(speech[i]), _seconds(speech[i + 1])] for i in range(0, len(speech), 2)]
        last = speech[-1] if speech else None
        entry: dict[str, Any] = {
            "user_id": track.user_id,
            "name": track.name,
            "speaking": not finished and last is not None and now - last <= SPEAKING_WINDOW * SAMPLE_RATE,
            "first_audio": _seconds(speech[0]) if speech else None,
            "last_audio": _seconds(last) if last is not None else None,
            "speech": intervals,
            "speech_seconds": _seconds(sum(speech[i + 1] - speech[i] for i in range(0, len(speech), 2))),
            "frames": {kind.value: count for kind, count in zip(_KINDS, track.frames, strict=True)},
        }
        if stats is not None:
            user_stats = stats.get(track.user_id)
            entry["stats"] = user_stats.as_dict() if user_stats is not None else None
        return entry

    def write(
        self,
        directory: Path,
        *,
        stats: Mapping[int, UserStats] | None = None,
        files: Iterable[tuple[str, Path]] = (),
        finished: bool = True,
        mixdown: Path | None = None,
        timeline: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``session.json`` (and, when ``finished`` and ``timeline``, ``timeline.png``) in ``directory``.

        Both are written to a temporary file next to them and moved into place, so a reader never
        sees half a file and a failure leaves the previous ones as they were. A timeline that
        cannot be rendered (Pillow missing, ...) is logged as a WARNING and ``"timeline"`` is
        null; ``session.json`` is still written. ``mixdown``: the session's mixdown file, drawn
        in the timeline's last lane. ``extra`` keys are added to ``session.json``; its ``guild``
        and ``channel`` (names) also title the timeline. Returns the path of ``session.json``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.snapshot(stats=stats, files=files, directory=directory, finished=finished)
        data["timeline"] = None
        data["mixdown"] = _relative(Path(mixdown), directory) if mixdown is not None else None
        if finished and timeline:
            from .report_png import render_timeline

            try:
                where = [str(extra[k]) for k in ("guild", "channel") if extra and extra.get(k)]
                render_timeline(
                    self, directory / "timeline.png", mixdown=mixdown, place=" / ".join(where) or None
                )
            except Exception as exc:
                _log.warning(
                    "session report: timeline.png not written in %s (%s: %s); session.json says null",
                    directory,
                    type(exc).__name__,
                    exc,
                )
            else:
                data["timeline"] = "timeline.png"
        if extra:
            data.update(extra)
        text = _PAIR.sub(r"[\1, \2]", json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False)) + "\n"
        path = directory / "session.json"
        _atomic_write(path, lambda fh: fh.write(text.encode()), sync=finished)
        return path


_NUMBER = r"(-?[0-9][0-9.eE+-]*)"
# A speech interval, kept on one line (only indentation has newlines: strings escape theirs).
_PAIR = re.compile(rf"\[\n *{_NUMBER},\n *{_NUMBER}\n *\]")


def _relative(path: Path, directory: Path | None) -> str:
    if directory is not None:
        with contextlib.suppress(ValueError, OSError):
            return path.resolve().relative_to(directory.resolve()).as_posix()
    return str(path)


def _file_entry(sink: str, path: Path, directory: Path | None) -> dict[str, Any]:
    try:
        size: int | None = path.stat().st_size if path.is_file() else None
    except OSError:
        size = None
    return {"sink": sink, "path": _relative(path, directory), "bytes": size}


def _umask() -> int:
    """The process's umask, read without changing it (Linux); else the usual 022."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _atomic_write(path: Path, fill: Callable[[Any], object], *, sync: bool) -> None:
    """Write ``path`` through a temporary file in its directory and ``os.replace``.

    The file gets the permissions a plain ``open`` would give it (mkstemp's are owner-only).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_report(path: Path) -> dict[str, Any]:
    """Read a ``session.json`` (``path`` may also be the directory holding it).

    Raises :class:`ValueError` if the file is not a session report this version can read.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "session.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("format"), int):
        raise ValueError(f"{path} is not a session report")
    if data["format"] > REPORT_FORMAT:
        raise ValueError(
            f"{path} is a format {data['format']} session report; this listening-core reads "
            f"format {REPORT_FORMAT} and older"
        )
    return data


def __getattr__(name: str) -> Any:
    """``render_timeline`` lives in :mod:`listening_core.report_png`; imported here on first use,
    so importing the report never imports the drawing (nor Pillow)."""
    if name == "render_timeline":
        from .report_png import render_timeline

        return render_timeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
