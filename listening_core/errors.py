"""The project's exception hierarchy.

Every error listening-core raises derives from :class:`ListeningError`. Errors about one bad
datagram or frame derive from :class:`PacketError` and carry a short machine-readable
:attr:`~PacketError.reason` (``"truncated"``, ``"bad-tag"``, ``"no-key"`` ...) that receivers use
as a drop-counter key; such errors are expected on a live connection and are not bugs.

Every exception class is defined here (the modules that raise them import them, so the old
spellings ``listening_core.plugins.UnknownSinkError``, ``listening_core.opus.OpusError``,
``listening_core.sinks.SinkError``, ``listening_core.pool.WorkerDied``… keep working)::

    ListeningError
    ├── PacketError (ValueError)          one bad datagram or frame: dropped and counted
    │   └── DecryptError
    │       └── DaveError
    ├── PluginError                       sink plugins (listening_core.plugins)
    │   ├── InvalidPluginError
    │   ├── PluginConflictError
    │   └── UnknownSinkError (LookupError)
    ├── OptionsError (ValueError)         a sink's options
    ├── SinkError                         a sink failed (listening_core.sinks)
    ├── LibopusNotFound, OpusError        decoding (listening_core.opus)
    ├── WorkerDied, PoolClosed            the decoding pool (listening_core.pool)
    ├── ListeningStateError (discord.ClientException, RuntimeError)
    │                                     listen() and friends called in the wrong state
    └── ListeningInterrupted              the session ended with the voice connection

:class:`ListeningStateError` is the one misuse of the API in the sense of discord.py's
``ClientException`` (``"Already playing audio."``, ``"Not connected to voice."``): a bot's
``except discord.ClientException`` catches it with discord.py's own. It is made on first use,
so that the decoding workers, which import this module, never import discord.py. Bad arguments
stay ``ValueError``/``LookupError`` (:class:`OptionsError`, :class:`UnknownSinkError`), as in
discord.py.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import TYPE_CHECKING, Any

__all__ = [
    "DaveError",
    "DecryptError",
    "InvalidPluginError",
    "LibopusNotFound",
    "ListeningError",
    "ListeningInterrupted",
    "ListeningStateError",
    "OptionsError",
    "OpusError",
    "PacketError",
    "PluginConflictError",
    "PluginError",
    "PoolClosed",
    "SinkError",
    "UnknownSinkError",
    "WorkerDied",
]

_log = logging.getLogger(__name__)


class ListeningError(Exception):
    """Base class of every error raised by listening-core."""


_STATE_ERROR_DOC = """``listen`` and friends were called in a state that does not allow it (the message says why).

A :class:`discord.ClientException` (and a :class:`RuntimeError`), like discord.py's own errors
for a voice client in the wrong state."""

if TYPE_CHECKING:
    from discord import ClientException

    class ListeningStateError(ListeningError, ClientException, RuntimeError):
        """``listen`` and friends were called in a state that does not allow it."""

else:

    def __getattr__(name: str) -> Any:
        if name == "ListeningStateError":
            return _state_error()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*globals(), "ListeningStateError"})


@functools.cache
def _state_error() -> type[Exception]:
    """:class:`ListeningStateError`, made (once) on first use: its base is discord.py's."""
    from discord import ClientException

    error = type(
        "ListeningStateError",
        (ListeningError, ClientException, RuntimeError),
        {"__doc__": _STATE_ERROR_DOC, "__module__": __name__},
    )
    return error


class ListeningInterrupted(ListeningError):
    """The listening session ended because the voice connection did; handed to ``after``.

    :attr:`reason` is ``"disconnected"`` (the bot left voice, or Discord removed it: kicked, the
    channel deleted, a connection that could not be restored) or ``"moved"`` (the bot is now in
    another channel, whose audio does not belong in this recording). Everything received before
    is in the sink, which was cleaned up as after :meth:`VoiceClient.stop_listening`. A sink's
    own failure takes precedence: ``after`` then gets that error instead.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ListeningInterrupted], tuple[str, str]]:
        return (type(self), (self.reason, str(self)))


class PacketError(ListeningError, ValueError):
    """A datagram or frame is malformed; it should be dropped (and counted under :attr:`reason`)."""

    reason: str
    """Short machine-readable cause, e.g. ``"truncated"``, ``"bad-version"``, ``"bad-extension"``."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message if message is not None else reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type[PacketError], tuple[str, str]]:
        # keep the reason when errors cross a process boundary (pickle)
        return (type(self), (self.reason, str(self)))


class DecryptError(PacketError):
    """Transport (or end-to-end) decryption failed: ``"bad-tag"``, ``"truncated"``, ``"bad-padding"``."""


class DaveError(DecryptError):
    """DAVE end-to-end decryption failed.

    Reasons: ``"no-key"`` (the sender's key is not known yet: hold the frame briefly and retry
    after the pending commit/welcome is processed), ``"unencrypted"`` (a plain frame while the
    sender's passthrough is off: drop it), ``"dave-failed"`` (anything else: drop it).
    """


# ------------------------------------------------------------------------- plugins and options


class PluginError(ListeningError):
    """A sink plugin is missing, broken, or clashes with another one."""


class InvalidPluginError(PluginError):
    """A plugin breaks the contract of :mod:`listening_core.hookspecs`.

    Raised by :meth:`~listening_core.plugins.SinkRegistry.register` (and by
    :meth:`~listening_core.plugins.SinkRegistry.create` when a factory
    returns something that is not a sink); plugins found through entry points are recorded in
    :attr:`~listening_core.plugins.SinkRegistry.failures` instead.
    """

    plugin: str | None
    """The plugin's name (its entry point name, or the name given to ``register``)."""

    def __init__(self, message: str, *, plugin: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin


class PluginConflictError(PluginError):
    """Two or more plugins provide a sink with the same name; uninstall one of them."""

    sink: str
    """The contested sink name."""
    providers: tuple[str, ...]
    """Who provides it: ``"<distribution> <version>"`` or ``"plugin '<name>' (registered in code)"``."""

    def __init__(self, message: str, *, sink: str = "", providers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.sink = sink
        self.providers = providers


class UnknownSinkError(PluginError, LookupError):
    """No installed plugin provides a sink with this name.

    The message lists the installed sinks, suggests near names and says what to install.
    """

    sink: str
    """The name that was asked for."""
    installed: tuple[str, ...]
    """The names of the sinks that are available."""
    suggestions: tuple[str, ...]
    """Near names (installed or published by this project), best first."""
    install: str | None
    """The distribution the message suggests installing, if any."""

    def __init__(
        self,
        message: str,
        *,
        sink: str = "",
        installed: tuple[str, ...] = (),
        suggestions: tuple[str, ...] = (),
        install: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sink = sink
        self.installed = installed
        self.suggestions = suggestions
        self.install = install

    def __str__(self) -> str:
        # LookupError subclasses keep Exception's __str__, but be explicit: no KeyError quoting
        return str(self.args[0]) if self.args else ""


class OptionsError(ListeningError, ValueError):
    """The options given for a sink are unknown, ill-typed or rejected by the sink.

    A sink's options class may raise it from ``__post_init__`` too (a plain ``ValueError`` works
    as well and is converted).
    """

    sink: str | None
    """The sink the options were for."""
    option: str | None
    """The offending option, when one can be named."""

    def __init__(self, message: str, *, sink: str | None = None, option: str | None = None) -> None:
        super().__init__(message)
        self.sink = sink
        self.option = option


# ------------------------------------------------------------------------------ decoding pool


class WorkerDied(ListeningError):
    """A decoding worker died with this batch in flight; its frames are concealed."""


class PoolClosed(ListeningError):
    """The pool was shut down."""


# ------------------------------------------------------------------------------------ decoding


class LibopusNotFound(ListeningError):
    """libopus could not be loaded; the message says how to install it."""


class OpusError(ListeningError):
    """libopus refused a packet or a call: :attr:`code` is libopus's (negative) error code."""

    code: int
    """libopus error code, e.g. ``-4`` (``OPUS_INVALID_PACKET``)."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message if message is not None else f"libopus error {code}")
        self.code = code

    def __reduce__(self) -> tuple[type[OpusError], tuple[int, str]]:
        # keep the code when errors cross a process boundary (pickle)
        return (type(self), (self.code, str(self)))


# --------------------------------------------------------------------------------------- sinks


class SinkError(ListeningError):
    """A sink failed; the session stops that sink and passes this (with the cause) to ``after``."""


# ------------------------------------------------- fixes named in messages (private, shared)


def _normalise(name: str) -> str:
    """A distribution name in its comparable form (PEP 503): ``Discord_py`` -> ``discord-py``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(display: str) -> str:
    """``display`` (a distribution name) with the version range listening-core requires, if any.

    Read from listening-core's installed metadata, so messages never disagree with what pip
    would install alongside it.

    ``"davey"`` -> ``"davey>=0.1.7,<0.2"``; ``"discord.py"`` -> ``"discord.py[voice]>=2.7.1,<2.8"``.
    """
    import importlib.metadata  # here: worker processes import this module and never need it

    try:
        requires = importlib.metadata.requires("listening-core") or []
    except importlib.metadata.PackageNotFoundError:
        return display
    for requirement in requires:
        text = requirement.split(";")[0].strip()
        if requirement != text and "extra" in requirement.split(";", 1)[1]:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?\s*(.*)", text)
        if match is None or _normalise(match.group(1)) != _normalise(display):
            continue
        specifiers = [s.strip() for s in match.group(3).split(",") if s.strip()]
        specifiers.sort(key=lambda s: not s.startswith((">", "~", "=")))  # lower bound first
        return f"{display}{match.group(2) or ''}{','.join(specifiers)}"
    return display


def _pip_install(display: str, *, reinstall: bool = False) -> str:
    """The command that installs distribution ``display`` in the range listening-core requires,
    quoted for a shell when it needs to be: ``pip install "davey>=0.1.7,<0.2"``.

    Shared by the errors raised at runtime and ``listening doctor``, so both name the same fix.
    """
    requirement = _requirement(display)
    quoted = f'"{requirement}"' if re.search(r"[<>=!~\[,]", requirement) else requirement
    return f"pip install {'--force-reinstall ' if reinstall else ''}{quoted}"
