"""``ReceiveSession``: what a listening session makes of datagrams and time, with no I/O.

Bytes and times in, events out. :meth:`ReceiveSession.datagram` takes one datagram and the
moment it arrived; :meth:`ReceiveSession.tick` takes the time when nothing arrived;
:meth:`ReceiveSession.next_deadline` says when ``tick`` next has something to do (``None``: not
until a datagram comes). What comes out, in :class:`Events`, is frames to decode or deliver (in
order per user, placed on the session timeline), RTCP packets and speaking changes. No thread,
clock, socket or discord.py object is touched here: the shell
(:class:`~listening_core.receiver.AudioReceiver`) owns those, and tests feed bytes and times.

Per datagram: classify it (RTP, RTCP, discovery, keep-alive); open the transport encryption
(either ``_rtpsize`` AEAD mode); keep only Opus from audio SSRCs (video, RTX and other payload
types never reach a decoder; padding-only bandwidth probes are dropped as ``probe``); attribute
the SSRC to a user through the :class:`~listening_core.ssrc_map.SsrcMap`, holding packets from an
SSRC not mapped yet (at most :data:`MAX_UNMAPPED` SSRCs, ``max_held_per_stream`` packets each,
``unmapped_hold`` seconds); and hand the packet to that SSRC's
:class:`~listening_core.stream.StreamState`, which does the rest. Nothing lost is silent: every
drop, concealment and DAVE failure is counted per user (:class:`UserStats`) and logged at WARNING
the first time (as ``listening_core.receiver``).
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from .crypto import TransportCipher
from .errors import PacketError
from .rtp import OPUS_PAYLOAD_TYPE, PacketKind, RtcpHeader, RtpHeader, classify
from .sinks import FRAME_SAMPLES, AudioFrame, FrameKind, RtcpPacket
from .stream import EPSILON, StreamState
from .timeline import SessionClock
from .unpacker import CONCEALED, FAILED, DecodeAnswer

__all__ = [
    "MAX_UNMAPPED",
    "DaveOpener",
    "Events",
    "ListenOptions",
    "ReceiveSession",
    "SsrcSource",
    "UserStats",
]

# The receiver's logger: what users filter on to see a session's warnings.
_log = logging.getLogger("listening_core.receiver")

#: At most this many SSRCs no user was announced for are tracked at once (a flood is dropped).
MAX_UNMAPPED = 64

_INF = float("inf")


@dataclass(frozen=True)
class ListenOptions:
    """Tuning of a listening session (the defaults suit Discord)."""

    jitter_delay: float = 0.06
    """How long a gap in a speaker's sequence is waited for before the frame counts as lost."""
    dave_hold: float = 2.0
    """How long a frame whose DAVE key is not usable yet is held for a retry."""
    unmapped_hold: float = 2.0
    """How long packets from an SSRC no user is mapped to yet are held before they are dropped."""
    tick: float = 0.005
    """The batching interval: decode jobs go to the workers at most this often while audio flows,
    and a frame held for its DAVE key is retried this often. An idle session does not tick."""
    speaking_timeout: float = 0.08
    """A speaker stops speaking this long after their last packet."""
    spurt_gap: float = 0.1
    """A pause in arrivals longer than this starts a new talk spurt (re-checked on the timeline)."""
    max_held_per_stream: int = 256
    """At most this many packets of one SSRC are held: from an SSRC no user is mapped to yet, or
    waiting for their DAVE key (beyond it, the oldest is dropped, counted)."""
    stop_grace: float = 0.05
    """After stop(), datagrams are still read this long: what was already in the socket is delivered."""

    def __post_init__(self) -> None:
        # Checked here, before listen() starts anything: a bad value used to surface only in the
        # receiver thread (a negative tick killed it, leaving the session, its workers and its
        # threads running and after never called; a tick of 0 made it spin).
        for name, f in self.__dataclass_fields__.items():
            value = getattr(self, name)
            kind = int if f.type in (int, "int") else float
            if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
                raise TypeError(f"ListenOptions.{name} must be {kind.__name__}, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"ListenOptions.{name} must be a finite number >= 0, got {value!r}")
        if self.tick <= 0:
            raise ValueError(f"ListenOptions.tick must be > 0 seconds, got {self.tick!r}")
        if self.max_held_per_stream < 1:
            raise ValueError(
                f"ListenOptions.max_held_per_stream must be >= 1, got {self.max_held_per_stream!r}"
            )


@dataclass
class UserStats:
    """What happened to one user's audio in a session (counts of packets or frames)."""

    packets: int = 0
    """RTP packets received from the user's SSRCs (before anything was dropped)."""
    decrypted: int = 0
    """Packets whose transport encryption opened."""
    dave_decrypted: int = 0
    """Frames whose DAVE layer opened (or passed through, when allowed)."""
    dave_held: int = 0
    """Frames that waited for their DAVE key and opened once it was usable."""
    dave_failures: int = 0
    """Frames whose DAVE layer never opened: dropped, and concealed on the timeline."""
    duplicates: int = 0
    late: int = 0
    """Packets that arrived after their frame was already concealed."""
    lost: int = 0
    """Frames never received (each one recovered by FEC or concealed)."""
    recovered_fec: int = 0
    concealed: int = 0
    """Frames concealed: lost without FEC, corrupt, or in flight when a decoder died."""
    corrupt: int = 0
    """Frames the Opus decoder refused (concealed instead)."""
    frames: int = 0
    """Frames delivered to the sink, every kind included."""
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    """What was dropped or lost for this user, by reason: packets dropped before ordering, frames a
    decoder failed on (``decoder-died``, ``decoder-error``), frames a live stream's consumer fell
    too far behind to take (``stream-overflow``)."""

    def as_dict(self) -> dict[str, Any]:
        """These counts as a plain dict (``dropped`` as a dict of reason to count), e.g. for a JSON report."""
        data = {k: v for k, v in self.__dict__.items() if k != "dropped"}
        data["dropped"] = dict(self.dropped)
        return data


class DaveOpener(Protocol):
    """Opens the DAVE layer of one frame with the connection's current keys."""

    def decrypt(self, user_id: int, payload: bytes) -> bytes:
        """``payload`` opened; raises (a :class:`~listening_core.errors.DaveError` with a
        ``reason``, ``"no-key"`` meaning: hold it and retry) when it does not open."""
        ...


class SsrcSource(Protocol):
    """What the voice gateway said about SSRCs (see :class:`~listening_core.ssrc_map.SsrcMap`)."""

    def user_of(self, ssrc: int) -> int | None:
        """The user whose audio ``ssrc`` carries."""
        ...

    def is_video(self, ssrc: int) -> bool:
        """Whether ``ssrc`` carries video or RTX."""
        ...

    def owner(self, ssrc: int) -> int | None:
        """The user ``ssrc`` belongs to, audio or video."""
        ...


@dataclass(slots=True)
class Events:
    """What a session produced since its last :meth:`ReceiveSession.drain`, in order."""

    frames: list[tuple[AudioFrame, bytes | None]] = field(default_factory=list)
    """Frames placed on the timeline, each with the Opus its decoder needs (the frame's own, the
    next frame's for FEC, ``None`` to conceal). In order per user."""
    rtcp: list[RtcpPacket] = field(default_factory=list)
    speaking: list[tuple[int, bool]] = field(default_factory=list)
    """(user id, speaking) changes."""

    def __bool__(self) -> bool:
        return bool(self.frames or self.rtcp or self.speaking)


_Held = tuple[RtpHeader, bytes, float]


class ReceiveSession:
    """The pure core of one listening session; see the module docstring.

    ``clock_start`` is the time (on the caller's monotonic clock) of session sample 0. ``ssrcs``
    says which user an SSRC belongs to; ``dave`` opens DAVE frames. :attr:`transport` is the
    transport cipher datagrams are opened with (``None``: no key yet, RTP is counted as
    ``no-key-yet``). Times passed in must not go backwards (an earlier one is taken as the latest
    seen). ``datagram`` and ``tick`` return the events gathered since the last :meth:`drain`.
    """

    def __init__(
        self,
        options: ListenOptions,
        clock_start: float,
        ssrcs: SsrcSource,
        dave: DaveOpener,
        *,
        transport: TransportCipher | None = None,
        session_id: int = 0,
    ) -> None:
        self.options = options
        self.clock: SessionClock = SessionClock(clock_start)
        self.ssrcs = ssrcs
        self.dave = dave
        self.transport = transport
        self.session_id = session_id
        self.stats: collections.defaultdict[int, UserStats] = collections.defaultdict(UserStats)
        self.unattributed: collections.Counter[str] = collections.Counter()
        self.streams: dict[int, StreamState] = {}
        """SSRC → its stream (audio SSRCs of known users that sent something)."""
        self.unmapped: dict[int, collections.deque[_Held]] = {}
        """SSRCs no user is mapped to yet → their packets, held."""
        self._not_audio_unmapped: collections.Counter[int] = collections.Counter()
        self._warned: set[tuple[int | None, str]] = set()
        self.events: Events = Events()
        self.paused: bool = False
        self._now = -_INF
        # Stream deadlines in a heap, so that a wake costs O(log n) for n streams, not a walk of
        # them all: entries are (deadline, ordinal, SSRC), and one is live only while
        # _scheduled[SSRC] holds its deadline (a stream whose deadline moves pushes a new entry;
        # the old one is skipped when it surfaces). The ordinal (the SSRC's place in
        # self.streams) makes streams due at the same tick act in the order a walk of
        # self.streams would. Streams holding frames for their DAVE key (_blocked) are retried on
        # every tick, as a walk retried them.
        self._heap: list[tuple[float, int, int]] = []
        self._scheduled: dict[int, float] = {}
        self._ordinal: dict[int, int] = {}
        self._blocked: set[int] = set()
        self._rescan = False  # after pause/finish: the next tick schedules every stream afresh

    def __repr__(self) -> str:
        return f"<ReceiveSession {self.session_id} streams={len(self.streams)} held={len(self.unmapped)}>"

    # -- the interface ---------------------------------------------------------------------------

    def datagram(self, data: bytes, now: float) -> Events:
        """One datagram that arrived at ``now``. Never raises for what came from the network."""
        if now < self._now:
            now = self._now
        else:
            self._now = now
        kind = classify(data)
        if kind is PacketKind.RTP:
            self._rtp(data, now)
        elif kind is PacketKind.RTCP:
            self._rtcp(data)
        elif kind is PacketKind.UNKNOWN:
            self.drop(None, "not-rtp", "a datagram that is neither RTP, RTCP nor a keep-alive")
        # keep-alives and IP discovery are the connection's business
        return self.events

    def tick(self, now: float) -> Events:
        """Time passed to ``now``: release what is due (jitter deadlines, start windows, DAVE
        retries, speaking stops, held SSRCs now mapped or expired)."""
        if now < self._now:
            now = self._now
        else:
            self._now = now
        if self._rescan:
            self._rescan = False
            for stream in self.streams.values():
                self._schedule(stream)
        self._attribute_unmapped(now)
        self._attribute_not_audio()
        heap, scheduled = self._heap, self._scheduled
        due: dict[int, int] = {}  # SSRC -> ordinal of the streams to act on
        while heap and heap[0][0] <= now:
            t, ordinal, ssrc = heapq.heappop(heap)
            if scheduled.get(ssrc) == t:
                del scheduled[ssrc]
                due[ssrc] = ordinal
        for ssrc in self._blocked:
            due[ssrc] = self._ordinal[ssrc]
        if due:
            streams = self.streams
            for ssrc in sorted(due, key=due.__getitem__) if len(due) > 1 else due:
                stream = streams[ssrc]
                stream.due(now)
                self._schedule(stream)
        return self.events

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (it may find none, never misses any), or ``None``."""
        t = self._unmapped_deadline()
        heap, scheduled = self._heap, self._scheduled
        while heap and scheduled.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # superseded
        if heap and heap[0][0] < t:
            t = heap[0][0]
        return None if t == _INF else t

    def _schedule(self, stream: StreamState) -> None:
        """Keep ``stream``'s entry in the deadline heap (and its DAVE hold) up to date."""
        ssrc = stream.ssrc
        if stream.pending:
            self._blocked.add(ssrc)
        else:
            self._blocked.discard(ssrc)
        t = stream.next_deadline()
        scheduled = self._scheduled
        if scheduled.get(ssrc, _INF) == t:
            return
        if t == _INF:
            del scheduled[ssrc]
            return
        scheduled[ssrc] = t
        heap = self._heap
        heapq.heappush(heap, (t, self._ordinal[ssrc], ssrc))
        if len(heap) > 4 * len(scheduled) + 64:
            # superseded entries outnumber live ones: keep the live ones only (amortised O(1))
            ordinal = self._ordinal
            heap[:] = [(t, ordinal[s], s) for s, t in scheduled.items()]
            heapq.heapify(heap)

    def drain(self) -> Events:
        """The events gathered so far; the session starts gathering afresh."""
        events = self.events
        self.events = Events()
        return events

    def pause(self, now: float) -> Events:
        """Discard audio from now on; what is held is released (delivered), speakers stop."""
        self.paused = True
        for stream in self.streams.values():
            stream.drain(now, final=True)
            if stream.speaking:
                stream.speaking = False
                self.events.speaking.append((stream.user_id, False))
        self._forget_deadlines()
        return self.events

    def resume(self) -> None:
        """Receive again after :meth:`pause`; each stream starts a fresh jitter buffer, so what
        was discarded while paused is neither counted as lost nor concealed."""
        for stream in self.streams.values():
            stream.restart_jitter()
            self._schedule(stream)
        self.paused = False

    def finish(self, now: float) -> Events:
        """The session ends: everything held is released (what cannot be attributed is dropped)."""
        if now < self._now:
            now = self._now
        self._attribute_unmapped(now, final=True)
        self._attribute_not_audio()
        for stream in list(self.streams.values()):
            stream.drain(now, final=True)
        self._forget_deadlines()
        return self.events

    def _forget_deadlines(self) -> None:
        """Every stream was drained: none counts as due until the next tick looks again (as a
        walk of them all did; a stream that stays speaking after finish stops on that tick)."""
        self._heap.clear()
        self._scheduled.clear()
        self._blocked.clear()
        self._rescan = True

    def decoded(
        self,
        frames: list[AudioFrame],
        answers: list[DecodeAnswer] | None,
        failure: tuple[str, BaseException] | None = None,
    ) -> None:
        """Attach a decoder's PCM to ``frames`` and count what it concealed; with ``answers``
        ``None``, ``failure`` is (reason, error) and every frame is concealed as silence."""
        if answers is None:
            reason, exc = failure if failure is not None else ("decoder-error", None)
            silence = bytes(FRAME_SAMPLES * 4)
            for frame in frames:
                stats = self.stats[frame.user_id]
                if frame.kind is not FrameKind.PLC:
                    stats.concealed += 1
                stats.dropped[reason] += 1
                frame.kind = FrameKind.PLC
                frame.pcm = silence
                self.warn_once(frame.user_id, reason, f"frames were concealed: {exc}")
            return
        for frame, (status, pcm) in zip(frames, answers, strict=True):
            if status in (CONCEALED, FAILED):
                stats = self.stats[frame.user_id]
                stats.corrupt += 1
                stats.concealed += 1
                frame.kind = FrameKind.PLC
                self.warn_once(frame.user_id, "corrupt", "a corrupt Opus frame was concealed")
            frame.pcm = pcm if pcm is not None else bytes(FRAME_SAMPLES * 4)

    def sizes(self) -> dict[str, int]:
        """How much the session holds, by structure (each has a cap; see the fuzz test)."""
        streams = list(self.streams.values())
        return {
            "unmapped SSRCs": len(self.unmapped),
            "held per unmapped SSRC": max((len(q) for q in self.unmapped.values()), default=0),
            "not-audio SSRCs": len(self._not_audio_unmapped),
            "streams": len(streams),
            "jitter held": max((s.jitter.held for s in streams), default=0),
            "DAVE pending": max((len(s.pending) for s in streams), default=0),
            "DAVE opened ahead": max((len(s.opened) for s in streams), default=0),
            "warnings given": len(self._warned),
            "drop reasons": len(self.unattributed) + sum(len(s.dropped) for s in self.stats.values()),
            "users": len(self.stats),
        }

    # -- counting --------------------------------------------------------------------------------

    def drop(self, user_id: int | None, reason: str, what: str, *, count_packet: bool = False) -> None:
        """Count a dropped packet under ``reason`` (against ``user_id``, or unattributed)."""
        if user_id is None:
            self.unattributed[reason] += 1
            self.warn_once(None, reason, f"{what} ({reason}); the datagram was dropped")
            return
        stats = self.stats[user_id]
        if count_packet:
            stats.packets += 1
        stats.dropped[reason] += 1
        self.warn_once(user_id, reason, f"{what} ({reason}); the packet was dropped")

    def warn_once(self, user_id: int | None, kind: str, message: str) -> None:
        """Log ``message`` at WARNING the first time ``kind`` of trouble happens to ``user_id``."""
        key = (user_id, kind)
        if key in self._warned:
            return
        self._warned.add(key)
        who = "unattributed audio" if user_id is None else f"user {user_id}"
        _log.warning(
            "listening session %d, %s: %s (further ones are counted, not logged)",
            self.session_id,
            who,
            message,
        )

    # -- datagrams -------------------------------------------------------------------------------

    def _rtp(self, data: bytes, now: float) -> None:
        cipher = self.transport
        if cipher is None:
            self.unattributed["no-key-yet"] += 1
            return
        try:
            header = RtpHeader.parse(data)
        except PacketError as exc:
            self.drop(None, exc.reason, "an RTP header that does not parse")
            return
        ssrcs = self.ssrcs
        user_id = ssrcs.user_of(header.ssrc)
        if header.payload_type != OPUS_PAYLOAD_TYPE or ssrcs.is_video(header.ssrc):
            if user_id is None:
                user_id = ssrcs.owner(header.ssrc)
            if user_id is None:
                # not announced yet (op 12 can arrive after the first video packets): count it
                # against the SSRC; _attribute_not_audio moves the count to its user once known
                if header.ssrc in self._not_audio_unmapped or len(self._not_audio_unmapped) < MAX_UNMAPPED:
                    self._not_audio_unmapped[header.ssrc] += 1
                self.drop(None, "not-audio", "video, RTX or another payload type from an unannounced SSRC")
                return
            self.drop(user_id, "not-audio", "video, RTX or another payload type", count_packet=True)
            return
        try:
            header, payload = cipher.open_rtp(data)
        except PacketError as exc:
            self.drop(user_id, exc.reason, "transport decryption failed", count_packet=True)
            return
        if self.paused:
            return
        if user_id is None:
            held = self.unmapped.get(header.ssrc)
            if held is None:
                if len(self.unmapped) >= MAX_UNMAPPED:
                    # a flood of SSRCs nobody announced: hold a bounded number, drop the rest
                    self.unattributed["unknown-ssrc"] += 1
                    self.warn_once(
                        None, "unmapped-flood", "too many unannounced SSRCs; dropping their packets"
                    )
                    return
                held = self.unmapped[header.ssrc] = collections.deque()
            if len(held) >= self.options.max_held_per_stream:
                held.popleft()
                self.unattributed["unknown-ssrc"] += 1
            held.append((header, payload, now))
            return
        self._packet(header, payload, user_id, now)

    def _packet(self, header: RtpHeader, payload: bytes, user_id: int, now: float) -> None:
        """A transport-decrypted packet of a known user, still DAVE-encrypted."""
        stats = self.stats[user_id]
        stats.packets += 1
        stats.decrypted += 1
        if not payload and header.padding:
            self._probe(header, user_id, now)
            return
        stream = self.streams.get(header.ssrc)
        if stream is None or stream.user_id != user_id:
            stream = self.streams[header.ssrc] = StreamState(self, header.ssrc, user_id, now)
            self._ordinal.setdefault(header.ssrc, len(self._ordinal))
        stream.packet(header.sequence, header.timestamp, payload, now)
        self._schedule(stream)

    def _probe(self, header: RtpHeader, user_id: int, now: float) -> None:
        """A padding-only packet (a bandwidth probe): no audio, dropped and counted.

        It never reaches DAVE or a decoder, starts no stream, spurt or speaking event, and moves
        no timeline. Sent on the member's audio SSRC it may take a sequence number of the stream:
        the jitter buffer is told, so that number is not taken for a lost frame and concealed.
        """
        self.drop(user_id, "probe", "a padding-only packet: a bandwidth probe, no audio")
        stream = self.streams.get(header.ssrc)
        if stream is None or stream.user_id != user_id:
            return
        stream.probe(header.sequence, header.timestamp, now)
        self._schedule(stream)

    def _rtcp(self, data: bytes) -> None:
        cipher = self.transport
        if cipher is None or self.paused:
            return
        try:
            plain = cipher.open_rtcp(data)
            head = RtcpHeader.parse(plain)
        except PacketError as exc:
            self.drop(None, "rtcp-" + exc.reason, "an RTCP packet that does not open")
            return
        self.events.rtcp.append(RtcpPacket(head.ssrc, self.ssrcs.user_of(head.ssrc), head.packet_type, plain))

    # -- held SSRCs --------------------------------------------------------------------------------

    def _unmapped_deadline(self) -> float:
        hold = self.options.unmapped_hold + EPSILON
        return min((q[0][2] + hold for q in self.unmapped.values() if q), default=_INF)

    def _attribute_not_audio(self) -> None:
        """Move drops counted against a not-yet-announced (video) SSRC to its user."""
        if not self._not_audio_unmapped:
            return
        for ssrc, count in list(self._not_audio_unmapped.items()):
            user_id = self.ssrcs.owner(ssrc)
            if user_id is None:
                continue
            del self._not_audio_unmapped[ssrc]
            self.unattributed["not-audio"] -= count
            if not self.unattributed["not-audio"]:
                del self.unattributed["not-audio"]
            stats = self.stats[user_id]
            stats.packets += count
            stats.dropped["not-audio"] += count

    def _attribute_unmapped(self, now: float, *, final: bool = False) -> None:
        if not self.unmapped:
            return
        for ssrc in list(self.unmapped):
            held = self.unmapped[ssrc]
            user_id = self.ssrcs.user_of(ssrc)
            if user_id is not None:
                del self.unmapped[ssrc]
                for header, payload, arrival in held:
                    self._packet(header, payload, user_id, arrival)
                continue
            while held and (final or now - held[0][2] > self.options.unmapped_hold):
                held.popleft()
                self.unattributed["unknown-ssrc"] += 1
                # once, not once per SSRC: a flood of made-up SSRCs must not flood the log (nor
                # grow the set of warnings given, which lives as long as the session)
                self.warn_once(
                    None, "unmapped", f"packets from SSRC {ssrc}, which no user was mapped to, were dropped"
                )
            if not held:
                del self.unmapped[ssrc]
