"""Tests for listening_core.jitter: ordering, duplicates, loss (FEC/PLC), resets, overflow, deadlines."""

from __future__ import annotations

import itertools
import pickle
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listening_core.jitter import OPUS_SILENCE, FrameKind, JitterBuffer, JitterStats, Playout
from listening_core.rtp import seq_add, seq_diff, ts_add, ts_diff

STEP = 960


def opus(i: int) -> bytes:
    """A stand-in Opus payload that names its frame (never the silence frame)."""
    return b"\x78" + i.to_bytes(4, "big")


def fec_every_other(payload: bytes) -> bool:
    """has_fec for the tests: frames with an even index carry FEC, the silence frame none."""
    return payload != OPUS_SILENCE and payload[-1] % 2 == 0


def seqs(out: list[Playout]) -> list[int]:
    return [p.sequence for p in out]


def kinds(out: list[Playout]) -> list[FrameKind]:
    return [p.kind for p in out]


# -- the common path --------------------------------------------------------------------------


def test_in_order_released_at_once_and_nothing_held() -> None:
    jb = JitterBuffer()
    for i in range(200):
        out = jb.push(1000 + i, 5000 + i * STEP, opus(i), i * 0.02)
        assert out == [Playout(1000 + i, 5000 + i * STEP, FrameKind.RECEIVED, opus(i), i * 0.02)]
        assert jb.held == 0
        assert jb.next_deadline() is None
        assert jb.poll(i * 0.02 + 1.0) == []
    assert jb.flush() == []
    assert jb.stats == JitterStats(received=200)


def test_first_packet_released_at_once_and_sets_expected() -> None:
    jb = JitterBuffer()
    assert jb.expected is None
    assert seqs(jb.push(40000, 123, opus(0), 0.0)) == [40000]
    assert jb.expected == 40001


def test_duplicates_dropped_and_counted() -> None:
    jb = JitterBuffer()
    out: list[Playout] = []
    for t, i in enumerate([0, 1, 1, 2, 0, 2, 3, 1]):
        out += jb.push(i, i * STEP, opus(i), t * 0.01)
    assert seqs(out) == [0, 1, 2, 3]
    assert jb.stats.duplicates == 4
    assert jb.stats.received == 4
    assert jb.stats.late == 0


def test_duplicate_of_a_held_packet_is_dropped() -> None:
    jb = JitterBuffer()
    jb.push(0, 0, opus(0), 0.0)
    assert jb.push(2, 2 * STEP, opus(2), 0.01) == []
    assert jb.push(2, 2 * STEP, opus(2), 0.02) == []
    assert jb.held == 1
    assert seqs(jb.push(1, STEP, opus(1), 0.03)) == [1, 2]
    assert jb.stats.duplicates == 1


def test_wraparound_of_sequence_and_timestamp() -> None:
    jb = JitterBuffer()
    seq0, ts0 = 65533, 2**32 - 2 * STEP
    out: list[Playout] = []
    for i in range(6):
        out += jb.push(seq_add(seq0, i), ts_add(ts0, i * STEP), opus(i), i * 0.02)
    assert seqs(out) == [65533, 65534, 65535, 0, 1, 2]
    assert [p.timestamp for p in out] == [2**32 - 1920, 2**32 - 960, 0, 960, 1920, 2880]
    # a duplicate from before the wrap is recognised as such
    assert jb.push(65535, 0, opus(2), 0.2) == []
    assert jb.stats.duplicates == 1


def test_wraparound_with_reordering_and_loss() -> None:
    jb = JitterBuffer(has_fec=lambda p: True)
    ts0 = 2**32 - STEP
    out = jb.push(65534, ts0, opus(0), 0.0)
    out += jb.push(1, ts_add(ts0, 3 * STEP), opus(3), 0.01)  # 65535 and 0 missing
    out += jb.push(65535, ts_add(ts0, STEP), opus(1), 0.02)  # 0 still missing
    assert seqs(out) == [65534, 65535]
    out += jb.poll(0.07)
    assert seqs(out) == [65534, 65535, 0, 1]
    assert kinds(out) == [FrameKind.RECEIVED, FrameKind.RECEIVED, FrameKind.FEC, FrameKind.RECEIVED]
    assert out[2].timestamp == ts_add(ts0, 2 * STEP) == 960
    assert out[2].payload == opus(3)


def test_silence_frame_kind() -> None:
    jb = JitterBuffer()
    out = jb.push(0, 0, opus(0), 0.0)
    for i in range(1, 6):
        out += jb.push(i, i * STEP, OPUS_SILENCE, i * 0.02)
    assert kinds(out) == [FrameKind.RECEIVED] + [FrameKind.SILENCE] * 5
    assert out[-1].payload == OPUS_SILENCE
    assert jb.stats.received == 6


def test_playout_is_frozen_and_picklable() -> None:
    p = Playout(1, 2, FrameKind.FEC, b"x", None)
    assert pickle.loads(pickle.dumps(p)) == p
    with pytest.raises(AttributeError):
        p.sequence = 3  # type: ignore[misc]


# -- reordering and loss ----------------------------------------------------------------------


def test_reordered_packet_fills_the_gap() -> None:
    jb = JitterBuffer()
    assert seqs(jb.push(0, 0, opus(0), 0.0)) == [0]
    assert jb.push(2, 2 * STEP, opus(2), 0.02) == []
    assert jb.push(3, 3 * STEP, opus(3), 0.03) == []
    out = jb.push(1, STEP, opus(1), 0.04)
    assert seqs(out) == [1, 2, 3]
    assert [p.arrival for p in out] == [0.04, 0.02, 0.03]
    assert jb.held == 0 and jb.next_deadline() is None
    assert jb.stats.reordered == 1
    assert jb.stats.lost == 0


def test_deadline_is_earliest_held_arrival_plus_max_delay() -> None:
    jb = JitterBuffer(0.06)
    jb.push(0, 0, opus(0), 0.0)
    jb.push(3, 3 * STEP, opus(3), 0.01)
    assert jb.next_deadline() == pytest.approx(0.07)
    jb.push(2, 2 * STEP, opus(2), 0.03)
    assert jb.next_deadline() == pytest.approx(0.07)
    assert jb.poll(0.069) == []
    out = jb.poll(0.07)
    assert seqs(out) == [1, 2, 3]
    assert kinds(out) == [FrameKind.PLC, FrameKind.RECEIVED, FrameKind.RECEIVED]
    assert out[0].timestamp == STEP and out[0].payload is None and out[0].arrival is None
    assert jb.next_deadline() is None
    assert jb.stats.lost == jb.stats.concealed == 1


def test_next_deadline_moves_to_the_next_gap() -> None:
    jb = JitterBuffer(0.06)
    jb.push(0, 0, opus(0), 0.0)
    jb.push(2, 2 * STEP, opus(2), 0.01)
    jb.push(5, 5 * STEP, opus(5), 0.05)
    assert jb.next_deadline() == pytest.approx(0.07)
    assert seqs(jb.poll(0.07)) == [1, 2]
    assert jb.next_deadline() == pytest.approx(0.11)
    assert seqs(jb.poll(0.11)) == [3, 4, 5]
    assert jb.next_deadline() is None


def test_poll_cascades_through_gaps_whose_deadline_passed() -> None:
    # 5 arrived first, so nothing may wait beyond its deadline, even behind a later gap
    jb = JitterBuffer(0.06)
    jb.push(0, 0, opus(0), 0.0)
    jb.push(5, 5 * STEP, opus(5), 0.0)
    jb.push(2, 2 * STEP, opus(2), 0.03)
    out = jb.poll(0.06)
    assert seqs(out) == [1, 2, 3, 4, 5]
    assert kinds(out) == [FrameKind.PLC, FrameKind.RECEIVED, FrameKind.PLC, FrameKind.PLC, FrameKind.RECEIVED]


def test_push_releases_a_gap_whose_deadline_passed() -> None:
    jb = JitterBuffer(0.06)
    jb.push(0, 0, opus(0), 0.0)
    jb.push(2, 2 * STEP, opus(2), 0.02)
    out = jb.push(3, 3 * STEP, opus(3), 0.1)  # no poll in between
    assert seqs(out) == [1, 2, 3]
    assert kinds(out)[0] is FrameKind.PLC


def test_expected_packet_arriving_after_deadline_but_before_poll_is_used() -> None:
    jb = JitterBuffer(0.06)
    jb.push(0, 0, opus(0), 0.0)
    jb.push(2, 2 * STEP, opus(2), 0.02)
    out = jb.push(1, STEP, opus(1), 0.5)
    assert kinds(out) == [FrameKind.RECEIVED, FrameKind.RECEIVED]
    assert jb.stats.lost == 0


def test_fec_for_the_frame_just_before_an_available_packet() -> None:
    jb = JitterBuffer(has_fec=lambda p: True)
    jb.push(10, 10 * STEP, opus(10), 0.0)
    jb.push(14, 14 * STEP, opus(14), 0.08)
    out = jb.poll(0.2)
    assert seqs(out) == [11, 12, 13, 14]
    assert kinds(out) == [FrameKind.PLC, FrameKind.PLC, FrameKind.FEC, FrameKind.RECEIVED]
    assert [p.timestamp for p in out] == [11 * STEP, 12 * STEP, 13 * STEP, 14 * STEP]
    assert out[2].payload == opus(14)
    s = jb.stats
    assert (s.lost, s.recovered_fec, s.concealed) == (3, 1, 2)


def test_no_fec_when_the_next_packet_has_none() -> None:
    calls: list[bytes] = []

    def has_fec(p: bytes) -> bool:
        calls.append(p)
        return False

    jb = JitterBuffer(has_fec=has_fec)
    jb.push(0, 0, opus(0), 0.0)
    jb.push(2, 2 * STEP, opus(2), 0.0)
    assert kinds(jb.poll(1.0)) == [FrameKind.PLC, FrameKind.RECEIVED]
    assert calls == [opus(2)]
    assert jb.stats.recovered_fec == 0 and jb.stats.concealed == 1


def test_late_packet_after_its_slot_was_concealed_is_dropped() -> None:
    jb = JitterBuffer()
    jb.push(0, 0, opus(0), 0.0)
    jb.push(2, 2 * STEP, opus(2), 0.02)
    jb.poll(0.1)
    assert jb.push(1, STEP, opus(1), 0.11) == []
    assert jb.push(2, 2 * STEP, opus(2), 0.12) == []
    assert jb.stats.late == 1
    assert jb.stats.duplicates == 1
    assert seqs(jb.push(3, 3 * STEP, opus(3), 0.13)) == [3]


def test_packet_before_the_first_is_late() -> None:
    jb = JitterBuffer()
    jb.push(100, 0, opus(0), 0.0)
    assert jb.push(99, 0, opus(0), 0.01) == []
    assert jb.stats.late == 1


# -- gaps across a silence period -------------------------------------------------------------


def test_lost_end_of_spurt_is_placed_after_the_previous_frame_as_plc() -> None:
    jb = JitterBuffer(has_fec=lambda p: True)
    out: list[Playout] = []
    # spurt 1: seq 0..9, the last two (seq 8, 9: silence frames) are lost
    for i in range(8):
        out += jb.push(i, i * STEP, opus(i), i * 0.02)
    # spurt 2 starts 3 s later; the sender's timestamp kept counting
    ts2 = 10 * STEP + 150 * STEP
    out += jb.push(10, ts2, opus(10), 3.2)
    out += jb.poll(3.3)
    assert seqs(out) == list(range(11))
    assert kinds(out[8:]) == [FrameKind.PLC, FrameKind.PLC, FrameKind.RECEIVED]
    assert [p.timestamp for p in out[8:]] == [8 * STEP, 9 * STEP, ts2]
    assert jb.stats.recovered_fec == 0 and jb.stats.concealed == 2


def test_timestamp_gap_across_the_wrap_is_contiguous() -> None:
    jb = JitterBuffer(has_fec=lambda p: True)
    ts0 = 2**32 - STEP
    jb.push(7, ts0, opus(0), 0.0)
    jb.push(9, ts_add(ts0, 2 * STEP), opus(2), 0.02)
    out = jb.poll(0.1)
    assert kinds(out) == [FrameKind.FEC, FrameKind.RECEIVED]
    assert out[0].timestamp == 0


# -- resets, overflow, flush ------------------------------------------------------------------


def test_huge_forward_jump_resets_without_concealing() -> None:
    jb = JitterBuffer(max_gap=500)
    jb.push(0, 0, opus(0), 0.0)
    jb.push(2, 2 * STEP, opus(2), 0.01)
    out = jb.push(2000, 12345, opus(7), 0.02)
    assert seqs(out) == [1, 2, 2000]
    assert kinds(out) == [FrameKind.PLC, FrameKind.RECEIVED, FrameKind.RECEIVED]
    assert jb.stats.resets == 1
    assert jb.stats.lost == 1
    assert jb.expected == 2001
    assert seqs(jb.push(2001, 12345 + STEP, opus(8), 0.04)) == [2001]


def test_gap_of_exactly_max_gap_is_concealed() -> None:
    jb = JitterBuffer(max_gap=10)
    jb.push(0, 0, opus(0), 0.0)
    assert jb.push(11, 11 * STEP, opus(11), 0.01) == []
    assert len(jb.poll(1.0)) == 11
    assert jb.stats.resets == 0 and jb.stats.lost == 10


def test_big_backward_jump_resets() -> None:
    jb = JitterBuffer()
    for i in range(5):
        jb.push(30000 + i, i * STEP, opus(i), i * 0.02)
    back = 30000 - JitterBuffer.WINDOW - 10
    out = jb.push(back, 777, opus(9), 0.2)
    assert seqs(out) == [back]
    assert jb.stats.resets == 1
    assert seqs(jb.push(back + 1, 777 + STEP, opus(10), 0.22)) == [back + 1]
    assert jb.stats.late == 0


def test_overflow_forces_the_earliest_gap() -> None:
    jb = JitterBuffer(10.0, max_packets=4)
    jb.push(0, 0, opus(0), 0.0)
    for i, seq in enumerate((2, 4, 6, 8)):
        assert jb.push(seq, seq * STEP, opus(seq), 0.01 * i) == []
    assert jb.held == 4
    out = jb.push(10, 10 * STEP, opus(10), 0.05)
    assert seqs(out) == [1, 2]
    assert kinds(out) == [FrameKind.PLC, FrameKind.RECEIVED]
    assert jb.held == 4
    assert jb.stats.overflow == 1
    assert jb.next_deadline() == pytest.approx(10.01)


def test_never_holds_more_than_max_packets() -> None:
    jb = JitterBuffer(10.0, max_packets=8)
    jb.push(0, 0, opus(0), 0.0)
    for k in range(1, 200):
        jb.push(2 * k, 2 * k * STEP, opus(k), k * 0.001)
        assert jb.held <= 8
    assert jb.stats.overflow == 199 - 8


def test_flush_conceals_inner_gaps_and_keeps_the_stream() -> None:
    jb = JitterBuffer(has_fec=lambda p: True)
    jb.push(0, 0, opus(0), 0.0)
    jb.push(2, 2 * STEP, opus(2), 0.01)
    jb.push(5, 5 * STEP, opus(5), 0.02)
    out = jb.flush()
    assert seqs(out) == [1, 2, 3, 4, 5]
    assert kinds(out) == [FrameKind.FEC, FrameKind.RECEIVED, FrameKind.PLC, FrameKind.FEC, FrameKind.RECEIVED]
    assert jb.held == 0 and jb.next_deadline() is None
    assert jb.flush() == []
    assert jb.push(3, 3 * STEP, opus(3), 0.03) == []
    assert jb.stats.late == 1
    assert seqs(jb.push(6, 6 * STEP, opus(6), 0.04)) == [6]


def test_out_of_line_tells_which_packets_restart_the_stream() -> None:
    jb = JitterBuffer(max_gap=500)
    assert not jb.out_of_line(123)  # the first packet starts the stream, whatever it is
    jb.push(1000, 0, opus(0), 0.0)
    assert jb.expected == 1001
    assert not any(jb.out_of_line(seq_add(1001, d)) for d in (-JitterBuffer.WINDOW, -1, 0, 1, 500))
    assert jb.out_of_line(seq_add(1001, -JitterBuffer.WINDOW - 1)) and jb.out_of_line(1001 + 501)
    assert jb.stats.resets == 0  # asking changes nothing


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="max_delay"):
        JitterBuffer(-1.0)
    with pytest.raises(ValueError, match="max_packets"):
        JitterBuffer(max_packets=0)
    with pytest.raises(ValueError, match="max_gap"):
        JitterBuffer(max_gap=40000)


# -- the property: every frame exactly once, in order -----------------------------------------


@dataclass
class Sent:
    """A simulated sender's stream after a lossy, jittery, duplicating network."""

    first_seq: int
    first_ts: int
    payloads: list[bytes]
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, frame index), sorted


@st.composite
def networks(draw: st.DrawFn, max_jitter: float) -> Sent:
    n = draw(st.integers(1, 400))
    first_seq = draw(st.integers(0xFFFF - 420, 0xFFFF) | st.integers(0, 0xFFFF))
    first_ts = draw(st.integers(2**32 - 420 * STEP, 2**32 - 1) | st.integers(0, 2**32 - 1))
    loss = draw(st.sampled_from([0.0, 0.02, 0.1, 0.3]))
    bursts = draw(st.integers(0, 4))
    dup = draw(st.sampled_from([0.0, 0.05, 0.3]))
    rng = random.Random(draw(st.integers(0, 2**32)))
    payloads = [OPUS_SILENCE if rng.random() < 0.05 else opus(i) for i in range(n)]
    lost = {i for i in range(n) if rng.random() < loss}
    for _ in range(bursts):
        start = rng.randrange(n)
        lost.update(range(start, min(n, start + rng.randint(2, 12))))
    sent = Sent(first_seq, first_ts, payloads)
    for i in range(n):
        if i in lost:
            continue
        copies = 1 + (rng.random() < dup) + (rng.random() < dup / 3)
        for _ in range(copies):
            sent.arrivals.append((i * 0.02 + rng.uniform(0.0, max_jitter), i))
    sent.arrivals.sort()
    return sent


def run(sent: Sent, jb: JitterBuffer) -> list[tuple[float, Playout]]:
    """Feed the arrivals in order, with poll() every 10 ms, then flush(); return (release time, frame)."""
    released: list[tuple[float, Playout]] = []
    tick = 0.0
    end = (sent.arrivals[-1][0] if sent.arrivals else 0.0) + 0.2
    for t, i in sent.arrivals:
        while tick < t:
            released += [(tick, p) for p in jb.poll(tick)]
            tick += 0.01
        seq = seq_add(sent.first_seq, i)
        ts = ts_add(sent.first_ts, i * STEP)
        released += [(t, p) for p in jb.push(seq, ts, sent.payloads[i], t)]
    while tick < end:
        released += [(tick, p) for p in jb.poll(tick)]
        tick += 0.01
    released += [(end, p) for p in jb.flush()]
    return released


def check(sent: Sent, jb: JitterBuffer, released: list[tuple[float, Playout]], max_delay: float) -> set[int]:
    """Assert the stream invariants; return the indices of delivered frames that came out late."""
    s = jb.stats
    assert s.resets == 0 and s.overflow == 0
    assert s.received + s.duplicates + s.late == len(sent.arrivals)
    if not sent.arrivals:
        assert released == []
        return set()
    first = sent.arrivals[0][1]
    last = max(i for _, i in sent.arrivals)
    out = [p for _, p in released]
    assert [seq_diff(p.sequence, sent.first_seq) for p in out] == list(range(first, last + 1))
    for p in out:
        i = seq_diff(p.sequence, sent.first_seq)
        assert p.timestamp == ts_add(sent.first_ts, i * STEP)
    for a, b in itertools.pairwise(out):
        assert ts_diff(b.timestamp, a.timestamp) == STEP
    arrivals_of: dict[int, list[float]] = {}
    for t, i in sent.arrivals:
        arrivals_of.setdefault(i, []).append(t)
    received = set()
    for when, p in released:
        i = seq_diff(p.sequence, sent.first_seq)
        if p.kind in (FrameKind.RECEIVED, FrameKind.SILENCE):
            received.add(i)
            assert p.payload == sent.payloads[i]
            assert (p.kind is FrameKind.SILENCE) == (p.payload == OPUS_SILENCE)
            assert p.arrival in arrivals_of[i]
            # nothing waits longer than max_delay (plus one timer tick)
            assert when - p.arrival <= max_delay + 0.01 + 1e-9
        elif p.kind is FrameKind.FEC:
            assert p.payload == sent.payloads[i + 1]
            assert i + 1 in arrivals_of
            assert fec_every_other(p.payload)
            assert p.arrival is None
        else:
            assert p.kind is FrameKind.PLC
            assert p.payload is None and p.arrival is None
    n_fec = sum(p.kind is FrameKind.FEC for p in out)
    n_plc = sum(p.kind is FrameKind.PLC for p in out)
    assert s.received == len(received)
    assert s.lost == len(out) - len(received) == n_fec + n_plc
    assert s.recovered_fec == n_fec and s.concealed == n_plc
    assert s.recovered_fec + s.concealed == s.lost
    late = set(arrivals_of) - received
    # a delivered frame that was not received came too late: before the first, or after concealment
    for i in late:
        assert i < first or out[i - first].kind in (FrameKind.FEC, FrameKind.PLC)
    assert s.late >= len(late)
    assert jb.held == 0
    return late


@settings(max_examples=300, deadline=None)
@given(networks(max_jitter=0.05))
def test_property_every_frame_exactly_once_in_order(sent: Sent) -> None:
    jb = JitterBuffer(0.06, has_fec=fec_every_other)
    released = run(sent, jb)
    late = check(sent, jb, released, 0.06)
    # the reordering is bounded by max_delay: only frames sent before the first arrival are late
    if sent.arrivals:
        first = sent.arrivals[0][1]
        assert all(i < first for i in late)


@settings(max_examples=200, deadline=None)
@given(networks(max_jitter=0.2))
def test_property_with_jitter_beyond_max_delay(sent: Sent) -> None:
    jb = JitterBuffer(0.06, has_fec=fec_every_other)
    check(sent, jb, run(sent, jb), 0.06)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-40, 40), st.floats(0.0, 0.05), st.booleans()), max_size=300),
    st.integers(0, 0xFFFF),
)
def test_property_arbitrary_input_never_releases_out_of_order(
    steps: list[tuple[int, float, bool]], start: int
) -> None:
    jb = JitterBuffer(0.06, has_fec=lambda p: True, max_gap=30)
    now = 0.0
    prev: int | None = None
    pushes = 0
    for delta, dt, poll in steps:
        now += dt
        seq = seq_add(start, delta)
        resets = jb.stats.resets
        if poll:
            out = jb.poll(now)
        else:
            restarts = jb.out_of_line(seq)
            out = jb.push(seq, ts_add(0, delta * STEP), opus(delta & 0xFF), now)
            pushes += 1
            assert (jb.stats.resets != resets) == restarts
        reset = jb.stats.resets != resets
        for k, p in enumerate(out):
            # after a reset, only the new packet (the last one out) may jump
            if prev is not None and not (reset and k == len(out) - 1):
                assert p.sequence == seq_add(prev, 1)
            prev = p.sequence
        assert jb.held <= 30
    s = jb.stats
    assert s.received + s.duplicates + s.late == pushes
    assert s.recovered_fec + s.concealed == s.lost


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(-10, 60), st.integers(0, 0xFFFF).map(lambda seq: ("far", seq))),
            st.integers(0, 0xFFFFFFFF),
            st.floats(0.0, 0.1),
            st.booleans(),
        ),
        max_size=300,
    ),
    st.integers(1, 16),
)
def test_property_hostile_input_stays_bounded(
    steps: list[tuple[int | tuple[str, int], int, float, bool]], max_packets: int
) -> None:
    """Any sequence numbers and timestamps at all (a sender gone mad, or forged packets that got
    through): never more than max_packets held, every packet counted once, every output in order
    but where the stream restarted, and nothing raised."""
    jb = JitterBuffer(0.06, has_fec=lambda p: True, max_packets=max_packets)
    now = 0.0
    prev: int | None = None
    seq = 0
    pushes = 0
    for step, ts, dt, poll in steps:
        now += dt
        seq = step[1] if isinstance(step, tuple) else seq_add(seq, step)  # far away, or near the last
        resets = jb.stats.resets
        if poll:
            out = jb.poll(now)
        else:
            out = jb.push(seq, ts, opus(seq & 0xFF), now)
            pushes += 1
        jumps = 0
        for p in out:
            if prev is not None and p.sequence != seq_add(prev, 1):
                jumps += 1
            prev = p.sequence
        assert jumps <= jb.stats.resets - resets
        assert jb.held <= max_packets
    jb.flush()
    s = jb.stats
    assert jb.held == 0
    assert s.received + s.duplicates + s.late == pushes
    assert s.recovered_fec + s.concealed == s.lost
