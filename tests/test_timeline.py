"""Tests for listening_core.timeline: session clock, RTP-exact placement, re-anchoring, wrap, silence."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listening_core.jitter import FrameKind, JitterBuffer
from listening_core.rtp import ts_add
from listening_core.timeline import SAMPLE_RATE, SessionClock, SilenceSpan, StreamTimeline

STEP = 960
START = 1000.0  # the session's start, a monotonic time
THRESHOLD = round(0.06 * SAMPLE_RATE)


def at(sample: int) -> float:
    """The monotonic time of a session sample."""
    return START + sample / SAMPLE_RATE


# -- the clock --------------------------------------------------------------------------------


def test_sample_at_rounds_and_time_at_inverts() -> None:
    clock = SessionClock(START)
    assert clock.sample_rate == SAMPLE_RATE == 48000
    assert clock.sample_at(START) == 0
    assert clock.sample_at(START + 1.0) == 48000
    assert clock.sample_at(START + 0.5 / 48000 + 1e-9) == 1
    assert clock.sample_at(START - 0.02) == -960
    for n in (0, 1, 959, 48000 * 3600):
        assert clock.sample_at(clock.time_at(n)) == n
    with pytest.raises(ValueError):
        SessionClock(START, 0)


# -- placement --------------------------------------------------------------------------------


def test_first_frame_anchors_at_its_arrival() -> None:
    tl = StreamTimeline(SessionClock(START))
    assert tl.last_end == 0 and tl.last_silence is None
    assert tl.place(123456, at(4800)) == 4800
    assert tl.last_silence == SilenceSpan(0, 4800)
    assert SilenceSpan(0, 4800).length == 4800
    assert tl.last_end == 4800 + STEP
    assert tl.anchors == 0


def test_first_frame_before_the_session_start_is_placed_at_zero() -> None:
    tl = StreamTimeline(SessionClock(START))
    assert tl.place(0, START - 0.5) == 0
    assert tl.last_silence is None


def test_first_frame_needs_an_arrival() -> None:
    tl = StreamTimeline(SessionClock(START))
    with pytest.raises(ValueError, match="arrival"):
        tl.place(0, None)


def test_later_frames_follow_rtp_not_arrival() -> None:
    tl = StreamTimeline(SessionClock(START))
    tl.place(5000, at(9600))
    # jittery arrivals do not move contiguous frames
    assert tl.place(5000 + STEP, at(9600 + 960 + 1000)) == 9600 + STEP
    assert tl.last_silence is None
    assert tl.place(5000 + 2 * STEP, at(9600 + 2 * 960 - 500)) == 9600 + 2 * STEP
    # FEC/PLC frames have no arrival: placed by timestamp
    assert tl.place(5000 + 3 * STEP, None) == 9600 + 3 * STEP
    assert tl.place(5000 + 4 * STEP, None, spurt_start=True) == 9600 + 4 * STEP
    assert tl.anchors == 0


def test_timestamp_wrap_is_seamless() -> None:
    tl = StreamTimeline(SessionClock(START))
    ts0 = 2**32 - 10 * STEP - 17
    positions = [tl.place(ts_add(ts0, i * STEP), at(i * STEP) if i == 0 else None) for i in range(30)]
    assert positions == [i * STEP for i in range(30)]
    # a spurt after the wrap lands by timestamp, too
    assert tl.place(ts_add(ts0, 100 * STEP), at(100 * STEP + 500), spurt_start=True) == 100 * STEP
    assert tl.last_silence == SilenceSpan(30 * STEP, 100 * STEP)


def test_spurt_arriving_late_within_threshold_keeps_rtp_position() -> None:
    tl = StreamTimeline(SessionClock(START))
    tl.place(0, at(0))
    assert tl.place(48000, at(48000 + THRESHOLD), spurt_start=True) == 48000  # network delay
    assert tl.anchors == 0


def test_spurt_arriving_before_its_predicted_position_corrects_a_late_anchor() -> None:
    # The first packet was delayed by 60 ms; a later spurt arriving 60 ms "early" shows the
    # anchor was late (nothing arrives before it is sent), so the mapping moves earlier.
    tl = StreamTimeline(SessionClock(START))
    tl.place(0, at(THRESHOLD))
    assert tl.place(96000, at(96000), spurt_start=True) == 96000
    assert tl.anchors == 1
    assert tl.place(96000 + STEP, at(96000 + STEP + THRESHOLD)) == 96000 + STEP  # then RTP-exact again


def test_spurt_beyond_threshold_reanchors_at_arrival() -> None:
    tl = StreamTimeline(SessionClock(START))
    tl.place(0, at(0))
    # a discord.py sender: the timestamp did not advance during two seconds of silence
    assert tl.place(STEP, at(2 * 48000), spurt_start=True) == 2 * 48000
    assert tl.anchors == 1
    assert tl.last_silence == SilenceSpan(STEP, 2 * 48000)
    assert tl.place(2 * STEP, at(2 * 48000 + 960)) == 2 * 48000 + STEP
    # without the spurt flag the arrival is not consulted
    assert tl.place(3 * STEP, at(5 * 48000)) == 2 * 48000 + 2 * STEP
    assert tl.anchors == 1


def test_reanchor_that_would_overlap_is_clamped_after_the_previous_frame() -> None:
    tl = StreamTimeline(SessionClock(START))
    tl.place(0, at(0))
    # the sender's timestamp ran 10 s ahead, but the packet arrived at 0.5 s, inside audio placed
    # by a frame that claims to end later
    tl.place(48000 * 10, None)
    end = tl.last_end
    assert tl.place(48000 * 10 + STEP, at(24000), spurt_start=True) == end
    assert tl.anchors == 1
    assert tl.last_silence is None


def test_timestamp_going_back_never_moves_backwards() -> None:
    tl = StreamTimeline(SessionClock(START))
    tl.place(100000, at(0))
    tl.place(100000 + STEP, None)
    assert tl.place(100000 - 5 * STEP, None) == 2 * STEP
    assert tl.anchors == 1
    # and the mapping continues from the clamped frame
    assert tl.place(100000 - 4 * STEP, None) == 3 * STEP


def test_frame_length_sets_the_end() -> None:
    tl = StreamTimeline(SessionClock(START))
    tl.place(0, at(0), length=480)
    assert tl.last_end == 480
    assert tl.place(480, None) == 480


# -- properties -------------------------------------------------------------------------------

spurt_lists = st.lists(st.tuples(st.integers(1, 60), st.integers(0, 48000 * 4)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    spurt_lists,
    st.integers(0, 48000 * 5),
    st.integers(2**32 - 48000 * 30, 2**32 - 1) | st.integers(0, 2**32 - 1),
    st.integers(0, 2**32),
)
def test_property_wall_clock_sender_lands_where_it_sent(
    spurts: list[tuple[int, int]], begin: int, ts0: int, seed: int
) -> None:
    """Discord's clients: timestamps follow the wall clock across silences (and wrap)."""
    rng = random.Random(seed)
    exact = StreamTimeline(SessionClock(START))
    jittery = StreamTimeline(SessionClock(START))
    offset = None
    send = begin
    for k, (frames, pause) in enumerate(spurts):
        for j in range(frames):
            ts = ts_add(ts0, send - begin)
            spurt_start = k > 0 and j == 0
            assert exact.place(ts, at(send), spurt_start=spurt_start) == send
            delay = rng.uniform(0.0, 0.05)
            jittery_prev_end = jittery.last_end
            pos = jittery.place(ts, at(send) + delay, spurt_start=spurt_start)
            error = pos - send
            if offset is None or j > 0:
                # the first packet's delay; within a spurt, RTP-exact
                assert offset is None or error == offset
            else:
                # a spurt start can only move the mapping earlier, towards the least delay seen
                # (no earlier than the end of the previous frame: positions never overlap)
                assert error <= offset
                tolerance = round(0.005 * SAMPLE_RATE)  # early_tolerance: smaller corrections are not made
                assert error <= max(
                    round(delay * SAMPLE_RATE) + tolerance + 1, offset - (pos - jittery_prev_end)
                )
            offset = error
            assert 0 <= error <= 0.05 * SAMPLE_RATE + 1  # never off by more than the jitter
            send += STEP
        send += pause
    assert exact.anchors == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 60), st.integers(THRESHOLD + 1, 48000 * 4)), min_size=1, max_size=12),
    st.integers(0, 48000 * 5),
    st.integers(2**32 - 48000 * 30, 2**32 - 1) | st.integers(0, 2**32 - 1),
)
def test_property_discordpy_sender_reanchors_each_spurt(
    spurts: list[tuple[int, int]], begin: int, ts0: int
) -> None:
    """discord.py bots: the timestamp advances one frame per packet, never during silence."""
    tl = StreamTimeline(SessionClock(START))
    send = begin
    ts = ts0
    for k, (frames, pause) in enumerate(spurts):
        for j in range(frames):
            assert tl.place(ts, at(send), spurt_start=k > 0 and j == 0) == send
            if j == 0 and k > 0:
                assert tl.last_silence == SilenceSpan(send - spurts[k - 1][1], send)
            ts = ts_add(ts, STEP)
            send += STEP
        send += pause
    assert tl.anchors == len(spurts) - 1


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-5 * STEP, 100 * STEP),
            st.one_of(st.none(), st.floats(-1.0, 3.0)),
            st.booleans(),
            st.sampled_from([None, 480, 960, 1920]),
        ),
        min_size=1,
        max_size=100,
    ),
    st.integers(0, 2**32 - 1),
)
def test_property_positions_never_go_backwards(
    frames: list[tuple[int, float | None, bool, int | None]], ts0: int
) -> None:
    tl = StreamTimeline(SessionClock(START))
    ts = ts0
    now = START
    for i, (dts, dt, spurt, length) in enumerate(frames):
        ts = ts_add(ts, dts)
        arrival = None
        if dt is not None or i == 0:
            now += abs(dt or 0.0)
            arrival = now
        before = tl.last_end
        pos = tl.place(ts, arrival, spurt_start=spurt, length=length)
        assert pos >= before >= 0
        assert tl.last_end == pos + (STEP if length is None else length)
        if pos > before:
            assert tl.last_silence == SilenceSpan(before, pos)
        else:
            assert tl.last_silence is None


# -- with the jitter buffer -------------------------------------------------------------------


def test_lost_end_of_spurt_fills_after_it_and_next_spurt_lands_by_rtp() -> None:
    clock = SessionClock(START)
    jb = JitterBuffer(has_fec=lambda p: True)
    tl = StreamTimeline(clock)
    ts0 = 2**32 - 5 * STEP  # wraps inside spurt 1
    pause = 3 * 48000 + 123  # the sender's clock kept counting through it
    placed: list[tuple[int, FrameKind, int]] = []
    last_arrival: float | None = None

    def feed(seq: int, send: int) -> None:
        nonlocal last_arrival
        arrival = at(send)
        for p in jb.push(seq, ts_add(ts0, send), b"\x78" + bytes([seq]), arrival):
            spurt = p.arrival is not None and last_arrival is not None and p.arrival - last_arrival > 0.1
            placed.append((p.sequence, p.kind, tl.place(p.timestamp, p.arrival, spurt_start=spurt)))
            if p.arrival is not None:
                last_arrival = p.arrival

    for i in range(8):  # spurt 1 is seq 0..9; 8, 9 and the first of spurt 2 (10) are lost
        feed(i, i * STEP)
    spurt2 = 10 * STEP + pause
    for i in range(11, 15):
        feed(i, spurt2 + (i - 10) * STEP)
    for p in jb.flush():
        placed.append((p.sequence, p.kind, tl.place(p.timestamp, p.arrival)))
    assert [s for s, _, _ in placed] == list(range(15))
    assert [k for _, k, _ in placed][8:11] == [FrameKind.PLC] * 3
    # the lost frames continue spurt 1; spurt 2's received frames land exactly where they were sent
    assert [pos for _, _, pos in placed[:11]] == [i * STEP for i in range(11)]
    assert [pos for _, _, pos in placed[11:]] == [spurt2 + i * STEP for i in range(1, 5)]
    assert tl.anchors == 0
