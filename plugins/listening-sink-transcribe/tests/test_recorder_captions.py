"""The recording bot (``listening_core.ext.recorder``) with the ``transcribe`` sink: live captions in
the text channel, batched, and the transcript attached at ``stop``; driven as a member would."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from pathlib import Path

import pytest
from test_sink_transcribe import MAX_WER, MODEL, TEXT, word_error_rate  # this directory

from listening_core.ext.recorder import CAPTIONS_EVERY, make_bot
from listening_core.testing import LocalDiscord, Schedule


@pytest.mark.timeout(180)
async def test_live_captions_and_the_transcript(tmp_path: Path) -> None:
    async with LocalDiscord() as local:
        account = local.add_bot("recorder")
        bot = make_bot(tmp_path / "recordings", connector=local.connector(), guild_ready_timeout=0.1)
        runner = asyncio.ensure_future(bot.start(account.token))
        try:
            # as a task, so that start() runs first (3.12+ awaits a bare coroutine here at once)
            await asyncio.wait_for(asyncio.ensure_future(bot.wait_until_ready()), 30)
            erin = local.add_member("erin")
            await erin.join()

            def from_bot() -> list[str]:
                return [m.content for m in local.messages() if m.author.id == account.user.id]

            engine = json.dumps({"model": MODEL, "cpu_threads": 2})
            await local.post_message(
                erin.user, f"!record transcribe transcribe.language=en 'transcribe.engine_options={engine}'"
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not any(text.startswith("Recording") for text in from_bot()):
                assert loop.time() < deadline, from_bot()
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the bot's DAVE session settles
            clips = [("meeting-bob", 0.0), ("bob", 4.0)]
            await erin.speak(Schedule.from_clips(clips))
            # the first utterance's caption comes while erin still speaks or soon after
            deadline = loop.time() + 30
            while not any("**erin**" in text for text in from_bot()):
                assert loop.time() < deadline, from_bot()
                await asyncio.sleep(0.1)
            await local.post_message(erin.user, "!stop")
            deadline = loop.time() + 60
            while not (
                summary := [m for m in local.messages() if m.author.id == account.user.id and m.attachments]
            ):
                assert loop.time() < deadline, from_bot()
                await asyncio.sleep(0.1)
        finally:
            await bot.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(runner, 10)
    messages = [m for m in local.messages() if m.author.id == account.user.id]
    captions = [m for m in messages if "**erin**" in m.content]
    lines = [line for m in captions for line in m.content.splitlines()]
    assert len(lines) == 2 and all("**erin**:" in line for line in lines), lines
    heard = " ".join(line.split("**erin**: ", 1)[1] for line in lines)
    assert word_error_rate(" ".join(TEXT[c] for c, _ in clips), heard) <= MAX_WER, heard
    # batched: never two caption messages closer than CAPTIONS_EVERY
    times = [m.created_at.timestamp() for m in captions]
    assert all(b - a >= CAPTIONS_EVERY - 0.05 for a, b in itertools.pairwise(times))
    assert "transcript.srt" in [a.filename for a in summary[0].attachments]
    (folder,) = [p for p in (tmp_path / "recordings").iterdir() if p.is_dir()]
    report = json.loads((folder / "session.json").read_text())
    section = report["transcript"]
    assert [u["text"] for u in section["utterances"]] == [line.split("**erin**: ", 1)[1] for line in lines]
    assert section["members"][0]["name"] == "erin" and section["members"][0]["transcribed"] == 2
