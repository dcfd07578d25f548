"""Session clock and RTP-timestamp-to-session-sample mapping, with no I/O.

Every user's track is laid on one sample clock, the session's (48 kHz; sample 0 is the moment
listening started), so that tracks line up. A :class:`StreamTimeline` maps one SSRC's RTP
timestamps onto it: the first frame is anchored at its arrival, later frames follow their RTP
timestamps exactly (wrap-aware), and at the start of a talk spurt the mapping is re-anchored at
the arrival time if the two disagree by more than a threshold (discord.py senders do not advance
their timestamp while silent; clocks drift). Positions never go backwards, and the silence
between two placed frames is reported so that file sinks can fill it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .frames import SAMPLE_RATE
from .rtp import ts_diff

__all__ = ["SAMPLE_RATE", "SessionClock", "SilenceSpan", "StreamTimeline"]

_log = logging.getLogger(__name__)


class SessionClock:
    """The session's sample clock: sample 0 is ``start``, a :func:`time.monotonic` value.

    It never pauses: while listening is paused the timeline keeps counting (paused audio is
    discarded upstream), so positions stay true to the wall clock.
    """

    __slots__ = ("sample_rate", "start")

    def __init__(self, start: float, sample_rate: int = SAMPLE_RATE) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.start: float = start
        self.sample_rate: int = sample_rate

    def sample_at(self, t: float) -> int:
        """The session sample at monotonic time ``t``: ``round((t - start) * sample_rate)``."""
        return round((t - self.start) * self.sample_rate)

    def time_at(self, sample: int) -> float:
        """The monotonic time of session sample ``sample`` (the inverse of :meth:`sample_at`)."""
        return self.start + sample / self.sample_rate

    def __repr__(self) -> str:
        return f"<SessionClock start={self.start} rate={self.sample_rate}>"


@dataclass(slots=True, frozen=True)
class SilenceSpan:
    """Session samples ``[start, end)`` of one stream in which nothing was placed."""

    start: int
    end: int

    @property
    def length(self) -> int:
        """Number of samples in the span."""
        return self.end - self.start


class StreamTimeline:
    """Places one SSRC's frames on the session clock, by RTP timestamp.

    Rules:

    - The first frame anchors the mapping: its position is ``clock.sample_at(arrival)``
      (never before sample 0), so it needs an arrival time.
    - Each later frame is placed at the previous frame's position plus
      ``ts_diff(timestamp, previous timestamp)``: RTP-exact and wrap-aware, so a 2**32 wrap
      mid-session is seamless.
    - At a spurt start (``spurt_start=True``: the caller saw a gap in arrivals), the predicted
      position is compared with ``clock.sample_at(arrival)``. Arriving more than
      ``early_tolerance`` before the prediction proves the anchor late (nothing arrives before it
      is sent): re-anchored at the arrival. Arriving more than ``resync_threshold`` after it (a
      sender whose timestamps stood still while silent, or drift): re-anchored too. Otherwise
      the RTP-derived position is kept (exact for Discord's clients, whose timestamps follow
      the wall clock).
    - Positions never go backwards: a frame that would start before the previous frame's end
      (after a re-anchor, or a timestamp going back) is placed right after it. Both count in
      :attr:`anchors`.
    - Frames without an arrival (FEC/PLC) are placed by timestamp only.

    After each :meth:`place`, :attr:`last_silence` tells the silence the file sinks should
    write before the frame (from the previous frame's end, or from sample 0 for the first).
    """

    __slots__ = (
        "_clock",
        "_early",
        "_frame_step",
        "_last_end",
        "_last_silence",
        "_ref_pos",
        "_ref_ts",
        "_threshold",
        "anchors",
    )

    def __init__(
        self,
        clock: SessionClock,
        *,
        resync_threshold: float = 0.06,
        early_tolerance: float = 0.005,
        frame_step: int = 960,
    ) -> None:
        self._clock = clock
        self._threshold = round(resync_threshold * clock.sample_rate)
        self._early = round(early_tolerance * clock.sample_rate)
        self._frame_step = frame_step
        self._ref_ts: int | None = None
        self._ref_pos = 0
        self._last_end = 0
        self._last_silence: SilenceSpan | None = None
        self.anchors: int = 0
        """How many times the mapping was re-anchored after the first frame (for stats)."""

    def __repr__(self) -> str:
        return f"<StreamTimeline last_end={self._last_end} anchors={self.anchors}>"

    @property
    def clock(self) -> SessionClock:
        """The session clock this timeline places frames on."""
        return self._clock

    @property
    def last_end(self) -> int:
        """The session sample just after the last placed frame (0 before the first)."""
        return self._last_end

    @property
    def last_silence(self) -> SilenceSpan | None:
        """The silence before the last placed frame, or ``None`` if it followed without a gap."""
        return self._last_silence

    def place(
        self, timestamp: int, arrival: float | None, *, spurt_start: bool = False, length: int | None = None
    ) -> int:
        """Return the session sample of the frame's first sample, and record the frame.

        ``length`` is the frame's length in samples per channel (default ``frame_step``).
        Raises :class:`ValueError` if the very first frame has no arrival time.
        """
        ref_ts = self._ref_ts
        last_end = self._last_end
        if ref_ts is None:
            if arrival is None:
                raise ValueError("the first frame of a stream needs an arrival time to anchor it")
            pos = self._clock.sample_at(arrival)
            if pos < last_end:
                pos = last_end
        else:
            pos = self._ref_pos + ts_diff(timestamp, ref_ts)
            moved = False
            if spurt_start and arrival is not None:
                actual = self._clock.sample_at(arrival)
                # A frame cannot have been sent after it arrived: arriving well before the
                # predicted position means the anchor was late (a delayed first packet), and it is
                # corrected; within ``early_tolerance`` the RTP-exact position is kept. Arriving
                # later is network delay unless it exceeds the threshold (a sender whose
                # timestamps stood still while it was silent).
                if pos - actual > self._early or actual - pos > self._threshold:
                    _log.debug("re-anchoring ts %d: predicted %d, arrived at %d", timestamp, pos, actual)
                    pos = actual
                    moved = True
            if pos < last_end:
                pos = last_end
                moved = True
            if moved:
                self.anchors += 1
        self._last_silence = SilenceSpan(last_end, pos) if pos > last_end else None
        self._ref_ts = timestamp
        self._ref_pos = pos
        self._last_end = pos + (self._frame_step if length is None else length)
        return pos
