"""The sink classes a session talks to: :class:`AudioSink`, :class:`MultiSink`, :class:`AudioHandlingSink`.

- :class:`AudioSink`: the base: ``on_start``, ``on_audio``, ``on_rtcp``, ``on_stop``, ``cleanup``.
- :class:`MultiSink`: several sinks on one session (``vc.listen(["wav", "mixdown"])``); one
  that fails is stopped alone.
- :class:`AudioHandlingSink`: the seed's validation procedure (wrap-aware, per user and SSRC)
  in front of ``on_valid_audio``: a frame that would go backwards is dropped and counted.
"""

from __future__ import annotations

import abc
import collections
import logging
from collections.abc import Callable, Container, Iterable, Mapping
from typing import ClassVar

from ..errors import SinkError
from ..frames import AudioFrame, RtcpPacket, SessionInfo
from ..rtp import seq_diff

_log = logging.getLogger(__name__)

__all__ = ["AudioHandlingSink", "AudioSink", "MultiSink"]


class AudioSink(abc.ABC):
    """Receives a listening session's audio.

    ``on_audio`` is called for every frame, in order per user, from the session's delivery thread;
    ``on_rtcp`` for every RTCP packet; ``on_stop`` with the session's final sample after the last
    frame; ``cleanup`` once when the session ends. An exception from any of them stops this sink
    and reaches ``listen``'s ``after``. Set ``wants_pcm = False`` on sinks that only keep Opus:
    the session then skips decoding.
    """

    wants_pcm: ClassVar[bool] = True

    def on_start(self, session: SessionInfo) -> None:  # noqa: B027 - optional hook
        """Called once before the first frame with what is known about the session."""

    @abc.abstractmethod
    def on_audio(self, frame: AudioFrame) -> None:
        """Handle one frame."""

    def on_rtcp(self, packet: RtcpPacket) -> None:  # noqa: B027 - optional hook
        """Handle one decrypted RTCP packet (default: ignore it)."""

    def on_stop(self, end: int) -> None:  # noqa: B027 - optional hook
        """The session stopped at session sample ``end``; called after the last frame, before cleanup.

        File sinks extend every track to ``end`` so all tracks have the session's length.
        """

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        """The session ended: flush and close. Called exactly once."""


def _unused_name(sink: object, taken: Container[str]) -> str:
    """``sink``'s class name, with ``-2``, ``-3``… if that is in ``taken``: its name in a MultiSink."""
    base = type(sink).__name__
    key, n = base, 2
    while key in taken:
        key, n = f"{base}-{n}", n + 1
    return key


class MultiSink(AudioSink):
    """Several sinks fed by one session: each gets every frame, RTCP packet and the stop.

    ``vc.listen(["wav", "mixdown"], options={"wav": {...}})`` builds one from installed sinks;
    ``MultiSink({"report": SessionReport(), "wav": my_sink})`` from instances. Audio is decoded
    once when any of them :attr:`~AudioSink.wants_pcm`. A sink that raises is cleaned up at once
    (its files keep what they hold), logged at ERROR and recorded in :attr:`errors`; the others go
    on. At cleanup a :class:`SinkError` naming every failed sink is raised, so ``after`` hears of
    it. When every sink has failed, the session ends.
    """

    def __init__(self, sinks: Mapping[str, AudioSink] | Iterable[AudioSink]) -> None:
        named = dict(sinks) if isinstance(sinks, Mapping) else {}
        if not isinstance(sinks, Mapping):
            for sink in sinks:
                named[_unused_name(sink, named)] = sink
        if not named:
            raise ValueError("MultiSink needs at least one sink")
        for key, sink in named.items():
            if not isinstance(sink, AudioSink):
                raise TypeError(f"MultiSink: {key!r} is a {type(sink).__name__}, not an AudioSink")
        self.sinks: dict[str, AudioSink] = named
        """The sinks by name, in the order they are called."""
        self.errors: dict[str, BaseException] = {}
        """The sinks that failed, by name, with their exception."""
        self._active = list(named.items())
        # Decoding is per session: decode when any sink wants PCM (an instance value here).
        setattr(self, "wants_pcm", any(s.wants_pcm for s in named.values()))  # noqa: B010

    def __getitem__(self, name: str) -> AudioSink:
        """The sink called ``name``."""
        return self.sinks[name]

    def __repr__(self) -> str:
        return f"<MultiSink {list(self.sinks)}>"

    def _fail(self, name: str, sink: AudioSink, exc: Exception) -> None:
        self.errors[name] = exc
        self._active = [(n, s) for n, s in self._active if s is not sink]
        _log.error("sink %r failed and was stopped (the other sinks go on): %r", name, exc)
        try:
            sink.cleanup()
        except Exception as cleanup_exc:
            _log.error("cleanup of the failed sink %r failed too: %r", name, cleanup_exc)
        if not self._active:
            raise SinkError(f"every sink failed: {self._describe_errors()}") from exc

    def _describe_errors(self) -> str:
        return "; ".join(f"{name}: {exc!r}" for name, exc in self.errors.items())

    def _each(self, call: Callable[[AudioSink], None]) -> None:
        for name, sink in list(self._active):
            try:
                call(sink)
            except Exception as exc:
                self._fail(name, sink, exc)

    def on_start(self, session: SessionInfo) -> None:
        """Start every sink."""
        self._each(lambda sink: sink.on_start(session))

    def on_audio(self, frame: AudioFrame) -> None:
        """Hand ``frame`` to every sink still running."""
        for name, sink in self._active:
            try:
                sink.on_audio(frame)
            except Exception as exc:
                self._fail(name, sink, exc)

    def on_rtcp(self, packet: RtcpPacket) -> None:
        """Hand ``packet`` to every sink still running."""
        self._each(lambda sink: sink.on_rtcp(packet))

    def on_stop(self, end: int) -> None:
        """Tell every sink still running that the session stopped at ``end``."""
        self._each(lambda sink: sink.on_stop(end))

    def cleanup(self) -> None:
        """Clean up every sink still running; raise :class:`SinkError` if any sink failed."""
        active, self._active = self._active, []
        for name, sink in active:
            try:
                sink.cleanup()
            except Exception as exc:
                self.errors[name] = exc
                _log.error("cleanup of sink %r failed: %r", name, exc)
        if self.errors:
            first = next(iter(self.errors.values()))
            raise SinkError(
                f"{len(self.errors)} of {len(self.sinks)} sinks failed: {self._describe_errors()}"
            ) from first


class AudioHandlingSink(AudioSink):
    """Validates frames before :meth:`on_valid_audio`: the seed's procedure, fixed.

    For each user and SSRC: the first frame is valid; the next sequence number is valid; a frame
    at or before the last valid one (wrap-aware, so 65535 → 0 is "next") is dropped and counted in
    :attr:`invalid`; a jump forward is accepted and counted in :attr:`gaps` (the receiver conceals
    every lost frame, so a gap means frames went missing upstream). Positions never go backwards
    for a user. The receiver already delivers in order; this is the guard that keeps a sink's
    output true if anything upstream ever does not.
    """

    def __init__(self) -> None:
        self._last_seq: dict[tuple[int, int], int] = {}
        self._last_end: dict[int, int] = {}
        self.invalid: collections.Counter[int] = collections.Counter()
        self.gaps: collections.Counter[int] = collections.Counter()

    def on_audio(self, frame: AudioFrame) -> None:
        key = (frame.user_id, frame.ssrc)
        last = self._last_seq.get(key)
        if last is not None:
            step = seq_diff(frame.sequence, last)
            if step <= 0:
                self.invalid[frame.user_id] += 1
                return
            if step > 1:
                self.gaps[frame.user_id] += 1
        end = self._last_end.get(frame.user_id)
        if end is not None and frame.position < end:
            # A new SSRC for this user (rejoin) placed over its previous frames: keep time moving.
            self.invalid[frame.user_id] += 1
            return
        self._last_seq[key] = frame.sequence
        self._last_end[frame.user_id] = frame.end
        self.on_valid_audio(frame)

    @abc.abstractmethod
    def on_valid_audio(self, frame: AudioFrame) -> None:
        """Handle a frame that passed validation."""
