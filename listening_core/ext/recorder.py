"""The recording bot: a discord.py Cog, an extension and a runnable bot, built on listening-core.

Commands (prefix ``!`` or slash, once synced with ``--sync``), typed by a member who is in a voice
channel::

    !record [SINK ...] [SINK.OPTION=VALUE ...]   join your voice channel and record
                                                 (default sinks: wav mixdown)
    !pause / !resume                             stop and restart keeping audio (time runs on)
    !stop                                        finish, reply with a summary and the mixdown
    !plugins                                     the sinks installed, with their options

Each session goes to ``recordings/<started>-<guild>-<channel>/``: one folder per sink,
``session.json`` (members, timings, statistics, files; rewritten every second while recording)
and ``timeline.png`` (who spoke when). Example: ``!record wav mp3 vad-segments mp3.bitrate=96``.

With the ``transcribe`` sink (listening-sink-transcribe), e.g. ``!record wav transcribe
transcribe.language=en``, the bot posts live captions, each member's utterances as they are
transcribed, to the text channel the command came from: batched into one message every
:data:`CAPTIONS_EVERY` seconds at most (Discord allows about five messages per five seconds in a
channel), and ``stop`` attaches the transcript (``transcript.srt``); ``session.json`` gets its
``"transcript"`` section.

In your own bot (it needs the Message Content intent for the ``!`` commands)::

    await bot.load_extension("listening_core.ext.recorder")    # sessions under ./recordings
    await bot.add_cog(Recorder(bot, Path("/srv/recordings")))   # or choose the folder

Run it on its own against Discord::

    DISCORD_TOKEN=... python -m listening_core.ext.recorder

(the bot needs the Message Content intent, enabled in the Developer Portal, and the Connect and
Send Messages permissions), or against the loopback Discord of ``listening demo``::

    python -m listening_core.ext.recorder --local loopback.json

``examples/record_bot.py`` is this module run as a script.

Which sinks a session records with, and with which options, is decided in one place:
:meth:`Recorder.plan` (request text -> sink names and options, each sink's output placed in the
session folder and every option checked before the bot joins voice). :data:`DEFAULT_SINKS` is what
a bare ``record`` uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import discord
from discord.ext import commands

from ..errors import ListeningError
from ..plugins import default_registry, describe
from ..report import SessionReport
from ..sinks import AudioSink, MultiSink, safe_filename
from ..voice_client import VoiceClient

__all__ = [
    "CAPTIONS_EVERY",
    "DEFAULT_SINKS",
    "Captions",
    "Recorder",
    "Session",
    "attachments",
    "main",
    "make_bot",
    "parse_request",
    "place_outputs",
    "setup",
    "summary",
]

log: logging.Logger = logging.getLogger(__name__)

DEFAULT_SINKS = ("wav", "mixdown")
"""The sinks a bare ``record`` uses."""
LIVE_REPORT_EVERY = 1.0  # seconds between rewrites of session.json while recording
CAPTIONS_EVERY = 2.0
"""Seconds between two caption messages: within Discord's rate limit of a channel, and a caption
seldom waits longer than this for the next message."""
MAX_MESSAGE = 2000  # Discord's message length limit


def parse_request(
    text: str, default: tuple[str, ...] = DEFAULT_SINKS
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``"wav mp3 mp3.bitrate=96"`` → ``(["wav", "mp3"], {"mp3": {"bitrate": 96}})``.

    Values are JSON when they parse as JSON (numbers, true/false), else strings. No sink named:
    the ``default`` sinks.
    """
    sinks: list[str] = []
    options: dict[str, dict[str, Any]] = {}
    for word in shlex.split(text):
        if "=" not in word:
            sinks.append(word)
            continue
        key, _, raw = word.partition("=")
        sink, dot, option = key.partition(".")
        if not dot or not sink or not option:
            raise ValueError(f"{word!r}: write options as SINK.OPTION=VALUE, e.g. mp3.bitrate=96")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        options.setdefault(sink, {})[option] = value
    for sink in options:
        if sink not in sinks:
            sinks.append(sink)  # an option for a sink names that sink too
    return sinks or list(default), options


def place_outputs(sinks: list[str], options: dict[str, dict[str, Any]], folder: Path) -> None:
    """Point every sink's output (its ``directory`` or ``path`` option) into ``folder/<sink>``,
    unless the user set it."""
    registry = default_registry()
    for name in sinks:
        fields = {info.name for info in describe(registry.get(name))}
        own = options.setdefault(name, {})
        if "directory" in fields:
            own.setdefault("directory", str(folder / name))
        elif "path" in fields:
            own.setdefault("path", str(folder / name / f"{name}.jsonl"))
            (folder / name).mkdir(parents=True, exist_ok=True)


class Session:
    """One recording: its folder, its sinks and the report written next to them."""

    def __init__(self, vc: VoiceClient, folder: Path, names: list[str]) -> None:
        self.vc: VoiceClient = vc
        self.folder: Path = folder
        self.names: list[str] = names
        self.report: SessionReport = SessionReport()
        self.sink: MultiSink | None = None
        self.done: asyncio.Event = asyncio.Event()
        self.error: BaseException | None = None
        self.started: float = time.monotonic()
        self._writer: asyncio.Task[None] | None = None

    def start(self, options: dict[str, dict[str, Any]]) -> None:
        """Start listening with the sinks and ``options``, and the live rewrites of session.json."""
        sink = self.vc.listen([*self.names, self.report], options=options, after=self._after)
        assert isinstance(sink, MultiSink)
        self.sink = sink
        self._writer = asyncio.create_task(self._write_live())

    def _after(self, sink: AudioSink, error: BaseException | None) -> None:
        self.error = error
        self.done.set()

    def files(self) -> list[tuple[str, Path]]:
        """Every file the sinks wrote, as (sink name, path)."""
        found: list[tuple[str, Path]] = []
        for name in self.names:
            where = self.folder / name
            if where.is_dir():
                found.extend((name, path) for path in sorted(where.rglob("*")) if path.is_file())
        return found

    def write_report(self, *, finished: bool) -> Path:
        """Write ``session.json`` (and, once ``finished``, ``timeline.png``); its path."""
        mixdown = next((p for sink, p in self.files() if sink == "mixdown" and p.suffix == ".wav"), None)
        return self.report.write(
            self.folder,
            stats=self.vc.listening_stats(),
            files=self.files(),
            finished=finished,
            mixdown=mixdown,
            extra={
                "sinks": self.names,
                "guild": getattr(self.vc.guild, "name", None),
                "channel": getattr(self.vc.channel, "name", None),
                "error": None if self.error is None else repr(self.error),
                **self._transcript(),
            },
        )

    def _transcript(self) -> dict[str, Any]:
        """The ``transcribe`` sink's section of session.json (nothing without that sink)."""
        sink = self.sink.sinks.get("transcribe") if self.sink is not None else None
        report = getattr(sink, "report", None)
        return report() if callable(report) else {}

    async def _write_live(self) -> None:
        while not self.done.is_set():
            try:
                await asyncio.to_thread(self.write_report, finished=False)
            except Exception:
                log.exception("could not write the live session.json")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), LIVE_REPORT_EVERY)

    async def finish(self) -> Path:
        """Stop listening, wait for every sink to close its files, write the final report."""
        self.vc.stop_listening()
        await self.done.wait()  # every sink closed (a transcript may wait for its last utterances)
        if self._writer is not None:
            await self._writer
        return await asyncio.to_thread(self.write_report, finished=True)


def summary(session: Session, report: dict[str, Any]) -> str:
    """The reply to ``stop``: who was recorded, how well, and where the files are."""
    lines = [
        f"Recorded {report['duration']:.1f} s in {report.get('channel') or 'voice'}: "
        f"{len(report['members'])} member(s), sinks {', '.join(session.names)}."
    ]
    for member in report["members"]:
        stats = member.get("stats") or {}
        speech = sum(end - start for start, end in member["speech"])
        lines.append(
            f"- {member['name']}: {speech:.1f} s of speech, {stats.get('packets', 0)} packets, "
            f"{stats.get('lost', 0)} lost ({stats.get('recovered_fec', 0)} recovered by FEC, "
            f"{stats.get('concealed', 0)} concealed), {stats.get('dave_failures', 0)} undecryptable"
        )
    lines.append(f"{len(report['files'])} file(s) in `{session.folder}`.")
    if session.error is not None:
        lines.append(f"Errors: {session.error}")
    text = "\n".join(lines)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


class Captions:
    """Live captions in a text channel: each transcribed utterance as a line, batched into one
    message every :data:`CAPTIONS_EVERY` seconds at most (never a line lost to a rate limit)."""

    def __init__(self, channel: discord.abc.Messageable) -> None:
        self.channel = channel
        self.lines: list[str] = []
        self._lock = asyncio.Lock()
        self._last = -CAPTIONS_EVERY  # loop time of the last message
        self._task: asyncio.Task[None] | None = asyncio.create_task(self._post_every())

    def add(self, member: discord.abc.User, utterance: Any) -> None:
        """Queue ``utterance`` (a listening_sink_transcribe.Utterance) of ``member``."""
        if utterance.text:
            self.lines.append(f"`{utterance.start:6.1f} s` **{member.display_name}**: {utterance.text}")

    async def _post_every(self) -> None:
        while True:
            await asyncio.sleep(CAPTIONS_EVERY)
            await asyncio.shield(self.flush())  # close() lets a message being posted finish

    async def flush(self) -> None:
        """Post what is queued, in messages of up to 2000 characters, :data:`CAPTIONS_EVERY` apart."""
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self.lines:
            await asyncio.sleep(max(0.0, self._last + CAPTIONS_EVERY - loop.time()))
            text, taken = "", 0
            for line in self.lines:
                if text and len(text) + 1 + len(line) > MAX_MESSAGE:
                    break
                text, taken = (f"{text}\n{line}" if text else line[:MAX_MESSAGE]), taken + 1
            try:
                await self.channel.send(text, allowed_mentions=discord.AllowedMentions.none())
            except discord.HTTPException:
                log.exception("could not post %d caption line(s); they are in the transcript", taken)
            self._last = loop.time()
            del self.lines[:taken]

    async def close(self) -> None:
        """Stop the timer and post the rest."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()


def attachments(session: Session, limit: int) -> tuple[list[discord.File], list[str]]:
    """The mixdown, the timeline and the transcript as attachments, within the upload ``limit`` (bytes)."""
    wanted = [p for sink, p in session.files() if sink == "mixdown" and p.suffix == ".wav"]
    wanted += [p for sink, p in session.files() if sink == "transcribe" and p.name == "transcript.srt"]
    timeline = session.folder / "timeline.png"
    if timeline.exists():
        wanted.append(timeline)
    files, skipped, total = [], [], 0
    for path in wanted:
        size = path.stat().st_size
        if total + size > limit:
            skipped.append(f"{path.name} ({size / 2**20:.1f} MiB) is over the upload limit")
            continue
        total += size
        files.append(discord.File(path, filename=path.name))
    return files, skipped


class Recorder(commands.Cog):
    """The recording commands; sessions go under ``output`` (default ``recordings``)."""

    default_sinks: tuple[str, ...] = DEFAULT_SINKS
    """What a bare ``record`` records with."""

    def __init__(self, bot: commands.Bot, output: Path | None = None) -> None:
        self.bot: commands.Bot = bot
        self.output: Path = output if output is not None else Path("recordings")
        self.sessions: dict[int, Session] = {}
        self.captions: dict[int, Captions] = {}
        """Live captions by guild id, from ``record`` with ``transcribe`` until ``stop`` has posted the last."""

    def plan(self, request: str, folder: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """The sinks and options ``record REQUEST`` records with into ``folder``: the one place
        where sinks are chosen, their outputs placed and their options checked (before joining).

        Raises :class:`ValueError` or :class:`~listening_core.errors.ListeningError` (an unknown
        sink, a bad option) with a message for the member.
        """
        names, options = parse_request(request, self.default_sinks)
        place_outputs(names, options, folder)
        for name in names:
            default_registry().validate_options(name, options.get(name))
        return names, options

    @commands.hybrid_command()  # type: ignore[arg-type]  # discord.py's typing of methods here
    async def record(self, ctx: commands.Context[commands.Bot], *, request: str = "") -> None:
        """Join your voice channel and record: SINK ... SINK.OPTION=VALUE ..."""
        await ctx.defer()  # a slash command must be answered within 3 s; joining voice can take longer
        if ctx.guild is None:
            await ctx.reply("Recording works in a server, not in direct messages.")
            return
        if ctx.guild.id in self.sessions:
            await ctx.reply("Already recording here; `stop` first.")
            return
        voice = getattr(ctx.author, "voice", None)
        if voice is None or voice.channel is None:
            await ctx.reply("Join a voice channel first, then `record` again.")
            return
        try:
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
            where = safe_filename(f"{stamp}-{ctx.guild.name}-{voice.channel.name}").replace(" ", "-")
            folder = self.output / where
            names, options = self.plan(request, folder)
        except (ListeningError, ValueError) as exc:
            await ctx.reply(f"Cannot record that:\n```\n{str(exc)[:1800]}\n```")
            return
        vc = ctx.guild.voice_client
        if vc is None:
            vc = await voice.channel.connect(cls=VoiceClient)
        if not isinstance(vc, VoiceClient):
            await ctx.reply("This bot is in voice without listening_core.VoiceClient; disconnect it first.")
            return
        if vc.channel != voice.channel:
            await vc.move_to(voice.channel)
        folder.mkdir(parents=True, exist_ok=True)
        session = Session(vc, folder, names)
        session.start(options)
        self.sessions[ctx.guild.id] = session
        if "transcribe" in names:
            self.captions[ctx.guild.id] = Captions(ctx.channel)
        log.info("recording %s with %s into %s", voice.channel, ", ".join(names), folder)
        await ctx.reply(f"Recording {voice.channel.mention} with {', '.join(names)}. `stop` when done.")

    @commands.hybrid_command()  # type: ignore[arg-type]  # discord.py's typing of methods here
    async def pause(self, ctx: commands.Context[commands.Bot]) -> None:
        """Pause the recording (the time in between becomes silence)."""
        session = await self._session(ctx)
        if session is not None:
            session.vc.pause_listening()
            await ctx.reply("Paused. `resume` to go on.")

    @commands.hybrid_command()  # type: ignore[arg-type]  # discord.py's typing of methods here
    async def resume(self, ctx: commands.Context[commands.Bot]) -> None:
        """Resume a paused recording."""
        session = await self._session(ctx)
        if session is not None:
            session.vc.resume_listening()
            await ctx.reply("Recording again.")

    @commands.hybrid_command()  # type: ignore[arg-type]  # discord.py's typing of methods here
    async def stop(self, ctx: commands.Context[commands.Bot]) -> None:
        """Stop recording; reply with a summary, the mixdown and the timeline."""
        session = await self._session(ctx)
        if session is None or ctx.guild is None:
            return
        await ctx.defer()  # finishing every file can take longer than a slash command's 3 s
        del self.sessions[ctx.guild.id]
        try:
            path = await session.finish()
        finally:
            captions = self.captions.pop(ctx.guild.id, None)
            if captions is not None:
                await captions.close()  # the last utterances are transcribed as the session finishes
        report = json.loads(path.read_text(encoding="utf-8"))
        files, skipped = attachments(session, ctx.guild.filesize_limit)
        text = summary(session, report)
        if skipped:
            text = (text + "\n" + "\n".join(skipped))[:MAX_MESSAGE]
        await ctx.reply(text, files=files)
        await session.vc.disconnect()

    @commands.hybrid_command()  # type: ignore[arg-type]  # discord.py's typing of methods here
    async def plugins(self, ctx: commands.Context[commands.Bot]) -> None:
        """List the installed sinks and their options."""
        registry = default_registry()
        lines = []
        for spec in registry.specs():
            options = ", ".join(info.name for info in describe(spec)) or "no options"
            lines.append(f"**{spec.name}**: {spec.summary} ({options})")
        await ctx.reply(
            "\n".join(lines)[:MAX_MESSAGE] or "No sinks installed: pip install listening-sink-wav"
        )

    @commands.Cog.listener()
    async def on_listening_transcript(
        self, member: discord.abc.User, utterance: Any, vc: VoiceClient
    ) -> None:
        """An utterance was transcribed (by the ``transcribe`` sink): caption it."""
        captions = self.captions.get(vc.guild.id) if vc.guild is not None else None
        if captions is not None:
            captions.add(member, utterance)

    async def _session(self, ctx: commands.Context[commands.Bot]) -> Session | None:
        session = self.sessions.get(ctx.guild.id) if ctx.guild else None
        if session is None:
            await ctx.reply("Not recording here; `record` starts.")
        return session


def make_bot(output: Path, *, prefix: str = "!", sync: bool = False, **options: Any) -> commands.Bot:
    """The bot, with the :class:`Recorder` commands; ``options`` go to ``commands.Bot``."""
    intents = discord.Intents.default()
    intents.message_content = True
    intents.voice_states = True

    class RecordBot(commands.Bot):
        async def setup_hook(self) -> None:
            await self.add_cog(Recorder(self, output))
            if sync:
                await self.tree.sync()

        async def on_ready(self) -> None:
            log.info("logged in as %s; type %srecord in a server", self.user, prefix)

        async def on_command_error(self, ctx: commands.Context[Any], error: commands.CommandError) -> None:
            if isinstance(error, commands.CommandNotFound):
                return
            log.error("command %s failed", ctx.command, exc_info=error)
            await ctx.reply(f"That failed: {getattr(error, 'original', error)}")

    return RecordBot(command_prefix=prefix, intents=intents, **options)


async def setup(bot: commands.Bot) -> None:
    """The extension's entry point: ``await bot.load_extension("listening_core.ext.recorder")`` adds
    :class:`Recorder`, saving under ``recordings/`` of the working directory (for another folder,
    ``await bot.add_cog(Recorder(bot, folder))`` instead)."""
    await bot.add_cog(Recorder(bot))


async def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run the bot (``python -m listening_core.ext.recorder --help``); the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Record Discord voice channels with listening-core."
    )
    parser.add_argument("--local", metavar="FILE", help="run against a loopback Discord (its address file)")
    parser.add_argument("--output", default="recordings", help="where sessions go (default: recordings)")
    parser.add_argument("--prefix", default="!", help="command prefix (default: !)")
    parser.add_argument("--sync", action="store_true", help="register the slash commands with Discord")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output = Path(args.output)
    if args.local:
        from ..testing import LoopbackAddress

        try:
            address = LoopbackAddress.load(args.local)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        bot = make_bot(output, prefix=args.prefix, sync=args.sync, connector=address.connector())
        token = address.token
    else:
        token = os.environ.get("DISCORD_TOKEN", "")
        if not token:
            print("Set DISCORD_TOKEN to your bot's token (or use --local FILE).", file=sys.stderr)
            return 2
        bot = make_bot(output, prefix=args.prefix, sync=args.sync)
    # SIGTERM (a service manager, a container's stop, the demo) closes the bot as Ctrl-C does; a
    # process started in the background by a shell ignores SIGINT, so this is the signal to rely on
    with contextlib.suppress(NotImplementedError):  # no loop signal handlers on Windows
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, lambda: asyncio.ensure_future(bot.close())
        )
    async with bot:
        await bot.start(token)
    return 0


def run(prog: str | None = None) -> None:
    """Run :func:`main` until it returns or Ctrl-C, and exit with its status."""
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main(prog=prog)))


if __name__ == "__main__":
    run("python -m listening_core.ext.recorder")
