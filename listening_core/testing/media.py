"""Speech clips and Opus helpers: what a Discord client sends, and the reference decode of it.

Audio here is always 48 kHz stereo s16le PCM (`bytes`), 20 ms frames of 960 samples = 3840 bytes.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import soundfile as sf
from discord import opus

__all__ = [
    "CHANNELS",
    "FRAME_BYTES",
    "FRAME_SAMPLES",
    "FRAME_SECONDS",
    "OPUS_DELAY_SAMPLES",
    "SAMPLE_RATE",
    "SILENCE_FRAME",
    "SILENCE_TAIL_FRAMES",
    "OpusEncoder",
    "Schedule",
    "ScheduledFrame",
    "Spurt",
    "clip_path",
    "list_clips",
    "load_pcm",
    "reference_decode",
]

_log = logging.getLogger(__name__)

SAMPLE_RATE = 48_000
CHANNELS = 2
FRAME_SAMPLES = 960
"""Samples per channel in one 20 ms frame; also the RTP timestamp step per frame."""
FRAME_BYTES = FRAME_SAMPLES * CHANNELS * 2
FRAME_SECONDS = 0.02
SILENCE_FRAME = b"\xf8\xff\xfe"
"""The Opus frame clients send after speaking (its TOC claims mono; it decodes to 960 stereo samples)."""
SILENCE_TAIL_FRAMES = 5
"""How many `SILENCE_FRAME` follow every spurt of speech."""
OPUS_DELAY_SAMPLES = 312
"""libopus's encoder lookahead at 48 kHz (6.5 ms): `reference_decode` output lags the encoded PCM by
this much (CELT frames exactly; the clips' speech, coded in hybrid mode, lines up best at 310)."""

_CLIPS_DIR = pathlib.Path(__file__).parent / "clips"
_RTP_TIMESTAMP_MODULUS = 1 << 32


def list_clips() -> list[str]:
    """Names of the bundled speech clips (see ``clips/README.md``), sorted."""
    return sorted(path.stem for path in _CLIPS_DIR.glob("*.flac"))


def clip_path(name: str) -> pathlib.Path:
    """Path of the bundled clip `name` (with or without ``.flac``)."""
    path = _CLIPS_DIR / (name if name.endswith(".flac") else f"{name}.flac")
    if not path.is_file():
        raise FileNotFoundError(f"no bundled clip named {name!r}; the clips are: {', '.join(list_clips())}")
    return path


def load_pcm(path_or_name: str | os.PathLike[str]) -> bytes:
    """48 kHz stereo s16le PCM of a bundled clip (by name) or of any 48 kHz audio file soundfile reads.

    Mono is duplicated into both channels. Other sample rates are refused (no resampler here).
    """
    if isinstance(path_or_name, str) and path_or_name.removesuffix(".flac") in list_clips():
        path = clip_path(path_or_name)
    else:
        path = pathlib.Path(path_or_name)
    data, rate = sf.read(path, dtype="int16", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(
            f"{path} is sampled at {rate} Hz; convert it to {SAMPLE_RATE} Hz first (e.g. with sox)"
        )
    if data.shape[1] == 1:
        data = np.repeat(data, CHANNELS, axis=1)
    elif data.shape[1] != CHANNELS:
        raise ValueError(f"{path} has {data.shape[1]} channels; only mono and stereo are supported")
    return np.ascontiguousarray(data, dtype="<i2").tobytes()


class OpusEncoder:
    """discord.py's own `discord.opus.Encoder` with the settings `VoiceClient.play()` uses by default.

    That is: application 'audio', 128 kbps, in-band FEC on with 15 % expected loss, full band,
    automatic signal type; exactly what a discord.py client sends.
    """

    __slots__ = ("_encoder",)

    def __init__(self) -> None:
        self._encoder = opus.Encoder()

    def encode(self, frame: bytes) -> bytes:
        """Encode one 20 ms frame of exactly `FRAME_BYTES` bytes."""
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"an Opus frame takes exactly {FRAME_BYTES} bytes of PCM, got {len(frame)}")
        return self._encoder.encode(frame, FRAME_SAMPLES)

    def encode_pcm(self, pcm: bytes) -> list[bytes]:
        """Encode `pcm` as consecutive 20 ms frames, the last one padded with zeros."""
        if len(pcm) % (CHANNELS * 2):
            raise ValueError(f"stereo s16le PCM comes in 4-byte samples; got {len(pcm)} bytes")
        frames = []
        for offset in range(0, len(pcm), FRAME_BYTES):
            chunk = pcm[offset : offset + FRAME_BYTES]
            frames.append(self.encode(chunk.ljust(FRAME_BYTES, b"\0")))
        return frames


def reference_decode(frames: Iterable[bytes | None]) -> bytes:
    """Decode `frames` in order with one fresh `discord.opus.Decoder`; None conceals a lost frame (PLC).

    This is the decode receivers are compared against: 48 kHz stereo s16le, 3840 bytes per frame.
    """
    decoder = opus.Decoder()
    return b"".join(
        decoder.decode(frame, fec=False) if frame is not None else decoder.decode(None, fec=False)
        for frame in frames
    )


@dataclass(frozen=True)
class Spurt:
    """One stretch of speech: `pcm` (48 kHz stereo s16le) starting `start` seconds after the member starts.

    The first frame goes out in the 20 ms slot nearest to `start` (`first_slot`).
    """

    start: float
    pcm: bytes

    def __post_init__(self) -> None:
        if not math.isfinite(self.start) or self.start < 0:
            raise ValueError(f"Spurt.start must be a finite number of seconds >= 0, got {self.start!r}")
        if not self.pcm or len(self.pcm) % (CHANNELS * 2):
            raise ValueError(
                f"Spurt.pcm must be non-empty stereo s16le PCM (4-byte samples), got {len(self.pcm)} bytes"
            )

    @property
    def first_slot(self) -> int:
        """Index of the 20 ms slot of the first frame, counted from the member's start."""
        return round(self.start / FRAME_SECONDS)

    @property
    def frame_count(self) -> int:
        """Opus frames of speech (the last one zero-padded), not counting the silence tail."""
        return -(-len(self.pcm) // FRAME_BYTES)

    @property
    def end_slot(self) -> int:
        """One past the slot of the last silence-tail frame."""
        return self.first_slot + self.frame_count + SILENCE_TAIL_FRAMES


class ScheduledFrame(NamedTuple):
    """One datagram's worth of audio in a `Schedule`."""

    offset: float
    """Seconds from the member's start: ``slot * 0.02``."""
    opus: bytes
    """The Opus frame (`SILENCE_FRAME` in a silence tail)."""
    is_silence_tail: bool

    @property
    def slot(self) -> int:
        """Index of the 20 ms slot this frame occupies."""
        return round(self.offset / FRAME_SECONDS)

    @property
    def sample(self) -> int:
        """Position of the frame's first sample on the member's 48 kHz timeline."""
        return self.slot * FRAME_SAMPLES

    def rtp_timestamp(self, base: int = 0) -> int:
        """The RTP timestamp of this frame when the member's first slot has timestamp `base`."""
        return (base + self.sample) % _RTP_TIMESTAMP_MODULUS


class Schedule:
    """When a virtual member speaks, and the exact frames a Discord client sends for it.

    For each `Spurt` (in start order): one Opus frame every 20 ms, then `SILENCE_TAIL_FRAMES`
    `SILENCE_FRAME` frames every 20 ms, then nothing until the next spurt. Each spurt is encoded
    by its own fresh `OpusEncoder`, as discord.py does for each ``play()``.

    RTP timestamps follow the wall clock, as Discord's clients do: timestamp = ``base + 960 * slot``
    (mod 2**32) where ``slot = round(offset / 0.02)``, so the timestamp keeps counting across gaps
    and ``ScheduledFrame.sample`` is the frame's exact position on the member's timeline. (discord.py
    itself advances its timestamp only per packet sent and sends its five silence frames back to
    back; a receiver must cope with that too, but this schedule models the client.)

    Spurts may not overlap, silence tails included.
    """

    __slots__ = ("spurts",)

    def __init__(self, spurts: Iterable[Spurt]) -> None:
        self.spurts: tuple[Spurt, ...] = tuple(sorted(spurts, key=lambda spurt: spurt.start))
        for before, after in itertools.pairwise(self.spurts):
            if after.first_slot < before.end_slot:
                raise ValueError(
                    f"the spurt at {after.start} s starts before the one at {before.start} s has ended "
                    f"(with its silence tail, at {before.end_slot * FRAME_SECONDS:.2f} s); move it later"
                )

    @classmethod
    def from_clips(cls, clips: Iterable[tuple[str | os.PathLike[str], float]]) -> Schedule:
        """A schedule of ``(clip name or path, start seconds)`` pairs, each clip one spurt."""
        return cls(Spurt(start, load_pcm(clip)) for clip, start in clips)

    def __repr__(self) -> str:
        starts = ", ".join(f"{spurt.start}s+{spurt.frame_count}f" for spurt in self.spurts)
        return f"<Schedule [{starts}]>"

    @property
    def slot_count(self) -> int:
        """Slots from the member's start to one past the last frame sent."""
        return self.spurts[-1].end_slot if self.spurts else 0

    @property
    def duration(self) -> float:
        """Seconds from the member's start to the end of the last frame sent."""
        return self.slot_count * FRAME_SECONDS

    def frames(self) -> Iterator[ScheduledFrame]:
        """Every frame the client sends, in order, each encoded only when asked for (so a sender asks
        for the next frame while it waits to send this one, never for a whole spurt at once)."""
        for spurt in self.spurts:
            encoder = OpusEncoder()
            slot = spurt.first_slot
            for offset in range(0, len(spurt.pcm), FRAME_BYTES):
                chunk = spurt.pcm[offset : offset + FRAME_BYTES].ljust(FRAME_BYTES, b"\0")
                yield ScheduledFrame(slot * FRAME_SECONDS, encoder.encode(chunk), False)
                slot += 1
            for _ in range(SILENCE_TAIL_FRAMES):
                yield ScheduledFrame(slot * FRAME_SECONDS, SILENCE_FRAME, True)
                slot += 1

    def reference_pcm(self, frames: Sequence[ScheduledFrame] | None = None) -> bytes:
        """The member's whole track as a perfect receiver writes it: every frame decoded in order by one
        decoder and placed at its `ScheduledFrame.sample`, zeros where nothing was sent.

        Pass `frames` (from `frames()`) to avoid encoding twice.
        """
        frames = list(self.frames()) if frames is None else frames
        decoded = reference_decode(frame.opus for frame in frames)
        track = bytearray(self.slot_count * FRAME_BYTES)
        for k, frame in enumerate(frames):
            track[frame.slot * FRAME_BYTES : (frame.slot + 1) * FRAME_BYTES] = decoded[
                k * FRAME_BYTES : (k + 1) * FRAME_BYTES
            ]
        return bytes(track)
