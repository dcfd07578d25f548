"""Writing one file per speaker: :class:`AudioFileSink`, and :class:`FileNamer`, which names files.

- :class:`FileNamer`: template → safe name → unique on disk, the one way every sink that writes
  files names them (the wav, flac and mp3 sinks through :class:`AudioFileSink`; ogg-opus,
  vad-segments and mixdown directly). :data:`PLACEHOLDERS` lists what a template can use;
  :func:`check_template` checks one; :func:`safe_filename` makes any text a safe file name.
- :class:`AudioFileSink`: one :class:`~listening_core.sinks.AudioFile` per user, all aligned
  on the session timeline; :class:`FileSinkOptions`: the options the file sink plugins share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import time
import types
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

from ..errors import SinkError
from ..frames import CHANNELS, SAMPLE_RATE, AudioFrame, SessionInfo
from .audiofile import AudioFile
from .base import AudioHandlingSink

_log = logging.getLogger(__name__)

__all__ = [
    "PLACEHOLDERS",
    "SESSION_PLACEHOLDERS",
    "SPEAKER_PLACEHOLDERS",
    "STARTED_FORMAT",
    "AudioFileSink",
    "FileNamer",
    "FileSinkOptions",
    "check_template",
    "safe_filename",
]


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


# ------------------------------------------------------------------------------ the file namer


PLACEHOLDERS: Mapping[str, str] = types.MappingProxyType(
    {
        "user": "the speaker's display name (their user id when the member is not known)",
        "user_id": "the speaker's user id",
        "guild_id": "the session's guild id (empty when there is none)",
        "channel_id": "the session's voice channel id (empty when unknown)",
        "started": "when the session started, UTC: 20260301-120000 (the mixdown sink: 20260301T120000Z)",
        "index": "the speaker's utterance number: 1, 2… (vad-segments)",
        "start_ms": "where the utterance starts, in ms after the session's start (vad-segments)",
    }
)
"""Every placeholder a file-name template can use, with its meaning; each sink fills the ones
it names (a template with any other is refused when the options are checked)."""

SPEAKER_PLACEHOLDERS = ("user", "user_id", "guild_id", "channel_id", "started")
"""The placeholders of a sink with one file per speaker (wav, flac, mp3, ogg-opus)."""

SESSION_PLACEHOLDERS = ("guild_id", "channel_id", "started")
"""The placeholders of a sink with one file per session (mixdown)."""

STARTED_FORMAT = "%Y%m%d-%H%M%S"
"""How ``{started}`` is written (:meth:`datetime.datetime.strftime`, UTC) unless a sink says otherwise."""

# a value of the right type for each placeholder, to try a template with
_SAMPLE_VALUES: Mapping[str, object] = {
    "user": "u",
    "user_id": 1,
    "guild_id": 2,
    "channel_id": 3,
    "started": "s",
    "index": 1,
    "start_ms": 0,
}


def check_template(
    template: str, placeholders: Iterable[str] = SPEAKER_PLACEHOLDERS, *, option: str = "template"
) -> None:
    """Raise :class:`ValueError` if ``template`` uses anything but ``placeholders`` (names in
    :data:`PLACEHOLDERS`; by default those of a per-speaker file sink). ``option`` is how the
    message calls the template (``"filename"`` for the mixdown sink)."""
    names = tuple(placeholders)
    unknown = [name for name in names if name not in PLACEHOLDERS]
    if unknown:
        raise ValueError(f"not file-name placeholders: {', '.join(unknown)}; see PLACEHOLDERS")
    try:
        template.format(**{name: _SAMPLE_VALUES[name] for name in names})
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"{option} {template!r} is invalid ({type(exc).__name__}: {exc}); the placeholders are "
            + ", ".join("{" + name + "}" for name in names)
        ) from None


class FileNamer:
    """Template → safe name → unique on disk: how every sink that writes files names them.

    One namer per sink and session. :meth:`take` fills ``template`` with the sink's values and the
    session's (``{guild_id}``, ``{channel_id}``: empty when unknown; ``{started}``: the session's
    start, UTC, written with ``started_format``); makes the result one file-name component with
    :func:`safe_filename` (``fallback`` when nothing is left of it), so no template or user
    name can reach outside ``directory``; drops ``extension`` if the template already ends
    with it; then adds ``-2``, ``-3``… until the name is new: not taken by this namer before
    (compared without case, for case-insensitive file systems), not one of ``reserved``, and
    nothing at all on disk under that name: no file, directory or link (a dangling link
    included, so a link planted in the directory is never written through). Existing files
    are never overwritten.

    ``placeholders`` are the names (from :data:`PLACEHOLDERS`) the template may use; the
    template is checked with :func:`check_template` when the namer is made.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        template: str,
        extension: str,
        *,
        placeholders: Iterable[str] = SPEAKER_PLACEHOLDERS,
        started_format: str = STARTED_FORMAT,
        reserved: Iterable[str] = (),
        option: str = "template",
    ) -> None:
        self.placeholders: tuple[str, ...] = tuple(placeholders)
        check_template(template, self.placeholders, option=option)
        self.directory: pathlib.Path = pathlib.Path(directory)
        self.template = template
        self.extension = extension
        self.started_format = started_format
        self._reserved = {name.lower() for name in reserved}
        self._taken: set[str] = set()

    def session_values(self, session: SessionInfo | None) -> dict[str, object]:
        """``{guild_id}``, ``{channel_id}`` and ``{started}`` of ``session`` (now, when unknown)."""
        import datetime

        started = datetime.datetime.fromtimestamp(
            session.started_at if session else time.time(), datetime.UTC
        )
        return {
            "guild_id": session.guild_id if session and session.guild_id is not None else "",
            "channel_id": session.channel_id if session and session.channel_id is not None else "",
            "started": started.strftime(self.started_format),
        }

    def take(self, session: SessionInfo | None, *, fallback: str, **values: object) -> str:
        """A new file name (with the extension) for the sink's ``values``; it is taken from now on."""
        extra = [name for name in values if name not in self.placeholders]
        if extra:
            raise TypeError(f"{', '.join(extra)} not among this namer's placeholders {self.placeholders}")
        raw = self.template.format(**{**self.session_values(session), **values})
        base = safe_filename(raw, fallback=fallback)
        ext = self.extension
        if ext and len(base) > len(ext) and base.lower().endswith(ext.lower()):
            base = safe_filename(base[: -len(ext)], fallback=fallback)
        name, n = base, 1
        while self._clashes(name):
            n += 1
            name = f"{base}-{n}"
        self._taken.add(name.lower())
        return name + ext

    def for_speaker(self, frame: AudioFrame, session: SessionInfo | None) -> str:
        """A new file name for ``frame``'s user: ``{user}`` is their display name (else their id)."""
        user = frame.member.display_name if frame.member is not None else str(frame.user_id)
        return self.take(session, fallback=str(frame.user_id), user=user, user_id=frame.user_id)

    def _clashes(self, name: str) -> bool:
        file_name = name + self.extension
        return (
            name.lower() in self._taken
            or name.lower() in self._reserved
            or file_name.lower() in self._reserved
            or os.path.lexists(self.directory / file_name)
        )


# --------------------------------------------------------------------------------------- the sink


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
    ``{started}``: the session's start, UTC, ``YYYYmmdd-HHMMSS``) through :class:`FileNamer`:
    made safe with :func:`safe_filename`; a name already used in this session or already on
    disk gets ``-2``, ``-3``… (existing files are never overwritten). At the end every file is padded to the
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
        self.directory: pathlib.Path = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.template = template
        self.channels = channels
        self.sample_rate = sample_rate
        self.flush_interval = flush_interval
        self.files: dict[int, AudioFile] = {}
        self.errors: dict[int, BaseException] = {}
        self._namer = FileNamer(self.directory, template, self.extension)
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
        """The (unique, safe) file name of ``frame``'s user (see :class:`FileNamer`)."""
        return self._namer.for_speaker(frame, self._session)

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
