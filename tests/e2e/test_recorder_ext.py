"""``listening_core.ext.recorder`` as a discord.py extension: loaded into a bot of one's own."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import discord
import pytest
from discord.ext import commands

from listening_core.ext.recorder import DEFAULT_SINKS, Recorder
from listening_core.testing import LocalDiscord

from .test_record_bot import Chat


async def test_load_extension_adds_the_recording_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    intents = discord.Intents.default()
    intents.message_content = True

    class MyBot(commands.Bot):
        async def setup_hook(self) -> None:
            await self.load_extension("listening_core.ext.recorder")

    async with LocalDiscord() as local:
        account = local.add_bot("mine")
        bot = MyBot(command_prefix="!", intents=intents, connector=local.connector(), guild_ready_timeout=0.1)
        runner = asyncio.ensure_future(bot.start(account.token))
        try:
            # as a task, so that start() runs first (3.12+ awaits a bare coroutine here at once)
            await asyncio.wait_for(asyncio.ensure_future(bot.wait_until_ready()), 30)
            cog = bot.get_cog("Recorder")
            # load_extension imports its own copy of the module: compare by name
            assert type(cog).__qualname__ == "Recorder" and type(cog).__module__ == Recorder.__module__
            assert cog.output == Path("recordings")  # relative to where the bot runs
            assert {"record", "pause", "resume", "stop", "plugins"} <= {c.name for c in bot.commands}
            chat = Chat(local, account.user.id)
            erin = local.add_member("erin")
            assert "Join a voice channel first" in (await chat.say(erin.user, "!record")).content
            assert "**wav**" in (await chat.say(erin.user, "!plugins")).content
        finally:
            await bot.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(runner, 10)


def test_plan_places_each_sinks_output_and_checks_options(tmp_path: Path) -> None:
    recorder = Recorder(commands.Bot(command_prefix="!", intents=discord.Intents.default()), tmp_path)
    names, options = recorder.plan("", tmp_path / "s")
    assert tuple(names) == DEFAULT_SINKS
    assert options["wav"]["directory"] == str(tmp_path / "s" / "wav")
    names, options = recorder.plan("vad-segments mp3.bitrate=96", tmp_path / "s")
    assert names == ["vad-segments", "mp3"] and options["mp3"] == {
        "bitrate": 96,
        "directory": str(tmp_path / "s" / "mp3"),
    }
    with pytest.raises(ValueError, match="did you mean"):
        recorder.plan("wav wav.chanels=1", tmp_path / "s")
