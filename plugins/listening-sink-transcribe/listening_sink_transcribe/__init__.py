"""The ``transcribe`` sink: each member's utterances, as text, live and in a transcript.

Each member's audio is cut into utterances by the ``vad-segments`` sink's segmenter
(:class:`listening_sink_vad.VadSegmentsSink`, writing 16 kHz mono WAVs under
``{directory}/audio``; its options ``aggressiveness``, ``frame_ms``, ``padding_ms``,
``min_speech_ms`` and ``max_silence_ms`` carry over). A Discord client stops sending when its
member stops speaking, and the segmenter hears nothing more from them: once a member has sent
nothing for ``max_silence_ms`` (and :data:`IDLE_MARGIN`), the sink hands the segmenter somewhat
more silence than that after their last frame, so their utterance ends then, not when they next
speak.

Each finished utterance goes to a bounded backlog (``max_backlog``) that ``workers`` threads of
this sink take from and hand to a transcription engine, chosen by name (``engine``) among the
engines plugins provide through the ``listening_transcription_engines`` hook; this distribution
provides ``faster-whisper`` (local) and ``openai`` (an OpenAI-compatible HTTP server). Reception
never waits for an engine: the delivery thread only queues.

An utterance that cannot be transcribed in time is counted per member and logged at WARNING the
first time for that member and reason, never dropped silently:

- ``backlog_full``: the backlog held ``max_backlog`` utterances when it ended;
- ``late``: it waited longer than ``timeout`` seconds for a worker;
- ``failed``: the engine raised (server unreachable, bad reply, its own timeout...).

Output, in ``directory``: ``transcript.jsonl`` (a line per transcribed utterance, appended and
flushed as each arrives: :meth:`Utterance.as_dict`), and at the end ``transcript.srt`` and
``transcript.vtt`` (sorted by start, with speaker labels). Live: ``on_utterance(utterance)`` on a
worker thread, and the discord.py event ``on_listening_transcript(member, utterance, vc)`` on
the bot's event loop. :meth:`TranscribeSink.report` is the ``"transcript"`` section a bot adds to
``session.json`` (``SessionReport.write(extra=sink.report())``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from listening_sink_vad import Segment, VadOptions, VadSegmentsSink

from listening_core.hookspecs import EngineSpec, SinkSpec, Transcription, TranscriptionEngine, hookimpl
from listening_core.plugins import (
    OptionsError,
    PluginConflictError,
    PluginError,
    SinkRegistry,
    default_registry,
    validate_options,
)
from listening_core.sinks import AudioFrame, AudioSink, FrameKind, SessionInfo, SinkError

from .errors import TranscriptionError
from .openai import OpenAIEngine, OpenAIOptions
from .subtitles import srt, vtt
from .whisper import WhisperEngine, WhisperOptions

__all__ = [
    "MISSED_REASONS",
    "OpenAIEngine",
    "OpenAIOptions",
    "TranscribeOptions",
    "TranscribeSink",
    "TranscriptionError",
    "Utterance",
    "WhisperEngine",
    "WhisperOptions",
    "listening_sinks",
    "listening_transcription_engines",
]
__version__ = "0.1.0.dev0"

_log = logging.getLogger(__name__)

MISSED_REASONS = ("backlog_full", "late", "failed")
"""Why an utterance has no text (the per-member counters of :meth:`TranscribeSink.report`)."""

IDLE_MARGIN = 0.6
"""Seconds past ``max_silence_ms`` of nothing received from a member before their utterance is ended.
The silence handed to the segmenter is ``max_silence_ms`` and ten of its frames (up to 300 ms, for
webrtcvad's hangover); the rest is room for jitter, so that a frame that comes after all never lands
in the silence the sink filled in."""

EVENT = "listening_transcript"
"""The discord.py event dispatched per utterance: ``on_listening_transcript(member, utterance, vc)``."""


@dataclass(frozen=True)
class Utterance:
    """One transcribed utterance of one member."""

    user_id: int
    user: str
    """The member's display name when the utterance started (the user id if unknown)."""
    index: int
    """1, 2, 3… per member, in the order the utterances ended (missed ones keep their number)."""
    start: float
    """Session seconds (0 = when ``listen`` started) where the speech starts."""
    end: float
    """Session seconds where the speech ends."""
    started_at: float
    """Unix time of :attr:`start` (the session's wall clock at sample 0 plus :attr:`start`)."""
    ended_at: float
    """Unix time of :attr:`end`."""
    text: str
    language: str | None
    confidence: float | None
    """The engine's confidence in :attr:`text` (0 to 1), or ``None`` if it gives none."""
    engine: str
    latency: float
    """Seconds from the end of the speech (:attr:`ended_at`) to the text being ready, by the wall
    clock: the wait for ``max_silence_ms`` of silence, the backlog and the engine."""
    audio: str | None = None
    """The utterance's WAV, relative to the sink's directory (``None`` unless ``keep_audio``)."""

    def as_dict(self) -> dict[str, Any]:
        """The utterance as a line of ``transcript.jsonl`` (times rounded to milliseconds)."""
        line = dataclasses.asdict(self)
        for key in ("start", "end", "started_at", "ended_at", "latency"):
            line[key] = round(line[key], 3)
        return line


@dataclass(frozen=True)
class TranscribeOptions:
    """Options of the ``transcribe`` sink."""

    directory: Path = field(
        default=Path("transcript"), metadata={"help": "where the transcript files (and kept audio) go"}
    )
    engine: str = field(
        default="faster-whisper",
        metadata={"help": "the transcription engine: faster-whisper (local), openai (HTTP), or a plugin's"},
    )
    engine_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "the engine's own options (listening plugins transcribe lists them per engine)"},
    )
    language: str | None = field(
        default=None, metadata={"help": "ISO 639-1 code to force (e.g. 'en'); None: the engine detects it"}
    )
    workers: int = field(default=1, metadata={"help": "threads transcribing at once (1 is fastest on a CPU)"})
    max_backlog: int = field(
        default=32, metadata={"help": "utterances waiting for a worker; past it they are counted, not queued"}
    )
    timeout: float = field(
        default=60.0,
        metadata={
            "help": "seconds an utterance may wait for a worker (and a request may take) before it is late"
        },
    )
    keep_audio: bool = field(
        default=False, metadata={"help": "keep each utterance's WAV under directory/audio"}
    )
    on_utterance: Callable[[Utterance], Any] | None = field(
        default=None, metadata={"help": "called with each Utterance, on a worker thread: keep it quick"}
    )
    aggressiveness: int = field(default=2, metadata={"help": "segmenter (vad-segments): webrtcvad mode 0-3"})
    frame_ms: Literal[10, 20, 30] = field(default=30, metadata={"help": "segmenter: webrtcvad frame, ms"})
    padding_ms: int = field(default=200, metadata={"help": "segmenter: audio kept around the speech"})
    min_speech_ms: int = field(default=250, metadata={"help": "segmenter: shorter utterances are ignored"})
    max_silence_ms: int = field(default=600, metadata={"help": "segmenter: this much non-speech ends one"})

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be between 1 and 64, got {self.workers}")
        if not 1 <= self.max_backlog <= 100_000:
            raise ValueError(f"max_backlog must be between 1 and 100000, got {self.max_backlog}")
        if not 0 < self.timeout <= 86_400:
            raise ValueError(f"timeout must be between 0 and 86400 seconds, got {self.timeout}")
        if self.language is not None and not (self.language.isalpha() and 2 <= len(self.language) <= 3):
            raise ValueError(f"language must be an ISO 639-1 code such as 'en', got {self.language!r}")
        self.vad_options()  # the segmenter's checks, with its messages

    def vad_options(self, **more: Any) -> VadOptions:
        """The segmenter's options."""
        return VadOptions(
            directory=Path(self.directory) / "audio",
            aggressiveness=self.aggressiveness,
            frame_ms=self.frame_ms,
            padding_ms=self.padding_ms,
            min_speech_ms=self.min_speech_ms,
            max_silence_ms=self.max_silence_ms,
            sample_rate=16000,
            template="{user_id}-{index:04d}-{start_ms}",
            manifest="utterances.jsonl",
            **more,
        )


@dataclass
class _Job:
    segment: Segment
    ended: float  # time.monotonic() when the segmenter finished it


@dataclass
class _Counts:
    name: str
    utterances: int = 0
    transcribed: int = 0
    missed: collections.Counter[str] = field(default_factory=collections.Counter)


_STOP = object()


class TranscribeSink(AudioSink):
    """Segments each member's speech and transcribes each utterance (see the module docstring)."""

    wants_pcm = True

    def __init__(
        self, options: TranscribeOptions | None = None, *, registry: SinkRegistry | None = None
    ) -> None:
        self.options = options = options or TranscribeOptions()
        self.directory = Path(options.directory)
        registry = registry or default_registry()
        try:
            self.engine_spec: EngineSpec = registry.engine(options.engine)
        except PluginConflictError:
            raise
        except PluginError as exc:  # a name no installed plugin provides: a wrong option
            raise OptionsError(f"sink 'transcribe': {exc}", sink="transcribe", option="engine") from exc
        try:
            self.engine_options = validate_options(cast(SinkSpec, self.engine_spec), options.engine_options)
        except OptionsError as exc:
            raise OptionsError(
                f"sink 'transcribe': engine_options for engine {options.engine!r}: {exc}",
                sink="transcribe",
                option="engine_options",
            ) from exc
        self._vad = VadSegmentsSink(options.vad_options(on_segment=self._enqueue))
        self._vad_lock = threading.Lock()  # the delivery thread and the idle thread feed the segmenter
        self._heard: dict[int, tuple[int, float]] = {}  # user -> (end of their last frame, when it came)
        self._idle_stop = threading.Event()
        self._idle: threading.Thread | None = None
        self._queue: queue.Queue[_Job | object] = queue.Queue(options.max_backlog)
        self._lock = threading.Lock()
        self._engine_lock = threading.Lock()  # the workers loading the engine (once)
        self._engine: TranscriptionEngine | None = None
        self._engine_error: BaseException | None = None
        self._engine_ready = threading.Event()
        self._workers: list[threading.Thread] = []
        self._members: dict[int, Any] = {}
        self._counts: dict[int, _Counts] = {}
        self._warned: set[tuple[int, str]] = set()
        self._missed: list[dict[str, Any]] = []
        self._session: SessionInfo | None = None
        self._jsonl: Any = None
        self._closed = False
        self.utterances: list[Utterance] = []
        """Every transcribed utterance, in the order their text arrived."""
        self.callback_errors = 0

    # -- the sink's life (delivery thread)

    def on_start(self, session: SessionInfo) -> None:
        self._session = session
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "transcript.jsonl"
        try:
            self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in cleanup
        except OSError as exc:
            raise SinkError(f"transcribe: cannot open {path}: {exc}") from exc
        self._vad.on_start(session)
        self._idle = threading.Thread(
            target=self._end_idle_utterances,
            name=f"listening-transcribe-idle-{session.channel_id}",
            daemon=True,
        )
        self._idle.start()
        for i in range(self.options.workers):
            worker = threading.Thread(
                target=self._work, name=f"listening-transcribe-{session.channel_id}-{i}", daemon=True
            )
            worker.start()
            self._workers.append(worker)

    def on_audio(self, frame: AudioFrame) -> None:
        if frame.member is not None:
            self._members[frame.user_id] = frame.member
        with self._vad_lock:
            self._vad.on_audio(frame)
            self._heard[frame.user_id] = (frame.end, time.monotonic())

    def on_stop(self, end: int) -> None:
        self._stop_idle()
        with self._vad_lock:
            self._vad.on_stop(end)

    def _stop_idle(self) -> None:
        self._idle_stop.set()
        if self._idle is not None:
            self._idle.join()

    def _end_idle_utterances(self) -> None:
        """Hand the segmenter ``max_silence_ms`` of silence after the last frame of each member who
        has sent nothing for that long (and :data:`IDLE_MARGIN`), once per pause."""
        quiet = self.options.max_silence_ms / 1000 + IDLE_MARGIN
        samples = (self.options.max_silence_ms + 10 * self.options.frame_ms) * 48
        while not self._idle_stop.wait(0.1):
            now = time.monotonic()
            with self._vad_lock:
                for user_id, (end, when) in list(self._heard.items()):
                    if now - when < quiet:
                        continue
                    del self._heard[user_id]
                    silence = AudioFrame(user_id, 0, 0, 0, end, FrameKind.SILENCE, bytes(samples * 4))
                    try:
                        self._vad.on_valid_audio(silence)
                    except Exception:
                        _log.exception("transcribe: ending the utterance of %d after a pause failed", user_id)

    def cleanup(self) -> None:
        """Finish the open utterances, wait for the backlog (up to ``timeout``), write SRT and VTT."""
        if self._closed:
            return
        self._closed = True
        self._stop_idle()
        errors: list[BaseException] = []
        try:
            self._vad.cleanup()  # its last utterances come through _enqueue
        except Exception as exc:
            errors.append(exc)
        # the backlog's utterances each wait at most timeout for a worker, then one transcription
        deadline = time.monotonic() + self.options.timeout + 5.0
        for _ in self._workers:
            try:  # waits only while the workers work off a full backlog
                self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                break
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        stuck = [w.name for w in self._workers if w.is_alive()]
        if stuck:
            _log.warning(
                "transcribe: %s still busy at the end; their utterances are left out", ", ".join(stuck)
            )
        while True:  # only when no worker ran (never started) or they are stuck
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _Job):
                self._miss(job.segment, "late", "the session ended before a worker took it")
        if not self.options.keep_audio:  # the segmenter's manifest lists files that are gone
            self._vad.manifest_path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self._vad.directory.rmdir()
        with self._lock:
            done = sorted(self.utterances, key=lambda u: (u.start, u.user_id))
            jsonl, self._jsonl = self._jsonl, None
        # a sink that never started (listen() failed before it) has no transcript to write
        for name, render in (("transcript.srt", srt), ("transcript.vtt", vtt)) if self._session else ():
            try:
                (self.directory / name).write_text(render(done), encoding="utf-8")
            except OSError as exc:
                errors.append(exc)
        if jsonl is not None:
            try:
                jsonl.close()
            except OSError as exc:
                errors.append(exc)
        if self._engine is not None and not stuck:
            try:
                self._engine.close()
            except Exception:
                _log.exception("transcribe: closing engine %r failed", self.options.engine)
        if errors:
            raise SinkError(f"transcribe: finishing failed: {errors[0]}") from errors[0]

    # -- the backlog

    def _enqueue(self, segment: Segment) -> None:
        """The segmenter finished an utterance (delivery thread): queue it, never wait."""
        with self._lock:
            counts = self._count(segment)
            counts.utterances += 1
        try:
            self._queue.put_nowait(_Job(segment, time.monotonic()))
        except queue.Full:
            self._miss(segment, "backlog_full", f"{self.options.max_backlog} utterances were waiting")

    def _count(self, segment: Segment) -> _Counts:
        counts = self._counts.get(segment.user_id)
        if counts is None:
            counts = self._counts[segment.user_id] = _Counts(segment.user)
        return counts

    def _miss(self, segment: Segment, reason: str, why: str) -> None:
        with self._lock:
            self._count(segment).missed[reason] += 1
            first = (segment.user_id, reason) not in self._warned
            self._warned.add((segment.user_id, reason))
            self._missed.append(
                {
                    "user_id": segment.user_id,
                    "user": segment.user,
                    "index": segment.index,
                    "start": round(segment.speech_start, 3),
                    "end": round(segment.speech_end, 3),
                    "reason": reason,
                }
            )
        if first:
            _log.warning(
                "transcribe: an utterance of %s (%d) at %.2f s has no text (%s: %s); counted, "
                "further ones like it are counted without a warning",
                segment.user,
                segment.user_id,
                segment.speech_start,
                reason,
                why,
            )
        self._discard_audio(segment)

    def _discard_audio(self, segment: Segment) -> None:
        if not self.options.keep_audio:
            segment.path.unlink(missing_ok=True)

    # -- the workers

    def _load_engine(self) -> TranscriptionEngine | None:
        # its own lock: loading a model takes seconds, and the delivery thread takes _lock
        with self._engine_lock:
            if not self._engine_ready.is_set():
                try:
                    self._engine = self.engine_spec.factory(self.engine_options)
                except Exception as exc:
                    self._engine_error = exc
                    _log.error("transcribe: engine %r could not start: %s", self.options.engine, exc)
                self._engine_ready.set()
            return self._engine

    def _work(self) -> None:
        engine = self._load_engine()
        while True:
            job = self._queue.get()
            if not isinstance(job, _Job):
                return
            segment = job.segment
            waited = time.monotonic() - job.ended
            if engine is None:
                self._miss(segment, "failed", f"the engine could not start: {self._engine_error}")
                continue
            if waited > self.options.timeout:
                self._miss(
                    segment,
                    "late",
                    f"it waited {waited:.1f} s for a worker (timeout {self.options.timeout} s)",
                )
                continue
            try:
                heard = engine.transcribe(
                    segment.pcm, language=self.options.language, timeout=self.options.timeout - waited
                )
                if not isinstance(heard, Transcription):
                    raise TranscriptionError(f"engine returned {heard!r}, not a Transcription")
            except Exception as exc:
                self._miss(segment, "failed", f"{type(exc).__name__}: {exc}")
                continue
            self._deliver(segment, heard)

    def _deliver(self, segment: Segment, heard: Transcription) -> None:
        started = self._session.started_at if self._session is not None else 0.0
        latency = time.time() - (started + segment.speech_end)
        utterance = Utterance(
            user_id=segment.user_id,
            user=segment.user,
            index=segment.index,
            start=segment.speech_start,
            end=segment.speech_end,
            started_at=started + segment.speech_start,
            ended_at=started + segment.speech_end,
            text=heard.text,
            language=heard.language,
            confidence=heard.confidence,
            engine=self.options.engine,
            latency=latency,
            audio=f"audio/{segment.file}" if self.options.keep_audio else None,
        )
        self._discard_audio(segment)
        line = json.dumps(utterance.as_dict(), ensure_ascii=False) + "\n"
        with self._lock:
            self.utterances.append(utterance)
            self._count(segment).transcribed += 1
            if self._jsonl is not None:
                try:
                    self._jsonl.write(line)
                    self._jsonl.flush()
                except OSError:
                    _log.exception(
                        "transcribe: writing transcript.jsonl failed (the utterance stays in the report)"
                    )
        callback = self.options.on_utterance
        if callback is not None:
            try:
                callback(utterance)
            except Exception:
                self.callback_errors += 1
                _log.exception("transcribe: on_utterance raised (transcription goes on)")
        self._dispatch(utterance)

    def _dispatch(self, utterance: Utterance) -> None:
        member = self._members.get(utterance.user_id)
        vc = getattr(getattr(member, "guild", None), "voice_client", None)
        client, loop = getattr(vc, "client", None), getattr(vc, "loop", None)
        if client is None or loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(client.dispatch, EVENT, member, utterance, vc)

    # -- results

    def missed(self, user_id: int | None = None) -> dict[str, int]:
        """Utterances without text by reason (:data:`MISSED_REASONS`), of one member or of all."""
        with self._lock:
            counters = [c.missed for uid, c in self._counts.items() if user_id is None or uid == user_id]
            return {reason: sum(c[reason] for c in counters) for reason in MISSED_REASONS}

    def report(self) -> dict[str, Any]:
        """The ``"transcript"`` section of ``session.json``: pass it as ``SessionReport.write(extra=...)``.

        ``{"transcript": {"engine", "file", "members": [{"user_id", "name", "utterances",
        "transcribed", "backlog_full", "late", "failed"}], "utterances": [...],
        "missed": [{"user_id", "user", "index", "start", "end", "reason"}]}}``; callable at any
        time (live reports) from any thread.
        """
        with self._lock:
            members = [
                {
                    "user_id": uid,
                    "name": c.name,
                    "utterances": c.utterances,
                    "transcribed": c.transcribed,
                    **{reason: c.missed[reason] for reason in MISSED_REASONS},
                }
                for uid, c in sorted(self._counts.items())
            ]
            utterances = [u.as_dict() for u in sorted(self.utterances, key=lambda u: (u.start, u.user_id))]
            missed = list(self._missed)
        return {
            "transcript": {
                "engine": self.options.engine,
                "file": "transcript.jsonl",
                "members": members,
                "utterances": utterances,
                "missed": missed,
            }
        }

    def __repr__(self) -> str:
        return f"<TranscribeSink {self.directory} engine={self.options.engine} utterances={len(self.utterances)}>"


# ---------------------------------------------------------------------------------- the hooks


@hookimpl
def listening_sinks() -> list[SinkSpec]:
    """The sink of listening-sink-transcribe."""
    return [
        SinkSpec(
            "transcribe",
            TranscribeSink,
            TranscribeOptions,
            "each member's utterances as text (live, JSON lines, SRT, VTT), by a transcription engine",
        )
    ]


@hookimpl
def listening_transcription_engines() -> list[EngineSpec]:
    """The engines of listening-sink-transcribe."""
    return [
        EngineSpec(
            "faster-whisper", WhisperEngine, WhisperOptions, "Whisper models run locally (faster-whisper)"
        ),
        EngineSpec(
            "openai",
            OpenAIEngine,
            OpenAIOptions,
            "an OpenAI-compatible server: POST /v1/audio/transcriptions",
        ),
    ]
