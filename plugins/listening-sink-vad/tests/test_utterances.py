"""``VadSegmentsSink.utterances()``: finished utterances as an async iterator in the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf
from listening_sink_vad import Utterance, VadOptions, VadSegmentsSink

from listening_core.sinks import SessionInfo
from listening_core.testing import LocalDiscord, Schedule, record
from listening_core.testing.media import OpusEncoder, clip_path, load_pcm, reference_decode

RATE = 48_000
FRAME = 960
TRUTH = json.loads(clip_path("three-phrases").with_suffix(".json").read_text())["phrases"]


async def _collect(stream: object) -> list[Utterance]:
    return [u async for u in stream]  # type: ignore[attr-defined]


async def test_utterances_stream_end_to_end(local_discord: LocalDiscord, tmp_path: Path) -> None:
    sink = VadSegmentsSink(VadOptions(directory=tmp_path, sample_rate=16_000))
    consumer = asyncio.create_task(_collect(sink.utterances()))
    rec = await record(
        local_discord, sink, schedules={"alice": Schedule.from_clips([("three-phrases", 0.0)])}, lead=0.5
    )
    got = await asyncio.wait_for(consumer, 10)  # the end of the session ended the iterator
    alice = rec.members["alice"]
    assert [u.segment for u in got] == sink.segments and len(got) == len(TRUTH)
    member_start = alice.sent[0].time - rec.start
    for utterance, truth in zip(got, TRUTH, strict=True):
        assert utterance.user_id == alice.user_id
        assert utterance.member is not None and utterance.member.display_name == "alice"
        assert utterance.sample_rate == 16_000
        audio, rate = sf.read(utterance.segment.path, dtype="int16")
        assert rate == 16_000 and utterance.pcm == audio.tobytes()
        assert len(utterance.pcm) // 2 == round((utterance.end - utterance.start) * 16_000)
        assert abs(utterance.speech_start - (member_start + truth["start_sample"] / RATE)) <= 0.1
        assert abs(utterance.speech_end - (member_start + truth["end_sample"] / RATE)) <= 0.1
        assert utterance.start < utterance.speech_start < utterance.speech_end < utterance.end


def _decoded() -> bytes:
    return reference_decode(OpusEncoder().encode_pcm(load_pcm("three-phrases")))


async def _session(sink: VadSegmentsSink, *, end: bool = True) -> None:
    """Feed three-phrases from another thread, as the session's delivery thread does."""
    from listening_core import AudioFrame, FrameKind

    pcm = _decoded()

    def run() -> None:
        sink.on_start(SessionInfo(1, 2, time.time()))
        frames = len(pcm) // (FRAME * 4)
        for k in range(frames):
            chunk = pcm[k * FRAME * 4 : (k + 1) * FRAME * 4]
            sink.on_audio(AudioFrame(7, 7, k, 0, RATE + k * FRAME, FrameKind.RECEIVED, chunk))
        if end:
            sink.on_stop(RATE + frames * FRAME + RATE)
            sink.cleanup()

    thread = threading.Thread(target=run)
    thread.start()
    await asyncio.to_thread(thread.join)


async def test_a_consumer_that_falls_behind_loses_the_oldest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = VadSegmentsSink(VadOptions(directory=tmp_path))
    with caplog.at_level(logging.WARNING):
        async with sink.utterances(maxsize=1) as stream:
            await _session(sink)
            await asyncio.sleep(0.05)  # the utterances reached the loop; nobody took them
            got = [u async for u in stream]
    assert [u.segment for u in got] == sink.segments[-1:] and len(sink.segments) == 3
    assert sink.utterances_dropped == {7: 2}
    assert len([r for r in caplog.records if "fell behind" in r.getMessage()]) == 1
    assert len(sink.manifest_path.read_text().splitlines()) == 3  # the files keep everything


async def test_cancelling_a_consumer_is_clean(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = VadSegmentsSink(VadOptions(directory=tmp_path))

    async def consume() -> None:
        async with sink.utterances() as stream:
            async for _ in stream:
                pass

    with caplog.at_level(logging.DEBUG):
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(sink._streams) == 0
        await _session(sink)
    assert len(sink.segments) == 3 and not sink.utterances_dropped
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # once the session ended, a new stream ends at once
    assert [u async for u in sink.utterances()] == []


async def test_utterances_are_opened_in_the_event_loop(tmp_path: Path) -> None:
    sink = VadSegmentsSink(VadOptions(directory=tmp_path))
    with pytest.raises(ValueError, match="maxsize"):
        sink.utterances(maxsize=0)
    with pytest.raises(RuntimeError, match="no running event loop"):
        await asyncio.to_thread(sink.utterances)
