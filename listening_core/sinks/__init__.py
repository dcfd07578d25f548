"""Where received audio goes: :class:`AudioFrame` and the sink classes.

A listening session hands every user's frames to one :class:`AudioSink`, in order per user,
from one delivery thread (never the socket reader's, so a slow sink cannot make packets drop).

- :class:`AudioSink`: the base: ``on_audio``, ``on_rtcp``, ``cleanup``.
- :class:`MultiSink`: several sinks on one session (``vc.listen(["wav", "mixdown"])``); one
  that fails is stopped alone.
- :class:`AudioHandlingSink`: the seed's validation procedure (wrap-aware, per user and SSRC)
  in front of ``on_valid_audio``: a frame that would go backwards is dropped and counted.
- :class:`AudioFileSink`: one :class:`AudioFile` per user, all aligned on the session timeline.
- :class:`AudioFile`: one user's track streamed to disk through soundfile as frames arrive,
  silence where the user was silent, so tracks drop into an editor side by side; mono or
  stereo, 48 kHz or resampled (:mod:`listening_core.resample`); :meth:`AudioFile.convert`. Any
  length: a WAV is RIFF under 4 GiB and RF64 past it.
- :class:`FileSinkOptions`: the options the file sink plugins (wav, flac, mp3) share.
- :class:`FileNamer`: template → safe name → unique on disk, how every sink names its files.
- :func:`recover_file`: make a file left by a killed process whole; :func:`convert_file`.

Everything is importable from here; the modules of this package hold one concept each:

- :mod:`~listening_core.sinks.base`: :class:`AudioSink`, :class:`AudioHandlingSink`,
  :class:`MultiSink`.
- :mod:`~listening_core.sinks.audiofile`: :class:`AudioFile`, :func:`convert_file`, the MP3 helpers.
- :mod:`~listening_core.sinks.recovery`: :func:`recover_file`.
- :mod:`~listening_core.sinks.filesink`: :class:`AudioFileSink`, :class:`FileSinkOptions`,
  :class:`FileNamer` and its :data:`PLACEHOLDERS`, :func:`safe_filename`.
- The vocabulary (:class:`AudioFrame`, :class:`FrameKind`, :class:`RtcpPacket`,
  :class:`SessionInfo`, the rates) is :mod:`listening_core.frames`'; :class:`SinkError` is
  :mod:`listening_core.errors`'.
"""

from __future__ import annotations

from ..errors import SinkError
from ..frames import (
    CHANNELS,
    FRAME_BYTES,
    FRAME_SAMPLES,
    OPUS_SILENCE,
    SAMPLE_RATE,
    AudioFrame,
    FrameKind,
    RtcpPacket,
    SessionInfo,
)
from .audiofile import (
    FILE_FORMATS,
    MP3_SAMPLE_RATES,
    AudioFile,
    convert_file,
    mp3_bitrates,
    mp3_compression_level,
)
from .base import AudioHandlingSink, AudioSink, MultiSink
from .base import _unused_name as _unused_name  # for voice_client: a MultiSink's names
from .filesink import (
    PLACEHOLDERS,
    SESSION_PLACEHOLDERS,
    SPEAKER_PLACEHOLDERS,
    STARTED_FORMAT,
    AudioFileSink,
    FileNamer,
    FileSinkOptions,
    check_template,
    safe_filename,
)
from .recovery import recover_file

__all__ = [
    "CHANNELS",
    "FILE_FORMATS",
    "FRAME_BYTES",
    "FRAME_SAMPLES",
    "MP3_SAMPLE_RATES",
    "OPUS_SILENCE",
    "PLACEHOLDERS",
    "SAMPLE_RATE",
    "SESSION_PLACEHOLDERS",
    "SPEAKER_PLACEHOLDERS",
    "STARTED_FORMAT",
    "AudioFile",
    "AudioFileSink",
    "AudioFrame",
    "AudioHandlingSink",
    "AudioSink",
    "FileNamer",
    "FileSinkOptions",
    "FrameKind",
    "MultiSink",
    "RtcpPacket",
    "SessionInfo",
    "SinkError",
    "check_template",
    "convert_file",
    "mp3_bitrates",
    "mp3_compression_level",
    "recover_file",
    "safe_filename",
]
