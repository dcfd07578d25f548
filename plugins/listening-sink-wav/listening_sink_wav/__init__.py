"""The ``wav`` sink: one 16-bit PCM WAV file per speaker, aligned on the session timeline.

``pip install listening-sink-wav``, then ``vc.listen("wav", options={"directory": "recordings"})``.
Every file starts at session sample 0 and ends at the session's end (silence where the user was
silent or not there yet), is written as frames arrive and flushed about once a second.

Length: no limit. A file is an ordinary RIFF WAV under 4 GiB (6.2 h of 48 kHz stereo) and is
rewritten in place as RF64 (64-bit WAV) past that; long silence is a hole in the file (sparse).

Crash safety: PCM reaches the operating system as it is written, and the WAV header is brought
up to date at every flush, so a file left by a killed process is a valid WAV up to the last
flush (libsndfile reads it to the last sample written even so). :func:`recover` fixes the header
from the file's length (64-bit sizes: a file killed past 4 GiB is made RF64), so every reader
sees everything written before the kill.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from listening_core.hookspecs import SinkSpec, hookimpl
from listening_core.sinks import AudioFileSink, FileSinkOptions, recover_file

__all__ = ["WavOptions", "WavSink", "listening_sinks", "recover"]
__version__ = "0.1.0.dev0"


@dataclass(frozen=True)
class WavOptions(FileSinkOptions):
    """Options of the ``wav`` sink: those of every file sink (directory, template, channels,
    sample_rate, flush_interval)."""


class WavSink(AudioFileSink):
    """One 16-bit PCM WAV per speaker (see :class:`listening_core.sinks.AudioFileSink`)."""

    format: ClassVar[str] = "WAV"
    subtype: ClassVar[str | None] = "PCM_16"
    extension: ClassVar[str] = ".wav"


def recover(path: str | os.PathLike[str]) -> int:
    """Fix the header of a WAV left by a killed process from its length; returns its samples."""
    return recover_file(path)


@hookimpl
def listening_sinks() -> list[SinkSpec]:
    """The ``wav`` sink, for listening-core's registry (found through this package's entry point)."""
    return [SinkSpec("wav", WavSink.from_options, WavOptions, "one WAV file per speaker")]
