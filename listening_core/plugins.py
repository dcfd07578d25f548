"""Finding sinks by name: the registry of sink plugins (options are checked by :mod:`listening_core.options`).

Sinks are provided by plugins (the contract is :mod:`listening_core.hookspecs`), found through
the ``listening_core.sinks`` entry-point group and chosen by name::

    registry = default_registry()          # loads the installed plugins once per process
    sink = registry.create("vad-segments", {"silence_ms": 800})

A plugin that cannot be imported, or breaks the contract, does not stop the others: it is
recorded in :attr:`SinkRegistry.failures`, logged as a warning, and reported again in the
:class:`UnknownSinkError` raised when one of its sinks is asked for. Two installed plugins that
provide the same name make that name unusable (:class:`PluginConflictError`) until one of
them is uninstalled; their other sinks keep working.

Options are given as ``None`` (all defaults), a ``dict`` or an instance of the sink's options
class; :func:`validate_options` checks them against the class's annotations and returns an
instance of it. :func:`describe` lists a sink's options for help texts. Both live in
:mod:`listening_core.options` and resolve here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.metadata
import logging
import re
import reprlib
import threading
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

from . import hookspecs
from .errors import (
    InvalidPluginError,
    OptionsError,
    PluginConflictError,
    PluginError,
    UnknownSinkError,
)
from .hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME, SINK_NAME_RE, EngineSpec, SinkSpec
from .options import (  # the options checker; its public names resolve here too
    OptionInfo,
    _did_you_mean,
    _from,
    _or_list,
    describe,
    validate_options,
)
from .options import format_default as format_default

if TYPE_CHECKING:
    from .sinks import AudioSink

__all__ = [
    "KNOWN_DISTRIBUTIONS",
    "EntryPointLike",
    "InvalidPluginError",
    "OptionInfo",
    "OptionsError",
    "PluginConflictError",
    "PluginError",
    "SinkRegistry",
    "UnknownSinkError",
    "default_registry",
    "describe",
    "validate_options",
]

_log = logging.getLogger(__name__)

KNOWN_DISTRIBUTIONS: Mapping[str, str] = types.MappingProxyType(
    {
        "wav": "listening-sink-wav",
        "flac": "listening-sink-flac",
        "mp3": "listening-sink-mp3",
        "vad-segments": "listening-sink-vad",
        "mixdown": "listening-sink-mixdown",
        "ogg-opus": "listening-sink-ogg",
        "transcribe": "listening-sink-transcribe",
    }
)
"""Sink name → the distribution that provides it, for the sinks this project publishes."""

_HOOK_NAMES = (
    "listening_sinks",
    "listening_sink_created",
    "listening_session_finished",
    "listening_transcription_engines",
)


# ---------------------------------------------------------------------------------- the registry


_IMPORT_PATH = re.compile(r"[.:/\\()]")
"""Characters no sink name has and module, entry-point and file references do."""


def _normalize(distribution: str) -> str:
    """A distribution name as PyPI compares them (PEP 503): ``Listening_Sink.WAV`` → ``listening-sink-wav``."""
    return re.sub(r"[-_.]+", "-", distribution.strip()).lower()


class EntryPointLike(Protocol):
    """What the registry needs of an entry point (:class:`importlib.metadata.EntryPoint` fits)."""

    @property
    def name(self) -> str:
        """The entry point's name (left of ``=``)."""

    @property
    def value(self) -> str:
        """The object reference it names (``module`` or ``module:attr``)."""

    @property
    def dist(self) -> Any:
        """The distribution declaring it (with ``name`` and ``version``), or ``None``."""

    def load(self) -> Any:
        """Import and return the plugin object."""


@dataclass(frozen=True, slots=True)
class _Provided:
    spec: SinkSpec
    plugin: str


def _dist_of(ep: EntryPointLike) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    name = getattr(dist, "name", None)
    version = getattr(dist, "version", None)
    return (str(name) if name else None), (str(version) if version else None)


class SinkRegistry:
    """The sinks available in this process, by name, and the pluggy machinery behind them.

    :meth:`load` finds plugins through the entry-point group; :meth:`register` adds one from
    code (tests, ad-hoc plugins). :meth:`create` builds a sink by name with validated options.
    Most code uses the per-process instance from :func:`default_registry`; tests make their own.

    Registration is serialised by a lock; lookups and :meth:`create` may run on any thread.
    """

    def __init__(
        self,
        *,
        group: str = ENTRY_POINT_GROUP,
        entry_points: Callable[[], Iterable[EntryPointLike]] | None = None,
    ) -> None:
        """Make an empty registry for ``group``.

        ``entry_points`` replaces the discovery of entry points (by default
        ``importlib.metadata.entry_points(group=group)``), for tests.
        """
        self._group = group
        self._entry_points = entry_points
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._lock = threading.RLock()
        self._sinks: dict[str, _Provided] = {}
        self._conflicts: dict[str, list[_Provided]] = {}
        self._failures: dict[str, Exception] = {}
        self._failed_dist: dict[str, tuple[str | None, str | None]] = {}
        self._seen: set[tuple[str | None, str, str]] = set()
        self._plugin_dists: dict[str, tuple[str | None, str | None]] = {}

    # -- loading

    def load(self) -> None:
        """Load every plugin of the entry-point group that is not loaded yet.

        Never raises for a broken plugin: one that fails to import, raises from its hooks or
        breaks the contract is recorded in :attr:`failures` and logged as a warning; a sink name
        two plugins provide is recorded in :attr:`conflicts`. Calling it again loads only
        entry points that appeared since.
        """
        with self._lock:
            for ep in self._iter_entry_points():
                dist, version = _dist_of(ep)
                key = (dist, ep.name, ep.value)
                if key in self._seen:
                    continue
                self._seen.add(key)
                origin = f"{dist} {version}" if dist else f"entry point {ep.value!r}"
                try:
                    plugin = ep.load()
                except Exception as exc:
                    self._fail(ep.name, dist, version, exc)
                    _log.warning(
                        "sink plugin %r from %s could not be imported, its sinks are unavailable: %s: %s",
                        ep.name,
                        origin,
                        type(exc).__name__,
                        exc,
                    )
                    _log.debug("import of sink plugin %r failed", ep.name, exc_info=exc)
                    continue
                if self._pm.is_registered(plugin):
                    _log.debug("sink plugin %r (%s) is already registered; skipped", ep.name, origin)
                    continue
                name = ep.name if not self._pm.has_plugin(ep.name) else f"{dist}:{ep.name}"
                try:
                    self._add(plugin, name, dist, version, strict=False)
                except InvalidPluginError as exc:
                    self._fail(ep.name, dist, version, exc)
                    _log.warning(
                        "sink plugin %r from %s is broken, its sinks are unavailable: %s",
                        ep.name,
                        origin,
                        exc,
                    )

    def _iter_entry_points(self) -> Iterable[EntryPointLike]:
        if self._entry_points is not None:
            return self._entry_points()
        return importlib.metadata.entry_points(group=self._group)

    def _fail(self, ep_name: str, dist: str | None, version: str | None, exc: Exception) -> None:
        self._failures[ep_name] = exc
        self._failed_dist[ep_name] = (dist, version)

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register ``plugin`` (a module or object with :data:`~listening_core.hookspecs.hookimpl`
        functions) from code, and add the sinks its ``listening_sinks`` returns.

        Returns the plugin's name (``name``, or pluggy's canonical name for it). Raises
        :class:`InvalidPluginError` if it breaks the contract and :class:`PluginConflictError`
        if it provides a sink name that is already taken; in both cases nothing is registered.
        """
        with self._lock:
            plugin_name = name or self._pm.get_canonical_name(plugin)
            self._add(plugin, plugin_name, None, None, strict=True)
            return plugin_name

    def _add(self, plugin: object, name: str, dist: str | None, version: str | None, *, strict: bool) -> None:
        label = f"{dist} {version}" if dist else f"plugin {name!r}"
        if self._pm.has_plugin(name) or self._pm.is_registered(plugin):
            raise InvalidPluginError(
                f"{label}: a plugin named {name!r} or this very plugin is already registered"
            )
        try:
            registered = self._pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise InvalidPluginError(f"{label}: cannot register: {exc}", plugin=name) from exc
        if registered is None:
            raise InvalidPluginError(f"{label}: the plugin name {name!r} is blocked", plugin=name)
        try:
            self._check_hooks(plugin, name, label)
            provided = [
                _Provided(dataclasses.replace(spec, distribution=dist, version=version), name)
                for spec in self._collect(plugin, name, label)
            ]
            for item in provided:
                self._check_options_class(item.spec, name)
            clashes = [
                item
                for item in provided
                if item.spec.name in self._sinks or item.spec.name in self._conflicts
            ]
            if strict and clashes:
                first = clashes[0]
                raise self._conflict_error(first.spec.name, [*self._providers_of(first.spec.name), first])
        except BaseException:
            self._pm.unregister(plugin)
            raise
        self._plugin_dists[name] = (dist, version)
        for item in provided:
            sink = item.spec.name
            if sink in self._conflicts:
                self._conflicts[sink].append(item)
            elif sink in self._sinks:
                self._conflicts[sink] = [self._sinks.pop(sink), item]
            else:
                self._sinks[sink] = item
                continue
            _log.warning("%s", self._conflict_error(sink, self._conflicts[sink]))

    def _check_hooks(self, plugin: object, name: str, label: str) -> None:
        callers = self._pm.get_hookcallers(plugin) or []
        if not callers:
            raise InvalidPluginError(
                f"{label}: defines no hooks; decorate its functions with listening_core.hookspecs.hookimpl "
                f"(a pluggy marker for project {PROJECT_NAME!r})",
                plugin=name,
            )
        for caller in callers:
            if caller.has_spec():
                continue
            if all(impl.optionalhook for impl in caller.get_hookimpls() if impl.plugin is plugin):
                continue
            near = difflib.get_close_matches(caller.name, _HOOK_NAMES, n=1)
            hint = (
                f" (did you mean {_or_list(near)}?)" if near else f"; the hooks are {', '.join(_HOOK_NAMES)}"
            )
            raise InvalidPluginError(
                f"{label}: {caller.name!r} is not a listening_core hook{hint}", plugin=name
            )

    def _collect(self, plugin: object, name: str, label: str) -> list[SinkSpec]:
        # call this plugin's implementations only, to know whose sinks they are
        impls = [
            impl
            for impl in self._pm.hook.listening_sinks.get_hookimpls()
            if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper)
        ]
        try:
            results = [impl.function() for impl in impls]
        except Exception as exc:
            raise InvalidPluginError(
                f"{label}: listening_sinks() raised {type(exc).__name__}: {exc}", plugin=name
            ) from exc
        specs: list[SinkSpec] = []
        for result in results:
            if not isinstance(result, list | tuple) or not all(isinstance(s, SinkSpec) for s in result):
                raise InvalidPluginError(
                    f"{label}: listening_sinks() must return a list of SinkSpec, got {reprlib.repr(result)}",
                    plugin=name,
                )
            specs.extend(result)
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise InvalidPluginError(f"{label}: provides sink {spec.name!r} twice", plugin=name)
            seen.add(spec.name)
        return specs

    @staticmethod
    def _check_options_class(spec: SinkSpec, plugin: str) -> None:
        cls = spec.options
        if "<locals>" in cls.__qualname__:
            raise InvalidPluginError(
                f"sink {spec.name!r}{_from(spec)}: options class {cls.__qualname__} is defined inside a "
                "function; define it at module level so its instances can be pickled",
                plugin=plugin,
            )
        try:
            validate_options(spec, None)
        except InvalidPluginError:
            raise
        except OptionsError as exc:
            raise InvalidPluginError(
                f"sink {spec.name!r}{_from(spec)}: its default options are invalid: {exc}", plugin=plugin
            ) from exc
        except Exception as exc:
            raise InvalidPluginError(
                f"sink {spec.name!r}{_from(spec)}: building its default options raised "
                f"{type(exc).__name__}: {exc}",
                plugin=plugin,
            ) from exc

    # -- conflicts and failures

    @staticmethod
    def _labels(items: Sequence[_Provided]) -> list[str]:
        labels = [
            f"{item.spec.distribution} {item.spec.version}"
            if item.spec.distribution
            else f"plugin {item.plugin!r} (registered in code)"
            for item in items
        ]
        if len(set(labels)) < len(labels):  # one distribution twice: tell its entry points apart
            labels = [f"{label} (plugin {item.plugin!r})" for label, item in zip(labels, items, strict=True)]
        return labels

    def _providers_of(self, sink: str) -> list[_Provided]:
        if sink in self._conflicts:
            return list(self._conflicts[sink])
        return [self._sinks[sink]]

    def _conflict_error(self, sink: str, items: Sequence[_Provided]) -> PluginConflictError:
        labels = self._labels(items)
        if len(labels) == 2:
            who, fix = f"both {labels[0]} and {labels[1]}", "uninstall one of them"
        else:
            who, fix = ", ".join(labels[:-1]) + " and " + labels[-1], "uninstall all but one of them"
        dists = [item.spec.distribution for item in items if item.spec.distribution]
        if dists:
            fix += f" (e.g. pip uninstall {dists[-1]})"
        return PluginConflictError(
            f"sink {sink!r} is provided by {who}; {fix}", sink=sink, providers=tuple(labels)
        )

    @property
    def failures(self) -> dict[str, Exception]:
        """Plugins that could not be loaded: entry point name → the exception (a copy)."""
        with self._lock:
            return dict(self._failures)

    @property
    def conflicts(self) -> dict[str, PluginConflictError]:
        """Sink names provided by more than one plugin, which :meth:`get` refuses (a copy)."""
        with self._lock:
            return {sink: self._conflict_error(sink, items) for sink, items in self._conflicts.items()}

    # -- lookup

    def names(self) -> list[str]:
        """The names of the available sinks, sorted."""
        with self._lock:
            return sorted(self._sinks)

    def specs(self) -> list[SinkSpec]:
        """The :class:`SinkSpec` of every available sink, sorted by name."""
        with self._lock:
            return [self._sinks[name].spec for name in sorted(self._sinks)]

    def __contains__(self, name: object) -> bool:
        """Whether a sink of this name is available."""
        return name in self._sinks

    def get(self, name: str) -> SinkSpec:
        """The :class:`SinkSpec` of sink ``name``.

        Raises :class:`UnknownSinkError` (saying what is installed and what to install) or
        :class:`PluginConflictError` (saying which distributions clash).
        """
        if not isinstance(name, str):
            raise TypeError(f"a sink name must be a str, got {type(name).__qualname__}")
        with self._lock:
            provided = self._sinks.get(name)
            if provided is not None:
                return provided.spec
            if name in self._conflicts:
                raise self._conflict_error(name, self._conflicts[name])
            raise self._unknown_sink_error(name)

    def _unknown_sink_error(self, name: str) -> UnknownSinkError:
        key = name.strip().lower().replace("_", "-").replace(" ", "-")
        installed = [self._sinks[n].spec for n in sorted(self._sinks)]
        candidates = sorted(
            {spec.name for spec in installed} | set(KNOWN_DISTRIBUTIONS) | set(self._conflicts)
        )
        # A distribution or module name ("listening-sink-wav", "listening_sink_wav:listening_sinks")
        # for one of its sinks: name the sinks it provides (never import it to find out).
        by_distribution: dict[str, list[str]] = {}
        for spec in installed:
            if spec.distribution:
                by_distribution.setdefault(_normalize(spec.distribution), []).append(spec.name)
        for sink, dist in KNOWN_DISTRIBUTIONS.items():
            by_distribution.setdefault(_normalize(dist), []).append(sink)
        provided = list(dict.fromkeys(by_distribution.get(_normalize(name.split(":")[0]), [])))
        partial = [c for c in candidates if len(key) >= 3 and (c.startswith(key) or key in c.split("-"))]
        exact = [key] if key in candidates else []
        suggestions = [s for s in [*provided, *exact, *_did_you_mean(key, candidates), *partial] if s != name]
        suggestions = list(dict.fromkeys(suggestions))[:3]
        lines = [
            f"unknown sink {name!r}" + (f"; did you mean {_or_list(suggestions)}?" if suggestions else "")
        ]

        def failure_line(ep_name: str) -> str:
            dist, version = self._failed_dist[ep_name]
            exc = self._failures[ep_name]
            where = f"{dist} {version} (entry point {ep_name!r})" if dist else f"entry point {ep_name!r}"
            return f"{where}: {type(exc).__name__}: {exc}"

        likely = [
            ep
            for ep, (dist, _version) in self._failed_dist.items()
            if key in (ep, ep.replace("_", "-"))
            or (dist is not None and dist in (KNOWN_DISTRIBUTIONS.get(key), f"listening-sink-{key}"))
        ]
        install: str | None = None
        if likely:
            lines.append(
                f"{key!r} is probably provided by a plugin that is installed but failed to load: "
                f"{failure_line(likely[0])}; fix or reinstall it"
            )
        lines.extend(
            f"{s!r} is unavailable: {self._conflict_error(s, self._conflicts[s])}"
            for s in suggestions
            if s in self._conflicts
        )
        if installed:
            width = max(len(spec.name) for spec in installed)
            lines.append("installed sinks:")
            lines.extend(f"  {spec.name.ljust(width)} — {spec.summary}{_from(spec)}" for spec in installed)
        else:
            lines.append("no sinks are installed")
        if not likely:
            installed_names = {spec.name for spec in installed}
            known = [
                s
                for s in [key, *suggestions]
                if s in KNOWN_DISTRIBUTIONS and s not in installed_names and s not in self._conflicts
            ]
            if known:
                install = KNOWN_DISTRIBUTIONS[known[0]]
                lines.append(f"the {known[0]!r} sink comes with {install}: pip install {install}")
            elif (
                SINK_NAME_RE.fullmatch(key)
                and not provided  # a distribution's name, and it is installed: nothing to install
                and key not in installed_names  # only the spelling was off ("Wav"): nothing to install
                and f"listening-sink-{key}" not in {spec.distribution for spec in installed}
            ):
                install = key if key.startswith("listening-sink-") else f"listening-sink-{key}"
                lines.append(f"if {key!r} comes from a plugin, install it: pip install {install}")
        if _IMPORT_PATH.search(name):
            # Someone tried a module, entry-point reference or file: say why that cannot work.
            lines.append(
                f"a sink is chosen by the name an installed plugin gives it (entry points of group "
                f"{self._group!r}); a module, file or import path is never imported: install the "
                "plugin's distribution, or pass the sink itself: vc.listen(MySink(...))"
            )
        others = [ep for ep in self._failures if ep not in likely[:1]]
        if others:
            lines.append("plugins that failed to load:")
            lines.extend(f"  {failure_line(ep)}" for ep in others)
        return UnknownSinkError(
            "\n".join(lines),
            sink=name,
            installed=tuple(spec.name for spec in installed),
            suggestions=tuple(suggestions),
            install=install,
        )

    # -- using sinks

    def validate_options(self, spec: SinkSpec | str, options: object = None) -> Any:
        """:func:`validate_options` for a :class:`SinkSpec` or the name of an available sink."""
        return validate_options(self.get(spec) if isinstance(spec, str) else spec, options)

    def create(self, name: str, options: object = None) -> AudioSink:
        """Build a new sink ``name`` for one listening session.

        Validates ``options`` (see :func:`validate_options`), calls the sink's factory with the
        options object, then the ``listening_sink_created`` hook of every plugin. Raises
        :class:`UnknownSinkError`, :class:`PluginConflictError`, :class:`OptionsError`;
        an exception from the factory propagates with a note naming the sink and its plugin.
        """
        spec = self.get(name)
        plugin = self._sinks[name].plugin
        opts = validate_options(spec, options)
        try:
            sink = spec.factory(opts)
        except Exception as exc:
            exc.add_note(f"raised by the factory of sink {spec.name!r}{_from(spec)} for {opts!r}")
            raise
        if not (callable(getattr(sink, "on_audio", None)) and callable(getattr(sink, "cleanup", None))):
            raise InvalidPluginError(
                f"sink {spec.name!r}{_from(spec)}: the factory returned {reprlib.repr(sink)}, which is not an "
                "AudioSink (it needs on_audio() and cleanup())",
                plugin=plugin,
            )
        if bool(getattr(sink, "wants_pcm", True)) != spec.wants_pcm:
            _cleanup_quietly(sink, spec)
            raise InvalidPluginError(
                f"sink {spec.name!r}{_from(spec)}: its SinkSpec says wants_pcm={spec.wants_pcm}, but the "
                f"{type(sink).__qualname__} it built has wants_pcm={not spec.wants_pcm}; make them agree "
                "(set the class attribute wants_pcm on the sink class)",
                plugin=plugin,
            )
        try:
            self._pm.hook.listening_sink_created(sink=sink, spec=spec, options=opts)
        except BaseException:
            _cleanup_quietly(sink, spec)
            raise
        return sink

    def session_finished(
        self, sink: AudioSink, spec: SinkSpec | None = None, error: BaseException | None = None
    ) -> None:
        """Call the ``listening_session_finished`` hook; exceptions from it are logged, not raised."""
        try:
            self._pm.hook.listening_session_finished(sink=sink, spec=spec, error=error)
        except Exception:
            _log.exception("a listening_session_finished hook raised")

    def engines(self) -> list[EngineSpec]:
        """The transcription engines of the loaded plugins (``listening_transcription_engines``), by name.

        A plugin whose hook raises or returns something other than a list of
        :class:`~listening_core.hookspecs.EngineSpec` is logged as a warning and left out; a
        name two plugins provide is left out (:meth:`engine` says why).
        """
        return [specs[0] for specs in self._engine_providers().values() if len(specs) == 1]

    def engine(self, name: str) -> EngineSpec:
        """The engine ``name``; raises :class:`PluginConflictError` or :class:`PluginError` saying what is installed."""
        providers = self._engine_providers()
        specs = providers.get(name, [])
        if len(specs) == 1:
            return specs[0]
        if specs:
            who = " and ".join(f"{spec.distribution or 'a plugin registered in code'}" for spec in specs)
            raise PluginConflictError(
                f"transcription engine {name!r} is provided by {who}; uninstall all but one of them",
                sink=name,
                providers=tuple(str(spec.distribution) for spec in specs),
            )
        near = _did_you_mean(name, providers)
        raise PluginError(
            f"unknown transcription engine {name!r}"
            + (f"; did you mean {_or_list(near)}?" if near else "")
            + f"; installed engines: {', '.join(sorted(providers)) or 'none'}"
            + " (engines come from plugins, e.g. pip install 'listening-sink-transcribe[faster-whisper]')"
        )

    def _engine_providers(self) -> dict[str, list[EngineSpec]]:
        found: dict[str, list[EngineSpec]] = {}
        with self._lock:
            for impl in self._pm.hook.listening_transcription_engines.get_hookimpls():
                dist, version = self._plugin_dists.get(impl.plugin_name, (None, None))
                try:
                    result = impl.function()
                    if not isinstance(result, list | tuple) or not all(
                        isinstance(e, EngineSpec) for e in result
                    ):
                        raise TypeError(f"it must return a list of EngineSpec, got {reprlib.repr(result)}")
                except Exception as exc:
                    _log.warning(
                        "plugin %r: listening_transcription_engines() failed: %s", impl.plugin_name, exc
                    )
                    continue
                for spec in result:
                    found.setdefault(spec.name, []).append(
                        dataclasses.replace(spec, distribution=dist, version=version)
                    )
        return dict(sorted(found.items()))

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The underlying :class:`pluggy.PluginManager` (for tooling; prefer the methods above)."""
        return self._pm


def _cleanup_quietly(sink: AudioSink, spec: SinkSpec) -> None:
    """Clean up a sink that will never be used; its own failure is logged, not raised."""
    try:
        sink.cleanup()
    except Exception:
        _log.exception("cleanup of the unused sink %r failed", spec.name)


@functools.cache
def default_registry() -> SinkRegistry:
    """The process's registry, with the installed plugins loaded on first use.

    Each process (a sharded bot runs several) has its own; nothing is shared between them.
    """
    registry = SinkRegistry()
    registry.load()
    return registry
