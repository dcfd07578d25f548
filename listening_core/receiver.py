"""``AudioReceiver``: one listening session, from datagram to sink.

The socket listener runs on discord.py's reader thread and, per datagram: classifies it (RTP,
RTCP, discovery, keep-alive); opens the transport encryption (either ``_rtpsize`` AEAD mode);
keeps only Opus from known audio SSRCs (video, RTX and other payload types never reach a
decoder); drops duplicates (DAVE refuses a replay, so this must come first); attributes the SSRC
to a user, holding packets from an SSRC not mapped yet; opens the DAVE layer with the connection's
``davey`` session, holding frames whose key is not usable yet and retrying them once it is; and
feeds the speaker's jitter buffer, which hands back frames in order, each lost one marked for FEC
or concealment.

The receiver thread itself ticks every few milliseconds: it releases what the jitter buffers hold
past their deadline, retries held DAVE frames, attributes held SSRCs, notices speaking stops, and
sends each speaker's decode jobs, batched, to the worker that speaker is pinned to. Decoded PCM
comes back through futures and goes, with each frame's place on the session timeline, to the
sink's delivery thread. Nothing lost is silent: every drop, concealment and DAVE failure is
counted per user and logged at WARNING the first time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .crypto import OPUS_SILENCE, DaveError, TransportCipher, dave_decrypt, transport_cipher
from .errors import PacketError
from .jitter import NO_MEDIA, JitterBuffer, Playout
from .jitter import FrameKind as JitterKind
from .opus import LibopusNotFound, packet_has_fec
from .pool import AudioProcessPool, WorkerDied
from .rtp import OPUS_PAYLOAD_TYPE, PacketKind, RtcpHeader, RtpHeader, classify, seq_add, seq_diff, ts_diff
from .sinks import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, AudioSink, FrameKind, RtcpPacket, SessionInfo
from .timeline import SessionClock, StreamTimeline
from .unpacker import CONCEALED, DECODE, FAILED, FEC, PLC, DecodeAnswer, DecodeJob

if TYPE_CHECKING:
    from .voice_client import VoiceClient

_log = logging.getLogger(__name__)

__all__ = ["AudioReceiver", "ListenOptions", "UserStats"]


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
    """The receiver thread's period: batching, deadlines and retries."""
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
    """Packets dropped before ordering, by reason."""

    def as_dict(self) -> dict[str, Any]:
        """These counts as a plain dict (``dropped`` as a dict of reason to count), e.g. for a JSON report."""
        data = {k: v for k, v in self.__dict__.items() if k != "dropped"}
        data["dropped"] = dict(self.dropped)
        return data


#: At most this many SSRCs no user was announced for are tracked at once (a flood is dropped).
_MAX_UNMAPPED = 64


@dataclass(frozen=True, slots=True)
class _Stop:
    end: int  # the session sample at which listening stopped


class _Stream:
    """One SSRC's state in a session."""

    __slots__ = (
        "blocked_since",
        "jitter",
        "key",
        "last_arrival",
        "last_placed_arrival",
        "opened",
        "pending",
        "seen_duplicates",
        "seen_late",
        "speaking",
        "ssrc",
        "start_buffer",
        "start_until",
        "timeline",
        "user_id",
        "window",
        "worker",
    )

    def __init__(
        self, ssrc: int, user_id: int, key: tuple[int, int], jitter: JitterBuffer, timeline: StreamTimeline
    ):
        self.ssrc = ssrc
        self.user_id = user_id
        self.key = key
        self.jitter = jitter
        self.timeline = timeline
        self.last_arrival = 0.0
        self.last_placed_arrival = float("-inf")
        self.speaking = False
        self.start_buffer: list[tuple[int, int, bytes, float]] | None = []
        self.start_until = 0.0
        self.pending: collections.deque[Playout] = collections.deque()
        self.opened: dict[int, bytes] = {}  # frames DAVE-decrypted ahead of their turn, by sequence
        self.blocked_since: float | None = None
        self.seen_duplicates = 0
        self.seen_late = 0
        self.worker: int | None = None
        self.window = (0, 0)  # (first sequence, packets) of the last start window (see _start)


_session_ids = iter(range(1, 1 << 62))


class AudioReceiver(threading.Thread):
    """Runs one listening session of a :class:`~listening_core.voice_client.VoiceClient`."""

    def __init__(
        self,
        voice_client: VoiceClient,
        sink: AudioSink,
        *,
        pool: AudioProcessPool | None,
        after: Callable[..., Any] | None,
        options: ListenOptions | None = None,
        own_pool: bool = False,
        on_finished: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(name=f"listening-core-receiver-{voice_client.channel.id}", daemon=True)
        self.voice_client = voice_client
        self.sink = sink
        self.options = options or ListenOptions()
        self.after = after
        self._on_finished = on_finished
        self.loop: asyncio.AbstractEventLoop = voice_client.loop
        self.session_id = next(_session_ids)
        self.wants_pcm = bool(getattr(sink, "wants_pcm", True))
        self.pool = pool if self.wants_pcm else None
        self._own_pool = own_pool and self.pool is not None
        self.clock = SessionClock(time.monotonic())
        self.started_at = time.time()
        self.stats: dict[int, UserStats] = collections.defaultdict(UserStats)
        self.unattributed: collections.Counter[str] = collections.Counter()
        self._streams: dict[int, _Stream] = {}
        self._unmapped: dict[int, collections.deque[tuple[RtpHeader, bytes, float]]] = {}
        self._not_audio_unmapped: collections.Counter[int] = collections.Counter()
        self._lock = threading.RLock()
        self._paused = False
        self._stopped_at: float | None = None
        self._stopping = threading.Event()
        self._closed = False
        self._finished = threading.Event()
        self._jobs: dict[int, list[DecodeJob]] = collections.defaultdict(list)
        self._meta: dict[int, list[AudioFrame]] = collections.defaultdict(list)
        self._inflight: set[Future[list[DecodeAnswer]]] = set()
        self._inflight_lock = threading.Lock()
        self._delivery: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._delivery_thread = threading.Thread(
            target=self._deliver, name=f"listening-core-delivery-{voice_client.channel.id}", daemon=True
        )
        self._cipher: TransportCipher | None = None
        self._cipher_key: tuple[str, bytes] | None = None
        self._warned: set[tuple[int | None, str]] = set()
        self.error: BaseException | None = None
        self._sink_failed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        vc = self.voice_client
        info = SessionInfo(
            guild_id=vc.guild.id if vc.guild else None, channel_id=vc.channel.id, started_at=self.started_at
        )
        try:
            self.sink.on_start(info)
        except Exception as exc:
            self._sink_error(exc)
        self._delivery_thread.start()
        super().start()
        vc._attach(self)

    @property
    def finished(self) -> threading.Event:
        """Set once the sink was cleaned up and ``after`` was called."""
        return self._finished

    def pause(self) -> None:
        """Discard audio from now on (what is pending is delivered); the timeline keeps running."""
        with self._lock:
            self._paused = True
            now = time.monotonic()
            for stream in self._streams.values():
                self._drain_stream(stream, now, final=True)
                if stream.speaking:
                    stream.speaking = False
                    self._dispatch("listening_speaking_stop", stream.user_id)

    def resume(self) -> None:
        """Receive again after :meth:`pause`; each stream starts a fresh jitter buffer, so what was
        discarded while paused is neither counted as lost nor concealed."""
        with self._lock:
            # what arrived while paused was discarded, not lost: each stream's next packet starts a
            # fresh jitter buffer instead of opening a gap that would be concealed into the pause
            for stream in self._streams.values():
                stream.jitter = JitterBuffer(self.options.jitter_delay, has_fec=_always)
                stream.seen_duplicates = stream.seen_late = 0
            self._paused = False

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (or the sink failed); the session is winding down."""
        return self._stopping.is_set()

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` was called and :meth:`resume` not yet (incoming audio is discarded)."""
        return self._paused

    def stop(self) -> None:
        """End the session: every frame received so far is delivered, then the sink is cleaned up."""
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._stopping.set()

    def run(self) -> None:
        tick = self.options.tick
        try:
            while not self._stopping.wait(tick):
                self._safe_tick()
            # datagrams already in the socket when stop() was called are still read and delivered
            grace_end = time.monotonic() + self.options.stop_grace
            while time.monotonic() < grace_end:
                time.sleep(tick)
                self._safe_tick()
        finally:
            self._closed = True
            self._finish()

    def _safe_tick(self) -> None:
        try:
            self._tick(time.monotonic())
        except Exception:  # a bug here must not end the session silently
            _log.exception("listening session %d: error in the receiver tick", self.session_id)

    def _finish(self) -> None:
        vc = self.voice_client
        vc._detach(self)
        with self._lock:
            now = time.monotonic()
            self._attribute_unmapped(now, final=True)
            self._attribute_not_audio()
            for stream in list(self._streams.values()):
                self._drain_stream(stream, now, final=True)
            self._flush_jobs()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            with self._inflight_lock:
                if not self._inflight:
                    break
            time.sleep(0.002)
        if self.pool is not None:
            keys: list[Any] = [s.key for s in self._streams.values()]
            with contextlib.suppress(Exception):  # the pool may have been shut down by its owner
                self.pool.release(keys)
            if self._own_pool:
                self.pool.shutdown()
        self._delivery.put(_Stop(self.clock.sample_at(self._stopped_at or time.monotonic())))
        self._delivery.put(None)
        self._delivery_thread.join()
        if self._on_finished is not None:
            self._on_finished(self.sink, error=self.error)
        self._call_after()

    # -- datagrams (discord.py's socket reader thread) ---------------------------------------

    def on_datagram(self, data: bytes) -> None:
        """Socket listener: must never raise (it runs on discord.py's reader thread)."""
        try:
            self._on_datagram(data, time.monotonic())
        except Exception:
            _log.exception("listening session %d: unexpected error on a datagram", self.session_id)
            self.unattributed["receiver-error"] += 1

    def _transport(self) -> TransportCipher | None:
        conn = self.voice_client._connection
        mode, key = conn.mode, conn.secret_key
        if not mode or not key:
            return None
        raw = bytes(key)
        if self._cipher_key != (mode, raw):
            self._cipher = transport_cipher(mode, raw)
            self._cipher_key = (mode, raw)
        return self._cipher

    def _on_datagram(self, data: bytes, now: float) -> None:
        if self._closed:
            return
        kind = classify(data)
        if kind is PacketKind.RTP:
            self._on_rtp(data, now)
        elif kind is PacketKind.RTCP:
            self._on_rtcp(data)
        elif kind is PacketKind.UNKNOWN:
            self._drop(None, "not-rtp", "a datagram that is neither RTP, RTCP nor a keep-alive")
        # keep-alives and IP discovery are the connection's business

    def _on_rtp(self, data: bytes, now: float) -> None:
        cipher = self._transport()
        if cipher is None:
            self.unattributed["no-key-yet"] += 1
            return
        vc = self.voice_client
        try:
            header = RtpHeader.parse(data)
        except PacketError as exc:
            self._drop(None, exc.reason, "an RTP header that does not parse")
            return
        user_id = vc._ssrc_to_user.get(header.ssrc)
        if header.ssrc in vc._video_ssrcs or header.payload_type != OPUS_PAYLOAD_TYPE:
            if user_id is None:
                user_id = vc._video_owner.get(header.ssrc)
            if user_id is None:
                # not announced yet (op 12 can arrive after the first video packets): count it
                # against the SSRC; _attribute_not_audio moves the count to its user once known
                with self._lock:
                    if (
                        header.ssrc in self._not_audio_unmapped
                        or len(self._not_audio_unmapped) < _MAX_UNMAPPED
                    ):
                        self._not_audio_unmapped[header.ssrc] += 1
                    self._drop(
                        None, "not-audio", "video, RTX or another payload type from an unannounced SSRC"
                    )
                return
            self._drop(user_id, "not-audio", "video, RTX or another payload type", count_packet=True)
            return
        try:
            header, payload = cipher.open_rtp(data)
        except PacketError as exc:
            self._drop(user_id, exc.reason, "transport decryption failed", count_packet=True)
            return
        if self._paused:
            return
        with self._lock:
            # Paused, or the session ended, while this packet was being opened: _finish may already
            # have drained every stream, and a packet counted now would never be delivered.
            if self._paused or self._closed:
                return
            if user_id is None:
                held = self._unmapped.get(header.ssrc)
                if held is None:
                    if len(self._unmapped) >= _MAX_UNMAPPED:
                        # a flood of SSRCs nobody announced: hold a bounded number, drop the rest
                        self.unattributed["unknown-ssrc"] += 1
                        self._warn_once(
                            None, "unmapped-flood", "too many unannounced SSRCs; dropping their packets"
                        )
                        return
                    held = self._unmapped[header.ssrc] = collections.deque()
                if len(held) >= self.options.max_held_per_stream:
                    held.popleft()
                    self.unattributed["unknown-ssrc"] += 1
                held.append((header, payload, now))
                return
            self._packet(header, payload, user_id, now)

    def _packet(self, header: RtpHeader, payload: bytes, user_id: int, now: float) -> None:
        """A transport-decrypted packet of a known user, still DAVE-encrypted (lock held)."""
        stats = self.stats[user_id]
        stats.packets += 1
        stats.decrypted += 1
        if not payload and header.padding:
            self._probe(header, user_id, now)
            return
        stream = self._stream(header.ssrc, user_id, now)
        if stream.start_buffer is None and now - stream.last_arrival > self.options.spurt_gap:
            # A talk spurt starts: its place on the timeline is decided from its first packets
            # together (see _start), not from the first alone, which a delay spike can make late.
            stream.start_buffer = []
            stream.start_until = now + self.options.jitter_delay
        stream.last_arrival = now
        if not stream.speaking:
            stream.speaking = True
            self._dispatch("listening_speaking_start", user_id)
        if stream.start_buffer is not None:
            # A new stream or spurt: its first packets may arrive out of order, and DAVE refuses
            # any frame older than the first one it opens, so they are put in order first.
            stream.start_buffer.append((header.sequence, header.timestamp, payload, now))
            return
        self._push(stream, header.sequence, header.timestamp, payload, now, now)

    def _probe(self, header: RtpHeader, user_id: int, now: float) -> None:
        """A padding-only packet (a bandwidth probe): no audio, dropped and counted (lock held).

        It never reaches DAVE or a decoder, starts no stream, spurt or speaking event, and moves
        no timeline. Sent on the member's audio SSRC it may take a sequence number of the stream:
        the jitter buffer is told, so that number is not taken for a lost frame and concealed.
        """
        self._drop(user_id, "probe", "a padding-only packet: a bandwidth probe, no audio")
        stream = self._streams.get(header.ssrc)
        if stream is None or stream.user_id != user_id:
            return
        if stream.start_buffer is not None:
            stream.start_buffer.append((header.sequence, header.timestamp, NO_MEDIA, now))
        else:
            self._jitter(stream, stream.jitter.push(header.sequence, header.timestamp, NO_MEDIA, now), now)

    def _stream(self, ssrc: int, user_id: int, now: float) -> _Stream:
        stream = self._streams.get(ssrc)
        if stream is None or stream.user_id != user_id:
            # FEC is proposed for every lost frame followed by its neighbour; whether that frame
            # really carries FEC is known only once it is DAVE-decrypted (see _open).
            jitter = JitterBuffer(self.options.jitter_delay, has_fec=_always)
            stream = _Stream(ssrc, user_id, (self.session_id, ssrc), jitter, StreamTimeline(self.clock))
            stream.start_until = now + self.options.jitter_delay
            if self.pool is not None:
                stream.worker = self.pool.worker_for(stream.key)
            self._streams[ssrc] = stream
        return stream

    def _start(self, stream: _Stream, now: float) -> None:
        """End a stream's start window: its first packets enter the jitter buffer in order."""
        buffered = stream.start_buffer
        stream.start_buffer = None
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
        stream.window = (seq0, len(buffered) - i0)
        for seq, ts, payload, arrival in buffered:
            self._push(stream, seq, ts, payload, arrival, now)

    def _push(self, stream: _Stream, seq: int, ts: int, payload: bytes, arrival: float, now: float) -> None:
        """Give one packet to the stream's jitter buffer (lock held)."""
        if payload and stream.jitter.out_of_line(seq):
            # Far out of line, a packet restarts the stream: the jitter buffer starts over from it
            # and the timeline follows the jump. A real restart's frame opens; a stale copy (a
            # replay, or a datagram held up for seconds) does not, as DAVE never opens a frame
            # twice, and a silence frame proves nothing. Pushed, one replayed packet moved the
            # rest of the member's track and concealed the frames across the jump.
            opus = None if payload == OPUS_SILENCE else self._dave_open(stream, payload)
            if opus is None:
                self._drop(stream.user_id, "stale", "a stale copy of an old packet (replayed, or held up)")
                return
            stream.opened[seq] = opus  # _open takes it from here: DAVE would refuse it a second time
        self._jitter(stream, stream.jitter.push(seq, ts, payload, arrival), now)

    def _dave_open(self, stream: _Stream, payload: bytes) -> bytes | None:
        """``payload`` with its DAVE layer opened, or None if it does not open (yet)."""
        try:
            return self._dave_decrypt(stream.user_id, payload)
        except Exception:
            return None

    def _dave_decrypt(self, user_id: int, payload: bytes) -> bytes:
        """Open ``payload``'s DAVE layer with the session's keys, or else with those of the group
        a new one replaced in the last few seconds (a frame still on its way when the last other
        member left and the bot's group was reset); raises the current session's :class:`DaveError`.
        """
        conn = self.voice_client._connection
        try:
            return dave_decrypt(
                conn.dave_session,
                user_id,
                payload,
                protocol_version=conn.dave_protocol_version,
                downgraded=bool(getattr(conn, "dave_downgraded", False)),
            )
        except DaveError as exc:
            retired_session = getattr(conn, "retired_dave_session", None)
            retired = retired_session() if retired_session is not None else None
            if retired is not None:
                with contextlib.suppress(DaveError):
                    return dave_decrypt(retired, user_id, payload, protocol_version=1)
            raise exc from None

    def _jitter(self, stream: _Stream, out: list[Playout], now: float) -> None:
        """Count what the jitter buffer dropped and open the DAVE layer of what it released."""
        jstats = stream.jitter.stats
        stats = self.stats[stream.user_id]
        if jstats.duplicates != stream.seen_duplicates:
            stats.duplicates += jstats.duplicates - stream.seen_duplicates
            stream.seen_duplicates = jstats.duplicates
        if jstats.late != stream.seen_late:
            stats.late += jstats.late - stream.seen_late
            stream.seen_late = jstats.late
            self._warn_once(stream.user_id, "late", "a packet arrived after its frame was concealed; dropped")
        if out:
            stream.pending.extend(out)
        if stream.pending:
            self._open(stream, now)

    def _open(self, stream: _Stream, now: float, *, final: bool = False) -> None:
        """Open the DAVE layer of released frames, in sequence order (lock held).

        A frame whose key is not usable yet stays queued, with everything after it, until it
        opens or has waited ``dave_hold``; if a later frame opens meanwhile, the key is there and
        the waiting frame is undecryptable. Frames that never open are concealed and counted.
        A lost frame marked for FEC keeps FEC only if the next frame, decrypted, carries it.
        """
        stats = self.stats[stream.user_id]
        q = stream.pending
        waited = stream.blocked_since is not None
        while q:
            item = q[0]
            if item.kind is JitterKind.PLC:
                q.popleft()
                self._emit(stream, item, FrameKind.PLC, None, lost=True)
                continue
            fec = item.kind is JitterKind.FEC
            target = seq_add(item.sequence, 1) if fec else item.sequence
            opus = stream.opened.get(target) if fec else stream.opened.pop(target, None)
            if opus is None:
                assert item.payload is not None
                try:
                    opus = self._dave_decrypt(stream.user_id, item.payload)
                except Exception as exc:
                    reason = getattr(exc, "reason", "")
                    if reason == "no-key" and not final:
                        if stream.blocked_since is None:
                            stream.blocked_since = now
                        # Each frame waits dave_hold from its own arrival, and at most
                        # max_held_per_stream frames wait: timed from when it reached the head of
                        # the queue, a stream whose frames never open let one through per
                        # dave_hold while the rest queued behind it without bound.
                        since = item.arrival if item.arrival is not None else stream.blocked_since
                        if (
                            now - since < self.options.dave_hold
                            and len(q) <= self.options.max_held_per_stream
                            and not self._later_opens(stream)
                        ):
                            return  # wait for the key
                    q.popleft()
                    stream.blocked_since = None
                    if fec:  # the next frame will fail on its own; this one is simply concealed
                        self._emit(stream, item, FrameKind.PLC, None, lost=True)
                        continue
                    self._dave_failed(stream, exc)
                    self._emit(stream, item, FrameKind.PLC, None)
                    continue
                if fec:
                    stream.opened[target] = opus
            q.popleft()
            stream.blocked_since = None
            if fec:
                self._emit(stream, item, FrameKind.FEC if _has_fec(opus) else FrameKind.PLC, opus, lost=True)
                continue
            stats.dave_decrypted += 1
            if waited and item.arrival is not None and now - item.arrival > self.options.tick:
                stats.dave_held += 1
            kind = FrameKind.SILENCE if item.kind is JitterKind.SILENCE else FrameKind.RECEIVED
            self._emit(stream, item, kind, opus)

    def _later_opens(self, stream: _Stream) -> bool:
        """Whether a frame queued after the blocked head opens (then the head never will)."""
        for item in list(stream.pending)[1:]:
            if item.kind is not JitterKind.RECEIVED or item.sequence in stream.opened:
                continue
            assert item.payload is not None
            opus = self._dave_open(stream, item.payload)
            if opus is None:
                return False
            stream.opened[item.sequence] = opus
            return True
        return False

    def _dave_failed(self, stream: _Stream, exc: BaseException) -> None:
        stats = self.stats[stream.user_id]
        stats.dave_failures += 1
        stats.dropped["dave-" + (getattr(exc, "reason", "") or "error")] += 1
        self._warn_once(stream.user_id, "dave", f"DAVE decryption failed ({exc}); the frame is concealed")

    def _emit(
        self, stream: _Stream, item: Playout, kind: FrameKind, opus: bytes | None, *, lost: bool = False
    ) -> None:
        """Place one frame on the timeline and queue its decode, or deliver it (lock held)."""
        stats = self.stats[stream.user_id]
        arrival = item.arrival
        spurt_start = False
        if arrival is not None:
            # Only the first packet of a start window can begin a spurt: the window's packets
            # came together (after a delay spike, or from a sender catching up), and measured
            # against the first one's arrival, an estimate that can lie well before theirs, they
            # looked like a new spurt: re-anchored late, leaving a hole after the first frame and
            # the rest of the spurt shifted by the spike.
            first, span = stream.window
            in_window = 0 < seq_diff(item.sequence, first) < span
            spurt_start = not in_window and arrival - stream.last_placed_arrival > self.options.spurt_gap
            stream.last_placed_arrival = arrival
        position = stream.timeline.place(item.timestamp, arrival, spurt_start=spurt_start)
        frame = AudioFrame(
            user_id=stream.user_id,
            ssrc=stream.ssrc,
            sequence=item.sequence,
            timestamp=item.timestamp,
            position=position,
            kind=kind,
            opus=opus if kind in (FrameKind.RECEIVED, FrameKind.SILENCE) else None,
            member=self.voice_client._member(stream.user_id),
            arrival=arrival,
        )
        if lost:
            stats.lost += 1
            self._warn_once(
                stream.user_id, "lost", "frames were lost; recovering them (FEC) or concealing them"
            )
        if kind is FrameKind.FEC:
            stats.recovered_fec += 1
        elif kind is FrameKind.PLC:
            stats.concealed += 1
        if self.pool is None or stream.worker is None:
            stats.frames += 1
            self._delivery.put([frame])
            return
        if kind is FrameKind.FEC:
            job: DecodeJob = (stream.key, FEC, opus, FRAME_SAMPLES)
        elif kind is FrameKind.PLC:
            job = (stream.key, PLC, None, FRAME_SAMPLES)
        else:
            job = (stream.key, DECODE, opus, FRAME_SAMPLES)
        self._jobs[stream.worker].append(job)
        self._meta[stream.worker].append(frame)

    def _drain_stream(self, stream: _Stream, now: float, *, final: bool) -> None:
        """Release what the stream holds: what is due, or everything when ``final``."""
        if stream.start_buffer is not None and (final or now >= stream.start_until):
            self._start(stream, now)
        out = stream.jitter.flush() if final else stream.jitter.poll(now)
        self._jitter(stream, out, now)
        if final and stream.pending:
            self._open(stream, now, final=True)

    # -- the receiver thread's tick ----------------------------------------------------------

    def _tick(self, now: float) -> None:
        with self._lock:
            self._attribute_unmapped(now)
            self._attribute_not_audio()
            for stream in list(self._streams.values()):
                self._drain_stream(stream, now, final=False)
                if stream.speaking and now - stream.last_arrival > self.options.speaking_timeout:
                    stream.speaking = False
                    self._dispatch("listening_speaking_stop", stream.user_id)
            self._flush_jobs()

    def _attribute_not_audio(self) -> None:
        """Move drops counted against a not-yet-announced (video) SSRC to its user (lock held)."""
        if not self._not_audio_unmapped:
            return
        vc = self.voice_client
        for ssrc, count in list(self._not_audio_unmapped.items()):
            user_id = vc._ssrc_to_user.get(ssrc) or vc._video_owner.get(ssrc)
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
        if not self._unmapped:
            return
        mapping = self.voice_client._ssrc_to_user
        for ssrc in list(self._unmapped):
            held = self._unmapped[ssrc]
            user_id = mapping.get(ssrc)
            if user_id is not None:
                del self._unmapped[ssrc]
                for header, payload, arrival in held:
                    self._packet(header, payload, user_id, arrival)
                continue
            while held and (final or now - held[0][2] > self.options.unmapped_hold):
                held.popleft()
                self.unattributed["unknown-ssrc"] += 1
                # once, not once per SSRC: a flood of made-up SSRCs must not flood the log (nor
                # grow the set of warnings given, which lives as long as the session)
                self._warn_once(
                    None, "unmapped", f"packets from SSRC {ssrc}, which no user was mapped to, were dropped"
                )
            if not held:
                del self._unmapped[ssrc]

    def _flush_jobs(self) -> None:
        if not self._jobs:
            return
        assert self.pool is not None
        for worker, jobs in self._jobs.items():
            frames = self._meta[worker]
            try:
                future = self.pool.submit(worker, jobs)
            except Exception as exc:
                self._decoded(frames, None, exc)
                continue
            with self._inflight_lock:
                self._inflight.add(future)
            future.add_done_callback(functools.partial(self._on_decoded, frames=frames))
        self._jobs = collections.defaultdict(list)
        self._meta = collections.defaultdict(list)

    def _on_decoded(self, future: Future[list[DecodeAnswer]], *, frames: list[AudioFrame]) -> None:
        try:
            exc = future.exception()
            self._decoded(frames, None if exc else future.result(), exc)
        finally:
            with self._inflight_lock:
                self._inflight.discard(future)

    def _decoded(
        self, frames: list[AudioFrame], answers: list[DecodeAnswer] | None, exc: BaseException | None
    ) -> None:
        """Attach PCM to frames (or conceal them, if their worker died) and hand them to the sink."""
        if answers is None:
            reason = "decoder-died" if isinstance(exc, WorkerDied) else "decoder-error"
            silence = bytes(FRAME_SAMPLES * 4)
            for frame in frames:
                stats = self.stats[frame.user_id]
                if frame.kind is not FrameKind.PLC:
                    stats.concealed += 1
                stats.dropped[reason] += 1
                frame.kind = FrameKind.PLC
                frame.pcm = silence
                self._warn_once(frame.user_id, reason, f"frames were concealed: {exc}")
        else:
            for frame, (status, pcm) in zip(frames, answers, strict=True):
                if status in (CONCEALED, FAILED):
                    stats = self.stats[frame.user_id]
                    stats.corrupt += 1
                    stats.concealed += 1
                    frame.kind = FrameKind.PLC
                    self._warn_once(frame.user_id, "corrupt", "a corrupt Opus frame was concealed")
                frame.pcm = pcm if pcm is not None else bytes(FRAME_SAMPLES * 4)
        for frame in frames:
            self.stats[frame.user_id].frames += 1
        self._delivery.put(frames)

    # -- RTCP ---------------------------------------------------------------------------------

    def _on_rtcp(self, data: bytes) -> None:
        cipher = self._transport()
        if cipher is None or self._paused:
            return
        try:
            plain = cipher.open_rtcp(data)
            head = RtcpHeader.parse(plain)
        except PacketError as exc:
            self._drop(None, "rtcp-" + exc.reason, "an RTCP packet that does not open")
            return
        user_id = self.voice_client._ssrc_to_user.get(head.ssrc)
        self._delivery.put(RtcpPacket(head.ssrc, user_id, head.packet_type, plain))

    # -- delivery thread -----------------------------------------------------------------------

    def _deliver(self) -> None:
        sink = self.sink
        while True:
            item = self._delivery.get()
            if item is None:
                break
            if self._sink_failed:
                continue
            try:
                if isinstance(item, RtcpPacket):
                    sink.on_rtcp(item)
                elif isinstance(item, _Stop):
                    sink.on_stop(item.end)
                else:
                    for frame in item:
                        sink.on_audio(frame)
            except Exception as exc:
                self._sink_error(exc)
        try:
            sink.cleanup()
        except Exception as exc:
            self._sink_error(exc)

    def _sink_error(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._sink_failed = True
        _log.error(
            "listening session %d: the sink %r failed and was stopped: %r", self.session_id, self.sink, exc
        )
        # Nothing more can reach a failed sink: end the session now, so after() hears of it.
        self.stop()

    def _call_after(self) -> None:
        after, error = self.after, self.error
        loop = self.loop

        def call() -> None:
            try:
                if after is not None:
                    result = after(self.sink, error)
                    if inspect.isawaitable(result):
                        task = loop.create_task(_await(result))
                        self.voice_client._tasks.add(task)
                        task.add_done_callback(self.voice_client._tasks.discard)
            except Exception:
                _log.exception("the after callback of listen() raised")
            finally:
                self._finished.set()

        if loop.is_closed():
            self._finished.set()
            return
        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:  # the loop is closing
            self._finished.set()

    # -- helpers ----------------------------------------------------------------------------------

    def _drop(self, user_id: int | None, reason: str, what: str, *, count_packet: bool = False) -> None:
        if user_id is None:
            self.unattributed[reason] += 1
            self._warn_once(None, reason, f"{what} ({reason}); the datagram was dropped")
            return
        stats = self.stats[user_id]
        if count_packet:
            stats.packets += 1
        stats.dropped[reason] += 1
        self._warn_once(user_id, reason, f"{what} ({reason}); the packet was dropped")

    def _warn_once(self, user_id: int | None, kind: str, message: str) -> None:
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

    def _dispatch(self, event: str, user_id: int) -> None:
        vc = self.voice_client
        member = vc._member(user_id)
        with contextlib.suppress(RuntimeError):  # the event loop is closing
            self.loop.call_soon_threadsafe(vc.client.dispatch, event, member or vc._user(user_id), vc)


def _always(payload: bytes) -> bool:
    return True


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


async def _await(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:
        _log.exception("the after callback of listen() raised")
