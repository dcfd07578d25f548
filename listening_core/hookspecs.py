"""The plugin contract: everything a third-party sink author needs to read.

A sink plugin is a plain module with :data:`hookimpl`-decorated functions, found through the
``listening_core.sinks`` entry-point group. A distribution declares it in its ``pyproject.toml``::

    [project.entry-points."listening_core.sinks"]
    mp3 = "listening_sink_mp3.plugin"

and the module names the sinks it provides::

    from __future__ import annotations

    from dataclasses import dataclass, field
    from pathlib import Path

    from listening_core.hookspecs import SinkSpec, hookimpl


    @dataclass(frozen=True)
    class Mp3Options:
        directory: Path = field(default=Path("recordings"), metadata={"help": "where files go"})
        bitrate: int = field(default=128, metadata={"help": "kbit/s"})

        def __post_init__(self) -> None:
            if self.bitrate <= 0:
                raise ValueError(f"bitrate must be positive, got {self.bitrate}")


    @hookimpl
    def listening_sinks() -> list[SinkSpec]:
        return [SinkSpec("mp3", Mp3Sink, Mp3Options, "one MP3 file per speaker")]

A bot then records with ``vc.listen(sink="mp3", options={"bitrate": 192})``. The registry
(:mod:`listening_core.plugins`) checks the options against the annotations of ``Mp3Options``
(converting ``str`` to ``Path`` and ``int`` to ``float`` where the annotation asks for it),
builds an ``Mp3Options`` instance (so ``__post_init__`` runs) and calls ``Mp3Sink(options)``.

Rules for the options class, checked when the plugin is loaded:

- a frozen :func:`~dataclasses.dataclass` with a default for every field, so ``options=None``
  means "all defaults";
- annotations resolvable with :func:`typing.get_type_hints` from the module's globals (define
  the class and the types it names at module level; ``from __future__ import annotations`` is
  fine). Supported and checked: ``int`` (``bool`` is rejected), ``float`` (``int`` accepted),
  ``str``, ``bool``, :class:`pathlib.Path` (``str`` accepted), ``Literal[...]``, enums (a member,
  its value or its name), ``X | None``, ``tuple[...]``, ``list[...]`` and ``dict[...]`` of those,
  and ``Callable`` (any callable). Other classes are checked with ``isinstance``;
- picklable: module-level class, picklable field values. A ``Callable`` option holding a lambda
  or a closure makes the options object unpicklable; that is allowed, but such a sink cannot be
  handed to another process;
- ``field(metadata={"help": "..."})`` gives the one-line help that ``listening plugins`` shows;
- ``__post_init__`` may raise :class:`ValueError` for values that are well-typed but invalid;
  name the option in the message (``"bitrate must be positive"``) and the error the user sees
  will point at it.

Hooks are called in the main process only (never in a decode worker process).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .sinks import AudioSink

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROJECT_NAME",
    "SINK_NAME_RE",
    "SinkSpec",
    "hookimpl",
    "hookspec",
    "listening_session_finished",
    "listening_sink_created",
    "listening_sinks",
]

PROJECT_NAME = "listening_core"
"""The pluggy project name; :data:`hookspec` and :data:`hookimpl` are marked with it."""

ENTRY_POINT_GROUP = "listening_core.sinks"
"""Entry-point group the registry loads; each entry point names a module holding hookimpls."""

SINK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
"""What a sink name must match in full: lower-case ASCII letters, digits and ``-``."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks the hook specifications below (used by this module only)."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
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
    :class:`~listening_core.sinks.AudioSink` for one listening session. Usually the sink class."""
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

    **When:** once per plugin, when the registry loads it: on the first
    ``vc.listen(sink="<name>")`` or ``listening plugins`` in a process (through
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

    **When:** once per session, after ``sink.cleanup()`` has returned (its files are complete),
    in the main process, on the thread that ended the session (normally the event-loop thread):
    keep it short; hand uploads or conversions to a thread or a task of your own.

    **Arguments** (implement any subset): ``sink``, the session's sink; ``spec``, its
    :class:`SinkSpec`, or ``None`` for a sink instance passed to ``vc.listen`` directly;
    ``error``, the exception that ended the session, or ``None`` for a normal stop.

    **Return:** ``None``. Exceptions are logged and otherwise ignored: the session is already
    over.
    """
