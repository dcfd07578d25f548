"""The plugin's one exception."""

from __future__ import annotations

from listening_core.sinks import SinkError

__all__ = ["TranscriptionError"]


class TranscriptionError(SinkError):
    """An engine could not transcribe (model missing, server unreachable, bad reply, timeout).

    The message says what failed and what to do; the sink counts the utterance as failed."""
