"""Stopping a session while many members speak: everything received is delivered, nothing is left.

The load test runs the benchmark's set-up (``bench/reliability.py``): the bot in its own process,
200 members' packets sent at real-time pace from another process straight at its socket, a
little lost and reordered on the way (so that, at the stop, frames wait in the jitter buffers).
A second listener on the bot's voice socket, called after the session's own for every datagram,
remembers what the process received before ``stop_listening()``; the sink must get all of it.

The second test holds one datagram between the session's "still open?" check and its processing
while the session stops (as a busy reader thread is held by the scheduler), which under load
happens now and then: such a datagram must be delivered, or not counted at all.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from pathlib import Path
from typing import Any

from bench.reliability import STOP_SPEAKERS, judge_stop, stop_trial
from listening_core import AudioFrame, AudioSink, FrameKind
from listening_core.testing import LocalDiscord, Schedule
from listening_core.testing.clients import close_client, join_voice
from listening_core.testing.media import Spurt, load_pcm


async def test_stop_at_200_speakers_delivers_everything_within_5_s_and_leaves_nothing(tmp_path: Path) -> None:
    result = await stop_trial(tmp_path, speakers=STOP_SPEAKERS, speak_seconds=6.0)
    verdict = judge_stop(result)
    checks = verdict["checks"]
    # under load: every member was heard (the machine may drop datagrams; what arrived counts)
    assert result["frames_during"] > STOP_SPEAKERS * 50, result["during"]
    for name in (
        "received_before_stop_delivered",
        "receiver_counts_match_sink",
        "after_called_once_without_error",
        "after_within_5_s",
        "clean_within_5_s",
        "nothing_left_behind",
    ):
        assert checks[name]["ok"], f"{name}: {checks[name]['detail']}"


class Frames(AudioSink):
    def __init__(self) -> None:
        self.frames: dict[int, list[AudioFrame]] = collections.defaultdict(list)

    def on_audio(self, frame: AudioFrame) -> None:
        self.frames[frame.user_id].append(frame)


async def test_a_datagram_racing_the_stop_is_delivered_or_not_counted() -> None:
    pcm = load_pcm("alice")[48_000 * 4 // 5 :]  # past the clip's leading silence
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await join_voice(local)
        try:
            await asyncio.sleep(0.3)  # the last DAVE epoch settles
            sink = Frames()
            finished: list[Any] = []
            vc.listen(sink, after=lambda s, e: finished.append(e))
            receiver = vc._receiver
            assert receiver is not None
            await alice.speak(Schedule([Spurt(0.0, pcm[: 48_000 * 4 // 2])]))
            await asyncio.sleep(0.3)

            # The next datagram is held on the reader thread after the session saw it open.
            entered, release = threading.Event(), threading.Event()
            transport = receiver._transport

            def held_transport() -> Any:
                if threading.current_thread().name.startswith("voice-socket-reader") and not entered.is_set():
                    entered.set()
                    release.wait(10)
                return transport()

            receiver._transport = held_transport  # type: ignore[method-assign]
            speaking = alice.speak(Schedule([Spurt(0.0, pcm[: 48_000 * 4 // 5])]))
            await asyncio.wait_for(asyncio.to_thread(entered.wait, 10), 15)
            vc.stop_listening()
            await vc.wait_for_listen_ready(timeout=10)  # the session has delivered all and ended
            release.set()
            await speaking
            await asyncio.sleep(0.3)

            assert finished == [None]
            stats = vc.listening_stats()[alice.user_id]
            frames = sink.frames[alice.user_id]
            arrived = [f for f in frames if f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE)]
            assert stats.frames == len(frames)
            # every packet the session counted was delivered or counted as dropped
            assert stats.packets == len(arrived) + stats.duplicates + stats.late + sum(
                stats.dropped.values()
            ), (
                f"{stats.packets} packets counted, {len(arrived)} delivered, {stats.duplicates} duplicates, "
                f"{stats.late} late, dropped {dict(stats.dropped)}"
            )
        finally:
            await close_client(client)
