"""The receive pipeline end to end: VoiceClient.listen through the loopback Discord."""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

import discord
import pytest

from listening_core import AudioFrame, AudioSink, FrameKind, VoiceClient
from listening_core.testing import LocalDiscord, Schedule
from listening_core.testing.clients import close_client, connect_client
from listening_core.testing.media import reference_decode

from .helpers import wait_dave_ready

MODES = ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"]


class CollectingSink(AudioSink):
    """Keeps every frame, per user, in arrival order; records the thread it was called on."""

    def __init__(self) -> None:
        self.frames: dict[int, list[AudioFrame]] = collections.defaultdict(list)
        self.cleaned = 0
        self.threads: set[str] = set()

    def on_audio(self, frame: AudioFrame) -> None:
        self.threads.add(threading.current_thread().name)
        self.frames[frame.user_id].append(frame)

    def cleanup(self) -> None:
        self.cleaned += 1


async def _recorder(local: LocalDiscord) -> tuple[discord.Client, VoiceClient]:
    client = await connect_client(local, local.add_bot("recorder"))
    channel = client.get_channel(local.world.voice_channel_id)
    assert isinstance(channel, discord.VoiceChannel)
    vc = await asyncio.wait_for(channel.connect(cls=VoiceClient), 20)
    assert isinstance(vc, VoiceClient)
    return client, vc


def _stop_and_wait(vc: VoiceClient) -> Any:
    vc.stop_listening()
    return vc.wait_for_listen_ready()


@pytest.mark.parametrize("mode", MODES)
async def test_three_members_exact_and_aligned(mode: str) -> None:
    async with LocalDiscord(modes=(mode,)) as local:
        members = [local.add_member(name) for name in ("alice", "bob", "carol")]
        for member in members:
            await member.join()
        client, vc = await _recorder(local)
        try:
            await wait_dave_ready(vc, epoch=1)
            await asyncio.sleep(0.3)  # let the last epoch settle
            sink = CollectingSink()
            after_calls: list[tuple[Any, Any]] = []
            vc.listen(sink, after=lambda s, e: after_calls.append((s, e)))
            receiver = vc._receiver
            assert receiver is not None
            loop = asyncio.get_running_loop()
            schedules = {
                members[0]: Schedule.from_clips([("alice", 0.0), ("dave", 3.5)]),
                members[1]: Schedule.from_clips([("bob", 0.5), ("carol", 4.0)]),
                members[2]: Schedule.from_clips([("carol", 1.0), ("three-phrases", 3.6)]),
            }
            starts = {}
            tasks = []
            for member, schedule in schedules.items():
                start = loop.time() + 0.2
                starts[member] = start
                tasks.append(member.speak(schedule, start_at=start))
            await asyncio.gather(*tasks)
            await asyncio.sleep(0.3)
            await _stop_and_wait(vc)

            assert sink.cleaned == 1 and after_calls == [(sink, None)]
            assert all(name.startswith("listening-core-delivery") for name in sink.threads)
            for member, schedule in schedules.items():
                got = sink.frames[member.user_id]
                sent = member.sent
                assert [f.sequence for f in got] == [s.sequence for s in sent]
                assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in got)
                # exactness: sample for sample the reference decode of what the member sent
                reference = reference_decode([s.opus for s in sent])
                assert b"".join(f.pcm or b"" for f in got) == reference
                # silence where the sender was silent: positions follow the send schedule exactly
                first_sample = next(schedule.frames()).sample
                offsets = [f.position - got[0].position for f in got]
                assert offsets == [frame.sample - first_sample for frame in schedule.frames()]
                # alignment: the first frame sits where the member sent it, within 10 ms
                send_pos = receiver.clock.sample_at(_monotonic_of(starts[member], loop)) + first_sample
                assert abs(got[0].position - send_pos) <= 480
            stats = vc.listening_stats()
            for member in members:
                s = stats[member.user_id]
                assert s.lost == 0 and s.concealed == 0 and s.dave_failures == 0 and s.duplicates == 0
                assert s.frames == len(member.sent)
        finally:
            await close_client(client)


def _monotonic_of(loop_time: float, loop: asyncio.AbstractEventLoop) -> float:
    """asyncio's loop clock is time.monotonic() on Linux; keep the conversion in one place."""
    import time

    return loop_time - loop.time() + time.monotonic()
