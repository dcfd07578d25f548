"""The ``flac`` sink: one lossless FLAC file per speaker, aligned on the session timeline.

``pip install listening-sink-flac``, then ``vc.listen("flac", options={"directory": "recordings"})``.
Every file starts at session sample 0 and ends at the session's end (silence where the user was
silent or not there yet), encoded as frames arrive and flushed about once a second.

Crash safety: libFLAC writes each encoded frame as it goes but the stream's length only when the
file is closed. After a killed process, run :func:`recover` on the file (or
``python -m listening_sink_flac FILE...``): it decodes the file up to the first damaged frame
and re-encodes that, losslessly, into a complete FLAC in its place. What is lost is what the
encoder still held: at most one block (4096 samples, 85 ms at 48 kHz) plus the frames since the
last write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from listening_core.hookspecs import SinkSpec, hookimpl
from listening_core.sinks import AudioFileSink, FileSinkOptions, recover_file

__all__ = ["FlacOptions", "FlacSink", "listening_sinks", "recover"]
__version__ = "0.1.0.dev0"


@dataclass(frozen=True)
class FlacOptions(FileSinkOptions):
    """Options of the ``flac`` sink: those of every file sink, and the compression level."""

    compression_level: int = field(
        default=5, metadata={"help": "FLAC compression, 0 (fastest) to 8 (smallest); lossless at every level"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.compression_level <= 8:
            raise ValueError(f"compression_level must be between 0 and 8, got {self.compression_level}")


class FlacSink(AudioFileSink):
    """One 16-bit FLAC per speaker (see :class:`listening_core.sinks.AudioFileSink`)."""

    format: ClassVar[str] = "FLAC"
    subtype: ClassVar[str | None] = "PCM_16"
    extension: ClassVar[str] = ".flac"
    compression_level: int = 5

    @classmethod
    def from_options(cls, options: FileSinkOptions) -> FlacSink:
        sink = super().from_options(options)
        sink.compression_level = getattr(options, "compression_level", 5)
        return sink

    def file_options(self) -> dict[str, Any]:
        # soundfile's 0..1 scale maps linearly onto libFLAC's levels 0..8
        return {"compression_level": self.compression_level / 8}


def recover(path: str | os.PathLike[str]) -> int:
    """Make a FLAC left by a killed process complete (see the module); returns its samples."""
    return recover_file(path)


@hookimpl
def listening_sinks() -> list[SinkSpec]:
    """The ``flac`` sink, for listening-core's registry (found through this package's entry point)."""
    return [SinkSpec("flac", FlacSink.from_options, FlacOptions, "one FLAC file per speaker")]
