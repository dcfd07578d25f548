"""The vocabulary every part of listening-core speaks: frames, their kinds, sessions, the rates.

- :data:`SAMPLE_RATE`, :data:`CHANNELS`, :data:`FRAME_SAMPLES`, :data:`FRAME_BYTES`: Discord's
  audio (48 kHz, stereo, 20 ms frames) and the size of one decoded frame.
- :data:`OPUS_SILENCE`: the Opus silence frame.
- :class:`FrameKind`, :class:`AudioFrame`: one user's 20 ms on the session timeline, and how it
  was obtained.
- :class:`RtcpPacket`, :class:`SessionInfo`: what else a sink is told.

Pure: no thread, clock, socket or discord.py object at runtime. Everything here is importable
from :mod:`listening_core.sinks` too, where sink authors find it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import discord

__all__ = [
    "CHANNELS",
    "FRAME_BYTES",
    "FRAME_SAMPLES",
    "OPUS_SILENCE",
    "SAMPLE_RATE",
    "AudioFrame",
    "FrameKind",
    "RtcpPacket",
    "SessionInfo",
]

SAMPLE_RATE = 48_000
"""Hz: Discord's Opus audio, the session timeline and decoded PCM."""
CHANNELS = 2
"""Channels of decoded PCM (stereo, as received)."""
FRAME_SAMPLES = 960
"""Samples per channel in one 20 ms frame."""
FRAME_BYTES = FRAME_SAMPLES * CHANNELS * 2
"""Bytes of one decoded 20 ms frame: 48 kHz stereo s16le (3840)."""

OPUS_SILENCE = b"\xf8\xff\xfe"
"""The Opus silence frame: senders end every talk spurt with five of them."""


class FrameKind(enum.Enum):
    """How a frame's audio was obtained."""

    RECEIVED = "received"
    """The packet arrived and was decoded."""
    SILENCE = "silence"
    """The packet arrived and was the Opus silence frame (senders end every spurt with five)."""
    FEC = "fec"
    """The packet was lost; rebuilt from the next packet's in-band FEC."""
    PLC = "plc"
    """The packet was lost (or its decoder died); concealed."""


@dataclass(slots=True)
class AudioFrame:
    """One 20 ms frame of one user's audio, placed on the session timeline.

    ``position`` is the session sample (48 kHz; sample 0 = the moment ``listen`` started) of the
    frame's first sample. ``pcm`` is 48 kHz stereo s16le (3840 bytes) when the sink wants PCM,
    else ``None``; ``opus`` is the received Opus frame (``None`` for FEC/PLC frames).
    """

    user_id: int
    ssrc: int
    sequence: int
    timestamp: int
    position: int
    kind: FrameKind
    pcm: bytes | None = None
    opus: bytes | None = None
    member: discord.Member | None = field(default=None, repr=False, compare=False)
    arrival: float | None = field(default=None, repr=False, compare=False)
    """``time.monotonic()`` when the packet arrived (``None`` for FEC/PLC frames): ``time.monotonic()
    - frame.arrival`` in ``on_audio`` is the frame's latency through the pipeline. The first frame
    of a talk spurt carries the receiver's estimate of its arrival free of delay spikes (never
    later than the real one), which is also what places it on the timeline."""

    @property
    def samples(self) -> int:
        """Samples per channel in this frame (960 for 20 ms)."""
        return len(self.pcm) // (CHANNELS * 2) if self.pcm is not None else FRAME_SAMPLES

    @property
    def end(self) -> int:
        """The session sample just after this frame."""
        return self.position + self.samples


@dataclass(slots=True, frozen=True)
class RtcpPacket:
    """A decrypted RTCP packet (compound packets are kept whole) from ``user_id`` (None if unknown)."""

    ssrc: int
    user_id: int | None
    packet_type: int
    data: bytes


@dataclass(frozen=True)
class SessionInfo:
    """What a sink is told when a session starts."""

    guild_id: int | None
    channel_id: int | None
    started_at: float  # time.time() at sample 0
    sample_rate: int = SAMPLE_RATE
    channels: int = CHANNELS
