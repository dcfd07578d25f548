"""listening-sink-speech-log: a complete third-party sink plugin for listening-core, kept small.

It provides the ``speech-log`` sink, which writes a JSON-lines file of who spoke when, one line
for each talk spurt::

    {"user_id": 1234, "user": "alice", "start": 0.42, "end": 3.38, "duration": 2.96,
     "frames": 148, "lost": 0, "concealed": 0, "started_at": 1767225600.42}

``start`` and ``end`` are seconds on the session timeline (0 = the moment ``listen`` started) and
``started_at`` is the same moment as a Unix time. ``lost`` counts frames that never arrived and
``concealed`` counts those the receiver could only conceal (the others were rebuilt from FEC).

A plugin needs three things, all of them in this one module:

1. an **options class**: a frozen dataclass with a default for every field and a ``help`` for each;
2. a **sink class**: an ``AudioSink`` that receives every frame through ``on_audio``;
3. a ``listening_sinks`` **hook**, decorated with ``hookimpl``, that names the sink.

``pyproject.toml`` then points the ``listening_core.sinks`` entry-point group at this module.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar

from listening_core.hookspecs import SinkSpec, hookimpl
from listening_core.sinks import SAMPLE_RATE, AudioFrame, AudioSink, FrameKind, SessionInfo

__version__ = "0.1.0.dev0"
__all__ = ["SpeechLogOptions", "SpeechLogSink", "listening_sinks"]


# --- 1. the options ------------------------------------------------------------------------------
# The registry checks users' options against these annotations, builds an instance (so
# __post_init__ runs) and passes it to the sink. `listening plugins` shows each option's help.


@dataclass(frozen=True)
class SpeechLogOptions:
    """Options of the ``speech-log`` sink."""

    path: Path = field(
        default=Path("speech-log.jsonl"), metadata={"help": "the JSON-lines file, one line per talk spurt"}
    )
    gap_ms: int = field(
        default=100,
        metadata={"help": "a pause longer than this between two frames ends a spurt (ms)"},
    )
    append: bool = field(default=False, metadata={"help": "append to the file instead of replacing it"})

    def __post_init__(self) -> None:
        # Well-typed but invalid values: raise ValueError and name the option.
        if self.gap_ms < 0:
            raise ValueError(f"gap_ms must be >= 0, got {self.gap_ms}")


# --- 2. the sink ---------------------------------------------------------------------------------


@dataclass
class _Spurt:
    """A talk spurt in progress: session samples [start, end) and what its frames were."""

    start: int
    end: int
    user: str | None
    frames: int = 0
    lost: int = 0
    concealed: int = 0


class SpeechLogSink(AudioSink):
    """Writes one JSON line per talk spurt of each speaker.

    A spurt starts at a speaker's first frame of audio. It ends at the first Opus silence frame
    (clients send five after every spurt, and the receiver marks them ``FrameKind.SILENCE``),
    or where the speaker's frames stop for more than ``gap_ms``. Each line is written and
    flushed as soon as its spurt ends.
    """

    # The sink never looks at the audio, so it asks for no PCM. The receiver then skips decoding
    # altogether, which is much cheaper. The SinkSpec below must say the same.
    wants_pcm: ClassVar[bool] = False

    def __init__(self, options: SpeechLogOptions | None = None) -> None:
        self.options = options or SpeechLogOptions()
        self.path = Path(self.options.path)
        self.session: SessionInfo | None = None
        self.spurts_written = 0
        self._open: dict[int, _Spurt] = {}  # user id -> the spurt that speaker is in
        self._gap = self.options.gap_ms * SAMPLE_RATE // 1000  # in samples, like frame positions
        self._lock = threading.Lock()
        # The factory (this constructor) may do I/O: the registry calls it when `listen` starts.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(  # noqa: SIM115 - closed in cleanup()
            self.path, "a" if self.options.append else "w", encoding="utf-8", buffering=1
        )

    def on_start(self, session: SessionInfo) -> None:
        # Called once before the first frame: keep the wall-clock time of session sample 0.
        self.session = session

    def on_audio(self, frame: AudioFrame) -> None:
        # Called from the session's delivery thread for every frame of every speaker, in order per
        # speaker. frame.position is the frame's first sample on the session timeline (48 kHz).
        with self._lock:
            spurt = self._open.get(frame.user_id)
            if frame.kind is FrameKind.SILENCE:  # the sender says it stopped talking
                if spurt is not None:
                    self._close(frame.user_id, end=min(spurt.end, frame.position))
                return
            if spurt is not None and frame.position - spurt.end > self._gap:  # it stopped sending
                self._close(frame.user_id, end=spurt.end)
                spurt = None
            if spurt is None:
                name = frame.member.display_name if frame.member is not None else None
                spurt = self._open[frame.user_id] = _Spurt(frame.position, frame.end, name)
            spurt.end = frame.end
            spurt.frames += 1
            if frame.kind in (FrameKind.FEC, FrameKind.PLC):  # lost in transit...
                spurt.lost += 1
                if frame.kind is FrameKind.PLC:  # ...and not rebuilt from the next frame's FEC
                    spurt.concealed += 1

    def on_stop(self, end: int) -> None:
        # The session stopped: spurts still open end with their last frame.
        with self._lock:
            for user_id in list(self._open):
                self._close(user_id, end=self._open[user_id].end)

    def cleanup(self) -> None:
        # Called exactly once at the end, even if on_stop was not. An exception raised here (or in
        # on_audio) stops the sink and reaches the `after` callback of `listen`.
        self.on_stop(0)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _close(self, user_id: int, *, end: int) -> None:
        spurt = self._open.pop(user_id)
        start, stop = spurt.start / SAMPLE_RATE, max(end, spurt.start) / SAMPLE_RATE
        line = {
            "user_id": user_id,
            "user": spurt.user,
            "start": round(start, 3),
            "end": round(stop, 3),
            "duration": round(stop - start, 3),
            "frames": spurt.frames,
            "lost": spurt.lost,
            "concealed": spurt.concealed,
            "started_at": round(self.session.started_at + start, 3) if self.session else None,
        }
        if self._file is not None:
            self._file.write(json.dumps(line) + "\n")  # line-buffered: on disk at once
            self.spurts_written += 1


# --- 3. the hook ---------------------------------------------------------------------------------
# The registry calls this once when it loads the plugin. Do no I/O here; just describe the sinks.


@hookimpl
def listening_sinks() -> list[SinkSpec]:
    """The sinks of this plugin."""
    return [
        SinkSpec(
            "speech-log",  # the name users pass to vc.listen("speech-log", ...)
            SpeechLogSink,  # the factory: called with a validated SpeechLogOptions
            SpeechLogOptions,
            "a JSON-lines log of who spoke when: one line per talk spurt",
            wants_pcm=False,  # must match SpeechLogSink.wants_pcm
        )
    ]
