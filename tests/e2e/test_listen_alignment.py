"""Alignment over a long session: every spurt lands where the sender put it, for every user."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from listening_core import AudioFrame, AudioSink
from listening_core.testing import LocalDiscord, Schedule
from listening_core.testing.clients import close_client
from listening_core.testing.media import list_clips

from .helpers import wait_dave_ready
from .test_listen import _recorder, _stop_and_wait

SESSION = 300.0  # five minutes
TOLERANCE = 480  # 10 ms at 48 kHz


class FirstFrames(AudioSink):
    """Keeps only (sequence, position) of each frame: a five-minute session stays small."""

    def __init__(self) -> None:
        self.placed: dict[int, dict[int, int]] = {}

    def on_audio(self, frame: AudioFrame) -> None:
        self.placed.setdefault(frame.user_id, {})[frame.sequence] = frame.position


@pytest.mark.timeout(SESSION + 240)
async def test_spurts_stay_aligned_over_five_minutes() -> None:
    async with LocalDiscord(seed=5) as local:
        members = [local.add_member(name) for name in ("alice", "bob", "carol")]
        for member in members:
            await member.join()
        client, vc = await _recorder(local)
        try:
            await wait_dave_ready(vc, epoch=1)
            await asyncio.sleep(0.3)
            sink = FirstFrames()
            vc.listen(sink)
            receiver = vc._receiver
            assert receiver is not None
            rng = random.Random(5)
            clips = [c for c in list_clips() if c != "three-phrases"]
            loop = asyncio.get_running_loop()
            begin = loop.time() + 0.2
            plans, schedules = [], {}
            for i, member in enumerate(members):
                spurts, t = [], 0.3 * i
                while t < SESSION - 8:
                    spurts.append((rng.choice(clips), t))
                    t += 3.3 + rng.uniform(0.3, 3.0)
                schedules[member] = Schedule.from_clips(spurts)
                plans.append(member.speak(schedules[member], start_at=begin))
            await asyncio.gather(*plans)
            await asyncio.sleep(0.3)
            await _stop_and_wait(vc)

            assert client.user is not None
            call = local.calls[local.world.voice_channel_id]
            origin = receiver.clock.sample_at(
                begin - loop.time() + time.monotonic()
            )  # session sample of `begin`
            for member in members:
                placed = sink.placed[member.user_id]
                relayed = call.relay.sent[(member.user_id, client.user.id)]
                assert len(placed) == len(relayed) == len(member.sent)
                scheduled = [frame.sample for frame in schedules[member].frames()]
                assert len(scheduled) == len(member.sent)
                # the first frame of every talk spurt, against where the schedule put it
                starts = [
                    (sent, sample)
                    for prev, sent, sample in zip([None, *member.sent], member.sent, scheduled, strict=False)
                    if prev is None or sent.timestamp - prev.timestamp != 960
                ]
                assert len(starts) > 40
                errors = [placed[sent.sequence] - (origin + sample) for sent, sample in starts]
                worst = max(errors, key=abs)
                assert abs(worst) <= TOLERANCE, f"{member.user.name}: spurt misplaced by {worst} samples"
        finally:
            await close_client(client)
