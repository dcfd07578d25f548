"""Per-SSRC reorder/playout buffer and loss decisions (FEC or PLC), with no I/O.

One :class:`JitterBuffer` per speaker turns the RTP packets that arrived (lost, reordered and
duplicated on the way) into the ordered list of decode jobs an Opus decoder needs: every frame of
the sender's stream exactly once, in sequence order, each as a :class:`Playout` that says whether
to decode the packet itself, rebuild a lost frame from the next packet's in-band FEC, or conceal
it. Like aiortc's jitter buffer it is a plain data structure: :meth:`JitterBuffer.push` returns
what is ready, :meth:`JitterBuffer.poll` (on a timer) releases what has waited long enough, and
the caller passes the time in. Sequence numbers and timestamps wrap; all arithmetic on them goes
through the :mod:`listening_core.rtp` helpers.

A packet that takes a sequence number but carries no frame (a padding-only bandwidth probe) is
pushed with the empty payload :data:`NO_MEDIA`: it fills its slot, so its sequence number is not
taken for a lost frame, and it releases nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .frames import OPUS_SILENCE, FrameKind
from .rtp import seq_diff, ts_add, ts_diff

__all__ = ["NO_MEDIA", "OPUS_SILENCE", "FrameKind", "JitterBuffer", "JitterStats", "Playout"]

_log = logging.getLogger(__name__)

NO_MEDIA = b""
"""The payload of a packet that takes a sequence number but carries no frame (a bandwidth probe)."""

_SEQ_MASK = 0xFFFF
_WINDOW = 128  # how far back (in sequence numbers) duplicates are told from late packets
_WINDOW_MASK = _WINDOW - 1
_RELEASED = 1  # ring value: this seq went out as RECEIVED/SILENCE (0: it was concealed)


@dataclass(slots=True, frozen=True)
class Playout:
    """One decode job: a frame of the sender's stream, in sequence order.

    ``payload`` is the packet's Opus for RECEIVED/SILENCE, the *next* packet's Opus for FEC and
    ``None`` for PLC. ``arrival`` is when the packet itself arrived (``None`` for FEC/PLC).
    """

    sequence: int
    timestamp: int
    kind: FrameKind
    payload: bytes | None
    arrival: float | None


@dataclass(slots=True)
class JitterStats:
    """Counters of one :class:`JitterBuffer`.

    Every pushed packet is counted once in ``received``, ``no_media``, ``duplicates`` or ``late``.
    ``lost == recovered_fec + concealed`` counts the frames that never arrived in time.
    """

    received: int = 0
    """Packets accepted (released as RECEIVED/SILENCE, or held to be)."""
    duplicates: int = 0
    """Copies of a packet already accepted, dropped."""
    late: int = 0
    """Packets that arrived after their slot had been concealed (or before the stream began), dropped."""
    no_media: int = 0
    """Packets pushed with :data:`NO_MEDIA`: their sequence number is taken (never concealed), nothing
    is released for them; one before the stream began, out of line or already passed is ignored."""
    lost: int = 0
    """Frames released as FEC or PLC."""
    recovered_fec: int = 0
    """Lost frames rebuilt from the next packet's in-band FEC."""
    concealed: int = 0
    """Lost frames released for packet-loss concealment."""
    reordered: int = 0
    """Accepted packets that arrived after a packet with a higher sequence number."""
    resets: int = 0
    """Stream restarts: a forward jump beyond ``max_gap`` or a backward jump beyond the window."""
    overflow: int = 0
    """Gaps declared lost early because ``max_packets`` packets were held."""


class JitterBuffer:
    """Reorders one SSRC's packets and decides, for each missing frame, FEC or PLC.

    Semantics:

    - The first packet pushed is released at once and sets ``expected = seq + 1``.
    - A packet with ``seq == expected`` is released at once, together with the held packets
      contiguous after it: there is no fixed playout delay while nothing is missing.
    - A packet before ``expected`` (wrap-aware) is dropped: counted as a duplicate if that seq
      went out as RECEIVED/SILENCE (tracked for the last :attr:`WINDOW` seqs), otherwise as late
      (its slot was already concealed). Nothing is ever released twice or out of order.
    - A packet after ``expected`` is held. The gap at ``expected`` is declared lost once ``now``
      reaches the deadline: the arrival time of the earliest-arrived held packet plus
      ``max_delay`` (so no packet waits longer than ``max_delay``), checked by :meth:`poll` and
      by :meth:`push`. The missing frames are then released in order, followed by the held
      packets up to the next gap. The missing frame just before an available packet is FEC if
      ``has_fec(that packet's payload)`` and their timestamps are adjacent, otherwise PLC.
    - Timestamps of lost frames: if the gap is contiguous in time (``next.ts - prev.ts ==
      frame_step * (missing + 1)``) each lost frame gets its exact slot. Otherwise the gap spans
      a silence period (the sender stopped, so what was lost is the end of the previous spurt):
      the lost frames are placed right after the previous frame, ``prev.ts + k * frame_step``,
      and concealed with PLC (FEC needs adjacency).
    - A forward gap larger than ``max_gap`` frames, or a backward jump larger than
      :attr:`WINDOW`, is a stream reset: what is held is released (inner gaps concealed), the
      frames across the jump are not, and the stream starts over from the new packet, which is
      released at once (its sequence number may therefore be lower than the previous output's).
    - No more than ``max_packets`` packets are held: beyond that the earliest gap is declared
      lost at once (counted in ``overflow``).
    - A packet whose payload is exactly ``F8 FF FE`` is released as SILENCE.
    - A packet pushed with :data:`NO_MEDIA` (a padding-only probe) takes its sequence number like
      any packet, so the frames on either side of it follow each other with no loss; nothing is
      released for it and ``prev``'s timestamp stays the last frame's. It never starts, restarts
      or sets a deadline for the stream (it carries nothing to wait for): one before the first
      frame, out of line, already passed or a copy is ignored. A gap right before a held probe is
      concealed after the previous frame, as PLC.
    - :meth:`flush` releases everything held, concealing the gaps between held packets, and
      keeps the stream's position: later packets continue it (late ones are still dropped).

    Pure: no clock reads and no threads; ``now`` is always passed in and must not go backwards.
    """

    __slots__ = (
        "_deadline",
        "_expected",
        "_frame_step",
        "_has_fec",
        "_held",
        "_highest",
        "_max_delay",
        "_max_gap",
        "_max_packets",
        "_prev_ts",
        "_ring",
        "stats",
    )

    WINDOW = _WINDOW
    """How many recent sequence numbers are remembered to tell duplicates from late packets."""

    def __init__(
        self,
        max_delay: float = 0.06,
        *,
        has_fec: Callable[[bytes], bool] = lambda p: False,
        frame_step: int = 960,
        max_packets: int = 512,
        max_gap: int = 500,
    ) -> None:
        if max_delay < 0:
            raise ValueError(f"max_delay must be >= 0 seconds, got {max_delay}")
        if max_packets < 1:
            raise ValueError(f"max_packets must be >= 1, got {max_packets}")
        if not 1 <= max_gap < 0x8000:
            raise ValueError(f"max_gap must be between 1 and 32767 frames, got {max_gap}")
        self._max_delay = max_delay
        self._has_fec = has_fec
        self._frame_step = frame_step
        self._max_packets = max_packets
        self._max_gap = max_gap
        self._expected: int | None = None
        self._prev_ts = 0
        self._highest = 0
        # seq -> (timestamp, payload, arrival) of packets waiting behind a gap
        self._held: dict[int, tuple[int, bytes, float]] = {}
        self._deadline: float | None = None
        self._ring = bytearray(_WINDOW)
        self.stats: JitterStats = JitterStats()

    def __repr__(self) -> str:
        return (
            f"<JitterBuffer expected={self._expected} held={len(self._held)} deadline={self._deadline}"
            f" {self.stats}>"
        )

    @property
    def held(self) -> int:
        """How many packets are waiting behind a gap."""
        return len(self._held)

    @property
    def expected(self) -> int | None:
        """The next sequence number to release (``None`` before the first packet)."""
        return self._expected

    def out_of_line(self, sequence: int) -> bool:
        """Whether pushing ``sequence`` would restart the stream: it is more than :attr:`WINDOW`
        behind ``expected`` or more than ``max_gap`` ahead of it."""
        expected = self._expected
        if expected is None:
            return False
        d = seq_diff(sequence, expected)
        return d < -_WINDOW or d > self._max_gap

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to release, or ``None`` if nothing is held."""
        return self._deadline

    def push(self, sequence: int, timestamp: int, payload: bytes, now: float) -> list[Playout]:
        """Add a packet that arrived at ``now``; return what is ready, in order (often just it)."""
        expected = self._expected
        if not payload:
            return self._push_no_media(sequence, timestamp, now)
        if sequence == expected and not self._held:
            # the common case: in order, nothing missing
            self.stats.received += 1
            self._expected = (sequence + 1) & _SEQ_MASK
            self._prev_ts = timestamp
            self._highest = sequence
            self._ring[sequence & _WINDOW_MASK] = _RELEASED
            kind = FrameKind.SILENCE if payload == OPUS_SILENCE else FrameKind.RECEIVED
            return [Playout(sequence, timestamp, kind, payload, now)]
        out: list[Playout] = []
        if expected is None:
            self._start(sequence, timestamp, payload, now, out)
            return out
        stats = self.stats
        d = seq_diff(sequence, expected)
        if d < 0:
            if -d > _WINDOW:
                _log.debug("seq %d is %d behind %d: stream reset", sequence, -d, expected)
                self._reset(sequence, timestamp, payload, now, out)
                return out
            if self._ring[sequence & _WINDOW_MASK] == _RELEASED:
                stats.duplicates += 1
            else:
                stats.late += 1
        elif d > self._max_gap:
            _log.debug("seq %d is %d ahead of %d: stream reset", sequence, d, expected)
            self._reset(sequence, timestamp, payload, now, out)
            return out
        elif sequence in self._held:
            stats.duplicates += 1
        else:
            stats.received += 1
            if seq_diff(sequence, self._highest) < 0:
                stats.reordered += 1
            else:
                self._highest = sequence
            if d == 0:
                self._held[sequence] = (timestamp, payload, now)
                self._release_run(out)
            else:
                self._held[sequence] = (timestamp, payload, now)
                if self._deadline is None:
                    # held packets arrived at or before now: only an empty buffer starts a deadline
                    self._deadline = now + self._max_delay
                while len(self._held) > self._max_packets:
                    stats.overflow += 1
                    self._release_gap(out)
        due = self._deadline
        if due is not None and now >= due:
            self._release_due(now, out)
        return out

    def _push_no_media(self, sequence: int, timestamp: int, now: float) -> list[Playout]:
        """A packet with no frame: it takes its sequence number, if it is the stream's next or ahead."""
        stats = self.stats
        stats.no_media += 1
        expected = self._expected
        if expected is None:
            return []  # a stream starts with a frame (its first one anchors the timeline)
        d = seq_diff(sequence, expected)
        if d < 0 or d > self._max_gap or sequence in self._held:
            return []  # passed, a copy, or out of line: restarts nothing
        if seq_diff(sequence, self._highest) > 0:
            self._highest = sequence
        self._held[sequence] = (timestamp, NO_MEDIA, now)
        out: list[Playout] = []
        if d == 0:
            self._release_run(out)
        while len(self._held) > self._max_packets:
            stats.overflow += 1
            self._release_gap(out)
        due = self._deadline
        if due is not None and now >= due:
            self._release_due(now, out)
        return out

    def poll(self, now: float) -> list[Playout]:
        """Release the gaps whose deadline ``now`` has reached, and what follows them (timer tick)."""
        deadline = self._deadline
        if deadline is None or now < deadline:
            return []
        out: list[Playout] = []
        self._release_due(now, out)
        return out

    def flush(self) -> list[Playout]:
        """Release everything held, concealing the gaps before and between held packets."""
        out: list[Playout] = []
        while self._held:
            self._release_gap(out)
        return out

    # -- internals --------------------------------------------------------------------------

    def _start(self, sequence: int, timestamp: int, payload: bytes, now: float, out: list[Playout]) -> None:
        self.stats.received += 1
        self._expected = sequence
        self._highest = sequence
        self._held[sequence] = (timestamp, payload, now)
        self._release_run(out)

    def _reset(self, sequence: int, timestamp: int, payload: bytes, now: float, out: list[Playout]) -> None:
        self.stats.resets += 1
        while self._held:
            self._release_gap(out)
        self._ring = bytearray(_WINDOW)
        self._start(sequence, timestamp, payload, now, out)

    def _release_due(self, now: float, out: list[Playout]) -> None:
        # a released gap may leave held packets whose own deadline has passed too: cascade
        while self._deadline is not None and now >= self._deadline:
            self._release_gap(out)

    def _release_run(self, out: list[Playout]) -> None:
        """Release held packets contiguous from ``expected``; recompute the deadline."""
        held = self._held
        ring = self._ring
        seq = self._expected
        assert seq is not None
        prev_ts = self._prev_ts
        entry = held.pop(seq, None)
        while entry is not None:
            ts, payload, arrival = entry
            if payload:  # NO_MEDIA takes its slot and releases nothing
                prev_ts = ts
                kind = FrameKind.SILENCE if payload == OPUS_SILENCE else FrameKind.RECEIVED
                out.append(Playout(seq, ts, kind, payload, arrival))
            ring[seq & _WINDOW_MASK] = _RELEASED
            seq = (seq + 1) & _SEQ_MASK
            entry = held.pop(seq, None)
        self._expected = seq
        self._prev_ts = prev_ts
        # only a frame waits for the gap before it: a held probe carries nothing to release
        arrivals = [e[2] for e in held.values() if e[1]]
        self._deadline = min(arrivals) + self._max_delay if arrivals else None

    def _release_gap(self, out: list[Playout]) -> None:
        """Declare the gap at ``expected`` lost: emit its frames as FEC/PLC, then the run after it."""
        held = self._held
        expected = self._expected
        assert expected is not None and held and expected not in held
        nxt = expected
        missing = 0
        while nxt not in held:
            nxt = (nxt + 1) & _SEQ_MASK
            missing += 1
        next_ts, next_payload, _ = held[nxt]
        step = self._frame_step
        prev_ts = self._prev_ts
        # adjacent in time: the lost frames had exactly these slots, and FEC can rebuild the last
        # (a probe's timestamp says nothing: the gap before one is placed after the previous frame)
        contiguous = bool(next_payload) and ts_diff(next_ts, prev_ts) == step * (missing + 1)
        fec = contiguous and self._has_fec(next_payload)
        ring = self._ring
        last = missing - 1
        for k in range(missing):
            seq = (expected + k) & _SEQ_MASK
            ts = ts_add(prev_ts, (k + 1) * step)
            ring[seq & _WINDOW_MASK] = 0
            if k == last and fec:
                out.append(Playout(seq, ts, FrameKind.FEC, next_payload, None))
            else:
                out.append(Playout(seq, ts, FrameKind.PLC, None, None))
        stats = self.stats
        stats.lost += missing
        if fec:
            stats.recovered_fec += 1
            stats.concealed += missing - 1
        else:
            stats.concealed += missing
        if not contiguous:
            _log.debug(
                "gap of %d before seq %d is not contiguous in time: placed after ts %d", missing, nxt, prev_ts
            )
        self._expected = nxt
        self._prev_ts = ts_add(prev_ts, missing * step)
        self._release_run(out)
