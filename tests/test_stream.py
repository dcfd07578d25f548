"""One :class:`~listening_core.stream.StreamState` on its own: sequence numbers, RTP timestamps,
payloads and arrival times in, frames out.

Each stream is fed directly (``packet``, ``due``) on times the test chooses; its owner is a bare
:class:`~listening_core.session.ReceiveSession` that only keeps the stats and the events, and its
DAVE layer is :class:`Dave` below, which keeps DAVE's one rule that matters here: a frame opens
once, and only when its key is usable.
"""

from __future__ import annotations

from listening_core.errors import DaveError
from listening_core.session import ListenOptions, ReceiveSession
from listening_core.sinks import AudioFrame, FrameKind
from listening_core.ssrc_map import SsrcMap
from listening_core.stream import StreamState

T0 = 100.0  # session sample 0
T = T0 + 1.0  # when the stream starts
USER, SSRC = 7, 0x77
STEP = 960  # 20 ms of RTP time
RATE = 48_000
#: SILK 20 ms mono Opus frames whose first byte says: LBRR (FEC for the frame before) or not
WITH_FEC = bytes([1 << 3, 0b0100_0000, 0x55])
NO_FEC = bytes([1 << 3, 0b1000_0000, 0x55])


class Dave:
    """A DAVE opener: ``b"E<n>|<opus>"`` is a frame of key epoch ``n``; it opens once (a second
    copy is refused, as DAVE refuses a replay) and only once :attr:`epoch` reached ``n``."""

    def __init__(self) -> None:
        self.epoch = 1
        self.opened: set[bytes] = set()

    def decrypt(self, user_id: int, payload: bytes) -> bytes:
        head, _, opus = payload.partition(b"|")
        if int(head[1:]) > self.epoch:
            raise DaveError("no-key", "this epoch's key is not usable yet")
        if payload in self.opened:
            raise DaveError("replay", "opened before")
        self.opened.add(payload)
        return opus


def sealed(opus: bytes, epoch: int = 1) -> bytes:
    return b"E%d|" % epoch + opus


def opus(n: int) -> bytes:
    return NO_FEC + n.to_bytes(2, "big")


class Rig:
    def __init__(self, **options: float) -> None:
        self.dave = Dave()
        self.session = ReceiveSession(ListenOptions(**options), T0, SsrcMap(), self.dave)
        self.stream = StreamState(self.session, SSRC, USER, T)
        self.stats = self.session.stats[USER]

        self.out: list[tuple[AudioFrame, bytes | None]] = []

    def send(self, seq: int, ts: int, payload: bytes, now: float) -> None:
        """A packet arrives at ``now``, after the stream acted on every deadline before it."""
        self.advance(now)
        self.stream.packet(seq & 0xFFFF, ts & 0xFFFFFFFF, payload, now)

    def advance(self, now: float) -> None:
        while (t := self.stream.next_deadline()) <= now:
            self.stream.due(t)
        self.out += self.session.drain().frames

    def run_until(self, end: float) -> list[tuple[AudioFrame, bytes | None]]:
        """Act at each deadline up to ``end``; every frame handed out since the last call."""
        self.advance(end)
        out, self.out = self.out, []
        return out


def sample(t: float) -> int:
    return round((t - T0) * RATE)


def test_the_start_window_puts_packets_in_order_and_estimates_the_spurt_start_from_all() -> None:
    rig = Rig()
    # 101 arrives first, 100 after it (swapped on the way), 102 last; 100 was held up the most
    rig.send(101, 1000 + STEP, sealed(opus(1)), T)
    rig.send(100, 1000, sealed(opus(0)), T + 0.03)
    rig.send(102, 1000 + 2 * STEP, sealed(opus(2)), T + 0.035)
    assert rig.stream.next_deadline() == T + 0.06  # jitter_delay from the first arrival
    rig.stream.due(T + 0.059)
    assert not rig.session.drain().frames  # nothing before the window closes
    out = rig.run_until(T + 0.06)
    assert [(f.sequence, f.kind, payload) for f, payload in out] == [
        (100 + k, FrameKind.RECEIVED, opus(k)) for k in range(3)
    ]
    # 100 was sent no later than 101's arrival minus 20 ms (T - 0.02), 102's minus 40 ms
    # (T - 0.005): the earliest bound, not 100's own late arrival, places the spurt
    assert [f.position for f, _ in out] == [sample(T - 0.02) + k * STEP for k in range(3)]


def test_a_packet_far_out_of_line_restarts_the_stream_only_if_its_dave_layer_opens() -> None:
    rig = Rig()
    for k in range(200):
        rig.send(1000 + k, k * STEP, sealed(opus(k)), T + 0.02 * k)
    end = T + 0.02 * 199
    rig.run_until(end + 0.1)
    rig.session.drain()
    # a copy of 1001, replayed now that the stream is 199 packets past it (far out of line):
    # DAVE refuses a frame it opened before, so it is a stale copy, not a restart
    rig.send(1001, STEP, sealed(opus(1)), end + 0.02)
    assert rig.stats.dropped["stale"] == 1
    # a real restart far ahead (a client that reset its sequence): its frame opens
    restart = 1000 + 30_000
    rig.send(restart, 300 * STEP, sealed(opus(300)), end + 0.04)
    rig.send(restart + 1, 301 * STEP, sealed(opus(301)), end + 0.06)
    out = rig.run_until(end + 0.5)
    assert [(f.sequence, f.kind, payload) for f, payload in out] == [
        (restart, FrameKind.RECEIVED, opus(300)),
        (restart + 1, FrameKind.RECEIVED, opus(301)),
    ]
    assert rig.stats.dropped == {"stale": 1} and rig.stats.lost == 0 and rig.stats.frames == 202


def test_frames_wait_for_their_dave_key_then_come_out_in_order() -> None:
    rig = Rig()
    rig.dave.epoch = 0  # the key of epoch 1 is not usable yet
    for k in range(4):
        rig.send(10 + k, k * STEP, sealed(opus(k)), T + 0.02 * k)
    assert not rig.run_until(T + 0.3)  # held, retried each tick, none dropped
    assert rig.stats.dave_failures == 0
    rig.dave.epoch = 1  # the key arrives
    out = rig.run_until(T + 0.31)
    assert [(f.sequence, f.kind, payload) for f, payload in out] == [
        (10 + k, FrameKind.RECEIVED, opus(k)) for k in range(4)
    ]
    assert [f.position for f, _ in out] == [sample(T) + k * STEP for k in range(4)]
    assert (rig.stats.dave_held, rig.stats.dave_decrypted, rig.stats.concealed) == (4, 4, 0)


def test_a_frame_held_past_dave_hold_is_concealed_and_counted_undecryptable() -> None:
    rig = Rig(dave_hold=0.5)
    rig.dave.epoch = 0
    rig.send(10, 0, sealed(opus(0)), T)
    assert not rig.run_until(T + 0.49)
    out = rig.run_until(T + 0.5 + 1e-6)
    assert [(f.sequence, f.kind, payload) for f, payload in out] == [(10, FrameKind.PLC, None)]
    assert rig.stats.dave_failures == 1 and rig.stats.dropped == {"dave-no-key": 1}
    assert rig.stats.concealed == 1 and rig.stats.lost == 0  # received, never opened: not lost


def test_a_lost_frame_is_recovered_by_fec_only_when_the_next_frame_carries_it() -> None:
    rig = Rig()
    payloads = {0: opus(0), 1: opus(1), 3: WITH_FEC + b"\x03", 4: opus(4), 6: opus(6)}
    for k, p in payloads.items():  # 2 and 5 are lost; 3 carries FEC for 2, 6 none for 5
        rig.send(50 + k, k * STEP, sealed(p), T + 0.02 * k)
    out = rig.run_until(T + 0.5)
    assert [(f.sequence - 50, f.kind, payload) for f, payload in out] == [
        (0, FrameKind.RECEIVED, opus(0)),
        (1, FrameKind.RECEIVED, opus(1)),
        (2, FrameKind.FEC, WITH_FEC + b"\x03"),  # decoded from the next frame's FEC
        (3, FrameKind.RECEIVED, WITH_FEC + b"\x03"),
        (4, FrameKind.RECEIVED, opus(4)),
        (5, FrameKind.PLC, None),
        (6, FrameKind.RECEIVED, opus(6)),
    ]
    assert [f.position for f, _ in out] == [sample(T) + k * STEP for k in range(7)]
    assert (rig.stats.lost, rig.stats.recovered_fec, rig.stats.concealed) == (2, 1, 1)


def test_a_spurt_after_a_gap_is_placed_where_it_arrived_a_short_pause_by_its_timestamps() -> None:
    rig = Rig()
    for k in range(3):
        rig.send(k, k * STEP, sealed(opus(k)), T + 0.02 * k)
    # a pause shorter than spurt_gap: the timestamps say where (a sender's 60 ms of silence)
    rig.send(3, 6 * STEP, sealed(opus(3)), T + 0.12)
    # a pause longer than spurt_gap: the sender's timestamps stood still while it was silent,
    # so the frame is placed where it arrived, 2 s on, not 20 ms after the last one
    rig.send(4, 7 * STEP, sealed(opus(4)), T + 2.12)
    rig.send(5, 8 * STEP, sealed(opus(5)), T + 2.14)
    out = rig.run_until(T + 3.0)
    assert [(f.sequence, f.kind) for f, _ in out] == [(k, FrameKind.RECEIVED) for k in range(6)]
    start = sample(T)
    assert [f.position for f, _ in out] == [
        start,
        start + STEP,
        start + 2 * STEP,
        start + 6 * STEP,
        sample(T + 2.12),
        sample(T + 2.12) + STEP,
    ]


def test_a_stream_acts_at_its_deadlines_and_not_a_hair_before() -> None:
    # what lets the session keep streams in a deadline heap: due() between two deadlines does
    # nothing, so acting on a stream only at next_deadline() is acting on it at every wake
    rig = Rig()
    rig.send(1, 0, sealed(opus(1)), T)
    rig.run_until(T + 0.07)
    deadline = rig.stream.next_deadline()  # the speaker stops speaking speaking_timeout after T
    assert T + 0.08 < deadline < T + 0.08 + 1e-5
    rig.session.drain()
    rig.stream.due(T + 0.08 + (deadline - T - 0.08) / 2)  # past speaking_timeout, before the deadline
    assert not rig.session.drain().speaking
    rig.stream.due(deadline)
    assert rig.session.drain().speaking == [(USER, False)]


def test_a_held_frame_expires_at_its_own_deadline_whatever_the_rounding() -> None:
    # arrival + dave_hold - arrival < dave_hold in floating point, for this arrival: the frame
    # used to be found not expired at its expiry, and retried at that same moment, for good
    arrival = 101.134
    assert (arrival + 0.3) - arrival < 0.3
    rig = Rig(dave_hold=0.3)
    rig.dave.epoch = 0
    rig.stream = StreamState(rig.session, SSRC, USER, arrival)
    rig.send(10, 0, sealed(opus(0)), arrival)
    seen = set()
    while (t := rig.stream.next_deadline()) <= arrival + 1.0:
        assert t not in seen, f"due at {t} again after acting at {t}"
        seen.add(t)
        rig.stream.due(t)
    assert [(f.sequence, f.kind) for f, _ in rig.session.drain().frames] == [(10, FrameKind.PLC)]
    assert rig.stats.dave_failures == 1
