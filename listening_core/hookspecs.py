"""The plugin contract: everything a third-party sink author needs to read.

A *sink* receives the audio of a listening session (:class:`~listening_core.sinks.AudioSink`).
A *sink plugin* is a module whose functions, decorated with :data:`hookimpl`, implement the
hooks of this module; through :func:`listening_sinks` it provides sinks that bots choose by name::

    vc.listen("frame-count", options={"path": "counts.json"})

Declaring a plugin, names and conflicts
=======================================

A distribution declares its plugin module in the ``listening_core.sinks`` entry-point group
(:data:`ENTRY_POINT_GROUP`) of its ``pyproject.toml``::

    [project.entry-points."listening_core.sinks"]
    frame-count = "listening_sink_frame_count"

The value names the module holding the hook implementations (or ``module:object``, an object
holding them); the entry point's name, by convention the sink's name, names the plugin in
messages. Name the distribution ``listening-sink-<sink name>``: when a bot asks for a sink that
is not installed, the error says ``pip install listening-sink-<name>`` (and lists the sinks that
are installed).

The registry (:mod:`listening_core.plugins`) loads every entry point of the group once per
process, on first use (the first ``vc.listen``, ``listening plugins`` or ``listening doctor``).
Plugins do not stop each other:

- a plugin that cannot be imported, or that is refused (see *When a plugin is refused* below),
  is logged as a warning and recorded in :attr:`SinkRegistry.failures
  <listening_core.plugins.SinkRegistry.failures>`; its sinks are unavailable, and asking for
  one raises :class:`~listening_core.plugins.UnknownSinkError` saying why. ``listening doctor``
  and ``listening plugins`` show it, with the fix;
- a sink name that two installed plugins provide is unusable until one of them is
  uninstalled: asking for it raises :class:`~listening_core.plugins.PluginConflictError`
  naming both distributions (a warning is logged when they load); their other sinks work. A
  plugin registered in code (:meth:`SinkRegistry.register
  <listening_core.plugins.SinkRegistry.register>`, for tests) that would clash is refused
  with that error instead, and nothing of it is registered;
- two entry points of the same name from different distributions are both loaded, the second
  under the plugin name ``"<distribution>:<name>"``; two entry points naming the same module
  load it once.

A minimal plugin
================

The whole module ``listening_sink_frame_count``: a sink that counts each user's frames and
writes the counts to a JSON file at the end::

    from __future__ import annotations

    import collections
    import json
    from dataclasses import dataclass, field
    from pathlib import Path

    from listening_core.hookspecs import SinkSpec, hookimpl
    from listening_core.sinks import AudioFrame, AudioSink


    @dataclass(frozen=True)
    class CountOptions:
        path: Path = field(default=Path("counts.json"), metadata={"help": "where the counts go"})
        min_frames: int = field(default=1, metadata={"help": "leave out users with fewer frames"})

        def __post_init__(self) -> None:
            if self.min_frames < 0:
                raise ValueError(f"min_frames must be at least 0, got {self.min_frames}")


    class CountSink(AudioSink):
        wants_pcm = False  # it only counts: the session need not decode anything

        def __init__(self, options: CountOptions) -> None:
            self.options = options
            self.frames: collections.Counter[int] = collections.Counter()

        def on_audio(self, frame: AudioFrame) -> None:
            self.frames[frame.user_id] += 1

        def cleanup(self) -> None:
            counts = {str(user): n for user, n in self.frames.items() if n >= self.options.min_frames}
            self.options.path.write_text(json.dumps(counts))


    @hookimpl
    def listening_sinks() -> list[SinkSpec]:
        return [SinkSpec("frame-count", CountSink, CountOptions, "frames per user, as JSON", wants_pcm=False)]

A bot then records with ``vc.listen("frame-count", options={"path": "out/counts.json"})``. The
registry checks the options against the annotations of ``CountOptions`` (converting the ``str``
to a ``Path``), builds a ``CountOptions`` (so ``__post_init__`` runs), calls
``CountSink(options)`` and hands the sink to the session. A typo such as
``{"min_frame": 2}`` raises ``sink 'frame-count' has no option 'min_frame' (did you mean
'min_frames'?)``, followed by every valid option with its type, default and help.

The hooks
=========

- :func:`listening_sinks`: the sinks the plugin provides (most plugins implement only this);
- :func:`listening_sink_created`: observe each sink the registry builds by name;
- :func:`listening_session_finished`: observe the end of each listening session;
- :func:`listening_transcription_engines`: speech-to-text engines (:class:`EngineSpec`) for
  sinks that transcribe, such as ``transcribe`` (listening-sink-transcribe), which pick one by
  name.

Implement them as functions of the plugin module named like the hook and decorated with
``@hookimpl``; an implementation may take any subset of the hook's arguments (by name). A
plugin must implement at least one hook, and a decorated function whose name is not a hook
gets the plugin refused (with a did-you-mean), unless it is marked
``@hookimpl(optionalhook=True)``. Hooks are called in the main process only, never in a decode
worker process.

SinkSpec
========

:func:`listening_sinks` returns :class:`SinkSpec` objects: ``name`` (matching
:data:`SINK_NAME_RE`: lower-case letters, digits and ``-``), ``factory`` (called with the
options object; returns a new sink), ``options`` (the options class), ``summary`` (one line,
for listings and errors) and ``wants_pcm``. ``distribution`` and ``version`` are filled in by
the registry. The constructor checks the fields, and that the options class is a frozen
dataclass with a default for every field, and raises :class:`TypeError` or
:class:`ValueError` with what to fix.

The options class
=================

Checked when the plugin is loaded:

- a frozen :func:`~dataclasses.dataclass` with a default for every field, so ``options=None``
  means "all defaults" (an empty one for a sink without options);
- defined at module level (not inside a function: its instances must pickle), with annotations
  resolvable with :func:`typing.get_type_hints` from the module's globals (define the types it
  names at module level, not under ``if TYPE_CHECKING:``; ``from __future__ import annotations``
  is fine). Supported and checked: ``int`` (``bool`` is rejected), ``float`` (``int``
  accepted), ``str``, ``bool``, :class:`pathlib.Path` (``str`` accepted), ``Literal[...]``,
  enums (a member, its value or its name), ``X | None``, ``tuple[...]``, ``list[...]`` and
  ``dict[...]`` of those, and ``Callable`` (any callable). Other classes are checked with
  ``isinstance``;
- picklable field values. A ``Callable`` option holding a lambda or a closure makes the options
  object unpicklable; that is allowed, but such a sink cannot be handed to another process;
- its default options must pass the checks below: a plugin whose defaults fail is refused.

``field(metadata={"help": "..."})`` gives the one-line help that ``listening plugins`` and the
option errors show.

How options are checked (:func:`listening_core.plugins.validate_options`, which ``vc.listen``
calls): a bot gives ``None`` (all defaults), a ``dict`` or an instance of the class. Each value
is checked against its field's annotation and converted where that is lossless (``str`` →
``Path``, ``int`` → ``float``, ``list`` → ``tuple``, an enum's value or name → the member);
then the class is built from them, so ``__post_init__`` runs. Every problem raises
:class:`~listening_core.plugins.OptionsError` (a :class:`ValueError`; its ``sink`` and
``option`` attributes say where) from ``vc.listen``:

- an unknown option name: the name, the nearest valid names (did you mean ...?) and the list
  of valid options with their types, defaults and help;
- a value of the wrong type: the option, the type expected and the value given;
- ``__post_init__`` raising :class:`ValueError` or :class:`TypeError` for values that are
  well-typed but invalid: its message, prefixed with the sink, and with the option when the
  message names exactly one option (so name it: ``"min_frames must be at least 0"``). Raising
  :class:`~listening_core.plugins.OptionsError` with ``option=`` names it explicitly.

A sink's life, and which thread calls what
==========================================

For each listening session, in this order:

1. ``spec.factory(options)`` builds the sink inside ``vc.listen``, on the thread that called it
   (the bot's event-loop thread): keep it quick, though it may create directories or open
   files. It must return a new :class:`~listening_core.sinks.AudioSink` instance (``vc.listen``
   refuses anything else with :class:`TypeError`) whose ``wants_pcm`` is the spec's. An
   exception from the factory propagates out of ``vc.listen``, with a note naming the sink and
   its plugin. Then :func:`listening_sink_created` is called.
2. ``on_start(session)``, once, still on the thread that called ``vc.listen``, before any
   frame: a :class:`~listening_core.sinks.SessionInfo` (guild, channel, wall-clock start).
3. ``on_audio(frame)`` for every 20 ms :class:`~listening_core.sinks.AudioFrame` of every
   user, in order per user (a frame lost in transit comes rebuilt from FEC or concealed: see
   ``frame.kind``), and ``on_rtcp(packet)`` for every RTCP packet; then ``on_stop(end)``,
   once, after the last frame, with the session's last sample; then ``cleanup()``, exactly
   once. All of these are called on the session's delivery thread
   (``listening-core-delivery-<channel id>``), one call at a time, so a sink needs no lock for
   its own state; it is neither the event loop's thread nor the socket reader's, so do not touch
   asyncio objects directly (use ``loop.call_soon_threadsafe``). A slow sink delays only its own
   delivery, never reception: frames wait for it in a queue, which grows meanwhile.
4. After ``cleanup()`` returned: :func:`listening_session_finished`, on the session's receiver
   thread (``listening-core-receiver-<channel id>``); then ``after(sink, error)``, the callback
   given to ``vc.listen``, on the event loop.

Exceptions: one raised by ``on_start``, ``on_audio``, ``on_rtcp`` or ``on_stop`` is logged at
ERROR and stops the sink: it gets no further calls but ``cleanup()``, which is always called,
and the session ends. The first exception of the session (``cleanup()``'s included) is the
``error`` given to :func:`listening_session_finished` and to ``after``; ``vc.listen`` has
returned long before, so ``after`` is where a bot hears of it. ``cleanup()`` should therefore
close what the sink opened whatever state it is in.

wants_pcm
=========

``True`` (the default, on :class:`SinkSpec` and on :class:`~listening_core.sinks.AudioSink`):
``frame.pcm`` is the decoded audio, 48 kHz stereo signed 16-bit little-endian, 3840 bytes per
frame, decoded in worker processes; ``frame.opus`` also holds the packet of a received frame.
``False``: the session decodes nothing and starts no worker process; ``frame.pcm`` is
``None`` and ``frame.opus`` is the Opus packet as received (end-to-end decrypted) for a received
frame, ``None`` for a lost one (``FrameKind.FEC`` or ``FrameKind.PLC``). Set the class
attribute ``wants_pcm`` on the sink class and the same value in the :class:`SinkSpec`: the
session reads the sink's, tools read the spec's without building a sink, and the registry
refuses (after cleaning it up) a new sink whose value disagrees.

When a plugin is refused
========================

When it is loaded (:class:`~listening_core.plugins.InvalidPluginError`; recorded, not raised,
for installed plugins; raised by :meth:`SinkRegistry.register
<listening_core.plugins.SinkRegistry.register>`): it implements no hook, or decorates a
function that is not a hook; :func:`listening_sinks` raises, returns something other than a
list of :class:`SinkSpec`, or names one sink twice; a :class:`SinkSpec` or its options class
breaks the rules above. When a sink is built (raised by ``vc.listen``): the factory returns an
object without ``on_audio`` and ``cleanup``, or one whose ``wants_pcm`` disagrees with the spec.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from .sinks import AudioSink

__all__ = [
    "ENGINE_NAME_RE",
    "ENTRY_POINT_GROUP",
    "PROJECT_NAME",
    "SINK_NAME_RE",
    "EngineSpec",
    "SinkSpec",
    "Transcription",
    "TranscriptionEngine",
    "hookimpl",
    "hookspec",
    "listening_session_finished",
    "listening_sink_created",
    "listening_sinks",
    "listening_transcription_engines",
]

PROJECT_NAME = "listening_core"
"""The pluggy project name; :data:`hookspec` and :data:`hookimpl` are marked with it."""

ENTRY_POINT_GROUP = "listening_core.sinks"
"""Entry-point group the registry loads; each entry point names a module holding hookimpls."""

SINK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
"""What a sink name must match in full: lower-case ASCII letters, digits and ``-``."""

hookspec: pluggy.HookspecMarker = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks the hook specifications below (used by this module only)."""

hookimpl: pluggy.HookimplMarker = pluggy.HookimplMarker(PROJECT_NAME)
"""Decorate a plugin's hook functions with this: ``@hookimpl def listening_sinks(): ...``."""


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """A sink a plugin provides, as returned from :func:`listening_sinks`.

    The constructor checks the fields and raises :class:`TypeError` or :class:`ValueError`
    with what to fix; the registry reports such a plugin as failed instead of loading it.
    """

    name: str
    """The name users select it by: ``vc.listen(sink=name)``; must match :data:`SINK_NAME_RE`."""
    factory: Callable[[Any], AudioSink]
    """Called with the validated options object (an instance of :attr:`options`); returns a new
    :class:`~listening_core.sinks.AudioSink` for one listening session. Usually the sink class
    (or a classmethod such as :meth:`AudioFileSink.from_options
    <listening_core.sinks.AudioFileSink.from_options>`). Called in ``vc.listen``, on its thread."""
    options: type[Any]
    """The options class: a frozen dataclass with a default for every field (see the module
    docstring for the supported annotations)."""
    summary: str
    """One line saying what the sink produces, shown in listings and error messages."""
    wants_pcm: bool = True
    """``True``: the sink gets decoded 48 kHz stereo PCM. ``False``: it takes the Opus packets
    as received (e.g. an Ogg/Opus writer), and the receiver skips decoding for it. Must agree
    with the ``wants_pcm`` class attribute of the sinks the factory builds
    (:attr:`AudioSink.wants_pcm <listening_core.sinks.AudioSink.wants_pcm>`, which the receiver
    reads); the registry checks each new sink. Here it lets tools tell without building one."""
    distribution: str | None = field(default=None, kw_only=True)
    """The distribution the sink came from; filled in by the registry from the entry point
    (``None`` for plugins registered in code). Plugins leave it unset."""
    version: str | None = field(default=None, kw_only=True)
    """That distribution's version; filled in by the registry. Plugins leave it unset."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not SINK_NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"sink name {self.name!r} is invalid: use lower-case letters, digits and '-', "
                "starting with a letter or digit (e.g. 'vad-segments')"
            )
        if not callable(self.factory):
            raise TypeError(f"sink {self.name!r}: factory must be callable, got {self.factory!r}")
        if not isinstance(self.summary, str):
            raise TypeError(f"sink {self.name!r}: summary must be a str, got {self.summary!r}")
        if not isinstance(self.wants_pcm, bool):
            raise TypeError(f"sink {self.name!r}: wants_pcm must be a bool, got {self.wants_pcm!r}")
        _check_options_class(self.name, self.options)


def _check_options_class(sink: str, cls: object) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(
            f"sink {sink!r}: options must be a dataclass class, got {cls!r}; "
            "declare one with @dataclass(frozen=True) (an empty one if the sink takes no options)"
        )
    params = getattr(cls, "__dataclass_params__", None)
    if not getattr(params, "frozen", False):
        raise TypeError(f"sink {sink!r}: options class {cls.__qualname__} must be @dataclass(frozen=True)")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise TypeError(
            f"sink {sink!r}: options class {cls.__qualname__} must give every field a default; "
            f"missing for {', '.join(missing)}"
        )


@hookspec
def listening_sinks() -> list[SinkSpec]:  # type: ignore[empty-body]
    """Return the sinks this plugin provides.

    **When:** once per plugin, when the registry loads it: on the first ``vc.listen`` (whatever
    its sink), ``listening plugins`` or ``listening doctor`` in a process (through
    :func:`listening_core.plugins.default_registry`), or when a test calls
    :meth:`~listening_core.plugins.SinkRegistry.register`. Called in the main process, on the
    thread that triggered the load (often the event-loop thread): do no I/O and start nothing
    here; open files and threads in the sink's factory or its ``on_start``.

    **Return:** a list of :class:`SinkSpec`, possibly empty (a plugin that only implements
    :func:`listening_sink_created` returns nothing). Leave ``distribution`` and ``version``
    unset; the registry fills them in. A name another installed plugin also provides makes
    that name unusable until one of them is uninstalled
    (:class:`~listening_core.plugins.PluginConflictError`). Raising, or returning something
    that is not a list of :class:`SinkSpec`, marks the plugin as failed: its sinks are
    unavailable and the error is reported when one of them is asked for.
    """


@hookspec
def listening_sink_created(sink: AudioSink, spec: SinkSpec, options: Any) -> None:
    """Observe a sink that the registry has just built for a listening session.

    **When:** after ``spec.factory(options)`` returned ``sink`` and before the session
    delivers anything to it; in the main process, on the thread that called ``vc.listen``
    (normally the event-loop thread), so keep it short and non-blocking. Called for every sink
    built by name through the registry, whichever plugin provides it; not for sink instances
    passed to ``vc.listen`` directly.

    **Arguments** (implement any subset): ``sink``, the new sink; ``spec``, its
    :class:`SinkSpec`; ``options``, the validated options object given to the factory.

    **Return:** ``None``. Meant for logging and metrics plugins; do not replace or mutate the
    sink. An exception here aborts the ``listen`` call (the new sink's ``cleanup()`` is called
    first), so catch your own failures.
    """


@hookspec
def listening_session_finished(sink: AudioSink, spec: SinkSpec | None, error: BaseException | None) -> None:
    """Observe the end of a listening session.

    **When:** once per session, after ``sink.cleanup()`` has returned (its files are complete)
    and before the ``after`` callback given to ``vc.listen``; in the main process, on the
    session's receiver thread (``listening-core-receiver-<channel id>``), not the event loop's:
    keep it short, hand uploads or conversions to a thread of your own, and reach asyncio
    objects only through ``loop.call_soon_threadsafe``. Called for every session, whether its
    sink was built by name or passed to ``vc.listen`` as an instance.

    **Arguments** (implement any subset): ``sink``, the session's sink; ``spec``, its
    :class:`SinkSpec`, or ``None`` for a sink instance passed to ``vc.listen`` directly;
    ``error``, the sink's first exception (from ``on_start``, ``on_audio``, ``on_rtcp``,
    ``on_stop`` or ``cleanup``; it ended the session), or ``None`` when the session was stopped
    (``stop_listening``, ``disconnect``).

    **Return:** ``None``. Exceptions are logged and otherwise ignored: the session is already
    over.
    """


# ------------------------------------------------------------------------- transcription engines

ENGINE_NAME_RE = SINK_NAME_RE
"""What an engine name must match in full (the rule of sink names)."""


@dataclass(frozen=True, slots=True)
class Transcription:
    """What an engine heard in one utterance."""

    text: str
    """The words, stripped of surrounding whitespace (``""`` when it heard none)."""
    language: str | None = None
    """The language, as an ISO 639-1 code (``"en"``) when the engine says; else ``None``."""
    confidence: float | None = None
    """The engine's own confidence in ``text``, between 0 and 1 (for Whisper models, the mean
    token probability: ``exp(avg_logprob)``), or ``None`` when the engine gives none."""


class TranscriptionEngine(Protocol):
    """A speech-to-text engine, as built by :attr:`EngineSpec.factory`."""

    def transcribe(self, pcm: bytes, *, language: str | None, timeout: float) -> Transcription:
        """Transcribe one utterance: ``pcm`` is 16 kHz mono signed 16-bit little-endian audio.

        ``language``: an ISO 639-1 code to force, or ``None`` to let the engine detect it.
        ``timeout``: seconds the caller will wait; an engine that can stop (a network request)
        raises past it, one that cannot may overrun it.
        """
        ...

    def close(self) -> None:
        """Release what the engine holds (a model, connections); called once, last."""
        ...


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """A transcription engine a plugin provides, as returned from :func:`listening_transcription_engines`.

    The constructor checks the fields like :class:`SinkSpec`'s and raises :class:`TypeError`
    or :class:`ValueError` with what to fix.
    """

    name: str
    """The name a transcribing sink selects it by (``{"engine": name}``); matches :data:`ENGINE_NAME_RE`."""
    factory: Callable[[Any], TranscriptionEngine]
    """Called with the validated options object (an instance of :attr:`options`); returns a new
    :class:`TranscriptionEngine`. Called on the transcribing sink's worker thread, never the event
    loop's: loading a model here is fine."""
    options: type[Any]
    """The engine's options class, under the rules of a sink's options class (a frozen dataclass
    with a default for every field; checked the same way, by
    :func:`listening_core.options.validate_options`)."""
    summary: str
    """One line saying what the engine is, shown in listings and error messages."""
    distribution: str | None = field(default=None, kw_only=True)
    """The distribution the engine came from; filled in by the registry. Plugins leave it unset."""
    version: str | None = field(default=None, kw_only=True)
    """That distribution's version; filled in by the registry. Plugins leave it unset."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not ENGINE_NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"engine name {self.name!r} is invalid: use lower-case letters, digits and '-' "
                "(e.g. 'faster-whisper')"
            )
        if not callable(self.factory):
            raise TypeError(f"engine {self.name!r}: factory must be callable, got {self.factory!r}")
        if not isinstance(self.summary, str):
            raise TypeError(f"engine {self.name!r}: summary must be a str, got {self.summary!r}")
        _check_options_class(f"engine {self.name}", self.options)


@hookspec
def listening_transcription_engines() -> list[EngineSpec]:  # type: ignore[empty-body]
    """Return the speech-to-text engines this plugin provides.

    **When:** whenever a transcribing sink resolves an engine name or a tool lists engines
    (:meth:`SinkRegistry.engines <listening_core.plugins.SinkRegistry.engines>`): in the main
    process, on the thread that asks (the event loop's, in ``vc.listen``). Do no I/O and load no
    model here; load it in the spec's factory, which runs on the sink's worker thread.

    **Return:** a list of :class:`EngineSpec`, possibly empty. A plugin may provide engines only
    (no sinks): declare it in the same entry-point group. Leave ``distribution`` and ``version``
    unset. An engine name two installed plugins provide is unusable until one is uninstalled
    (asking for it raises :class:`~listening_core.plugins.PluginConflictError`). Raising, or
    returning something that is not a list of :class:`EngineSpec`, is logged as a warning and
    that plugin's engines are left out; its sinks are unaffected.

    **The engine's contract:** :meth:`TranscriptionEngine.transcribe` is called on the sink's
    worker threads, one utterance at a time per thread, and concurrently from several threads
    when the sink runs more than one worker: make it thread-safe or say so in your docs. It
    never runs on the delivery thread, so a slow engine delays transcripts, never reception.
    When it cannot transcribe (unreachable server, bad reply, timeout) it raises an exception
    whose message says what failed and what to fix; the sink counts the utterance as failed,
    logs the first failure per member at WARNING, and goes on with the next one.
    :meth:`TranscriptionEngine.close` is called once when the session's sink is cleaned up.
    """
