"""Live streams (listening_core.live): a LiveSink fed from a thread, as the delivery thread feeds it."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import discord
import numpy as np
import pytest
import soundfile

from listening_core import AudioFileSink, AudioFrame, FrameKind, LiveSink, PcmChunk, UserStats, VoiceClient
from listening_core.frames import FRAME_SAMPLES, SessionInfo
from listening_core.live import OVERFLOW_REASON, live_overflow
from listening_core.resample import Resampler
from listening_core.sinks import MultiSink

ALICE, BOB, CAROL = 11, 22, 33


def tone(index: int, freq: float = 1000.0, amplitude: float = 8000.0) -> bytes:
    """Frame ``index`` of a continuous stereo sine (left = right)."""
    t = (np.arange(FRAME_SAMPLES) + index * FRAME_SAMPLES) / 48_000
    mono = np.rint(amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2")
    return np.repeat(mono, 2).tobytes()


def frame(user: int, index: int, position: int | None = None, pcm: bytes | None = None) -> AudioFrame:
    return AudioFrame(
        user_id=user,
        ssrc=user,
        sequence=index,
        timestamp=index * FRAME_SAMPLES,
        position=index * FRAME_SAMPLES if position is None else position,
        kind=FrameKind.RECEIVED,
        pcm=tone(index) if pcm is None else pcm,
    )


def interleaved(users: Iterable[int], count: int) -> list[AudioFrame]:
    return [frame(user, i) for i in range(count) for user in users]


async def deliver(sink: LiveSink | MultiSink, frames: list[AudioFrame], *, end: bool = True) -> None:
    """Feed ``frames`` from another thread, as the session's delivery thread does; then stop."""

    def run() -> None:
        for f in frames:
            sink.on_audio(f)
        if end:
            sink.on_stop(max((f.end for f in frames), default=0))
            sink.cleanup()

    thread = threading.Thread(target=run, name="listening-core-delivery-test")
    thread.start()
    await asyncio.to_thread(thread.join)


async def settle() -> None:
    """Let the drains the delivery thread scheduled run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_every_member_in_delivery_order_then_the_end() -> None:
    live = LiveSink()
    sent = interleaved((ALICE, BOB, CAROL), 40)
    got = []
    async with live.frames() as stream:
        await deliver(live, sent)
        async for f in stream:
            got.append(f)
    assert got == sent  # same objects, same order, and the loop ended on its own
    assert live.ended


async def test_one_member_by_member_object_or_id() -> None:
    live = LiveSink()
    sent = interleaved((ALICE, BOB), 30)
    by_object = live.frames(discord.Object(BOB))
    by_id = live.frames(BOB)
    await deliver(live, sent)
    got_object = [f async for f in by_object]
    got_id = [f async for f in by_id]
    assert got_object == got_id == [f for f in sent if f.user_id == BOB]
    with pytest.raises(TypeError, match="member must be"):
        live.frames("bob")  # type: ignore[arg-type]


async def test_pcm_at_16k_mono_placed_on_the_timeline() -> None:
    live = LiveSink()
    first = [frame(ALICE, i, position=4800 + i * FRAME_SAMPLES) for i in range(50)]  # 1 s from 0.1 s
    second = [frame(ALICE, 100 + i, position=96_000 + i * FRAME_SAMPLES) for i in range(10)]  # at 2 s
    other = [frame(BOB, i, pcm=bytes(FRAME_SAMPLES * 4)) for i in range(5)]
    chunks: list[PcmChunk] = []
    async with live.pcm(ALICE, rate=16_000, channels=1) as stream:
        await deliver(live, [*first, *other, *second])
        async for chunk in stream:
            chunks.append(chunk)
    assert {c.user_id for c in chunks} == {ALICE} and {(c.rate, c.channels) for c in chunks} == {(16_000, 1)}
    runs: list[list[PcmChunk]] = [[chunks[0]]]
    for chunk in chunks[1:]:  # contiguous chunks, sample for sample on the timeline
        last = runs[-1][-1]
        if chunk.position == last.position + last.samples * 3:
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    assert [r[0].position for r in runs] == [4800, 96_000]
    assert [r[0].start for r in runs] == [0.1, 2.0]
    for run, frames in zip(runs, (first, second), strict=True):
        got = np.frombuffer(b"".join(c.pcm for c in run), dtype="<i2")
        # exactly what the resampler makes of the mono mix of the run
        stereo = np.frombuffer(b"".join(f.pcm or b"" for f in frames), dtype="<i2").reshape(-1, 2)
        resampler = Resampler(48_000, 16_000, 1)
        mono = stereo.mean(axis=1)
        want = np.concatenate([resampler.process(mono), resampler.flush()])[:, 0]
        assert np.array_equal(got, np.clip(np.rint(want), -32768, 32767).astype("<i2"))
        assert len(got) == len(frames) * 320
        spectrum = np.abs(np.fft.rfft(got.astype(np.float64)))
        assert abs(np.argmax(spectrum) * 16_000 / len(got) - 1000) < 20  # still the 1 kHz tone


async def test_pcm_taken_while_the_member_speaks_is_seamless() -> None:
    live = LiveSink()
    sent = [frame(ALICE, i) for i in range(40)]
    chunks: list[PcmChunk] = []
    async with live.pcm(rate=16_000, channels=1) as stream:
        for k in range(0, 40, 7):  # the consumer keeps up: several chunks while she speaks
            await deliver(live, sent[k : k + 7], end=False)
            await settle()
            while stream._queue or stream._out:
                chunks.append(await anext(stream))
        await deliver(live, [])
        chunks.extend([c async for c in stream])
    assert len(chunks) > 6
    for before, after in itertools.pairwise(chunks):
        assert after.position == before.position + before.samples * 3
    resampler = Resampler(48_000, 16_000, 1)
    mono = np.frombuffer(b"".join(f.pcm or b"" for f in sent), dtype="<i2").reshape(-1, 2).mean(axis=1)
    want = np.concatenate([resampler.process(mono), resampler.flush()])[:, 0]
    got = np.frombuffer(b"".join(c.pcm for c in chunks), dtype="<i2")
    assert np.array_equal(got, np.clip(np.rint(want), -32768, 32767).astype("<i2"))


async def test_pcm_at_48k_stereo_is_the_frames_untouched() -> None:
    live = LiveSink()
    sent = [frame(CAROL, i) for i in range(5)]
    stream = live.pcm(rate=48_000, channels=2)
    await deliver(live, sent)
    chunks = [c async for c in stream]
    assert b"".join(c.pcm for c in chunks) == b"".join(f.pcm or b"" for f in sent)
    assert chunks[0].position == sent[0].position and chunks[-1].end == sent[-1].end / 48_000


async def test_a_consumer_that_falls_behind_loses_the_oldest_counted_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    live = LiveSink()
    sent = interleaved((ALICE, BOB), 30)  # 60 frames into a queue of 10
    with caplog.at_level(logging.WARNING, logger="listening_core.live"):
        async with live.frames(maxsize=10) as stream:
            await deliver(live, sent)
            got = [f async for f in stream]
            assert stream.dropped == 50
    assert got == sent[-10:]
    assert live.overflow == {ALICE: 25, BOB: 25}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and {str(ALICE), str(BOB)} <= {
        w for r in warnings for w in r.getMessage().split()
    }

    # and in vc.listening_stats(), beside what the session counted
    vc = VoiceClient.__new__(VoiceClient)
    vc._init_listening()
    session_stats = {ALICE: UserStats(frames=30)}
    vc._last_receiver = SimpleNamespace(stats=session_stats, sink=MultiSink({"live": live}))  # type: ignore[assignment]
    stats = vc.listening_stats()
    assert stats[ALICE].frames == 30 and stats[ALICE].dropped[OVERFLOW_REASON] == 25
    assert stats[BOB].dropped[OVERFLOW_REASON] == 25
    assert session_stats[ALICE].dropped == {}  # the session's own counts are not changed
    assert live_overflow(live) == live.overflow


async def test_stopping_ends_every_iterator_after_what_it_holds() -> None:
    live = LiveSink()
    sent = interleaved((ALICE, BOB), 20)

    async def frames() -> int:
        return len([f async for f in live.frames()])

    async def pcm() -> int:
        async with live.pcm(rate=16_000) as stream:
            return sum([c.samples async for c in stream])

    async def alice() -> int:
        return len([f async for f in live.frames(ALICE)])

    tasks = [asyncio.create_task(t()) for t in (frames, pcm, alice)]
    await settle()  # the consumers opened their streams and wait
    await deliver(live, sent)
    done = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert done == [40, 2 * 20 * 320, 20]
    # a stream opened after the end ends at once
    assert [f async for f in live.frames()] == []


async def test_a_sink_never_streamed_from_ends_cleanly() -> None:
    live = LiveSink()
    await deliver(live, interleaved((ALICE,), 5))
    assert live.ended and [f async for f in live.frames()] == []


async def test_cancelling_a_consumer_task_is_clean(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    live = LiveSink()
    got: list[AudioFrame] = []

    async def consume() -> None:
        async with live.pcm(rate=16_000) as chunks, live.frames() as frames:
            assert chunks is not None
            async for f in frames:
                got.append(f)

    with caplog.at_level(logging.DEBUG):
        task = asyncio.create_task(consume())
        await settle()  # it opened its streams and waits
        await deliver(live, interleaved((ALICE,), 3), end=False)
        await settle()
        assert len(got) == 3 and len(live._streams) == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(live._streams) == 0  # both closed by their async with
        await deliver(live, interleaved((ALICE,), 3))  # nobody listens: nothing is queued or dropped
        await settle()
    assert live.ended and not live._pending and live.overflow == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    gc.collect()
    await settle()
    assert errors == []
    loop.set_exception_handler(None)


async def test_a_dropped_stream_stops_receiving() -> None:
    live = LiveSink()
    stream = live.frames(maxsize=1)
    assert len(live._streams) == 1
    del stream
    gc.collect()
    await deliver(live, interleaved((ALICE,), 5))
    assert live.overflow == {}  # a stream nobody holds is not counted as falling behind


async def test_beside_a_file_sink_in_one_session(tmp_path: Path) -> None:
    live = LiveSink()
    sink = MultiSink({"files": AudioFileSink(tmp_path), "live": live})
    sent = interleaved((ALICE, BOB), 25)
    sink.on_start(SessionInfo(guild_id=1, channel_id=2, started_at=0.0))
    async with live.frames() as stream:
        await deliver(sink, sent)
        got = [f async for f in stream]
    assert got == sent and not sink.errors
    for user in (ALICE, BOB):
        audio, rate = soundfile.read(tmp_path / f"{user}.wav", dtype="int16")
        want = np.frombuffer(b"".join(f.pcm or b"" for f in sent if f.user_id == user), dtype="<i2")
        assert rate == 48_000 and np.array_equal(audio.reshape(-1), want)


async def test_a_live_sink_serves_one_session() -> None:
    live = LiveSink()
    await deliver(live, [])
    from listening_core.errors import SinkError

    with pytest.raises(SinkError, match="make a new one"):
        live.on_start(SessionInfo(guild_id=1, channel_id=2, started_at=0.0))


async def test_bad_arguments_say_what_to_do() -> None:
    live = LiveSink()
    with pytest.raises(ValueError, match="maxsize"):
        live.frames(maxsize=0)
    with pytest.raises(ValueError, match="rate"):
        live.pcm(rate=100)
    with pytest.raises(ValueError, match="channels"):
        live.pcm(channels=3)
    with pytest.raises(ValueError, match="maxsize"):
        LiveSink(maxsize=-1)


def test_streams_are_opened_in_the_event_loop() -> None:
    with pytest.raises(RuntimeError, match="no running event loop"):
        LiveSink().frames()


def test_a_session_that_outlives_its_event_loop_queues_nothing() -> None:
    loop = asyncio.new_event_loop()

    async def open_stream(live: LiveSink) -> object:
        return live.frames()

    live = LiveSink()
    stream = loop.run_until_complete(open_stream(live))
    loop.close()
    for f in interleaved((ALICE,), 5):
        live.on_audio(f)  # the delivery thread goes on: never an error, never a growing queue
    live.cleanup()
    assert stream is not None and live.ended and not live._pending
