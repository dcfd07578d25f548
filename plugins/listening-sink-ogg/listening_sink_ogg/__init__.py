"""listening-sink-ogg: the ``ogg-opus`` sink for listening-core.

One Ogg Opus file per speaker holding the Opus packets exactly as they were received (no decode,
no re-encode), each at its place on the session timeline through granule positions; pauses and
lost frames are filled with Opus silence and concealment packets (RFC 7845 section 4.1), so
every player keeps the timeline. Select it by name once this distribution is installed::

    vc.listen("ogg-opus", options={"directory": "recordings"})

This module is the plugin (the ``listening_core.sinks`` entry point names it). It also offers
the reader used by the tests: :func:`read_packets`, :func:`read_stream`, :func:`decode_to_pcm`
and :func:`is_filler`.
"""

from __future__ import annotations

from listening_core.hookspecs import SinkSpec, hookimpl

from .ogg import (
    END_MARKER,
    PRE_SKIP,
    OggOpusStream,
    OggOpusWriter,
    Packet,
    decode_to_pcm,
    is_filler,
    ogg_crc,
    opus_packet_samples,
    read_packets,
    read_stream,
)
from .sink import VERSION, OggOpusOptions, OggOpusSink

__version__ = VERSION

__all__ = [
    "END_MARKER",
    "PRE_SKIP",
    "OggOpusOptions",
    "OggOpusSink",
    "OggOpusStream",
    "OggOpusWriter",
    "Packet",
    "__version__",
    "decode_to_pcm",
    "is_filler",
    "listening_sinks",
    "ogg_crc",
    "opus_packet_samples",
    "read_packets",
    "read_stream",
]


@hookimpl
def listening_sinks() -> list[SinkSpec]:
    """The sinks of this plugin: ``ogg-opus``."""
    return [
        SinkSpec(
            "ogg-opus",
            OggOpusSink,
            OggOpusOptions,
            "one Ogg Opus file per speaker: the received Opus packets, untouched, on the session timeline",
            wants_pcm=False,
        )
    ]
