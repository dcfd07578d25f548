"""The checks of ``listening doctor`` and of the demo's preflight: one set, one result type.

Each check is a plain callable returning :class:`CheckResult`\\ s (``ok``, ``missing`` or
``broken``, what was found and, for anything not ok, the command that fixes it), so tests and
tools can run their own: ``run_checks([...])``, ``check_libopus(load=...)``,
``check_plugins(registry)``. :func:`default_checks` are the doctor's (libopus, davey, PyNaCl,
cryptography, both transport encryption modes, discord.py, every installed sink plugin);
:mod:`listening_core.demo` adds :func:`check_sinks`, :func:`check_pillow` and :func:`check_bot`.
:mod:`listening_core.cli` prints the results; :func:`describe_failure` also explains the plugins
that failed to load in ``listening plugins``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import logging
import os
import shutil
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from . import __version__, plugins
from .errors import _pip_install
from .hookspecs import ENTRY_POINT_GROUP
from .opus import LIBOPUS_ENV, LibopusNotFound, LibopusSource, find_libopus, libopus_version, load_libopus
from .plugins import InvalidPluginError, SinkRegistry

__all__ = [
    "Check",
    "CheckResult",
    "Status",
    "check_bot",
    "check_cipher",
    "check_core",
    "check_libopus",
    "check_module",
    "check_pillow",
    "check_plugins",
    "check_python",
    "check_sinks",
    "default_checks",
    "describe_failure",
    "run_checks",
]

Status = Literal["ok", "missing", "broken"]

# the core's own dependencies: import name -> distribution (as users spell it)
_DEPENDENCIES = {
    "discord": "discord.py",
    "davey": "davey",
    "nacl": "PyNaCl",
    "cryptography": "cryptography",
    "pluggy": "pluggy",
    "soundfile": "soundfile",
    "webrtcvad": "webrtcvad-wheels",
}


def _is_root() -> bool:
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and geteuid() == 0


def _sudo() -> str:
    return "sudo " if hasattr(os, "geteuid") and not _is_root() else ""


def _libopus_install_command() -> str:
    """The command that installs libopus on this system."""
    if sys.platform == "darwin":
        return "brew install opus"
    if sys.platform == "win32":
        return f"put opus.dll on PATH, or set {LIBOPUS_ENV} to the path of opus.dll"
    for tool, command in (
        ("apt-get", "apt-get install libopus0"),
        ("dnf", "dnf install opus"),
        ("yum", "yum install opus"),
        ("zypper", "zypper install libopus0"),
        ("pacman", "pacman -S opus"),
        ("apk", "apk add opus"),
    ):
        if shutil.which(tool):
            return _sudo() + command
    return "install libopus with your system's package manager (Debian/Ubuntu: apt-get install libopus0)"


@contextlib.contextmanager
def _quiet_plugin_warnings() -> Iterator[None]:
    """Keep the registry's own warnings about failed plugins off the terminal: the command
    reports them itself, with the fix. (Handlers configured by the caller still get them.)"""
    logger = logging.getLogger("listening_core.plugins")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _load(registry: SinkRegistry | None) -> SinkRegistry:
    with _quiet_plugin_warnings():
        if registry is None:
            return plugins.default_registry()
        registry.load()
        return registry


# ----------------------------------------------------------------------- plugin failures, fixes


def _failure_dist(registry: SinkRegistry, plugin: str) -> tuple[str | None, str | None]:
    """The distribution (and version) of a plugin that failed to load, when known."""
    known: dict[str, tuple[str | None, str | None]] = getattr(registry, "_failed_dist", {})
    if plugin in known:
        return known[plugin]
    return None, None


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"


def _missing_module(exc: BaseException) -> str | None:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ModuleNotFoundError) and cause.name:
            return cause.name
        cause = cause.__cause__
    return None


def describe_failure(registry: SinkRegistry, plugin: str, exc: Exception) -> tuple[str, str]:
    """What went wrong with a plugin that failed to load, and the fix: ``(found, fix)``."""
    dist, version = _failure_dist(registry, plugin)
    origin = f"{dist} {version}" if dist else f"entry point {plugin!r} in group {ENTRY_POINT_GROUP!r}"
    message = str(exc).strip() or "(no message)"
    if isinstance(exc, InvalidPluginError):
        found = f"{type(exc).__name__}: {message}"
        if dist:
            fix = (
                f"the plugin breaks the contract of listening_core.hookspecs: upgrade it "
                f"(pip install -U {dist}), or remove it (pip uninstall {dist})"
            )
        else:
            fix = f"fix the plugin module named by {origin} (see listening_core.hookspecs), or uninstall it"
        return found, fix
    found = f"{origin} could not be imported: {type(exc).__name__}: {message}{_where(exc)}"
    module = _missing_module(exc)
    if module is not None:
        top = module.split(".")[0]
        if top in _DEPENDENCIES:
            return found, _pip_install(_DEPENDENCIES[top])
        if dist:
            return found, (
                f"it needs the module {module!r}, which is not installed; reinstall it with its "
                f"dependencies: pip install --force-reinstall {dist}"
            )
        return found, f"it needs the module {module!r}, which is not installed: install what provides it"
    if dist:
        return found, (
            f"importing it raised an error: reinstall it (pip install --force-reinstall {dist}) "
            f"or remove it (pip uninstall {dist})"
        )
    return found, f"importing it raised an error: fix the plugin module, or uninstall what declares {origin}"


def _conflict_fix(providers: Sequence[str]) -> str:
    dists = [label.split(" ")[0] for label in providers if not label.startswith("plugin ")]
    fix = "uninstall all but one of them"
    if dists:
        fix += f", e.g. pip uninstall {dists[-1]}"
    return fix


# -------------------------------------------------------------------------------------- checks


@dataclasses.dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of ``listening doctor``."""

    name: str
    """What was checked: ``"libopus"``, ``"davey"``, ``"sink wav"`` ..."""
    status: Status
    """``"ok"``, ``"missing"`` (not installed) or ``"broken"`` (installed but not working)."""
    found: str
    """What was found: a version, or what went wrong."""
    fix: str = ""
    """For anything not ok: the command or step that fixes it."""

    @property
    def ok(self) -> bool:
        """Whether the check passed (``status == "ok"``); anything else comes with a :attr:`fix`."""
        return self.status == "ok"


Check = Callable[[], Iterable[CheckResult]]
"""A doctor check: reports one or more results (the plugin check reports one per sink)."""


def check_python() -> list[CheckResult]:
    """The interpreter running this (the one whose packages are checked)."""
    version = ".".join(str(part) for part in sys.version_info[:3])
    return [CheckResult("python", "ok", f"{version} ({sys.executable})")]


def check_core() -> list[CheckResult]:
    """listening-core itself, and where it is imported from."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [CheckResult("listening-core", "ok", f"{__version__} ({here})")]


def check_module(
    label: str,
    module: str,
    *,
    import_module: Callable[[str], types.ModuleType] = importlib.import_module,
) -> list[CheckResult]:
    """Import ``module`` (distribution ``label``) and report its ``__version__``."""
    fix = _pip_install(label)
    try:
        imported = import_module(module)
    except ImportError as exc:
        if exc.name == module or (exc.name and module.startswith(exc.name + ".")):
            return [CheckResult(label, "missing", f"not installed ({exc})", fix)]
        return [
            CheckResult(
                label,
                "broken",
                f"installed but cannot be imported: {type(exc).__name__}: {exc}",
                _pip_install(label, reinstall=True),
            )
        ]
    except Exception as exc:
        return [
            CheckResult(
                label,
                "broken",
                f"importing it raised {type(exc).__name__}: {exc}",
                _pip_install(label, reinstall=True),
            )
        ]
    version = getattr(imported, "__version__", None)
    if not isinstance(version, str):
        try:
            version = importlib.metadata.version(label)
        except importlib.metadata.PackageNotFoundError:
            version = "version unknown"
    return [CheckResult(label, "ok", version)]


def check_libopus(
    load: Callable[[], object] = load_libopus,
    version: Callable[[], str] = libopus_version,
    source: Callable[[], LibopusSource] = find_libopus,
) -> list[CheckResult]:
    """Load libopus the way the decoder does, and say which library it is and where it comes from
    (``LISTENING_CORE_LIBOPUS``, discord.py's, or the system's: :func:`~listening_core.opus.find_libopus`)."""
    try:
        lib = load()
        found = version()
    except LibopusNotFound as exc:
        message = str(exc).split("; install libopus")[0]
        install = _libopus_install_command()
        configured = os.environ.get(LIBOPUS_ENV)
        if configured:
            fix = (
                f"{LIBOPUS_ENV}={configured} does not load: point it at the libopus shared library "
                f"or unset it; to install libopus: {install}"
            )
        else:
            fix = install
        return [CheckResult("libopus", "missing", message, fix)]
    where = getattr(lib, "_name", None)
    chosen = source()
    if where is None or where == chosen.name:
        return [CheckResult("libopus", "ok", f"{found} ({chosen.name}, {chosen.origin})")]
    return [CheckResult("libopus", "ok", f"{found} ({where})")]


_CIPHER_NEEDS = {
    "aead_aes256_gcm_rtpsize": ("AES-256-GCM", "cryptography", "cryptography"),
    "aead_xchacha20_poly1305_rtpsize": ("XChaCha20", "nacl", "PyNaCl"),
}


def _roundtrip_transport(mode: str, payload: bytes) -> bytes:
    crypto = importlib.import_module("listening_core.crypto")
    from .rtp import RtpHeader

    cipher = crypto.transport_cipher(mode, bytes(32))
    sealed = cipher.seal_rtp(RtpHeader(sequence=1, timestamp=960, ssrc=1), payload, counter=1)
    _header, opened = cipher.open_rtp(sealed)
    return bytes(opened)


def _roundtrip_primitive(mode: str, payload: bytes) -> bytes:
    """The bare AEAD, for when listening_core.crypto cannot be imported for another reason."""
    key, aad = bytes(32), b"listening doctor"
    if mode == "aead_aes256_gcm_rtpsize":
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aead = AESGCM(key)
        return aead.decrypt(bytes(12), aead.encrypt(bytes(12), payload, aad), aad)
    import nacl.bindings

    sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(payload, aad, bytes(24), key)
    opened: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, aad, bytes(24), key)
    return opened


def check_cipher(mode: str) -> list[CheckResult]:
    """Seal and open one RTP packet in transport encryption ``mode``, as the receiver does."""
    label, module, dist = _CIPHER_NEEDS[mode]
    payload = b"\xf8\xff\xfe listening doctor"
    how = f"sealed and opened an RTP packet ({mode})"
    try:
        try:
            opened = _roundtrip_transport(mode, payload)
        except ImportError as exc:
            if exc.name is None or exc.name.split(".")[0] == module:
                raise
            # e.g. davey missing: listening_core.crypto needs it, the cipher itself does not
            opened = _roundtrip_primitive(mode, payload)
            missing = exc.name.split(".")[0]
            how = f"sealed and opened a packet with {dist} directly ({mode}; {missing} is missing)"
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] == module:
            return [CheckResult(label, "missing", f"{dist} is not installed ({exc})", _pip_install(dist))]
        return [
            CheckResult(
                label,
                "broken",
                f"cannot be imported: {type(exc).__name__}: {exc}",
                _pip_install(dist, reinstall=True),
            )
        ]
    except Exception as exc:
        return [
            CheckResult(
                label,
                "broken",
                f"sealing and opening a packet ({mode}) failed: {type(exc).__name__}: {exc}",
                _pip_install(dist, reinstall=True),
            )
        ]
    if opened != payload:
        return [
            CheckResult(
                label,
                "broken",
                f"a packet sealed and opened ({mode}) came back different",
                _pip_install(dist, reinstall=True),
            )
        ]
    return [CheckResult(label, "ok", how)]


def check_plugins(registry: SinkRegistry | None = None) -> list[CheckResult]:
    """Every installed sink plugin imported: one line per sink, per failed plugin, per clash."""
    reg = _load(registry)
    results: list[CheckResult] = []
    for spec in reg.specs():
        origin = f"{spec.distribution} {spec.version}" if spec.distribution else "registered in code"
        results.append(CheckResult(f"sink {spec.name}", "ok", f"{origin}, imported"))
    for plugin, exc in reg.failures.items():
        found, fix = describe_failure(reg, plugin, exc)
        results.append(CheckResult(f"plugin {plugin}", "broken", found, fix))
    for sink, error in reg.conflicts.items():
        results.append(CheckResult(f"sink {sink}", "broken", str(error), _conflict_fix(error.providers)))
    if not results:
        results.append(
            CheckResult(
                "sinks",
                "ok",
                "no sink plugins installed (to record by name, install one: pip install listening-sink-wav)",
            )
        )
    return results


_PILLOW_FIX = "pip install 'listening-core[report]'"


def check_pillow() -> list[CheckResult]:
    """Pillow, which draws the session report's ``timeline.png`` (optional: the ``report`` extra)."""
    try:
        import PIL
    except ImportError:
        return [CheckResult("Pillow", "missing", "Pillow draws timeline.png", _PILLOW_FIX)]
    return [CheckResult("Pillow", "ok", str(getattr(PIL, "__version__", "version unknown")))]


def check_sinks(
    names: Sequence[str], registry: SinkRegistry | None = None, *, hint: str = ""
) -> list[CheckResult]:
    """Whether the sinks ``names`` (sinks this project publishes) are installed: one result.

    The fix installs the missing ones from this checkout's ``plugins/`` when it has them all,
    else from the package index; ``hint`` is appended to it. ``registry`` defaults to the
    process's (looked up when the check runs).
    """
    reg = registry if registry is not None else plugins.default_registry()
    installed = set(reg.names())
    missing = [name for name in names if name not in installed]
    if not missing:
        return [CheckResult("sinks", "ok", ", ".join(names))]
    here = Path(__file__).resolve().parent.parent / "plugins"
    dists = [plugins.KNOWN_DISTRIBUTIONS[name] for name in missing]
    local = [here / dist for dist in dists]
    fix = (
        "pip install " + " ".join(str(p) for p in local)
        if all(p.is_dir() for p in local)
        else "pip install " + " ".join(dists)
    )
    return [CheckResult("sinks", "missing", f"not installed: {', '.join(missing)}", fix + hint)]


def check_bot(bot: Path | None) -> list[CheckResult]:
    """The bot the demo runs: ``bot`` (``--bot``) is a file, or (``None``) the one that ships,
    :mod:`listening_core.ext.recorder`, imports."""
    if bot is None:
        try:
            importlib.import_module("listening_core.ext.recorder")
        except Exception as exc:
            return [
                CheckResult(
                    "bot",
                    "broken",
                    f"listening_core.ext.recorder cannot be imported: {type(exc).__name__}: {exc}{_where(exc)}",
                    _pip_install("listening-core", reinstall=True),
                )
            ]
        return [CheckResult("bot", "ok", "listening_core.ext.recorder (ships with listening-core)")]
    if not bot.is_file():
        return [
            CheckResult(
                "bot",
                "missing",
                f"the bot script was not found ({bot})",
                "pass --bot the path of a bot script, or leave --bot out to run the bot that ships",
            )
        ]
    return [CheckResult("bot", "ok", str(bot))]


def default_checks(registry: SinkRegistry | None = None) -> list[Check]:
    """The checks ``listening doctor`` runs, in order; ``registry`` defaults to the process's."""
    return [
        check_python,
        check_core,
        functools.partial(check_module, "discord.py", "discord"),
        check_libopus,
        functools.partial(check_module, "davey", "davey"),
        functools.partial(check_module, "PyNaCl", "nacl"),
        functools.partial(check_module, "cryptography", "cryptography"),
        functools.partial(check_cipher, "aead_aes256_gcm_rtpsize"),
        functools.partial(check_cipher, "aead_xchacha20_poly1305_rtpsize"),
        functools.partial(check_plugins, registry),
    ]


def _check_name(check: Check) -> str:
    if isinstance(check, functools.partial):
        args = [str(arg) for arg in check.args if isinstance(arg, str)]
        return " ".join([getattr(check.func, "__name__", "check"), *args])
    return getattr(check, "__name__", repr(check))


def run_checks(checks: Sequence[Check]) -> list[CheckResult]:
    """Run ``checks`` in order; a check that raises is reported as broken, not propagated."""
    results: list[CheckResult] = []
    for check in checks:
        try:
            results.extend(check())
        except Exception as exc:
            results.append(
                CheckResult(
                    _check_name(check),
                    "broken",
                    f"the check itself failed: {type(exc).__name__}: {exc}{_where(exc)}",
                    "report this to listening-core with the output of `listening doctor`",
                )
            )
    return results
