"""listening-core: voice receive for discord.py bots on today's Discord.

``vc = await channel.connect(cls=listening_core.VoiceClient)`` then ``vc.listen(sink)``: every
member's audio, opened through both transport encryption modes and DAVE, ordered, with lost
frames recovered (FEC) or concealed, decoded in worker processes and placed on one session
timeline, goes to an :class:`AudioSink`. Sinks can be installed plugins chosen by name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

__all__ = [
    "AudioFile",
    "AudioFileSink",
    "AudioFrame",
    "AudioHandlingSink",
    "AudioProcessPool",
    "AudioReceiver",
    "AudioSink",
    "AudioUnpacker",
    "FrameKind",
    "FrameStream",
    "ListenOptions",
    "ListeningError",
    "ListeningInterrupted",
    "ListeningStateError",
    "LiveSink",
    "PcmChunk",
    "PcmStream",
    "RtcpPacket",
    "UserStats",
    "VoiceClient",
    "__version__",
]

if TYPE_CHECKING:
    from .errors import ListeningError, ListeningInterrupted, ListeningStateError
    from .frames import AudioFrame, FrameKind, RtcpPacket
    from .live import FrameStream, LiveSink, PcmChunk, PcmStream
    from .pool import AudioProcessPool
    from .receiver import AudioReceiver
    from .session import ListenOptions, UserStats
    from .sinks import AudioFile, AudioFileSink, AudioHandlingSink, AudioSink
    from .unpacker import AudioUnpacker
    from .voice_client import VoiceClient

# Imported on first use, so that worker processes and the pytest plugin stay light.
_LAZY = {
    "AudioFile": ".sinks",
    "AudioFileSink": ".sinks",
    "AudioFrame": ".frames",
    "AudioHandlingSink": ".sinks",
    "AudioProcessPool": ".pool",
    "AudioReceiver": ".receiver",
    "AudioSink": ".sinks",
    "AudioUnpacker": ".unpacker",
    "FrameKind": ".frames",
    "FrameStream": ".live",
    "ListenOptions": ".session",
    "ListeningError": ".errors",
    "ListeningInterrupted": ".errors",
    "ListeningStateError": ".errors",
    "LiveSink": ".live",
    "PcmChunk": ".live",
    "PcmStream": ".live",
    "RtcpPacket": ".frames",
    "UserStats": ".session",
    "VoiceClient": ".voice_client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
