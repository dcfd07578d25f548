"""The ``mixdown`` sink past 4 GiB: a session of more than 7 hours, fed frames straight (not in
real time), read back whole with soundfile; and a recorder SIGKILLed at 7 h, made whole by
:func:`listening_sink_mixdown.recover`. Hours nobody speaks in are written at once, as a hole in
the file: the mix is 4.8 GB long and takes a few megabytes of disk."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import listening_sink_mixdown
import numpy as np
from listening_sink_mixdown import MixdownOptions, MixdownSink

from listening_core.sinks import AudioFrame, SessionInfo
from listening_core.testing.tracks import PAST_4GIB_STEREO, SEVEN_HOURS, assert_track, frames, head, pattern

RATE = 48_000
FRAME = 960


def mixed(parts: list[tuple[int, np.ndarray]], lo: int, hi: int) -> np.ndarray:
    """Session samples [lo, hi) of the clipped sum of ``parts`` (session sample, samples)."""
    out = np.zeros((hi - lo, 2), dtype=np.int32)
    for start, samples in parts:
        a, b = max(lo, start), min(hi, start + len(samples))
        if a < b:
            out[a - lo : b - lo] += samples[a - start : b - start]
    return np.clip(out, -32768, 32767).astype(np.int16)


def _deliver(sink: MixdownSink, *users: list[AudioFrame]) -> None:
    """Frames in the order a session delivers them: by position (users one after another)."""
    for frame in sorted((f for user in users for f in user), key=lambda f: (f.position, f.user_id)):
        sink.on_audio(frame)


def test_a_session_past_seven_hours_reads_back_whole(tmp_path: Path) -> None:
    """Two members talk over each other at the start, one across the 4 GiB mark (6.2 h), both
    again past 7 h: the mix runs from 0 to the session's end, their sum where they spoke,
    silence everywhere else."""
    sink = MixdownSink(MixdownOptions(directory=tmp_path, filename="mix"))
    sink.on_start(SessionInfo(1, 2, time.time()))
    boundary = PAST_4GIB_STEREO - 25 * FRAME
    late = SEVEN_HOURS + RATE // 2
    alice = frames(1, 0, 50) + frames(1, SEVEN_HOURS, 100, seq=50)
    bob = frames(2, RATE // 2, 50, salt=1) + frames(2, boundary, 50, seq=50, salt=1)
    bob += frames(2, late, 100, seq=100, salt=1)
    _deliver(sink, alice, bob)
    end = SEVEN_HOURS + 10 * RATE
    sink.on_stop(end)
    sink.cleanup()
    assert sink.path == tmp_path / "mix.wav" and sum(sink.late.values()) == 0
    parts = [(f.position, pattern(f.position, FRAME, salt=f.user_id - 1)) for f in alice + bob]
    pieces = {
        0: mixed(parts, 0, 3 * RATE // 2),
        boundary: mixed(parts, boundary, boundary + RATE),
        SEVEN_HOURS: mixed(parts, SEVEN_HOURS, late + 2 * RATE),
    }
    assert head(sink.path)[:4] == b"RF64"
    assert_track(sink.path, end, pieces)


_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {here!r})
    from test_mixdown_long_session import SEVEN_HOURS, _deliver, frames
    from listening_core.sinks import SessionInfo
    from listening_sink_mixdown import MixdownOptions, MixdownSink
    sink = MixdownSink(MixdownOptions(directory={directory!r}, filename="mix"))
    sink.on_start(SessionInfo(1, 2, time.time()))
    alice = frames(1, 0, 50) + frames(1, SEVEN_HOURS, {late}, seq=50)
    _deliver(sink, alice, frames(2, SEVEN_HOURS, {late}, salt=1))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_at_seven_hours_recover_makes_the_mix_whole(tmp_path: Path) -> None:
    """The recorder is SIGKILLed 3 s into two members talking at 7 h (past 4 GiB of file), with
    the 4 s mixing window still open: after listening_sink_mixdown.recover the mix of every
    frame delivered up to about flush_interval (1 s) before the kill reads back where it
    belongs, the window's part included."""
    late = 150
    script = _CHILD.format(here=str(Path(__file__).parent), directory=str(tmp_path), late=late)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    path = tmp_path / "mix.wav"
    fed = SEVEN_HOURS + late * FRAME
    samples = listening_sink_mixdown.recover(path)
    print(f"recovered {samples} of {fed} samples fed ({(fed - samples) / RATE:.3f} s short)")
    assert fed - RATE - FRAME <= samples <= fed
    assert head(path)[:4] == b"RF64"
    parts = [(f.position, pattern(f.position, FRAME, salt=f.user_id - 1)) for f in frames(1, 0, 50)]
    parts += [(f.position, pattern(f.position, FRAME, salt=0)) for f in frames(1, SEVEN_HOURS, late)]
    parts += [(f.position, pattern(f.position, FRAME, salt=1)) for f in frames(2, SEVEN_HOURS, late)]
    pieces = {0: mixed(parts, 0, RATE), SEVEN_HOURS: mixed(parts, SEVEN_HOURS, samples)}
    # the last frame on disk may hold one member's part only: the kill came between the two
    assert_track(path, samples, pieces, until=samples - FRAME)
