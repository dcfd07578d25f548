"""The ``vad-segments`` sink: end to end on ``three-phrases``, and on decoded frames fed directly."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from listening_sink_vad import Segment, VadOptions, VadSegmentsSink, recover

from listening_core import AudioFrame, FrameKind
from listening_core.plugins import OptionsError, default_registry, describe
from listening_core.sinks import SessionInfo, SinkError
from listening_core.testing import LocalDiscord, Schedule, record
from listening_core.testing.media import OpusEncoder, clip_path, load_pcm, reference_decode
from listening_core.testing.recording import fill_disk

RATE = 48_000
FRAME = 960
TOLERANCE = 0.100  # seconds
TRUTH = json.loads(clip_path("three-phrases").with_suffix(".json").read_text())["phrases"]


def _decoded(clip: str = "three-phrases") -> bytes:
    """The clip as a receiver gets it: encoded and decoded like the loopback's frames."""
    return reference_decode(OpusEncoder().encode_pcm(load_pcm(clip)))


def _feed(sink: VadSegmentsSink, pcm: bytes, position: int, user_id: int = 7, seq: int = 0) -> int:
    for k in range(len(pcm) // (FRAME * 4)):
        chunk = pcm[k * FRAME * 4 : (k + 1) * FRAME * 4]
        sink.on_audio(
            AudioFrame(
                user_id, user_id, (seq + k) & 0xFFFF, 0, position + k * FRAME, FrameKind.RECEIVED, chunk
            )
        )
    return seq + len(pcm) // (FRAME * 4)


def _run(tmp_path: Path, pcm: bytes, position: int = 3 * RATE + 123, **options: Any) -> VadSegmentsSink:
    options.setdefault("directory", tmp_path)
    sink = VadSegmentsSink(VadOptions(**options))
    sink.on_start(SessionInfo(1, 2, time.time()))
    _feed(sink, pcm, position)
    sink.on_stop(position + len(pcm) // 4 + RATE)
    sink.cleanup()
    return sink


def _manifest(directory: Path, name: str = "segments.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / name).read_text().splitlines()]


def _check_agreement(directory: Path, segments: list[Segment], calls: list[Segment]) -> None:
    """Manifest lines == files == callback calls."""
    lines = _manifest(directory)
    files = sorted(p.name for p in directory.glob("*.wav"))
    assert sorted(line["file"] for line in lines) == files
    assert [s.manifest_line() for s in calls] == lines == [s.manifest_line() for s in segments]
    for line in lines:
        info = sf.info(str(directory / line["file"]))
        assert info.samplerate == line["sample_rate"] and info.channels == 1
        assert info.frames == line["frames"] == round((line["end"] - line["start"]) * line["sample_rate"])
        assert line["start"] <= line["speech_start"] < line["speech_end"] <= line["end"]


# ----------------------------------------------------------------------------- the plugin


def test_entry_point_and_options(tmp_path: Path) -> None:
    registry = default_registry()
    spec = registry.get("vad-segments")
    assert spec.distribution == "listening-sink-vad" and spec.options is VadOptions and spec.wants_pcm
    names = {info.name for info in describe(spec)}
    assert {"aggressiveness", "padding_ms", "min_speech_ms", "max_silence_ms", "on_segment"} <= names
    assert all(info.help for info in describe(spec))
    sink = registry.create("vad-segments", {"directory": str(tmp_path), "frame_ms": 20, "on_segment": print})
    assert isinstance(sink, VadSegmentsSink) and sink.options.frame_ms == 20
    sink.cleanup()
    for bad in (
        {"aggressiveness": 4},
        {"frame_ms": 25},
        {"sample_rate": 44100},
        {"max_silence_ms": 5},
        {"padding_ms": -1},
        {"template": "{nope}"},
        {"manifest": "../x.jsonl"},
        {"on_segment": 3},
    ):
        with pytest.raises(OptionsError):
            registry.create("vad-segments", bad)


# ------------------------------------------------------------------------------ end to end


async def test_three_phrases_end_to_end(local_discord: LocalDiscord, tmp_path: Path) -> None:
    calls: list[Segment] = []
    rec = await record(
        local_discord,
        "vad-segments",
        options={"directory": str(tmp_path), "on_segment": calls.append},
        schedules={"alice": Schedule.from_clips([("three-phrases", 0.0)])},
        lead=0.5,
    )
    sink, done, alice = rec.sink, rec.calls, rec.members["alice"]
    t0 = rec.start  # session sample 0 is taken inside listen(), just before it returns

    assert isinstance(sink, VadSegmentsSink) and done == [(sink, None)]
    member_start = alice.sent[0].time - t0  # the clip's sample 0 on the session timeline
    assert len(calls) == 3
    for segment, truth in zip(calls, TRUTH, strict=True):
        assert segment.user_id == alice.user_id and segment.user == "alice"
        assert abs(segment.speech_start - (member_start + truth["start_sample"] / RATE)) <= TOLERANCE
        assert abs(segment.speech_end - (member_start + truth["end_sample"] / RATE)) <= TOLERANCE
        assert segment.file == f"alice-{segment.index:04d}-{round(segment.start * 1000)}.wav"
        assert segment.path == tmp_path / segment.file
    assert [s.index for s in calls] == [1, 2, 3]
    _check_agreement(tmp_path, sink.segments, calls)


async def test_disk_full_reaches_after_and_the_log(
    local_discord: LocalDiscord, tmp_path: Path, caplog: Any
) -> None:
    async def fill_when_the_second_segment_opens(rec: Any) -> None:
        second = tmp_path / "alice-2.wav"
        while not second.exists():
            await asyncio.sleep(0.005)
        fill_disk(second)  # its next write fails with ENOSPC

    with caplog.at_level(logging.ERROR):
        rec = await record(
            local_discord,
            "vad-segments",
            options={"directory": str(tmp_path), "template": "{user}-{index}"},
            schedules={"alice": Schedule.from_clips([("three-phrases", 0.0)])},
            lead=0.0,
            during=fill_when_the_second_segment_opens,
        )
    done = rec.calls
    assert len(done) == 1
    error = done[0][1]
    assert isinstance(error, SinkError) and "No space left" in str(error)
    assert any("No space left" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    # what was written before is intact: the first segment and its line
    lines = _manifest(tmp_path)
    assert [line["file"] for line in lines] == ["alice-1.wav"]
    assert sf.info(str(tmp_path / "alice-1.wav")).frames == lines[0]["frames"] > 0


# ---------------------------------------------------------------- frames fed directly


@pytest.mark.parametrize("aggressiveness", [2, 3])
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_boundaries_for_each_mode_and_frame(tmp_path: Path, aggressiveness: int, frame_ms: int) -> None:
    calls: list[Segment] = []
    position = 3 * RATE + 123
    sink = _run(
        tmp_path,
        _decoded(),
        position,
        aggressiveness=aggressiveness,
        frame_ms=frame_ms,
        on_segment=calls.append,
    )
    assert len(calls) == 3
    for segment, truth in zip(calls, TRUTH, strict=True):
        assert abs(segment.speech_start * RATE - position - truth["start_sample"]) <= TOLERANCE * RATE
        assert abs(segment.speech_end * RATE - position - truth["end_sample"]) <= TOLERANCE * RATE
    _check_agreement(tmp_path, sink.segments, calls)


def test_options_change_the_outcome(tmp_path: Path) -> None:
    pcm = _decoded()
    # a huge min speech drops everything
    sink = _run(tmp_path / "a", pcm, min_speech_ms=5_000)
    assert sink.segments == [] and sink.discarded == 3
    assert not list((tmp_path / "a").glob("*.wav")) and _manifest(tmp_path / "a") == []
    # a max silence longer than the one-second pauses joins the three phrases into one
    sink = _run(tmp_path / "b", pcm, max_silence_ms=1500)
    assert len(sink.segments) == 1
    # a short max silence still splits them; padding shapes the files around the speech
    for padding in (0, 300):
        sink = _run(tmp_path / f"p{padding}", pcm, padding_ms=padding)
        assert len(sink.segments) == 3
        for segment in sink.segments:
            assert segment.speech_start - segment.start == pytest.approx(padding / 1000, abs=1e-9)
            assert segment.end - segment.speech_end == pytest.approx(padding / 1000, abs=1e-9)
    # aggressiveness 0 takes the Opus near-silence before the first phrase for speech
    sink = _run(tmp_path / "c", pcm, aggressiveness=0)
    assert sink.segments[0].speech_start < _run(tmp_path / "d", pcm).segments[0].speech_start - 0.1


def test_sixteen_khz_files(tmp_path: Path) -> None:
    pcm = _decoded()
    full = _run(tmp_path / "48", pcm)
    low = _run(tmp_path / "16", pcm, sample_rate=16000)
    assert [(s.start, s.end) for s in low.segments] == [(s.start, s.end) for s in full.segments]
    for a, b in zip(full.segments, low.segments, strict=True):
        x, rate_x = sf.read(a.path, dtype="float64")
        y, rate_y = sf.read(b.path, dtype="float64")
        assert (rate_x, rate_y) == (48000, 16000) and len(y) * 3 == len(x) == a.frames
        # the same speech, not shifted: 16 kHz samples match every third 48 kHz one closely
        spectrum_x = np.abs(np.fft.rfft(x))[: len(x) // 6]  # below 4 kHz
        assert np.corrcoef(x[::3], y)[0, 1] > 0.9, "16 kHz file differs from the 48 kHz one"
        assert spectrum_x.sum() > 0
        assert len(b.pcm) == b.frames * 2


def test_utterance_open_at_stop_is_finished_at_cleanup(tmp_path: Path) -> None:
    pcm = _decoded()
    cut = (TRUTH[1]["start_sample"] + 20_000) // FRAME * FRAME * 4  # stop in the middle of phrase 2
    sink = VadSegmentsSink(VadOptions(directory=tmp_path))
    sink.on_start(SessionInfo(1, 2, time.time()))
    _feed(sink, pcm[:cut], 0)
    assert len(sink.segments) == 1
    sink.on_stop(cut // 4)
    sink.cleanup()
    assert len(sink.segments) == 2
    last = sink.segments[1]
    assert cut // 4 / RATE - 0.03 <= last.end <= cut // 4 / RATE  # up to the last whole VAD frame
    assert last.speech_end == last.end  # cut mid-speech: nothing after it to pad with
    _check_agreement(tmp_path, sink.segments, sink.segments)


def test_users_are_separate_and_gaps_are_silence(tmp_path: Path, caplog: Any) -> None:
    phrase = _decoded()[: 150_000 * 4 // (FRAME * 4) * FRAME * 4]  # the first two phrases
    calls: list[Segment] = []

    def callback(segment: Segment) -> None:
        calls.append(segment)
        if len(calls) == 1:
            raise RuntimeError("a buggy callback")

    sink = VadSegmentsSink(VadOptions(directory=tmp_path, on_segment=callback, template="{user_id}-{index}"))
    sink.on_start(SessionInfo(1, 2, time.time()))
    with caplog.at_level(logging.ERROR):
        seq = _feed(sink, phrase, 0, user_id=1)
        _feed(sink, phrase, RATE // 2, user_id=2)  # overlapping in time, another user
        _feed(sink, phrase, 10 * 60 * RATE, user_id=1, seq=seq)  # ten minutes later
    sink.on_stop(10 * 60 * RATE + len(phrase) // 4)
    sink.cleanup()
    assert sink.callback_errors == 1 and "a buggy callback" in caplog.text
    by_user = {u: [s for s in sink.segments if s.user_id == u] for u in (1, 2)}
    assert len(by_user[1]) == 4 and len(by_user[2]) == 2
    assert [s.file for s in by_user[1]] == ["1-1.wav", "1-2.wav", "1-3.wav", "1-4.wav"]
    offsets = [b.speech_start - a.speech_start for a, b in zip(by_user[1][:2], by_user[1][2:], strict=True)]
    assert offsets == pytest.approx([600.0, 600.0], abs=1e-9)
    assert by_user[2][0].speech_start - by_user[1][0].speech_start == pytest.approx(0.5, abs=1e-9)
    _check_agreement(tmp_path, sink.segments, calls)


def test_long_utterance_is_streamed_and_readable_while_open(tmp_path: Path) -> None:
    phrase = _decoded()[
        TRUTH[1]["start_sample"] // FRAME * FRAME * 4 : TRUTH[1]["end_sample"] // FRAME * FRAME * 4
    ]
    sink = VadSegmentsSink(VadOptions(directory=tmp_path, flush_interval=0.02, template="long"))
    sink.on_start(SessionInfo(1, 2, time.time()))
    seq = pos = 0
    for _ in range(20):  # ~23 s of uninterrupted speech
        seq = _feed(sink, phrase, pos, seq=seq)
        pos += len(phrase) // 4
        time.sleep(0.025)
    assert sink.segments == []
    on_disk = sf.info(str(tmp_path / "long.wav")).frames  # a crash here leaves a valid WAV
    assert on_disk > 15 * RATE
    assert recover(tmp_path / "long.wav") >= on_disk
    sink.on_stop(pos)
    sink.cleanup()
    assert len(sink.segments) == 1 and sink.segments[0].frames > 20 * RATE


def test_safe_names(tmp_path: Path) -> None:
    class Member:
        display_name = "../../etc/passwd\x00"

    sink = VadSegmentsSink(VadOptions(directory=tmp_path / "out"))
    sink.on_start(SessionInfo(1, 2, time.time()))
    pcm = _decoded()
    for k in range(len(pcm) // (FRAME * 4)):
        frame = AudioFrame(
            9, 9, k, 0, k * FRAME, FrameKind.RECEIVED, pcm[k * FRAME * 4 : (k + 1) * FRAME * 4]
        )
        frame.member = Member()  # type: ignore[assignment]
        sink.on_audio(frame)
    sink.on_stop(len(pcm) // 4)
    sink.cleanup()
    assert len(sink.segments) == 3
    for segment in sink.segments:
        assert segment.path.parent == tmp_path / "out" and "/" not in segment.file
        assert segment.user == "../../etc/passwd\x00"


def test_disk_full_keeps_earlier_segments(tmp_path: Path) -> None:
    sink = VadSegmentsSink(VadOptions(directory=tmp_path, template="{user_id}-{index}"))
    sink.on_start(SessionInfo(1, 2, time.time()))
    pcm = _decoded()
    filled = False
    with pytest.raises(SinkError, match="No space left"):
        for k in range(len(pcm) // (FRAME * 4)):
            _feed(sink, pcm[k * FRAME * 4 : (k + 1) * FRAME * 4], k * FRAME, seq=k)
            if not filled and (tmp_path / "7-2.wav").exists():
                fill_disk(tmp_path / "7-2.wav")  # the second segment's next write fails
                filled = True
    sink.cleanup()  # closes what is open; does not raise again
    lines = _manifest(tmp_path)
    assert [line["file"] for line in lines] == ["7-1.wav"]
    assert sf.info(str(tmp_path / "7-1.wav")).frames == lines[0]["frames"]


def test_existing_files_are_never_overwritten(tmp_path: Path) -> None:
    """A directory used before (or by another session now): its files keep what they hold."""
    (tmp_path / "7-2.wav").write_bytes(b"an earlier session's segment")
    (tmp_path / "7-3.wav").symlink_to("/dev/full")
    sink = _run(tmp_path, _decoded(), 0, template="{user_id}-{index}")
    assert [s.file for s in sink.segments] == ["7-1.wav", "7-2-2.wav", "7-3-2.wav"]
    assert (tmp_path / "7-2.wav").read_bytes() == b"an earlier session's segment"
    assert all(sf.info(str(s.path)).frames == s.frames for s in sink.segments)


# ------------------------------------------------------------------------------------- crash


def _record_until_killed(directory: Path, kill_after: float) -> tuple[list[tuple[float, AudioFrame]], float]:
    """Run ``_record_until_killed.py``: the frames it delivered to the sink (with the time each was
    handled) and the time it killed itself."""
    child = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("_record_until_killed.py")),
            str(directory),
            str(kill_after),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = child.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # its decode workers, orphaned by the kill
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL, f"the recorder exited with {child.returncode}"
    delivered: list[tuple[float, AudioFrame]] = []
    killed_at = None
    alice = SimpleNamespace(display_name="alice")
    for line in out.splitlines():
        fields = line.split()
        if fields[:1] == ["frame"] and len(fields) == 7:
            t, user_id, ssrc, seq, position = float(fields[1]), *map(int, fields[2:6])
            pcm = base64.b64decode(fields[6])
            frame = AudioFrame(user_id, ssrc, seq, 0, position, FrameKind.RECEIVED, pcm)
            frame.member = alice  # type: ignore[assignment]
            delivered.append((t, frame))
        elif fields[:1] == ["kill"]:
            killed_at = float(fields[1])
    assert killed_at is not None and delivered, out[-2000:]
    return delivered, killed_at


def _replay(directory: Path, frames: list[AudioFrame], *, finish: bool) -> VadSegmentsSink:
    """The same frames into a sink that is not killed: what the recorder had written by then."""
    sink = VadSegmentsSink(VadOptions(directory=directory))
    sink.on_start(SessionInfo(1, 2, time.time()))
    for frame in frames:
        sink.on_audio(frame)
    if finish:
        sink.on_stop(frames[-1].end)
        sink.cleanup()
    return sink


def _audio(path: Path) -> np.ndarray:
    recover(path)  # a file still open (or left by the crash): its header made to cover it all
    return sf.read(path, dtype="int16")[0]


def test_killed_recorder_keeps_every_segment(tmp_path: Path) -> None:
    """SIGKILL in the middle of the second phrase: finished segments are complete and listed, the
    open one holds everything the sink had written up to 1 s before the kill."""
    out = tmp_path / "out"
    delivered, killed_at = _record_until_killed(out, 3.3)
    frames = [frame for _, frame in delivered]
    early = _replay(tmp_path / "early", [f for t, f in delivered if t < killed_at - 1.0], finish=False)
    full = _replay(tmp_path / "full", frames, finish=True)
    lines = _manifest(out)  # whole lines only (each is written and flushed at once)
    listed = {line["file"] for line in lines}
    # finished segments: their lines and files, exactly as without the crash
    assert lines == [s.manifest_line() for s in full.segments[: len(lines)]]
    for line in lines:
        assert np.array_equal(_audio(out / line["file"]), _audio(tmp_path / "full" / line["file"]))
        assert sf.info(str(out / line["file"])).frames == line["frames"]
    # what the sink had handed to its files 1 s before the kill (known from its memory, not
    # from the disk) survived: the segments it had finished, with their lines ...
    assert lines[: len(early.segments)] == [s.manifest_line() for s in early.segments]
    # ... and the one it was writing, every sample of it: the file the kill left open
    writing = [u.writer for u in (state.utterance for state in early._users.values()) if u and u.writer]
    assert writing, "the kill came before the second segment opened: nothing to check"
    for writer in writing:
        assert writer.frames_written > RATE // 10
        after = _audio(out / writer.path.name)  # left open by the kill, made readable by recover()
        assert writer.path.name not in listed and len(after) >= writer.frames_written
        # a prefix of that segment as it would have ended: nothing but the recording
        whole = _audio(tmp_path / "full" / writer.path.name)
        assert np.array_equal(whole[: len(after)], after)
        start = next(s.start for s in full.segments if s.file == writer.path.name)
        gap = frames[-1].end / RATE - start - len(after) / RATE
        print(f"vad: the open segment ends {gap:.3f} s before the last frame delivered")
    assert sorted(p.name for p in out.glob("*.wav")) == sorted(listed | {w.path.name for w in writing})
    early.cleanup()
