"""The receive session's rules, fed bytes and times: no thread, clock, socket or voice client.

A :class:`~listening_core.session.ReceiveSession` gets datagrams sealed under a real transport key
(both AEAD modes) and the moments they arrived, and says what comes out and when it next needs
to be asked (:meth:`~listening_core.session.ReceiveSession.next_deadline`). DAVE is a stand-in
opener here (the real group is in ``tests/_receiver_rig.py``'s tests): frames pass through, or
have no key until the test says so.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from listening_core.crypto import OPUS_SILENCE, SUPPORTED_MODES, transport_cipher
from listening_core.errors import DaveError
from listening_core.rtp import RtpHeader
from listening_core.session import Events, ListenOptions, ReceiveSession
from listening_core.sinks import FRAME_SAMPLES, SAMPLE_RATE, FrameKind
from listening_core.ssrc_map import SsrcMap
from listening_core.unpacker import CONCEALED, OK

KEY = bytes(range(100, 132))
T0 = 50.0  # session sample 0
ALICE, BOB = 11, 22
SSRC_A, SSRC_B, SSRC_X = 0xA, 0xB, 0x5EC
STEP = 960


class Dave:
    """A DAVE opener: frames pass through, except while :attr:`keyless` (``no-key``)."""

    def __init__(self) -> None:
        self.keyless = False
        self.calls = 0

    def decrypt(self, user_id: int, payload: bytes) -> bytes:
        self.calls += 1
        if self.keyless and payload != OPUS_SILENCE:
            raise DaveError("no-key", "not yet")
        return payload


class Wire:
    """Seals packets as a Discord client does."""

    def __init__(self, mode: str) -> None:
        self.cipher = transport_cipher(mode, KEY)
        self.counter = 0

    def rtp(self, ssrc: int, seq: int, ts: int, opus: bytes, *, pt: int = 120, padding: int = 0) -> bytes:
        self.counter += 1
        return self.cipher.seal_rtp(
            RtpHeader(False, pt, seq, ts, ssrc), opus, padding=padding, counter=self.counter
        )


def frame(n: int) -> bytes:
    return b"\xfc" + n.to_bytes(4, "big") + bytes(8)


def make(mode: str = SUPPORTED_MODES[0], **options: float) -> tuple[ReceiveSession, Wire, SsrcMap, Dave]:
    ssrcs, dave = SsrcMap(), Dave()
    ssrcs.map(SSRC_A, ALICE)
    wire = Wire(mode)
    session = ReceiveSession(ListenOptions(**options), T0, ssrcs, dave, transport=transport_cipher(mode, KEY))
    return session, wire, ssrcs, dave


def at(t: float) -> int:
    return round((t - T0) * SAMPLE_RATE)


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_a_spurt_is_placed_where_it_arrived_and_in_order(mode: str) -> None:
    session, wire, _, _ = make(mode)
    t = T0 + 1.0
    session.datagram(wire.rtp(SSRC_A, 100, 5000, frame(0)), t)
    assert session.drain().speaking == [(ALICE, True)]
    # the start window: nothing comes out before jitter_delay has passed
    assert session.next_deadline() == pytest.approx(t + 0.06)
    session.datagram(wire.rtp(SSRC_A, 102, 5000 + 2 * STEP, frame(2)), t + 0.04)  # swapped on the way
    session.datagram(wire.rtp(SSRC_A, 101, 5000 + STEP, frame(1)), t + 0.041)
    assert not session.tick(t + 0.059).frames
    out = session.tick(t + 0.06).frames
    assert [(f.sequence, f.position, f.kind, payload) for f, payload in out] == [
        (100 + k, at(t) + k * STEP, FrameKind.RECEIVED, frame(k)) for k in range(3)
    ]
    assert all(f.opus == frame(k) for k, (f, _) in enumerate(out))
    stats = session.stats[ALICE]
    assert (stats.packets, stats.decrypted, stats.dave_decrypted, stats.frames) == (3, 3, 3, 3)


def test_idle_means_no_deadline() -> None:
    session, wire, _, _ = make()
    assert session.next_deadline() is None
    t = T0 + 1.0
    session.datagram(wire.rtp(SSRC_A, 1, 0, frame(0)), t)
    session.tick(t + 0.06)
    # the only thing left to do is to notice the speaker stopped
    deadline = session.next_deadline()
    assert deadline == pytest.approx(t + 0.08)
    session.drain()
    assert session.tick(deadline).speaking == [(ALICE, False)]
    assert session.next_deadline() is None


def test_a_lost_frame_is_concealed_at_its_jitter_deadline() -> None:
    session, wire, _, _ = make()
    t = T0 + 2.0
    session.datagram(wire.rtp(SSRC_A, 10, 0, frame(0)), t)
    session.tick(t + 0.06)
    session.drain()
    session.datagram(wire.rtp(SSRC_A, 12, 2 * STEP, frame(2)), t + 0.07)  # 11 is missing
    assert not session.tick(t + 0.075).frames
    assert session.next_deadline() == pytest.approx(t + 0.13)  # 12 waits jitter_delay for 11
    assert not session.tick(t + 0.1299).frames
    out = session.tick(t + 0.13).frames
    # the FEC proposal is taken back: this stand-in frame carries none
    assert [(f.sequence, f.kind) for f, _ in out] == [(11, FrameKind.PLC), (12, FrameKind.RECEIVED)]
    assert out[0][0].position == at(t) + STEP and out[0][1] is None
    stats = session.stats[ALICE]
    assert (stats.lost, stats.concealed, stats.frames) == (1, 1, 3)


def test_an_unannounced_ssrc_is_held_until_its_user_is_known() -> None:
    session, wire, ssrcs, _ = make()
    t = T0 + 1.0
    session.datagram(wire.rtp(SSRC_B, 1, 0, frame(0)), t)
    assert not session.drain() and SSRC_B in session.unmapped
    assert session.next_deadline() == pytest.approx(t + 2.0, abs=1e-5)  # unmapped_hold
    ssrcs.map(SSRC_B, BOB)  # op 5 arrives
    session.tick(t + 0.01)
    assert session.drain().speaking == [(BOB, True)]
    out = session.tick(t + 0.06).frames
    assert [(f.user_id, f.position) for f, _ in out] == [(BOB, at(t))]
    assert not session.unattributed


def test_an_unannounced_ssrc_expires_counted() -> None:
    session, wire, _, _ = make(unmapped_hold=1.0)
    t = T0 + 1.0
    for k in range(3):
        session.datagram(wire.rtp(SSRC_X, k, k * STEP, frame(k)), t + k * 0.02)
    session.tick(t + 1.0)
    assert session.unattributed["unknown-ssrc"] == 0
    session.tick(t + 1.05)
    assert session.unattributed["unknown-ssrc"] == 3 and not session.unmapped
    assert session.next_deadline() is None


def test_frames_wait_in_order_for_their_dave_key() -> None:
    session, wire, _, dave = make()
    dave.keyless = True
    t = T0 + 1.0
    for k in range(3):
        session.datagram(wire.rtp(SSRC_A, k, k * STEP, frame(k)), t + 0.02 * k)
    session.tick(t + 0.06)
    assert not session.drain().frames
    # retried a tick later, not polled otherwise
    assert session.next_deadline() == pytest.approx(t + 0.065)
    dave.keyless = False  # the key arrives
    out = session.tick(t + 0.3).frames
    assert [f.sequence for f, _ in out] == [0, 1, 2]
    assert session.stats[ALICE].dave_held == 3 and not session.stats[ALICE].dave_failures


def test_a_frame_whose_key_never_comes_is_concealed_after_dave_hold() -> None:
    session, wire, _, dave = make(dave_hold=0.5)
    dave.keyless = True
    t = T0 + 1.0
    session.datagram(wire.rtp(SSRC_A, 0, 0, frame(0)), t)
    session.tick(t + 0.06)
    now = t + 0.06
    while (due := session.next_deadline()) is not None and due < t + 0.5:
        now = due
        session.tick(now)
    assert not session.drain().frames
    out = session.tick(t + 0.5).frames
    assert [(f.sequence, f.kind) for f, _ in out] == [(0, FrameKind.PLC)]
    assert session.stats[ALICE].dropped == {"dave-no-key": 1}


def test_video_and_other_payload_types_never_reach_a_stream() -> None:
    session, wire, ssrcs, _ = make()
    ssrcs.add_video(0x77, ALICE)
    session.datagram(wire.rtp(0x77, 1, 0, frame(0)), T0 + 1)
    session.datagram(wire.rtp(SSRC_A, 1, 0, frame(0), pt=96), T0 + 1)
    session.datagram(wire.rtp(0x99, 1, 0, frame(0), pt=101), T0 + 1)  # nobody's yet
    assert session.stats[ALICE].dropped == {"not-audio": 2} and not session.streams
    assert session.unattributed == {"not-audio": 1}
    ssrcs.add_video(0x99, ALICE)  # op 12 comes after the packet
    session.tick(T0 + 1.1)
    assert session.stats[ALICE].dropped == {"not-audio": 3} and not session.unattributed


def test_no_key_yet_and_garbage_are_counted_not_raised() -> None:
    session, wire, _, _ = make()
    packet = wire.rtp(SSRC_A, 1, 0, frame(0))
    session.transport = None
    session.datagram(packet, T0 + 1)
    assert session.unattributed == {"no-key-yet": 1}
    session.transport = transport_cipher(SUPPORTED_MODES[0], KEY)
    session.datagram(b"\x00", T0 + 1)
    session.datagram(packet[:-3] + b"\x00\x00\x00", T0 + 1)
    assert session.unattributed["not-rtp"] == 1
    assert session.stats[ALICE].dropped == {"bad-tag": 1}


def test_pause_releases_what_is_held_and_discards_what_follows() -> None:
    session, wire, _, _ = make()
    t = T0 + 1.0
    session.datagram(wire.rtp(SSRC_A, 0, 0, frame(0)), t)
    out = session.pause(t + 0.01)
    assert [f.sequence for f, _ in out.frames] == [0] and (ALICE, False) in out.speaking
    session.drain()
    session.datagram(wire.rtp(SSRC_A, 1, STEP, frame(1)), t + 0.02)
    assert not session.drain() and session.stats[ALICE].packets == 1
    session.resume()
    # 2..49 were discarded while paused: not lost, not concealed
    session.datagram(wire.rtp(SSRC_A, 50, 50 * STEP, frame(50)), t + 1.0)
    out = session.tick(t + 1.2).frames
    assert [(f.sequence, f.kind) for f, _ in out] == [(50, FrameKind.RECEIVED)]
    assert session.stats[ALICE].lost == 0


def test_decoded_answers_are_counted() -> None:
    session, wire, _, _ = make()
    t = T0 + 1.0
    for k in range(2):
        session.datagram(wire.rtp(SSRC_A, k, k * STEP, frame(k)), t)
    frames = [f for f, _ in session.tick(t + 0.06).frames]
    pcm = bytes(FRAME_SAMPLES * 4)
    session.decoded(frames, [(OK, pcm), (CONCEALED, pcm)])
    assert [f.kind for f in frames] == [FrameKind.RECEIVED, FrameKind.PLC]
    stats = session.stats[ALICE]
    assert (stats.corrupt, stats.concealed) == (1, 1)
    session.decoded(frames[:1], None, ("decoder-died", RuntimeError("gone")))
    assert stats.concealed == 2 and stats.dropped["decoder-died"] == 1


def test_time_never_goes_backwards() -> None:
    """A datagram stamped before the last tick (it waited in the shell's queue) is taken as now."""
    session, wire, _, _ = make()
    t = T0 + 1.0
    session.tick(t)
    session.datagram(wire.rtp(SSRC_A, 0, 0, frame(0)), t - 0.001)
    out = session.tick(t + 0.06).frames
    assert [f.position for f, _ in out] == [at(t)]


# -- the deadline heap ---------------------------------------------------------------------------


class Walking(ReceiveSession):
    """The session as it was before its deadline heap: each tick walks every stream, and the next
    deadline is the earliest of them all. The reference the heap must agree with."""

    def tick(self, now: float) -> Events:
        if now < self._now:
            now = self._now
        else:
            self._now = now
        self._attribute_unmapped(now)
        self._attribute_not_audio()
        for stream in list(self.streams.values()):
            stream.due(now)
        return self.events

    def next_deadline(self) -> float | None:
        t = min([s.next_deadline() for s in self.streams.values()], default=math.inf)
        t = min(t, self._unmapped_deadline())
        return None if t == math.inf else t


class Keys:
    """A DAVE opener per session: some users' keys are missing for a while; one frame never opens."""

    def __init__(self) -> None:
        self.keyless: set[int] = set()

    def decrypt(self, user_id: int, payload: bytes) -> bytes:
        if payload.endswith(b"\xde\xad"):
            raise DaveError("bad-tag", "never opens")
        if user_id in self.keyless and payload != OPUS_SILENCE:
            raise DaveError("no-key", "not yet")
        return payload


def _seen(events: Events) -> tuple[list[Any], list[Any], list[Any]]:
    frames = [
        (f.user_id, f.ssrc, f.sequence, f.timestamp, f.position, f.kind, f.opus, f.arrival, payload)
        for f, payload in events.frames
    ]
    return frames, events.speaking, [(p.ssrc, p.user_id, p.data) for p in events.rtcp]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_deadline_heap_acts_exactly_as_a_walk_of_every_stream(seed: int) -> None:
    """Many speakers (talk spurts, loss, reordering, duplicates, probes, SSRCs announced late,
    DAVE keys missing for a while, a frame that never opens, pause and resume) fed to the heap
    session and to a session that walks every stream: after every call both hand out the same
    events, and both say the same next deadline."""
    rng = random.Random(seed)
    options = ListenOptions(dave_hold=0.3)
    ssrcs, keys = SsrcMap(), (Keys(), Keys())
    heap = ReceiveSession(options, T0, ssrcs, keys[0], transport=transport_cipher(SUPPORTED_MODES[0], KEY))
    walk = Walking(options, T0, ssrcs, keys[1], transport=transport_cipher(SUPPORTED_MODES[0], KEY))
    wire = Wire(SUPPORTED_MODES[0])
    speakers = 40
    users = {0x1000 + k: 500 + k for k in range(speakers)}
    late = set(rng.sample(sorted(users), 8))  # announced after their first packets
    for ssrc, user in users.items():
        if ssrc not in late:
            ssrcs.map(ssrc, user)
    # each speaker's packets: spurts of 5..40 frames with pauses, some lost, reordered, doubled
    arrivals: list[tuple[float, bytes]] = []
    for ssrc in users:
        t, seq = T0 + rng.uniform(0, 0.5), rng.randrange(65536)
        ts = rng.randrange(1 << 32)
        while t < T0 + 6.0:
            for _ in range(rng.randint(5, 40)):
                seq, ts, t = (seq + 1) & 0xFFFF, (ts + STEP) & 0xFFFFFFFF, t + 0.02
                r = rng.random()
                if r < 0.05:
                    continue  # lost
                opus = frame(seq) + (b"\xde\xad" if r > 0.995 else b"")
                jitter = rng.expovariate(1 / 0.01) if r < 0.2 else rng.uniform(0, 0.002)
                arrivals.append((t + jitter, wire.rtp(ssrc, seq, ts, opus)))
                if r > 0.98:
                    arrivals.append((t + 0.03, wire.rtp(ssrc, seq, ts, opus)))  # a duplicate
                if 0.97 < r < 0.975:
                    arrivals.append((t + 0.001, wire.rtp(ssrc, (seq + 1) & 0xFFFF, ts, b"", padding=40)))
            t += rng.choice([0.05, 0.2, 0.5, 1.0])
    arrivals.sort(key=lambda a: a[0])
    # what happens besides datagrams: keys missing for a while, late announcements, a pause
    chores: list[tuple[float, str, int]] = []
    for user in rng.sample(sorted(users.values()), 10):
        start = T0 + rng.uniform(0.5, 5.0)
        chores += [(start, "keyless", user), (start + rng.uniform(0.01, 0.5), "key", user)]
    chores += [(T0 + rng.uniform(0.1, 3.0), "announce", ssrc) for ssrc in late]
    pause = T0 + rng.uniform(2.0, 4.0)
    chores += [(pause, "pause", 0), (pause + 0.3, "resume", 0)]
    chores.sort()

    calls = stuck = 0
    now = T0

    def both(call: str, *args: Any) -> None:
        nonlocal calls
        calls += 1
        a, b = getattr(heap, call)(*args), getattr(walk, call)(*args)
        if call in ("datagram", "tick", "pause", "finish"):
            assert a is heap.events and b is walk.events
        got, want = _seen(heap.drain()), _seen(walk.drain())
        assert got == want, f"call {calls}: {call} at {now - T0:.6f}"
        if call != "finish":
            assert heap.next_deadline() == walk.next_deadline(), f"call {calls}: {call} at {now - T0:.6f}"

    i = j = 0
    while i < len(arrivals) or j < len(chores):
        nxt = min(
            arrivals[i][0] if i < len(arrivals) else math.inf, chores[j][0] if j < len(chores) else math.inf
        )
        due = heap.next_deadline()
        if due is not None and due < nxt:
            stuck = stuck + 1 if due <= now else 0
            assert stuck < 50, f"a tick at {now - T0:.6f} leaves work due at once, again and again"
            now = max(now, due)
            both("tick", now)
            continue
        now = max(now, nxt)
        if i < len(arrivals) and arrivals[i][0] == nxt:
            both("datagram", arrivals[i][1], now)
            i += 1
            continue
        _, what, arg = chores[j]
        j += 1
        if what == "keyless":
            keys[0].keyless.add(arg), keys[1].keyless.add(arg)
        elif what == "key":
            keys[0].keyless.discard(arg), keys[1].keyless.discard(arg)
        elif what == "announce":
            ssrcs.map(arg, users[arg])
        elif what == "pause":
            both("pause", now)
        else:
            both("resume")
    while (due := heap.next_deadline()) is not None:
        stuck = stuck + 1 if due <= now else 0
        assert stuck < 50, f"a tick at {now - T0:.6f} leaves work due at once, again and again"
        now = max(now, due)
        both("tick", now)
    both("finish", now + 0.05)
    assert calls > 5000
    assert {u: s.as_dict() for u, s in heap.stats.items()} == {u: s.as_dict() for u, s in walk.stats.items()}
    assert heap.unattributed == walk.unattributed
    totals = [
        sum(getattr(s, name) for s in heap.stats.values()) for name in ("lost", "dave_held", "dave_failures")
    ]
    assert all(totals), totals  # the run went through loss, DAVE holds and DAVE failures
    assert len(heap.streams) == speakers
    # the heap holds a bounded number of superseded entries
    assert len(heap._heap) <= 4 * len(heap._scheduled) + 64
