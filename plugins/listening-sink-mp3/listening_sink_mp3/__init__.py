"""The ``mp3`` sink: one MP3 file per speaker, aligned on the session timeline.

``pip install listening-sink-mp3``, then ``vc.listen("mp3", options={"bitrate": 192})``.
Encoded by libsndfile's LAME (MPEG Layer III) as frames arrive; no ffmpeg. Every file starts at
session sample 0 and ends at the session's end (silence where the user was silent or not there
yet); when the file is closed LAME's info tag records the encoder delay and padding, so decoders
that honour it (libsndfile/mpg123, ffmpeg…) give back exactly the session's samples.

``bitrate`` (kbit/s) is mapped onto soundfile's ``compression_level`` by
:func:`listening_core.sinks.mp3_compression_level`: libsndfile sets LAME's bitrate to
``int(320 - level * 288)`` at 32-48 kHz, ``int(160 - level * 152)`` at 16-24 kHz and
``int(64 - level * 56)`` below; ``bitrate_mode`` "constant" is CBR, "average" is ABR around it.

Crash safety: an MP3 is a stream of frames and LAME's are written as they are encoded, so a file
left by a killed process plays as it is, up to the frames the encoder still held (a few tens of
milliseconds); only the info tag (gapless trimming) is missing. :func:`recover` is there for
symmetry with the other file sinks: it changes nothing and returns the readable samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from listening_core.hookspecs import SinkSpec, hookimpl
from listening_core.sinks import (
    MP3_SAMPLE_RATES,
    AudioFileSink,
    FileSinkOptions,
    mp3_compression_level,
    recover_file,
)

__all__ = ["Mp3Options", "Mp3Sink", "listening_sinks", "recover"]
__version__ = "0.1.0.dev0"


@dataclass(frozen=True)
class Mp3Options(FileSinkOptions):
    """Options of the ``mp3`` sink: those of every file sink, bitrate and bitrate mode."""

    bitrate: int = field(
        default=128,
        metadata={"help": "kbit/s: 32-320 at 32-48 kHz, 8-160 at 16-24 kHz, 8-64 below (MPEG bitrates)"},
    )
    bitrate_mode: Literal["constant", "average"] = field(
        default="constant", metadata={"help": "constant (CBR) or average (ABR around bitrate)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sample_rate not in MP3_SAMPLE_RATES:
            raise ValueError(
                f"sample_rate {self.sample_rate} Hz cannot be stored in an MP3; use one of "
                + ", ".join(map(str, MP3_SAMPLE_RATES))
            )
        mp3_compression_level(self.bitrate, self.sample_rate)  # raises ValueError naming the bitrate


class Mp3Sink(AudioFileSink):
    """One MP3 per speaker (see :class:`listening_core.sinks.AudioFileSink`)."""

    format: ClassVar[str] = "MP3"
    subtype: ClassVar[str | None] = "MPEG_LAYER_III"
    extension: ClassVar[str] = ".mp3"
    bitrate: int = 128
    bitrate_mode: str = "constant"

    @classmethod
    def from_options(cls, options: FileSinkOptions) -> Mp3Sink:
        sink = super().from_options(options)
        sink.bitrate = getattr(options, "bitrate", 128)
        sink.bitrate_mode = getattr(options, "bitrate_mode", "constant")
        mp3_compression_level(sink.bitrate, sink.sample_rate)
        return sink

    def file_options(self) -> dict[str, Any]:
        return {
            "compression_level": mp3_compression_level(self.bitrate, self.sample_rate),
            "bitrate_mode": self.bitrate_mode.upper(),
        }


def recover(path: str | os.PathLike[str]) -> int:
    """The samples readable from an MP3 left by a killed process (nothing needs fixing)."""
    return recover_file(path)


@hookimpl
def listening_sinks() -> list[SinkSpec]:
    """The ``mp3`` sink, for listening-core's registry (found through this package's entry point)."""
    return [SinkSpec("mp3", Mp3Sink.from_options, Mp3Options, "one MP3 file per speaker")]
