"""The ``vad-segments`` sink past 7 hours of session, fed decoded frames straight (not in real
time): utterances past 7 h are placed on the session timeline as they are at the start, every
sample of each segment where it belongs; and a recorder SIGKILLed at 7 h, its open segment made
whole by :func:`listening_sink_vad.recover`.

A single segment file reaches 4 GiB only after 12.4 hours of one uninterrupted utterance (mono,
48 kHz; 37 h at 16 kHz); it is written by the core's AudioFile, whose mono files past 12.5 h
are read back whole in tests/test_long_sessions.py. Feeding 12.4 h through webrtcvad here would
take about a minute of CPU.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import listening_sink_vad
import numpy as np
import soundfile as sf
from listening_sink_vad import VadOptions, VadSegmentsSink

from listening_core import AudioFrame, FrameKind
from listening_core.sinks import SessionInfo
from listening_core.testing.media import OpusEncoder, load_pcm, reference_decode

RATE = 48_000
FRAME = 960
VAD_FRAME = 30 * RATE // 1000  # the default frame_ms: offsets below keep to its grid
SEVEN_HOURS = 7 * 3600 * RATE
START = 100 * VAD_FRAME  # where the first take of the clip starts


def decoded() -> np.ndarray:
    """three-phrases as the receiver hands it to sinks (encoded, decoded), stereo int16."""
    pcm = reference_decode(OpusEncoder().encode_pcm(load_pcm("three-phrases")))
    return np.frombuffer(pcm, dtype="<i2").reshape(-1, 2)


def feed(sink: VadSegmentsSink, clip: np.ndarray, position: int, seq: int, upto: int | None = None) -> int:
    """Deliver ``clip`` (up to sample ``upto``) in 20 ms frames from ``position``; the next sequence."""
    n = (len(clip) if upto is None else upto) // FRAME
    for k in range(n):
        pcm = clip[k * FRAME : (k + 1) * FRAME].astype("<i2").tobytes()
        sink.on_audio(AudioFrame(7, 7, (seq + k) & 0xFFFF, 0, position + k * FRAME, FrameKind.RECEIVED, pcm))
    return seq + n


def session(directory: Path, second: int) -> VadSegmentsSink:
    """The clip at START and again at START + ``second``, then the session ends 2 s later."""
    clip = decoded()
    sink = VadSegmentsSink(VadOptions(directory=directory))
    sink.on_start(SessionInfo(1, 2, time.time()))
    seq = feed(sink, clip, START, 0)
    feed(sink, clip, START + second, seq)
    sink.on_stop(START + second + len(clip) + 2 * RATE)
    sink.cleanup()
    return sink


def samples(line: dict[str, Any]) -> tuple[int, int, int, int]:
    """A manifest line's times, in session samples (exact: they are whole samples / 48000)."""
    return tuple(round(line[k] * RATE) for k in ("start", "end", "speech_start", "speech_end"))  # type: ignore[return-value]


def mono_at(clip: np.ndarray, at: int, start: int, end: int) -> np.ndarray:
    """Session samples [start, end) of a track holding ``clip`` (mono, as the sink makes it) at ``at``."""
    mono = ((clip[:, 0].astype(np.int32) + clip[:, 1]) >> 1).astype(np.int16)
    out = np.zeros(end - start, dtype=np.int16)
    a, b = max(start, at), min(end, at + len(mono))
    out[a - start : b - start] = mono[a - at : b - at]
    return out


def test_utterances_past_seven_hours_are_placed_like_the_first(tmp_path: Path) -> None:
    """The clip at the start and again 7 h later: the later segments are the earlier ones moved
    by exactly 7 h (the same as when the second take comes 60 s later), and every segment
    file holds the member's audio from its start to its end on the session timeline."""
    near = session(tmp_path / "near", 60 * RATE)
    far = session(tmp_path / "far", SEVEN_HOURS)
    lines = [json.loads(s) for s in (tmp_path / "far" / "segments.jsonl").read_text().splitlines()]
    near_lines = [json.loads(s) for s in (tmp_path / "near" / "segments.jsonl").read_text().splitlines()]
    assert len(lines) == len(near_lines) == 6 and len(far.segments) == len(near.segments) == 6
    shift = SEVEN_HOURS - 60 * RATE
    for line, ref in zip(lines, near_lines, strict=True):
        moved = shift if ref["start"] > 60 else 0
        assert samples(line) == tuple(t + moved for t in samples(ref))
        assert line["frames"] == ref["frames"] and line["index"] == ref["index"]
        ours = sf.read(tmp_path / "far" / line["file"], dtype="int16")[0]
        theirs = sf.read(tmp_path / "near" / ref["file"], dtype="int16")[0]
        assert np.array_equal(ours, theirs)
    clip = decoded()
    for line in lines:
        start, end, _, _ = samples(line)
        at = START if start < SEVEN_HOURS else START + SEVEN_HOURS
        data, rate = sf.read(tmp_path / "far" / line["file"], dtype="int16")
        assert rate == RATE and len(data) == end - start == line["frames"]
        assert np.array_equal(data, mono_at(clip, at, start, end)), line
    assert [samples(line)[0] > SEVEN_HOURS for line in lines] == [False] * 3 + [True] * 3


_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {here!r})
    from test_vad_long_session import START, SEVEN_HOURS, decoded, feed
    from listening_core.sinks import SessionInfo
    from listening_sink_vad import VadOptions, VadSegmentsSink
    sink = VadSegmentsSink(VadOptions(directory={directory!r}))
    sink.on_start(SessionInfo(1, 2, time.time()))
    clip = decoded()
    feed(sink, clip, START + SEVEN_HOURS, feed(sink, clip, START, 0), upto={upto})
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_at_seven_hours_keeps_every_segment(tmp_path: Path) -> None:
    """SIGKILL in the middle of the second phrase at 7 h: the segments finished before are
    complete and listed; the one being written, recovered, holds every sample the sink had
    handed to its file, where it belongs."""
    upto = 130_000  # of the clip's samples: the second phrase runs from 90 744 to 145 843
    out = tmp_path / "out"
    script = _CHILD.format(here=str(Path(__file__).parent), directory=str(out), upto=upto)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    # the same frames into a sink that is not killed: what it had finished and was writing
    clip = decoded()
    same = VadSegmentsSink(VadOptions(directory=tmp_path / "same"))
    same.on_start(SessionInfo(1, 2, time.time()))
    feed(same, clip, START + SEVEN_HOURS, feed(same, clip, START, 0), upto=upto)
    lines = [json.loads(s) for s in (out / "segments.jsonl").read_text().splitlines()]
    assert lines == [s.manifest_line() for s in same.segments] and len(lines) == 4
    for line in lines:
        start, end, _, _ = samples(line)
        at = START if start < SEVEN_HOURS else START + SEVEN_HOURS
        assert np.array_equal(sf.read(out / line["file"], dtype="int16")[0], mono_at(clip, at, start, end))
    [open_utterance] = [state.utterance for state in same._users.values()]
    assert open_utterance is not None and open_utterance.writer is not None
    writer = open_utterance.writer
    path = out / writer.path.name
    assert path.name not in {line["file"] for line in lines}
    assert listening_sink_vad.recover(path) == writer.frames_written > RATE // 2
    data = sf.read(path, dtype="int16")[0]
    start = open_utterance.start
    assert start > SEVEN_HOURS
    assert np.array_equal(data, mono_at(clip, START + SEVEN_HOURS, start, start + len(data)))
    same.cleanup()
