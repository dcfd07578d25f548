"""The ``listening`` command (also ``python -m listening_core``).

- ``listening plugins [NAME] [--json]``: the installed sinks, with their distribution, version
  and options (type, default, help); one sink with ``NAME``.
- ``listening doctor``: whether this machine can receive voice: libopus, davey, PyNaCl,
  cryptography (both transport encryption modes, by sealing and opening a packet), discord.py
  and every installed sink plugin. One line per check (``ok``, ``missing`` or ``broken``), and
  for anything not ok the command that fixes it. Exit status 0 when all is ok, 1 otherwise.
- ``listening demo [--install-system-deps]``: the recording bot that ships
  (:mod:`listening_core.ext.recorder`) recording a loopback Discord (:mod:`listening_core.demo`);
  it needs nothing from the working directory, and installs libopus only when asked to.
- ``listening recover PATH...``: make the files a killed recorder left whole, whatever their
  format (:mod:`listening_core.recover`); exit status 1 if a file cannot be recovered.

Output is wrapped to the terminal's width (at most :data:`WIDTH` columns).

Exit status 2 means the command could not do what was asked (a usage error, an unknown sink).

The checks of ``doctor`` live in :mod:`listening_core.doctor` (their names resolve here too):
plain callables returning :class:`CheckResult`\\ s, so tests (and tools) can run their own:
``doctor(checks=[...])``, ``check_libopus(load=...)``, ``check_plugins(registry)``, or
``main(argv, registry=..., checks=...)``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import enum
import json
import math
import os
import re
import reprlib
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from . import __version__
from .doctor import (
    Check,
    CheckResult,
    _failure_dist,
    _load,
    check_cipher,
    check_core,
    check_libopus,
    check_module,
    check_plugins,
    check_python,
    default_checks,
    describe_failure,
    run_checks,
)
from .hookspecs import SinkSpec
from .options import OptionInfo, describe, format_default
from .plugins import KNOWN_DISTRIBUTIONS, PluginError, SinkRegistry

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
"""Output is wrapped to this many columns at most; to fewer on a narrower terminal."""

COMMANDS = ("demo", "doctor", "plugins", "recover")

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other command-line tools


def _width() -> int:
    """The columns to wrap to: the terminal's (or ``COLUMNS``), at most :data:`WIDTH`, at least 40."""
    return max(40, min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns))


def _flushed(code: int) -> int:
    """Flush stdout here, where a reader that left (BrokenPipeError) is still handled."""
    sys.stdout.flush()
    return code


# ------------------------------------------------------------------------------------ helpers


# a command in a fix is never split across lines, so it can be copied whole
_COMMAND_RE = re.compile(
    r"(?:sudo )?(?:pip install(?: --force-reinstall| -U)?|pip uninstall|apt-get install|dnf install|"
    r"yum install|zypper install|pacman -S|apk add|brew install) (?:\"[^\"]*\"|[^\s;,()]+)"
)
_GLUE = "\u00a0"  # textwrap splits on ASCII whitespace only


def _wrap(text: str, indent: int, *, first: str = "", width: int | None = None) -> list[str]:
    """Wrap ``text`` (which may hold several lines) to ``width`` (default: :func:`_width`);
    ``first`` prefixes line one."""
    width = width or _width()
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
    """Wrap a multi-line message (an error from the registry) to :func:`_width`, each long line
    with a hanging indent under its text (after `` — `` in a listing line)."""
    lines: list[str] = []
    width = _width()
    for line in text.splitlines():
        if len(line) <= width:
            lines.append(line)
            continue
        lead = len(line) - len(line.lstrip())
        dash = line.find(" — ")
        hang = dash + 3 if 0 <= dash < width // 2 else lead + 2
        lines.extend(_wrap(line[lead:], hang, first=line[:lead]))
    return "\n".join(lines)


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


# ------------------------------------------------------------------------------------- plugins


def _sink_json(spec: SinkSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "summary": spec.summary,
        "distribution": spec.distribution,
        "version": spec.version,
        "wants_pcm": getattr(spec, "wants_pcm", None),  # None for an EngineSpec
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
    if isinstance(spec, SinkSpec):  # not for an EngineSpec
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
            lines.extend(_wrap(head[4:], help_indent, first="    ") if len(head) > _width() else [head])
            if info.help:
                lines.extend(_wrap(info.help, help_indent))
    if example:
        lines.extend(_wrap(_usage_example(spec, infos), 4, first="  usage: "))
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
            print(
                "\n".join(
                    _sink_lines(spec, example=True)
                    + (_engine_lines(reg) if "engine" in {i.name for i in describe(spec)} else [])
                )
            )
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
            "engines": [_sink_json(engine) for engine in reg.engines()],  # type: ignore[arg-type]
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
    lines += _engine_lines(reg)
    lines += _failure_lines(reg)
    print(_wrap_message("\n".join(lines)))  # headings too fit the terminal
    return EXIT_OK


def _engine_lines(registry: SinkRegistry) -> list[str]:
    """The transcription engines plugins provide (``engine_options`` of a transcribing sink)."""
    engines = registry.engines()
    if not engines:
        return []
    lines = ["", "transcription engines, for the engine and engine_options of a transcribing sink:"]
    for engine in engines:
        head, *rest = _sink_lines(engine)  # type: ignore[arg-type]
        lines += ["", f"  {head}", *rest]
    return lines


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
        lines += _wrap(f"{len(problems)} {noun}: apply each fix above, then run `listening doctor` again.", 0)
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
        description="listening-core: voice receive for discord.py bots. Inspect the installed sinks, "
        "check that this machine can receive voice, run the demo, recover files a killed recorder left.",
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
    from . import demo as demo_module
    from . import recover as recover_module

    demo = commands.add_parser(
        "demo",
        help="the demo: a loopback Discord where the recording bot records four members",
        description="Start a loopback Discord where three virtual members and a discord.py client "
        "speak (2 %% loss, jitter), run the recording bot that ships (listening_core.ext.recorder) "
        "against it with six sinks, show progress live and check every file. Writes "
        "recordings/<session>/.",
    )
    demo_module.add_arguments(demo)
    recover = commands.add_parser(
        "recover",
        help="make the files a killed recorder left whole (WAV, FLAC, MP3, Ogg Opus)",
        description="Make the files a killed recorder left whole: WAV headers are set from the "
        "file's length, FLAC is re-encoded up to its first damaged frame, MP3 and Ogg Opus are "
        "checked (readable as they are). The format is read from each file; a folder stands for "
        "the audio files under it. One line per file; exit status 1 if one cannot be recovered.",
    )
    recover_module.add_arguments(recover)
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
            demo_args += ["--bot", args.bot] if args.bot else []
            demo_args += ["--install-system-deps"] if args.install_system_deps else []
            return _flushed(cmd_demo(demo_args))
        if args.command == "recover":
            from .recover import run as recover

            return _flushed(recover(args.paths, out=sys.stdout, err=sys.stderr))
    except BrokenPipeError:  # `listening plugins | head`: the reader left; stop quietly
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    parser.print_help(sys.stderr)
    return EXIT_USAGE
