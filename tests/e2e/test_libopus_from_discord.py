"""A machine where listening-core's own search finds no libopus, but discord.py has one loaded
(as on macOS, where a bot calls ``discord.opus.load_opus(path)``): listening still works."""

from __future__ import annotations

import asyncio
import collections
import ctypes.util
from pathlib import Path

import discord
import pytest
from discord import opus as discord_opus

from listening_core import AudioFrame, AudioSink, VoiceClient, opus
from listening_core.opus import LIBOPUS_ENV, LibopusSource, find_libopus
from listening_core.testing import LocalDiscord, Schedule
from listening_core.testing.clients import close_client, connect_client
from listening_core.testing.media import reference_decode

from ..test_libopus_source import real_libopus_path
from .helpers import wait_dave_ready


class Frames(AudioSink):
    def __init__(self) -> None:
        self.pcm: dict[int, list[bytes]] = collections.defaultdict(list)

    def on_audio(self, frame: AudioFrame) -> None:
        self.pcm[frame.user_id].append(frame.pcm or b"")


@pytest.fixture
def only_discord_has_libopus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "libopus-given-to-discord.so"
    path.symlink_to(real_libopus_path())
    monkeypatch.setenv(LIBOPUS_ENV, "")  # records its state, so what the loader sets is undone
    monkeypatch.delenv(LIBOPUS_ENV)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert opus._search.__wrapped__() == LibopusSource("libopus.so.0", "default soname")
    # and that fallback soname is not installed either
    monkeypatch.setattr(
        opus, "_search", lambda: LibopusSource("libopus-not-installed.so.0", "default soname")
    )
    monkeypatch.setattr(discord_opus, "_lib", None)
    discord_opus.load_opus(str(path))
    return path


async def test_listens_with_the_library_discord_py_loaded(only_discord_has_libopus: Path) -> None:
    with pytest.raises(opus.LibopusNotFound):
        opus.load_libopus(opus._search().name)  # our own search finds nothing that loads
    assert find_libopus() == LibopusSource(str(only_discord_has_libopus), "loaded by discord.py")
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        client = await connect_client(local, local.add_bot("recorder"))
        try:
            channel = client.get_channel(local.world.voice_channel_id)
            assert isinstance(channel, discord.VoiceChannel)
            vc = await asyncio.wait_for(channel.connect(cls=VoiceClient), 20)
            assert isinstance(vc, VoiceClient)
            await wait_dave_ready(vc)
            sink = Frames()
            vc.listen(sink)  # decoding workers start here, told the library through the environment
            loop = asyncio.get_running_loop()
            await alice.speak(Schedule.from_clips([("alice", 0.0)]), start_at=loop.time() + 0.2)
            await asyncio.sleep(0.3)
            vc.stop_listening()
            await vc.wait_for_listen_ready()
            got = b"".join(sink.pcm[alice.user_id])
            assert got and got == reference_decode([s.opus for s in alice.sent])
            assert vc.listening_stats()[alice.user_id].lost == 0
        finally:
            await close_client(client)
