"""The ``wav`` sink past 4 GiB: a session of more than 7 hours, fed frames straight (not in real
time), read back whole with soundfile; and a recorder SIGKILLed at 7 h, made whole by
:func:`listening_sink_wav.recover`. Silence is a hole in the file: each file is 4.8 GB long and
takes a few megabytes of disk."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import listening_sink_wav
from listening_sink_wav import WavOptions, WavSink

from listening_core.sinks import SessionInfo
from listening_core.testing.tracks import PAST_4GIB_STEREO, SEVEN_HOURS, assert_track, frames, head, pattern

RATE = 48_000
FRAME = 960


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
        (2, {boundary: pattern(boundary, RATE, salt=1), late: pattern(late, 2 * RATE, salt=1)}),
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
