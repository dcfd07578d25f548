"""The ``wav`` sink past 4 GiB: a session of more than 7 hours, fed frames straight (not in real
time), read back whole with soundfile; and a recorder SIGKILLed at 7 h, made whole by
:func:`listening_sink_wav.recover`. Silence is a hole in the file: each file is 4.8 GB long and
takes a few megabytes of disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import listening_sink_wav
import numpy as np
import pytest
import soundfile as sf
from listening_sink_wav import WavOptions, WavSink

from listening_core.sinks import AudioFrame, FrameKind, SessionInfo

RATE = 48_000
FRAME = 960
HOUR = 3600 * RATE
SEVEN_HOURS = 7 * HOUR
PAST_4GIB_STEREO = (2**32 - 80) // 4 + 1  # the first stereo sample whose bytes lie past 4 GiB of file


def pattern(start: int, n: int, salt: int = 0) -> np.ndarray:
    """``n`` stereo samples that say where they are (and, with ``salt``, whose they are)."""
    t = np.arange(start, start + n, dtype=np.int64)
    return np.stack(
        [
            ((t * 7 + salt) % 20011 - 10005).astype(np.int16),
            ((t * 13 + salt) % 19997 - 9998).astype(np.int16),
        ],
        axis=1,
    )


def frames(user_id: int, start: int, n: int, seq: int = 0, salt: int = 0) -> list[AudioFrame]:
    """``n`` 20 ms frames of :func:`pattern` from session sample ``start``."""
    return [
        AudioFrame(
            user_id,
            user_id,
            (seq + k) & 0xFFFF,
            0,
            start + k * FRAME,
            FrameKind.RECEIVED,
            pattern(start + k * FRAME, FRAME, salt).astype("<i2").tobytes(),
        )
        for k in range(n)
    ]


def head(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(4096)


def assert_track(path: Path, length: int, pieces: dict[int, np.ndarray], channels: int = 2) -> None:
    """``path`` reads back with soundfile as exactly ``length`` samples: each of ``pieces``
    (session sample → samples) where it belongs, zeros everywhere else. Every stretch of the
    file that holds data (SEEK_DATA) is read; the rest are holes, zeros by definition (a few
    samples in them are read too)."""
    assert all(start + len(piece) <= length for start, piece in pieces.items())
    info = sf.info(str(path))
    assert (info.frames, info.channels, info.samplerate) == (length, channels, RATE), info
    offset, align, size = head(path).index(b"data") + 8, 2 * channels, path.stat().st_size
    ranges = [(start, start + len(piece)) for start, piece in pieces.items()]
    ranges += [(p, p + 4) for p in np.linspace(0, length - 4, 9, dtype=np.int64).tolist()]
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0 if hasattr(os, "SEEK_DATA") else size
        ranges += [] if pos == 0 else [(0, length)]  # no SEEK_DATA: read it all
        while pos < size:
            try:
                a = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # only a hole after pos
                break
            pos = os.lseek(fd, a, os.SEEK_HOLE)
            ranges.append((max(0, (a - offset) // align), min(length, -(-(pos - offset) // align))))
    finally:
        os.close(fd)
    merged: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    blocks = [(a, min(hi, a + (1 << 22))) for lo, hi in merged for a in range(lo, hi, 1 << 22)]
    with sf.SoundFile(str(path)) as f:
        for lo, hi in blocks:
            f.seek(lo)
            got = f.read(hi - lo, dtype="int16", always_2d=True)
            want = np.zeros((hi - lo, channels), dtype=np.int16)
            for start, piece in pieces.items():
                a, b = max(lo, start), min(hi, start + len(piece))
                if a < b:
                    want[a - lo : b - lo] = piece[a - start : b - start]
            if not np.array_equal(got, want):
                bad = lo + int(np.argmax(np.any(got != want, axis=1)))
                pytest.fail(f"{path.name}: sample {bad} ({bad / RATE:.3f} s) is not what was fed there")


def test_a_session_past_seven_hours_reads_back_whole(tmp_path: Path) -> None:
    """alice speaks at the start and past 7 h; bob joins across the 4 GiB mark (6.2 h) and
    speaks again past 7 h: both files run from 0 to the session's end, each frame where it was
    placed, silence everywhere else."""
    sink = WavSink.from_options(WavOptions(directory=tmp_path))
    sink.on_start(SessionInfo(1, 2, time.time()))
    boundary = PAST_4GIB_STEREO - 25 * FRAME
    late = SEVEN_HOURS + RATE // 2
    alice = frames(1, 0, 50) + frames(1, SEVEN_HOURS, 100, seq=50)
    bob = frames(2, boundary, 50, salt=1) + frames(2, late, 100, seq=50, salt=1)
    for frame in sorted(alice + bob, key=lambda f: f.position):
        sink.on_audio(frame)
    end = SEVEN_HOURS + 10 * RATE
    sink.on_stop(end)
    sink.cleanup()
    assert not sink.errors
    for user, pieces in [
        (1, {0: pattern(0, RATE), SEVEN_HOURS: pattern(SEVEN_HOURS, 2 * RATE)}),
        (2, {boundary: pattern(boundary, RATE, 1), late: pattern(late, 2 * RATE, 1)}),
    ]:
        path = tmp_path / f"{user}.wav"
        assert head(path)[:4] == b"RF64"
        assert_track(path, end, pieces)


_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {here!r})
    from test_wav_long_session import SEVEN_HOURS, frames
    from listening_core.sinks import SessionInfo
    from listening_sink_wav import WavOptions, WavSink
    sink = WavSink.from_options(WavOptions(directory={directory!r}))
    sink.on_start(SessionInfo(1, 2, time.time()))
    for frame in frames(1, 0, 50) + frames(1, SEVEN_HOURS, {late}, seq=50):
        sink.on_audio(frame)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_at_seven_hours_recover_makes_the_file_whole(tmp_path: Path) -> None:
    """The recorder is SIGKILLed 2.6 s into speech at 7 h (past 4 GiB of file): after
    listening_sink_wav.recover every whole block of audio that reached the disk reads back
    where it was placed; only what the writer was still gathering (under 0.25 s) is lost."""
    late = 130
    script = _CHILD.format(here=str(Path(__file__).parent), directory=str(tmp_path), late=late)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    path = tmp_path / "1.wav"
    fed = SEVEN_HOURS + late * FRAME
    samples = listening_sink_wav.recover(path)
    print(f"recovered {samples} of {fed} samples fed ({(fed - samples) / RATE:.3f} s short)")
    assert fed - RATE // 4 <= samples <= fed
    assert head(path)[:4] == b"RF64"
    assert_track(
        path, samples, {0: pattern(0, RATE), SEVEN_HOURS: pattern(SEVEN_HOURS, samples - SEVEN_HOURS)}
    )
