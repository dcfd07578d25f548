"""Long tracks for sink tests: frames whose samples say where they are, and a check that reads a
WAV of any length back, hours of it, in seconds.

A sink fed :func:`frames` at session positions hours apart writes a multi-gigabyte WAV whose long
silences are holes in the file (see :class:`~listening_core.sinks.AudioFile`). :func:`assert_track`
reads every stretch of such a file that holds data (``SEEK_DATA``) with soundfile, and a few
samples inside the holes too, and compares each sample with what was written there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..frames import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, FrameKind

__all__ = [
    "HOUR",
    "PAST_4GIB_STEREO",
    "SEVEN_HOURS",
    "assert_track",
    "data_extents",
    "frames",
    "head",
    "pattern",
]

HOUR = 3600 * SAMPLE_RATE
"""Session samples in an hour."""
SEVEN_HOURS = 7 * HOUR
PAST_4GIB_STEREO = (2**32 - 80) // 4 + 1
"""The first stereo sample whose bytes lie past 4 GiB of a WAV file (80-byte header)."""

_BLOCK = 1 << 22  # samples read at once


def pattern(start: int, n: int, *, channels: int = 2, salt: int = 0) -> np.ndarray:
    """``n`` int16 samples that say where they are (and, with ``salt``, whose they are): no two
    stretches of a track look alike."""
    t = np.arange(start, start + n, dtype=np.int64)
    left = ((t * 7 + salt) % 20011 - 10005).astype(np.int16)
    if channels == 1:
        return left.reshape(-1, 1)
    return np.stack([left, ((t * 13 + salt) % 19997 - 9998).astype(np.int16)], axis=1)


def frames(user_id: int, start: int, n: int, *, seq: int = 0, salt: int = 0) -> list[AudioFrame]:
    """``n`` received 20 ms stereo frames of :func:`pattern` from session sample ``start``."""
    return [
        AudioFrame(
            user_id,
            user_id,
            (seq + k) & 0xFFFF,
            0,
            start + k * FRAME_SAMPLES,
            FrameKind.RECEIVED,
            pattern(start + k * FRAME_SAMPLES, FRAME_SAMPLES, salt=salt).astype("<i2").tobytes(),
        )
        for k in range(n)
    ]


def data_extents(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of ``path`` that hold data; the rest are holes (zeros). The whole file where
    the file system cannot say."""
    size = path.stat().st_size
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            pos = end
    except (AttributeError, OSError):
        return [(0, size)]
    finally:
        os.close(fd)
    return extents


def head(path: Path) -> bytes:
    """The first 4 KiB of ``path``: its header (``head(path)[:4]`` is ``RIFF`` or ``RF64``)."""
    with path.open("rb") as fh:
        return fh.read(4096)


def _data_start(path: Path) -> int:
    return head(path).index(b"data") + 8


def assert_track(
    path: Path,
    length: int,
    pieces: Mapping[int, np.ndarray],
    *,
    channels: int = 2,
    until: int | None = None,
) -> None:
    """``path`` reads back with soundfile as exactly ``length`` samples: each of ``pieces``
    (session sample → samples, none past ``length``) where it belongs, zeros everywhere else
    (compared up to ``until``, default the end). Raises :class:`AssertionError` naming the first
    sample that is not what was written there."""
    import soundfile as sf

    assert all(start + len(piece) <= length for start, piece in pieces.items())
    info = sf.info(str(path))
    assert (info.frames, info.channels, info.samplerate) == (length, channels, SAMPLE_RATE), info
    until = length if until is None else until
    offset, align = _data_start(path), 2 * channels
    ranges = [
        (max(0, (a - offset) // align), min(length, -(-(b - offset) // align))) for a, b in data_extents(path)
    ]
    ranges += [(start, start + len(piece)) for start, piece in pieces.items()]
    # a few samples inside the holes too, read through soundfile like the rest
    ranges += [(p, p + 4) for p in np.linspace(0, length - 4, 9, dtype=np.int64).tolist()]
    merged: list[list[int]] = []
    for lo, hi in sorted((lo, min(hi, until)) for lo, hi in ranges):
        if lo >= hi:
            continue
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    blocks = [(a, min(hi, a + _BLOCK)) for lo, hi in merged for a in range(lo, hi, _BLOCK)]
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
                raise AssertionError(
                    f"{path.name}: sample {bad} ({bad / SAMPLE_RATE:.3f} s) is not what was written there"
                )
