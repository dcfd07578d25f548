"""Live streams end to end: ``async for`` over a session recorded by the wav sink too, through the loopback Discord."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import discord
import numpy as np
import soundfile

from listening_core import AudioFrame, LiveSink, PcmChunk, VoiceClient
from listening_core.testing import LocalDiscord, Schedule
from listening_core.testing.clients import close_client, connect_client

from .helpers import wait_dave_ready


async def test_streams_beside_the_wav_sink(tmp_path: Path) -> None:
    async with LocalDiscord() as local:
        alice, bob = local.add_member("alice"), local.add_member("bob")
        for member in (alice, bob):
            await member.join()
        client = await connect_client(local, local.add_bot("recorder"))
        try:
            channel = client.get_channel(local.world.voice_channel_id)
            assert isinstance(channel, discord.VoiceChannel)
            vc = await asyncio.wait_for(channel.connect(cls=VoiceClient), 20)
            assert isinstance(vc, VoiceClient)
            await wait_dave_ready(vc, epoch=1)

            live = LiveSink()
            vc.listen([live, "wav"], options={"wav": {"directory": str(tmp_path)}})
            frames: dict[int, list[AudioFrame]] = collections.defaultdict(list)
            chunks: list[PcmChunk] = []
            cancelled_saw: list[AudioFrame] = []

            async def every_frame() -> None:
                async with live.frames() as stream:
                    async for frame in stream:
                        frames[frame.user_id].append(frame)

            async def alice_at_16k() -> None:
                async for chunk in live.pcm(alice.user.id, rate=16_000, channels=1):
                    chunks.append(chunk)

            async def gives_up() -> None:
                async with live.frames(bob.user) as stream:
                    async for frame in stream:
                        cancelled_saw.append(frame)

            consumers = [asyncio.create_task(every_frame()), asyncio.create_task(alice_at_16k())]
            quitter = asyncio.create_task(gives_up())
            await asyncio.sleep(0.1)  # the consumers opened their streams
            await asyncio.gather(
                alice.speak(Schedule.from_clips([("alice", 0.0)])),
                bob.speak(Schedule.from_clips([("bob", 0.3)])),
            )
            quitter.cancel()
            await asyncio.sleep(0.3)
            vc.stop_listening()
            await asyncio.wait_for(asyncio.gather(*consumers), 20)  # the end of the session ends them
            await vc.wait_for_listen_ready()
            assert quitter.cancelled() and cancelled_saw

            stats = vc.listening_stats()
            for member in (alice, bob):
                got = frames[member.user.id]
                assert [f.sequence for f in got] == [s.sequence for s in member.sent]
                assert stats[member.user.id].frames == len(got)
                assert "stream-overflow" not in stats[member.user.id].dropped
                # the wav sink wrote the same audio the stream handed out, at the same place
                audio, rate = soundfile.read(tmp_path / f"{member.user.name}.wav", dtype="int16")
                start = got[0].position * 2
                streamed = np.frombuffer(b"".join(f.pcm or b"" for f in got), dtype="<i2")
                assert rate == 48_000
                assert np.array_equal(audio.reshape(-1)[start : start + len(streamed)], streamed)

            # Alice at 16 kHz mono: one contiguous run per talk spurt, as long as her frames
            assert {(c.user_id, c.rate, c.channels) for c in chunks} == {(alice.user.id, 16_000, 1)}
            assert sum(c.samples for c in chunks) == len(frames[alice.user.id]) * 320
            assert chunks[0].position == frames[alice.user.id][0].position
            loud = max(int(np.abs(np.frombuffer(c.pcm, dtype="<i2")).max()) for c in chunks)
            assert loud > 1000
            await vc.disconnect()
        finally:
            await close_client(client)
