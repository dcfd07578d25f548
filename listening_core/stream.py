"""``StreamState``: one SSRC's state in a listening session, and the rules that act on it.

Pure: bytes and times in, frames out through the owning
:class:`~listening_core.session.ReceiveSession`; no thread, clock, socket or discord.py object.

A stream's packets pass, in this order:

1. the **start window**: the first packets of a stream or of a talk spurt are gathered for
   ``jitter_delay`` and put in sequence order before anything else sees them (DAVE refuses any
   frame older than the first one it opened), and the spurt's start is estimated from all of
   their arrivals together, not from the first alone, which a delay spike can make late;
2. the **restart rule**: a packet far out of line restarts the stream only if its DAVE layer
   opens (a replay or a datagram held up for seconds does not, and is dropped as ``stale``);
3. the **jitter buffer** (:class:`~listening_core.jitter.JitterBuffer`): sequence order, each
   lost frame marked for FEC or concealment;
4. **DAVE, in order**: a frame whose key is not usable yet is held, with everything after it,
   until it opens or has waited ``dave_hold``;
5. **placement** on the session timeline, then out as a frame to decode or deliver.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING

from .crypto import OPUS_SILENCE
from .jitter import NO_MEDIA, JitterBuffer, Playout
from .jitter import FrameKind as JitterKind
from .opus import LibopusNotFound, packet_has_fec
from .rtp import seq_add, seq_diff, ts_diff
from .sinks import SAMPLE_RATE, AudioFrame, FrameKind
from .timeline import StreamTimeline

if TYPE_CHECKING:
    from .session import ReceiveSession, UserStats

__all__ = ["StreamState"]

_log = logging.getLogger("listening_core.receiver")

_INF = float("inf")
#: Strict deadlines (``now - t > limit``) are due a hair after ``t + limit``.
EPSILON = 1e-6


def _always(payload: bytes) -> bool:
    return True


class StreamState:
    """One SSRC of one user in a session: its start window, jitter buffer, DAVE queue, timeline."""

    __slots__ = (
        "blocked_since",
        "jitter",
        "last_arrival",
        "last_placed_arrival",
        "opened",
        "pending",
        "retry_at",
        "seen_duplicates",
        "seen_late",
        "session",
        "speaking",
        "ssrc",
        "start_buffer",
        "start_until",
        "stats",
        "timeline",
        "user_id",
        "window",
    )

    def __init__(self, session: ReceiveSession, ssrc: int, user_id: int, now: float) -> None:
        self.session: ReceiveSession = session
        self.ssrc: int = ssrc
        self.user_id: int = user_id
        self.stats: UserStats = session.stats[user_id]
        # FEC is proposed for every lost frame followed by its neighbour; whether that frame
        # really carries FEC is known only once it is DAVE-decrypted (see _open).
        self.jitter: JitterBuffer = JitterBuffer(session.options.jitter_delay, has_fec=_always)
        self.timeline: StreamTimeline = StreamTimeline(session.clock)
        self.last_arrival: float = 0.0
        self.last_placed_arrival: float = -_INF
        self.speaking: bool = False
        self.start_buffer: list[tuple[int, int, bytes, float]] | None = []
        self.start_until: float = now + session.options.jitter_delay
        self.pending: collections.deque[Playout] = collections.deque()
        self.opened: dict[int, bytes] = {}  # frames DAVE-decrypted ahead of their turn, by sequence
        self.blocked_since: float | None = None
        self.retry_at: float | None = None  # when a frame held for its DAVE key is tried again
        self.seen_duplicates: int = 0
        self.seen_late: int = 0
        self.window: tuple[int, int] = (
            0,
            0,
        )  # (first sequence, packets) of the last start window (see _start)

    def __repr__(self) -> str:
        return f"<StreamState ssrc={self.ssrc} user={self.user_id} pending={len(self.pending)}>"

    # -- deadlines -----------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When :meth:`due` next has something to do (``inf``: nothing until a packet comes)."""
        t = _INF
        if self.start_buffer is not None:
            t = self.start_until
        j = self.jitter.next_deadline()
        if j is not None and j < t:
            t = j
        if self.retry_at is not None and self.retry_at < t:
            t = self.retry_at
        if self.speaking:
            s = self.last_arrival + self.session.options.speaking_timeout + EPSILON
            if s < t:
                t = s
        return t

    # -- packets -------------------------------------------------------------------------------

    def packet(self, sequence: int, timestamp: int, payload: bytes, now: float) -> None:
        """A transport-decrypted packet of this stream, still DAVE-encrypted."""
        session = self.session
        options = session.options
        if self.start_buffer is None and now - self.last_arrival > options.spurt_gap:
            # A talk spurt starts: its place on the timeline is decided from its first packets
            # together (see _start), not from the first alone, which a delay spike can make late.
            self.start_buffer = []
            self.start_until = now + options.jitter_delay
        self.last_arrival = now
        if not self.speaking:
            self.speaking = True
            session.events.speaking.append((self.user_id, True))
        if self.start_buffer is not None:
            # A new stream or spurt: its first packets may arrive out of order, and DAVE refuses
            # any frame older than the first one it opens, so they are put in order first.
            self.start_buffer.append((sequence, timestamp, payload, now))
            return
        self._push(sequence, timestamp, payload, now, now)

    def probe(self, sequence: int, timestamp: int, now: float) -> None:
        """A padding-only packet on this stream's SSRC: it takes its sequence number, nothing more."""
        if self.start_buffer is not None:
            self.start_buffer.append((sequence, timestamp, NO_MEDIA, now))
        else:
            self._jitter(self.jitter.push(sequence, timestamp, NO_MEDIA, now), now)

    def due(self, now: float) -> None:
        """Release what is due at ``now``: a start window, lost frames, DAVE retries, speaking."""
        self.drain(now, final=False)
        # at its deadline, not a hair before: a stream acts only when next_deadline() says, so
        # the session's deadline heap finds it due exactly when a walk of every stream would
        if self.speaking and now >= self.last_arrival + self.session.options.speaking_timeout + EPSILON:
            self.speaking = False
            self.session.events.speaking.append((self.user_id, False))

    def drain(self, now: float, *, final: bool) -> None:
        """Release what the stream holds: what is due, or everything when ``final``."""
        if self.start_buffer is not None and (final or now >= self.start_until):
            self._start(now)
        out = self.jitter.flush() if final else self.jitter.poll(now)
        self._jitter(out, now)
        if final and self.pending:
            self._open(now, final=True)

    def restart_jitter(self) -> None:
        """A fresh jitter buffer (after a pause): what was discarded is neither lost nor concealed."""
        self.jitter = JitterBuffer(self.session.options.jitter_delay, has_fec=_always)
        self.seen_duplicates = self.seen_late = 0

    # -- the rules -------------------------------------------------------------------------------

    def _start(self, now: float) -> None:
        """End a stream's start window: its first packets enter the jitter buffer in order."""
        buffered = self.start_buffer
        self.start_buffer = None
        if not buffered:
            return
        # probes (NO_MEDIA) take their sequence numbers, but tell nothing of the spurt's time
        frames = [p for p in buffered if p[2]]
        if not frames:
            return
        first = frames[0][0]
        buffered.sort(key=lambda p: seq_diff(p[0], first))
        # The spurt's first packet was sent no later than any of its successors' arrival minus
        # their distance in RTP time: the earliest such bound is the best estimate of when it
        # arrived without the delay spikes of a congested network or a starved reader thread.
        i0 = next(i for i, p in enumerate(buffered) if p[2])
        seq0, ts0, payload0, arrival0 = buffered[i0]
        estimate = min(arrival - ts_diff(ts, ts0) / SAMPLE_RATE for _, ts, _, arrival in frames)
        buffered[i0] = (seq0, ts0, payload0, min(arrival0, estimate))
        self.window = (seq0, len(buffered) - i0)
        for seq, ts, payload, arrival in buffered:
            self._push(seq, ts, payload, arrival, now)

    def _push(self, seq: int, ts: int, payload: bytes, arrival: float, now: float) -> None:
        """Give one packet to the jitter buffer."""
        if payload and self.jitter.out_of_line(seq):
            # Far out of line, a packet restarts the stream: the jitter buffer starts over from it
            # and the timeline follows the jump. A real restart's frame opens; a stale copy (a
            # replay, or a datagram held up for seconds) does not, as DAVE never opens a frame
            # twice, and a silence frame proves nothing. Pushed, one replayed packet moved the
            # rest of the member's track and concealed the frames across the jump.
            opus = None if payload == OPUS_SILENCE else self._dave_open(payload)
            if opus is None:
                self.session.drop(
                    self.user_id, "stale", "a stale copy of an old packet (replayed, or held up)"
                )
                return
            self.opened[seq] = opus  # _open takes it from here: DAVE would refuse it a second time
        self._jitter(self.jitter.push(seq, ts, payload, arrival), now)

    def _dave_open(self, payload: bytes) -> bytes | None:
        """``payload`` with its DAVE layer opened, or None if it does not open (yet)."""
        try:
            return self.session.dave.decrypt(self.user_id, payload)
        except Exception:
            return None

    def _jitter(self, out: list[Playout], now: float) -> None:
        """Count what the jitter buffer dropped and open the DAVE layer of what it released."""
        jstats = self.jitter.stats
        stats = self.stats
        if jstats.duplicates != self.seen_duplicates:
            stats.duplicates += jstats.duplicates - self.seen_duplicates
            self.seen_duplicates = jstats.duplicates
        if jstats.late != self.seen_late:
            stats.late += jstats.late - self.seen_late
            self.seen_late = jstats.late
            self.session.warn_once(
                self.user_id, "late", "a packet arrived after its frame was concealed; dropped"
            )
        if out:
            self.pending.extend(out)
        if self.pending:
            self._open(now)

    def _open(self, now: float, *, final: bool = False) -> None:
        """Open the DAVE layer of released frames, in sequence order.

        A frame whose key is not usable yet stays queued, with everything after it, until it
        opens or has waited ``dave_hold``; if a later frame opens meanwhile, the key is there and
        the waiting frame is undecryptable. Frames that never open are concealed and counted.
        A lost frame marked for FEC keeps FEC only if the next frame, decrypted, carries it.
        """
        session = self.session
        options = session.options
        stats = self.stats
        q = self.pending
        waited = self.blocked_since is not None
        while q:
            item = q[0]
            if item.kind is JitterKind.PLC:
                q.popleft()
                self._emit(item, FrameKind.PLC, None, lost=True)
                continue
            fec = item.kind is JitterKind.FEC
            target = seq_add(item.sequence, 1) if fec else item.sequence
            opus = self.opened.get(target) if fec else self.opened.pop(target, None)
            if opus is None:
                assert item.payload is not None
                try:
                    opus = session.dave.decrypt(self.user_id, item.payload)
                except Exception as exc:
                    reason = getattr(exc, "reason", "")
                    if reason == "no-key" and not final:
                        if self.blocked_since is None:
                            self.blocked_since = now
                        # Each frame waits dave_hold from its own arrival, and at most
                        # max_held_per_stream frames wait: timed from when it reached the head of
                        # the queue, a stream whose frames never open let one through per
                        # dave_hold while the rest queued behind it without bound.
                        since = item.arrival if item.arrival is not None else self.blocked_since
                        expires = since + options.dave_hold
                        if (
                            # not now - since < dave_hold: rounded differently, a frame was
                            # not yet expired at its own expiry, retried at that same time, for good
                            now < expires
                            and len(q) <= options.max_held_per_stream
                            and not self._later_opens()
                        ):
                            # wait for the key: tried again a tick from now, or when it expires
                            self.retry_at = min(now + options.tick, expires)
                            return
                    q.popleft()
                    self.blocked_since = self.retry_at = None
                    if fec:  # the next frame will fail on its own; this one is simply concealed
                        self._emit(item, FrameKind.PLC, None, lost=True)
                        continue
                    self._dave_failed(exc)
                    self._emit(item, FrameKind.PLC, None)
                    continue
                if fec:
                    self.opened[target] = opus
            q.popleft()
            self.blocked_since = self.retry_at = None
            if fec:
                self._emit(item, FrameKind.FEC if _has_fec(opus) else FrameKind.PLC, opus, lost=True)
                continue
            stats.dave_decrypted += 1
            if waited and item.arrival is not None and now - item.arrival > options.tick:
                stats.dave_held += 1
            kind = FrameKind.SILENCE if item.kind is JitterKind.SILENCE else FrameKind.RECEIVED
            self._emit(item, kind, opus)

    def _later_opens(self) -> bool:
        """Whether a frame queued after the blocked head opens (then the head never will)."""
        for item in list(self.pending)[1:]:
            if item.kind is not JitterKind.RECEIVED or item.sequence in self.opened:
                continue
            assert item.payload is not None
            opus = self._dave_open(item.payload)
            if opus is None:
                return False
            self.opened[item.sequence] = opus
            return True
        return False

    def _dave_failed(self, exc: BaseException) -> None:
        stats = self.stats
        stats.dave_failures += 1
        stats.dropped["dave-" + (getattr(exc, "reason", "") or "error")] += 1
        self.session.warn_once(
            self.user_id, "dave", f"DAVE decryption failed ({exc}); the frame is concealed"
        )

    def _emit(self, item: Playout, kind: FrameKind, opus: bytes | None, *, lost: bool = False) -> None:
        """Place one frame on the timeline and hand it out (to decode, or to deliver)."""
        stats = self.stats
        arrival = item.arrival
        spurt_start = False
        if arrival is not None:
            # Only the first packet of a start window can begin a spurt: the window's packets
            # came together (after a delay spike, or from a sender catching up), and measured
            # against the first one's arrival, an estimate that can lie well before theirs, they
            # looked like a new spurt: re-anchored late, leaving a hole after the first frame and
            # the rest of the spurt shifted by the spike.
            first, span = self.window
            in_window = 0 < seq_diff(item.sequence, first) < span
            spurt_start = (
                not in_window and arrival - self.last_placed_arrival > self.session.options.spurt_gap
            )
            self.last_placed_arrival = arrival
        position = self.timeline.place(item.timestamp, arrival, spurt_start=spurt_start)
        frame = AudioFrame(
            user_id=self.user_id,
            ssrc=self.ssrc,
            sequence=item.sequence,
            timestamp=item.timestamp,
            position=position,
            kind=kind,
            opus=opus if kind in (FrameKind.RECEIVED, FrameKind.SILENCE) else None,
            arrival=arrival,
        )
        if lost:
            stats.lost += 1
            self.session.warn_once(
                self.user_id, "lost", "frames were lost; recovering them (FEC) or concealing them"
            )
        if kind is FrameKind.FEC:
            stats.recovered_fec += 1
        elif kind is FrameKind.PLC:
            stats.concealed += 1
        stats.frames += 1  # every frame handed out reaches the sink: decoded, or concealed if not
        # the payload a decoder needs: the frame's own Opus, the next one's for FEC, none for PLC
        self.session.events.frames.append((frame, None if kind is FrameKind.PLC else opus))


_warned_no_libopus = False


def _has_fec(opus: bytes) -> bool:
    """Whether ``opus`` carries FEC for the frame before it (False for a corrupt frame)."""
    global _warned_no_libopus
    try:
        return packet_has_fec(opus)
    except LibopusNotFound as exc:  # only an Opus-keeping sink gets here without libopus
        if not _warned_no_libopus:
            _warned_no_libopus = True
            _log.warning("lost frames cannot be checked for FEC, so none is counted as recovered: %s", exc)
        return False
    except Exception:  # a corrupt frame carries no usable FEC
        return False
