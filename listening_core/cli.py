"""The ``listening`` command (also ``python -m listening_core``).

- ``listening plugins [NAME] [--json]``: the installed sinks, with their distribution, version
  and options (type, default, help); one sink with ``NAME``.
- ``listening doctor``: whether this machine can receive voice: libopus, davey, PyNaCl,
  cryptography (both transport encryption modes, by sealing and opening a packet), discord.py
  and every installed sink plugin. One line per check (``ok``, ``missing`` or ``broken``), and
  for anything not ok the command that fixes it. Exit status 0 when all is ok, 1 otherwise.
- ``listening demo``: not written yet; says so and exits with status 2.

Exit status 2 means the command could not do what was asked (a usage error, an unknown sink).

The checks of ``doctor`` are plain callables returning :class:`CheckResult`\\ s, so tests (and
tools) can run their own: ``doctor(checks=[...])``, ``check_libopus(load=...)``,
``check_plugins(registry)``, or ``main(argv, registry=..., checks=...)``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import enum
import functools
import importlib
import importlib.metadata
import json
import logging
import math
import os
import re
import reprlib
import shutil
import sys
import textwrap
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import PurePath
from typing import Any, Literal

from . import __version__
from .errors import _pip_install
from .hookspecs import ENTRY_POINT_GROUP, SinkSpec
from .opus import LIBOPUS_ENV, LibopusNotFound, libopus_version, load_libopus
from .plugins import (
    KNOWN_DISTRIBUTIONS,
    InvalidPluginError,
    OptionInfo,
    PluginError,
    SinkRegistry,
    default_registry,
    describe,
    format_default,
)

__all__ = [
    "Check",
    "CheckResult",
    "build_parser",
    "check_cipher",
    "check_core",
    "check_libopus",
    "check_module",
    "check_plugins",
    "check_python",
    "default_checks",
    "describe_failure",
    "doctor",
    "format_results",
    "main",
    "run_checks",
]

WIDTH = 100
"""Output is wrapped to this many columns."""

COMMANDS = ("demo", "doctor", "plugins")

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other command-line tools


def _flushed(code: int) -> int:
    """Flush stdout here, where a reader that left (BrokenPipeError) is still handled."""
    sys.stdout.flush()
    return code


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


# ------------------------------------------------------------------------------------ helpers


# a command in a fix is never split across lines, so it can be copied whole
_COMMAND_RE = re.compile(
    r"(?:sudo )?(?:pip install(?: --force-reinstall| -U)?|pip uninstall|apt-get install|dnf install|"
    r"yum install|zypper install|pacman -S|apk add|brew install) (?:\"[^\"]*\"|[^\s;,()]+)"
)
_GLUE = "\u00a0"  # textwrap splits on ASCII whitespace only


def _wrap(text: str, indent: int, *, first: str = "", width: int = WIDTH) -> list[str]:
    """Wrap ``text`` (which may hold several lines) to ``width``; ``first`` prefixes line one."""
    pad = " " * indent
    lines: list[str] = []
    text = _COMMAND_RE.sub(lambda m: m.group(0).replace(" ", _GLUE), text)
    for number, paragraph in enumerate(text.splitlines() or [""]):
        lead = first if number == 0 and first else pad
        wrapped = textwrap.wrap(
            paragraph,
            width=width,
            initial_indent=lead,
            subsequent_indent=pad,
            break_long_words=True,  # only words longer than a whole line: long paths
            break_on_hyphens=False,
        )
        lines.extend(wrapped or [lead.rstrip()])
    return [line.replace(_GLUE, " ") for line in lines]


def _wrap_message(text: str) -> str:
    """Wrap a multi-line message (an error from the registry) to :data:`WIDTH`, each long line
    with a hanging indent under its text (after `` — `` in a listing line)."""
    lines: list[str] = []
    for line in text.splitlines():
        if len(line) <= WIDTH:
            lines.append(line)
            continue
        lead = len(line) - len(line.lstrip())
        dash = line.find(" — ")
        hang = dash + 3 if 0 <= dash < WIDTH // 2 else lead + 2
        lines.extend(_wrap(line[lead:], hang, first=line[:lead]))
    return "\n".join(lines)


def _sudo() -> str:
    geteuid = getattr(os, "geteuid", None)
    return "sudo " if geteuid is not None and geteuid() != 0 else ""


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


_default_repr = reprlib.Repr()
_default_repr.maxstring = 60
_default_repr.maxother = 60


def _default_text(value: object) -> str:
    """An option's default as the listings show it (longer values than the registry's errors)."""
    return format_default(value, _default_repr.repr)


def _json_value(value: object) -> Any:
    """``value`` as JSON when it has a natural JSON form, else as its listing text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return _json_value(value.value)
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _json_value(item) for key, item in value.items()}
    return _default_text(value)


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
            return default_registry()
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


# ------------------------------------------------------------------------------------- plugins


def _sink_json(spec: SinkSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "summary": spec.summary,
        "distribution": spec.distribution,
        "version": spec.version,
        "wants_pcm": spec.wants_pcm,
        "options": [
            {
                "name": info.name,
                "type": info.type_str,
                "default": _json_value(info.default),
                "default_repr": _default_text(info.default),
                "help": info.help,
            }
            for info in describe(spec)
        ],
    }


def _usage_example(spec: SinkSpec, infos: Sequence[OptionInfo]) -> str:
    for info in infos:
        value = _json_value(info.default)
        if isinstance(value, bool | int | float | str) and not isinstance(info.default, enum.Enum):
            literal = repr(value) if not isinstance(value, str) else json.dumps(value)
            return f'vc.listen("{spec.name}", options={{"{info.name}": {literal}}})'
    return f'vc.listen("{spec.name}")'


def _sink_lines(spec: SinkSpec, *, example: bool = False) -> list[str]:
    origin = f"{spec.distribution} {spec.version}" if spec.distribution else "registered in code"
    lines = [f"{spec.name} ({origin})"]
    lines.extend(_wrap(spec.summary, 2, first="  "))
    receives = "decoded PCM, 48 kHz stereo" if spec.wants_pcm else "the Opus packets as received"
    lines.append(f"  input: {receives}")
    infos = describe(spec)
    if not infos:
        lines.append("  options: none")
    else:
        lines.append("  options:")
        name_width = max(len(info.name) for info in infos)
        type_width = max(len(info.type_str) for info in infos)
        help_indent = 4 + name_width + 2
        for info in infos:
            head = f"    {info.name:<{name_width}}  {info.type_str:<{type_width}}  = {_default_text(info.default)}"
            lines.extend(_wrap(head[4:], help_indent, first="    ") if len(head) > WIDTH else [head])
            if info.help:
                lines.extend(_wrap(info.help, help_indent))
    if example:
        lines.append(f"  usage: {_usage_example(spec, infos)}")
    return lines


def _failure_lines(registry: SinkRegistry) -> list[str]:
    lines: list[str] = []
    failures = registry.failures
    if failures:
        lines += ["", "plugins that failed to load (their sinks are unavailable):"]
        for plugin, exc in failures.items():
            found, fix = describe_failure(registry, plugin, exc)
            lines.extend(_wrap(found, 4, first=f"  {plugin}: "))
            lines.extend(_wrap(fix, 9, first="    fix: "))
    conflicts = registry.conflicts
    if conflicts:
        lines += ["", "sink names provided by more than one plugin (unusable until one is uninstalled):"]
        for sink, error in conflicts.items():
            lines.extend(_wrap(str(error), 4, first=f"  {sink}: "))
    return lines


def cmd_plugins(registry: SinkRegistry | None, name: str | None, as_json: bool) -> int:
    """``listening plugins [NAME] [--json]``."""
    reg = _load(registry)
    if name is not None:
        try:
            spec = reg.get(name)
        except PluginError as exc:  # UnknownSinkError, PluginConflictError
            print(_wrap_message(str(exc)), file=sys.stderr)
            return EXIT_USAGE
        if as_json:
            print(json.dumps(_sink_json(spec), indent=2))
        else:
            print("\n".join(_sink_lines(spec, example=True)))
        return EXIT_OK

    specs = reg.specs()
    if as_json:
        document = {
            "sinks": [_sink_json(spec) for spec in specs],
            "failures": [
                {
                    "plugin": plugin,
                    "distribution": _failure_dist(reg, plugin)[0],
                    "version": _failure_dist(reg, plugin)[1],
                    "error": f"{type(exc).__name__}: {exc}",
                    "fix": describe_failure(reg, plugin, exc)[1],
                }
                for plugin, exc in reg.failures.items()
            ],
            "conflicts": [
                {"sink": sink, "providers": list(error.providers), "message": str(error)}
                for sink, error in reg.conflicts.items()
            ],
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK

    lines: list[str] = []
    if specs:
        noun = "sink" if len(specs) == 1 else "sinks"
        lines.append(
            f"{len(specs)} {noun} installed; record with one by name: vc.listen(NAME, options={{...}})"
        )
        for spec in specs:
            lines += ["", *_sink_lines(spec)]
    elif reg.failures or reg.conflicts:
        lines.append("no usable sinks: every installed plugin failed to load or clashes with another")
    else:
        lines.append("no sinks are installed. The sinks of this project, one distribution each:")
        width = max(len(sink) for sink in KNOWN_DISTRIBUTIONS)
        lines.extend(f"  {sink:<{width}}  pip install {dist}" for sink, dist in KNOWN_DISTRIBUTIONS.items())
    lines += _failure_lines(reg)
    print("\n".join(lines))
    return EXIT_OK


# -------------------------------------------------------------------------------------- doctor


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
) -> list[CheckResult]:
    """Load libopus the way the decoder does (honouring ``LISTENING_CORE_LIBOPUS``)."""
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
    return [CheckResult("libopus", "ok", f"{found} ({where})" if where else found)]


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


def format_results(results: Sequence[CheckResult]) -> list[str]:
    """The report: ``name  status  found`` per check, and ``fix: ...`` under anything not ok."""
    name_width = min(max((len(r.name) for r in results), default=0), 24)
    status_width = max(len(status) for status in ("ok", "missing", "broken"))
    indent = name_width + 2 + status_width + 2
    lines: list[str] = []
    for result in results:
        first = f"{result.name:<{name_width}}  {result.status:<{status_width}}  "
        if len(first) > indent:  # a very long name: the rest goes on the next line
            lines.append(first.rstrip())
            first = " " * indent
        lines.extend(_wrap(result.found, indent, first=first))
        if not result.ok:
            lines.extend(_wrap(result.fix or "(no fix known)", indent + 5, first=" " * indent + "fix: "))
    problems = [r for r in results if not r.ok]
    lines.append("")
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        lines.append(f"{len(problems)} {noun}: apply each fix above, then run `listening doctor` again.")
    else:
        lines.append(f"all {len(results)} checks ok: this machine can receive voice.")
    return lines


def doctor(checks: Sequence[Check] | None = None, *, registry: SinkRegistry | None = None) -> int:
    """``listening doctor``: run ``checks`` (default: :func:`default_checks`), print the report.

    Returns the exit status: 0 when every check is ok, 1 otherwise.
    """
    results = run_checks(checks if checks is not None else default_checks(registry))
    print("\n".join(format_results(results)))
    return EXIT_OK if all(r.ok for r in results) else EXIT_PROBLEMS


# ---------------------------------------------------------------------------------------- demo


def cmd_demo(argv: Sequence[str]) -> int:
    """``listening demo``: see :mod:`listening_core.demo`."""
    from .demo import main as demo_main

    return demo_main(list(argv))


# ---------------------------------------------------------------------------------------- main


def _prog() -> str:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m listening_core" if argv0 in ("__main__.py", "-m") else "listening"


def build_parser(prog: str = "listening") -> argparse.ArgumentParser:
    """The argument parser of the ``listening`` command."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="listening-core: voice receive for discord.py bots. Inspect the installed sinks "
        "and check that this machine can receive voice.",
    )
    parser.add_argument("--version", action="version", version=f"listening-core {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = commands.add_parser(
        "plugins",
        help="list the installed sinks: distribution, version, options",
        description="List the installed sinks with their distribution, version and options "
        "(type, default, help), or show one sink.",
    )
    plugins.add_argument("name", nargs="?", metavar="NAME", help="show only this sink")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser(
        "doctor",
        help="check libopus, davey, PyNaCl, cryptography, discord.py and the plugins",
        description="Check everything voice receive needs; print one line per check and, for "
        "anything not ok, the fix. Exit status 0 when all is ok, 1 otherwise.",
    )
    demo = commands.add_parser(
        "demo",
        help="the demo: a loopback Discord where the example bot records four members",
        description="Start a loopback Discord where three virtual members and a discord.py client "
        "speak (2 %% loss, jitter), run examples/record_bot.py against it with six sinks, show "
        "progress live and check every file. Writes recordings/<session>/.",
    )
    demo.add_argument(
        "--output", default="recordings", help="where the session folder goes (default: recordings)"
    )
    demo.add_argument(
        "--bot", help="the example bot to run (default: examples/record_bot.py of this checkout)"
    )
    demo.add_argument("--seed", type=int, default=2026, help="seed of the simulated network faults")
    return parser


def _unknown_command(argv: Sequence[str]) -> str | None:
    """A message for a mistyped command (argparse of Python < 3.14 suggests nothing)."""
    words = [arg for arg in argv if not arg.startswith("-")]
    if not words or words[0] in COMMANDS:
        return None
    near = difflib.get_close_matches(words[0], COMMANDS, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown command {words[0]!r}{hint} (commands: {', '.join(COMMANDS)})"


def main(
    argv: list[str] | None = None,
    *,
    registry: SinkRegistry | None = None,
    checks: Sequence[Check] | None = None,
) -> int:
    """Run the ``listening`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    ``registry`` replaces the process's sink registry (for tests and tools); ``checks`` replaces
    the checks of ``doctor``.
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    prog = _prog()
    parser = build_parser(prog)
    message = _unknown_command(args_in)
    if message is not None:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(args_in)
    except SystemExit as exc:  # --help, --version, usage errors: return the status instead
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    try:
        if args.command == "plugins":
            return _flushed(cmd_plugins(registry, args.name, args.json))
        if args.command == "doctor":
            return _flushed(doctor(checks, registry=registry))
        if args.command == "demo":
            demo_args = ["--output", args.output, "--seed", str(args.seed)]
            return _flushed(cmd_demo(demo_args + (["--bot", args.bot] if args.bot else [])))
    except BrokenPipeError:  # `listening plugins | head`: the reader left; stop quietly
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    parser.print_help(sys.stderr)
    return EXIT_USAGE
