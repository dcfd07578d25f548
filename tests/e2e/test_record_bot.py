"""examples/record_bot.py's commands, driven through the loopback Discord as a member would type them.

(The whole bot in its own process, with six sinks, is tested by ``test_demo.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import soundfile

from listening_core.testing import LocalDiscord, Schedule
from listening_core.testing.world import Message

ROOT = Path(__file__).resolve().parents[2]
BOT = ROOT / "examples" / "record_bot.py"


def load_bot_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("record_bot_under_test", BOT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Chat:
    """A member typing in the text channel and reading the bot's replies."""

    def __init__(self, local: LocalDiscord, bot_id: int) -> None:
        self.local = local
        self.bot_id = bot_id
        self.seen = 0

    async def say(self, author: Any, text: str, timeout: float = 60.0) -> Message:
        before = len(self.local.messages())
        await self.local.post_message(author, text)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            replies = [m for m in self.local.messages()[before:] if m.author.id == self.bot_id]
            if replies:
                return replies[0]
            assert loop.time() < deadline, f"the bot did not answer {text!r}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def bot_session(tmp_path: Path) -> AsyncIterator[tuple[LocalDiscord, Chat, Path]]:
    module = load_bot_module()
    async with LocalDiscord() as local:
        account = local.add_bot("recorder")
        bot = module.make_bot(tmp_path / "recordings", connector=local.connector(), guild_ready_timeout=0.1)
        runner = asyncio.ensure_future(bot.start(account.token))
        # as a task, so that start() runs first (3.12+ awaits a bare coroutine here at once)
        await asyncio.wait_for(asyncio.ensure_future(bot.wait_until_ready()), 30)
        try:
            yield local, Chat(local, account.user.id), tmp_path / "recordings"
        finally:
            await bot.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(runner, 10)


async def test_commands_explain_what_to_do(bot_session: tuple[LocalDiscord, Chat, Path]) -> None:
    local, chat, _ = bot_session
    erin = local.add_member("erin")
    reply = await chat.say(erin.user, "!record")
    assert "Join a voice channel first" in reply.content
    await erin.join()
    reply = await chat.say(erin.user, "!record wav nosuch")
    assert "Cannot record that" in reply.content and "pip install listening-sink-nosuch" in reply.content
    reply = await chat.say(erin.user, "!record wav wav.chanels=1")
    assert "channels" in reply.content and "did you mean" in reply.content.lower()
    reply = await chat.say(erin.user, "!record wav bitrate=3")
    assert "SINK.OPTION=VALUE" in reply.content
    reply = await chat.say(erin.user, "!stop")
    assert "Not recording here" in reply.content
    reply = await chat.say(erin.user, "!plugins")
    for name in ("wav", "mixdown", "ogg-opus", "vad-segments"):
        assert f"**{name}**" in reply.content
    assert chat.bot_id not in local.world.voice_states  # refused requests never joined voice


@pytest.mark.timeout(180)
async def test_record_pause_resume_stop(bot_session: tuple[LocalDiscord, Chat, Path]) -> None:
    local, chat, recordings = bot_session
    erin = local.add_member("erin")
    await erin.join()
    reply = await chat.say(erin.user, "!record wav mixdown wav.channels=1")
    assert reply.content.startswith("Recording"), reply.content
    await asyncio.sleep(1.0)  # the bot's DAVE session settles
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    erin.speak(Schedule.from_clips([("three-phrases", 0.0)]), start_at=t0)  # 4.8 s of speech

    async def at(offset: float) -> None:
        await asyncio.sleep(max(0.0, t0 + offset - loop.time()))

    await at(1.5)
    assert "Paused" in (await chat.say(erin.user, "!pause")).content
    await at(3.0)
    assert "Recording again" in (await chat.say(erin.user, "!resume")).content
    await at(5.5)
    summary = await chat.say(erin.user, "!stop")
    assert "erin" in summary.content and "member(s)" in summary.content
    names = sorted(a.filename for a in summary.attachments)
    assert names[0].startswith("mixdown-") and names[0].endswith(".wav") and names[1] == "timeline.png"

    (folder,) = [p for p in recordings.iterdir() if p.is_dir()]
    report = json.loads((folder / "session.json").read_text())
    assert report["finished"] is True and report["sinks"] == ["wav", "mixdown"]
    (member,) = report["members"]
    assert member["name"] == "erin"
    files = {f["path"] for f in report["files"]}
    assert "wav/erin.wav" in files and any(p.startswith("mixdown/") for p in files)

    audio, rate = soundfile.read(folder / "wav" / "erin.wav", dtype="int16")
    assert rate == 48_000 and audio.ndim == 1  # wav.channels=1 reached the sink
    # Speech started at t0 + 0; in the file, sample 0 is when listening started.
    first = member["speech"][0][0]

    def loud(a: float, b: float) -> float:
        chunk = audio[int((first + a) * rate) : int((first + b) * rate)]
        return float(np.abs(chunk.astype(np.int32)).max()) if len(chunk) else 0.0

    assert loud(0.2, 1.2) > 1000  # recorded before the pause
    assert loud(1.9, 2.6) == 0  # paused: kept as silence, time ran on
    assert loud(3.5, 4.5) > 1000  # recorded after the resume


def test_without_a_token_it_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    proc = subprocess.run(
        [sys.executable, str(BOT)], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "Set DISCORD_TOKEN" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(BOT), "--local", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "listening demo" in proc.stderr


def test_parse_request() -> None:
    module = load_bot_module()
    assert module.parse_request("") == (["wav", "mixdown"], {})
    assert module.parse_request("wav mp3 mp3.bitrate=96 vad-segments.directory='a b'") == (
        ["wav", "mp3", "vad-segments"],
        {"mp3": {"bitrate": 96}, "vad-segments": {"directory": "a b"}},
    )
    assert module.parse_request("flac.compression_level=8") == (["flac"], {"flac": {"compression_level": 8}})
    with pytest.raises(ValueError, match=r"SINK\.OPTION=VALUE"):
        module.parse_request("=3")
