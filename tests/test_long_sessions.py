"""Tracks longer than a RIFF WAV can describe (4 GiB: 6.2 h of 48 kHz stereo, 12.4 h mono).

:class:`~listening_core.sinks.AudioFile` (what the wav, mixdown and vad-segments sinks write
through) is fed frames straight, hours apart, then read back with soundfile; a child process is
SIGKILLed past 7 h and :func:`~listening_core.sinks.recover_file` makes its file whole. Long
silence is a hole in the file, so these multi-gigabyte files take a few megabytes of disk; the
read-back reads every stretch of the file that holds data (``SEEK_DATA``) with soundfile, the
holes are zeros by the file system's definition (and are spot-read too).
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from listening_core.sinks import AudioFile, recover_file
from listening_core.testing.tracks import (
    HOUR,
    PAST_4GIB_STEREO,
    SEVEN_HOURS,
    assert_track,
    frames,
    head,
    pattern,
)

RATE = 48_000
FRAME = 960


# ------------------------------------------------------------------------------- short files


@pytest.mark.parametrize(("channels", "rate"), [(2, 48000), (1, 48000), (1, 16000)])
def test_a_short_file_is_todays_wav_with_room_for_rf64(tmp_path: Path, channels: int, rate: int) -> None:
    """Under 4 GiB the file is an ordinary RIFF WAVE: take out its 36-byte JUNK chunk (the room
    kept for RF64's ds64) and it is byte for byte what libsndfile's WAV writer (what AudioFile
    wrote before) makes of the same samples; Python's own ``wave`` module reads it."""
    path = tmp_path / "short.wav"
    audio = AudioFile(path, channels=channels, sample_rate=rate)
    for frame in frames(1, RATE // 2, 50):  # half a second of silence, then a second of audio
        audio.write(frame)
    audio.pad_to(3 * RATE)
    audio.cleanup()
    data, _ = sf.read(str(path), dtype="int16", always_2d=True)
    with sf.SoundFile(
        str(tmp_path / "libsndfile.wav"), "w", rate, channels, format="WAV", subtype="PCM_16"
    ) as f:
        f.write(data)
    ours, theirs = path.read_bytes(), (tmp_path / "libsndfile.wav").read_bytes()
    assert ours[:12] == b"RIFF" + struct.pack("<I", len(ours) - 8) + b"WAVE"
    assert ours[12:48] == b"JUNK" + struct.pack("<I", 28) + bytes(28)
    assert ours[:4] + struct.pack("<I", len(ours) - 8 - 36) + ours[8:12] + ours[48:] == theirs
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (channels, rate, len(data))
    assert recover_file(path) == len(data) and path.read_bytes() == ours  # closed: left as it is


def test_other_wav_subtypes_keep_room_for_rf64(tmp_path: Path) -> None:
    """A WAV in another subtype goes through libsndfile's RF64 with auto-downgrade: a RIFF WAVE
    while small, with the JUNK chunk that becomes its ds64 if it grows past 4 GiB."""
    path = tmp_path / "pcm24.wav"
    audio = AudioFile(path, subtype="PCM_24")
    for frame in frames(1, 0, 50):
        audio.write(frame)
    audio.cleanup()
    head = path.read_bytes()[:16]
    assert head[:4] == b"RIFF" and head[8:16] == b"WAVEJUNK"
    data, _ = sf.read(str(path), dtype="int16", always_2d=True)
    assert np.array_equal(data, pattern(0, 50 * FRAME))


# ------------------------------------------------------------------------------- long files


def test_stereo_track_past_seven_hours_reads_back_whole(tmp_path: Path) -> None:
    """The issue's case, longer: a frame at 0, a second of audio across the 4 GiB mark, a second
    past 7 h, silence between (a quiet member); then padded to the session's end."""
    path = tmp_path / "long.wav"
    audio = AudioFile(path)
    pieces = {0: pattern(0, FRAME)}
    audio.write(frames(1, 0, 1)[0])
    boundary = PAST_4GIB_STEREO - 25 * FRAME
    for frame in frames(1, boundary, 50, seq=1) + frames(1, SEVEN_HOURS, 50, seq=51):
        audio.write(frame)
        if frame.position == boundary:
            audio.flush()
            assert head(path)[:4] == b"RIFF"  # an ordinary WAV until it outgrows 4 GiB
    pieces |= {boundary: pattern(boundary, 50 * FRAME), SEVEN_HOURS: pattern(SEVEN_HOURS, 50 * FRAME)}
    end = SEVEN_HOURS + 60 * RATE
    audio.pad_to(end)
    audio.cleanup()
    assert head(path)[:4] == b"RF64" and path.stat().st_size == 80 + end * 4
    assert_track(path, end, pieces)
    assert recover_file(path) == end  # closed properly: nothing to change
    assert_track(path, end, pieces)


def test_mono_track_past_twelve_and_a_half_hours_reads_back_whole(tmp_path: Path) -> None:
    """Mono reaches 4 GiB at 12.4 h: audio written as a sink writes it (write_samples, as the
    vad-segments and mixdown sinks do), silence between, past 12.5 h."""
    path = tmp_path / "mono.wav"
    audio = AudioFile(path, channels=1)
    late = 12 * HOUR + HOUR // 2
    audio.write_samples(pattern(0, RATE, channels=1))
    audio.pad_to(late)
    audio.write_samples(pattern(late, RATE, channels=1))
    audio.cleanup()
    assert head(path)[:4] == b"RF64"
    assert_track(
        path,
        late + RATE,
        {0: pattern(0, RATE, channels=1), late: pattern(late, RATE, channels=1)},
        channels=1,
    )


# ------------------------------------------------------------------------------- after a kill

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_long_sessions import AudioFile, frames, SEVEN_HOURS
    audio = AudioFile({path!r}, flush_interval={flush!r})
    for frame in frames(1, 0, 50) + frames(1, SEVEN_HOURS, {late}, seq=50):
        audio.write(frame)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _killed_at_seven_hours(path: Path, flush: float, late: int = 130) -> int:
    """A child writes a second at 0 and ``late`` frames from 7 h into ``path`` with AudioFile,
    then SIGKILLs itself; returns the session sample just after the last frame it wrote."""
    script = _CHILD.format(tests=str(Path(__file__).parent), path=str(path), flush=flush, late=late)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return SEVEN_HOURS + late * FRAME


@pytest.mark.parametrize("flush", [1.0, 0.0])
def test_killed_past_seven_hours_recovers_whole(tmp_path: Path, flush: float) -> None:
    """SIGKILL at 7 h. With the default flush the header is RF64 with a stale ds64; with no
    flush (``flush_interval=0``) it is still the RIFF header written at the start, on a file
    that has grown past 4 GiB: recover_file makes it RF64. Either way every whole block of
    audio that reached the disk reads back where it belongs."""
    path = tmp_path / "killed.wav"
    fed = _killed_at_seven_hours(path, flush)
    assert head(path)[:4] == (b"RF64" if flush else b"RIFF")
    samples = recover_file(path)
    # PCM reaches the OS in blocks of 0.25 s; what was still gathering in the last one is lost
    assert fed - RATE // 4 <= samples <= fed
    assert head(path)[:4] == b"RF64"
    late = pattern(SEVEN_HOURS, samples - SEVEN_HOURS)
    assert_track(path, samples, {0: pattern(0, 50 * FRAME), SEVEN_HOURS: late})
    before = head(path)
    assert recover_file(path) == samples and head(path) == before  # idempotent


def test_an_older_wav_past_4gib_is_rewritten_as_rf64(tmp_path: Path) -> None:
    """A WAV written before this change (libsndfile's 44-byte header, no room for a ds64) by a
    process killed past 7 h: recover_file used to raise struct.error; it now copies the audio
    into an RF64 file that replaces it (holes stay holes)."""
    path = tmp_path / "old.wav"
    with sf.SoundFile(str(path), "w", RATE, 2, format="WAV", subtype="PCM_16") as f:
        f.write(pattern(0, RATE))  # the header as of the last flush: one second
    late = pattern(SEVEN_HOURS, 2 * RATE)
    with path.open("r+b") as fh:  # ... and the session went on to 7 h before the kill
        fh.seek(44 + SEVEN_HOURS * 4)
        fh.write(late.astype("<i2").tobytes() + b"\x01\x02")  # and half a sample
    samples = recover_file(path)
    assert samples == SEVEN_HOURS + 2 * RATE
    assert head(path)[:4] == b"RF64"
    assert not list(tmp_path.glob(".*recovering"))
    assert_track(path, samples, {0: pattern(0, RATE), SEVEN_HOURS: late})


def test_converting_to_wav_keeps_room_for_rf64(tmp_path: Path) -> None:
    """convert_file / AudioFile.convert to "wav" writes the same WAV as AudioFile (so a long
    recording converted from FLAC is not cut at 4 GiB either)."""
    audio = AudioFile(tmp_path / "a.flac", format="FLAC")
    for frame in frames(1, 0, 50):
        audio.write(frame)
    audio.cleanup()
    path = audio.convert("wav")
    assert head(path)[:16] == b"RIFF" + struct.pack("<I", path.stat().st_size - 8) + b"WAVEJUNK"
    data, _ = sf.read(str(path), dtype="int16", always_2d=True)
    assert np.array_equal(data, pattern(0, 50 * FRAME))
