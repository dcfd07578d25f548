"""Tests of the speech-log sink: offline with made-up frames, then end to end with the
``local_discord`` fixture that installing listening-core gives pytest."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from listening_sink_speech_log import SpeechLogOptions, SpeechLogSink

from listening_core import AudioFrame, FrameKind
from listening_core.plugins import OptionsError, default_registry, describe
from listening_core.testing import LocalDiscord, Schedule, record

SILENCE = b"\xf8\xff\xfe"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_registry_lists_it_with_its_options() -> None:
    spec = default_registry().get("speech-log")  # found through the entry point
    assert spec.distribution == "listening-sink-speech-log" and spec.wants_pcm is False
    assert [(o.name, bool(o.help)) for o in describe(spec)] == [
        ("path", True),
        ("gap_ms", True),
        ("append", True),
    ]
    with pytest.raises(OptionsError, match="gap_ms"):
        default_registry().validate_options("speech-log", {"gap_ms": -1})


def test_spurts_end_at_silence_frames_and_gaps(tmp_path: Path) -> None:
    sink = SpeechLogSink(SpeechLogOptions(path=tmp_path / "log.jsonl", gap_ms=100))

    def frame(position: int, kind: FrameKind) -> AudioFrame:
        return AudioFrame(7, 1, 0, 0, position, kind, opus=SILENCE if kind is FrameKind.SILENCE else b"x")

    kinds = [FrameKind.RECEIVED] * 8 + [FrameKind.FEC, FrameKind.PLC] + [FrameKind.RECEIVED] * 2
    for i, kind in enumerate(kinds):  # 0.00 .. 0.24 s, then the silence tail
        sink.on_audio(frame(960 * i, kind))
    for i in range(12, 17):
        sink.on_audio(frame(960 * i, FrameKind.SILENCE))
    for i in range(50, 60):  # 1.00 .. 1.20 s, no silence tail...
        sink.on_audio(frame(960 * i, FrameKind.RECEIVED))
    for i in range(70, 75):  # ...and a 200 ms pause: a new spurt
        sink.on_audio(frame(960 * i, FrameKind.RECEIVED))
    sink.on_stop(960 * 100)
    sink.cleanup()
    got = [
        (line["start"], line["end"], line["frames"], line["lost"], line["concealed"])
        for line in _lines(sink.path)
    ]
    assert got == [(0.0, 0.24, 12, 2, 1), (1.0, 1.2, 10, 0, 0), (1.4, 1.5, 5, 0, 0)]


async def test_spurts_match_the_schedule(local_discord: LocalDiscord, tmp_path: Path) -> None:
    # members join, a bot with listening_core.VoiceClient joins (DAVE ready) and listens; the
    # members speak from 0.3 s after listen() started; then listening stops and the bot leaves
    rec = await record(
        local_discord,
        "speech-log",  # by name: the installed plugin
        options={"path": str(tmp_path / "log.jsonl")},
        schedules={  # talk spurts with pauses between them
            "alice": Schedule.from_clips([("alice", 0.0), ("dave", 4.0)]),
            "bob": Schedule.from_clips([("bob", 1.0), ("carol", 5.0), ("alice", 8.0)]),
        },
        settle=0.0,
        lead=0.3,
        timeout=20,
    )
    sink, loop = rec.sink, asyncio.get_running_loop()
    assert isinstance(sink, SpeechLogSink) and sink.session is not None
    # the session time of the schedules' start: loop time -> wall clock -> seconds since listen() started
    origin = rec.speak_at - loop.time() + time.time() - sink.session.started_at
    lines = _lines(tmp_path / "log.jsonl")
    for name, schedule in rec.schedules.items():
        member = rec.members[name]
        mine = [line for line in lines if line["user_id"] == member.user_id]
        assert [line["user"] for line in mine] == [member.user.name] * len(schedule.spurts)
        for line, spurt in zip(mine, schedule.spurts, strict=True):
            start = origin + spurt.first_slot * 0.02
            end = start + spurt.frame_count * 0.02  # the first silence frame
            assert abs(line["start"] - start) <= 0.04, (line, start)
            assert abs(line["end"] - end) <= 0.04, (line, end)
            assert line["frames"] == spurt.frame_count and line["lost"] == 0
