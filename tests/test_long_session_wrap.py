"""Nothing that counts in 32 (or 16) bits breaks a long listening session.

RTP timestamps (48 kHz, 32 bits) wrap every 24.9 hours and sequence numbers (16 bits) every
21.8 minutes of speech; the transport nonce counter (32 bits) wraps too. A member's timestamps
start anywhere, so a wrap can come at any moment of a session, and a session can outlast the
whole timestamp space. Through the real receive path (a real
:class:`~listening_core.session.ReceiveSession`, a real transport key in both AEAD modes, a real
DAVE group, ``tests/_receiver_rig.py``) on a simulated clock, so hours pass in a moment:

- a member whose timestamps and sequence numbers wrap inside the session, with packets swapped
  across each wrap and a talk spurt whose start window straddles the timestamp wrap: every frame
  lands at the session sample it was sent at, exact;
- a 26-hour session (its session samples pass 2**32) with a member speaking every 20 minutes:
  every frame placed by RTP arithmetic alone (no re-anchoring), exact, across the wrap;
- silences longer than half the timestamp space (12.4 h), where the timestamp difference reads
  backwards, and of about one whole wrap, where it reads as almost nothing: the next spurt is
  placed at its arrival, exact, not hours early or right after the previous one.
"""

from __future__ import annotations

import itertools

import pytest

from listening_core.crypto import OPUS_SILENCE, SUPPORTED_MODES
from listening_core.rtp import seq_add, ts_add
from listening_core.sinks import FrameKind
from tests._receiver_rig import ALICE, SSRC_ALICE, STEP, Session, opus_of

WRAP = 2**32
HOUR = 3600 * 48_000  # session samples
FIRST = 48_000  # Alice's first frame arrives a second into the session


class Alice:
    """Alice's client: a frame per 20 ms slot while she speaks, five silence frames to end each
    spurt, and an RTP clock that keeps counting while she is silent (as Discord's clients do)."""

    def __init__(self, session: Session, seq0: int, ts0: int) -> None:
        self.session = session
        self.seq = seq0
        self.ts0 = ts0
        self.sent: list[tuple[int, int, int, bytes]] = []  # (sequence, timestamp, position, opus)

    def packet(self, position: int, opus: bytes) -> tuple[int, bytes]:
        """Her next packet, for the 20 ms slot at session sample ``position`` (when she sends it)."""
        ts = ts_add(self.ts0, position - FIRST)
        data = self.session.packet(ALICE, SSRC_ALICE, self.seq, ts, opus)
        self.sent.append((self.seq, ts, position, opus))
        self.seq = seq_add(self.seq, 1)
        return position, data

    def spurt(self, position: int, frames: int) -> list[tuple[int, bytes]]:
        """A talk spurt from session sample ``position``: ``frames`` frames, the last five silence."""
        return [
            self.packet(position + k * STEP, opus_of(len(self.sent)) if k < frames - 5 else OPUS_SILENCE)
            for k in range(frames)
        ]


def _delivered(session: Session) -> list[tuple[int, int, int, bytes | None]]:
    return [(f.sequence, f.timestamp, f.position, f.opus) for f in session.sink.of(ALICE)]


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
async def test_timestamps_and_sequence_numbers_wrap_inside_a_session(mode: str) -> None:
    """Her timestamps wrap in the second of silence between her two spurts, her sequence numbers
    between the first two frames of her second spurt, whose first packets are held up 30 ms, the
    one after the wrap arriving first. The spurt still lands where she sent it:
    RTP-exact from her first spurt (the 30 ms are network delay, under the timeline's threshold),
    not at its late arrival; and its frames in order, 65535 before 0."""
    session = Session(mode, counter=WRAP - 60)  # the nonce counter wraps in her first spurt
    await session.start({SSRC_ALICE: ALICE})
    alice = Alice(session, seq0=65536 - 101, ts0=WRAP - 120 * STEP + 5)
    first = alice.spurt(FIRST, 100)
    second = alice.spurt(FIRST + 150 * STEP, 100)
    assert alice.sent[99][1] == WRAP - 21 * STEP + 5 and alice.sent[100][1] == 30 * STEP + 5
    assert alice.sent[100][0] == 65535 and alice.sent[101][0] == 0
    arrivals = [(session.at(position), data) for position, data in first + second]
    # a delay spike: her second spurt's first ten packets arrive 30 ms late, the first after the second
    arrivals[100:110] = [(t + 0.03, data) for t, data in arrivals[100:110]]
    arrivals[100], arrivals[101] = arrivals[101], (arrivals[101][0] + 0.001, arrivals[100][1])
    # and one packet of her first spurt reaches the bot 5 ms after the next one
    arrivals[40], arrivals[41] = arrivals[41], (arrivals[41][0] + 0.005, arrivals[40][1])
    for t, data in arrivals:
        session.feed(t, data)
    session.tick(arrivals[-1][0] + 1.0)
    await session.stop()
    assert session.counter < 200  # the transport nonce counter did wrap, and every packet opened

    assert _delivered(session) == alice.sent
    assert {f.kind for f in session.sink.of(ALICE)} == {FrameKind.RECEIVED, FrameKind.SILENCE}
    stats = session.receiver.stats[ALICE]
    assert (stats.packets, stats.frames, stats.dave_decrypted) == (200, 200, 200)
    assert (stats.lost, stats.concealed, stats.late, stats.duplicates, stats.dave_failures) == (0, 0, 0, 0, 0)
    assert not stats.dropped and not session.receiver.unattributed


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
async def test_a_frame_lost_across_the_timestamp_wrap_is_concealed_in_its_own_slot(mode: str) -> None:
    """Two frames lost either side of the wrap: their slots are computed from their neighbours
    across it (2**32 - 1915 and 965): 2**32 - 955 and 5, and the frames after them keep their places."""
    session = Session(mode)
    await session.start({SSRC_ALICE: ALICE})
    alice = Alice(session, seq0=65536 - 3, ts0=WRAP - 10 * STEP + 5)
    packets = alice.spurt(FIRST, 30)
    lost = {9, 10}
    assert [alice.sent[i][:2] for i in sorted(lost)] == [(6, WRAP - STEP + 5), (7, 5)]
    for i, (position, data) in enumerate(packets):
        if i not in lost:
            session.feed(session.at(position), data)
    session.tick(session.at(packets[-1][0]) + 1.0)
    await session.stop()
    frames = session.sink.of(ALICE)
    assert [(f.sequence, f.timestamp, f.position) for f in frames] == [s[:3] for s in alice.sent]
    assert [f.kind is FrameKind.PLC for f in frames] == [i in lost for i in range(30)]
    stats = session.receiver.stats[ALICE]
    assert (stats.lost, stats.concealed, stats.frames) == (2, 2, 30)


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
async def test_a_26_hour_session_and_silences_of_half_and_of_a_whole_wrap(mode: str) -> None:
    """A day and more of a member speaking now and then, then silences the timestamp difference
    misreads: every frame where she sent it, on session samples far past 2**32."""
    session = Session(mode)
    await session.start({SSRC_ALICE: ALICE})
    every = 20 * 60 * 48_000  # she speaks a second every 20 minutes
    # her timestamps wrap between the first two frames of her 33rd spurt, 10 h 40 min in
    alice = Alice(session, seq0=64_000, ts0=WRAP - 32 * every - STEP)
    spurts = [FIRST + k * every for k in range(26 * 3)]
    packets = [p for start in spurts for p in alice.spurt(start, 50)]
    arrivals = [(session.at(position), data) for position, data in packets]
    # that spurt's first packet is held up 70 ms (more than the timeline's threshold), behind the
    # next three: its place is estimated from theirs, across the wrap, so it needs no re-anchoring
    t, data = arrivals[32 * 50]
    arrivals[32 * 50] = (t + 0.07, data)
    arrivals.sort(key=lambda a: a[0])
    for t, data in arrivals:
        session.feed(t, data)
    session.tick(arrivals[-1][0] + 1.0)  # her last spurt of the day is placed too
    stream = session.receiver.streams[SSRC_ALICE]
    placed_by_rtp = stream.timeline.anchors  # a spurt re-anchored at its arrival counts here
    # then silences where the timestamp difference misleads: more than half the timestamp space
    # (it reads as hours backwards), a whole wrap and a frame (it reads as one frame), a whole
    # wrap less seven frames (it reads as six frames backwards), and one well past a wrap; each
    # next spurt belongs at its arrival
    end = packets[-1][0] + STEP
    later = []
    for silence in (13 * HOUR, WRAP, WRAP - 7 * STEP, WRAP + 2 * HOUR):
        start = end + silence
        later += alice.spurt(start, 10)
        end = start + 10 * STEP
    for position, data in later:
        session.feed(session.at(position), data)
    session.tick(session.at(end) + 1.0)
    await session.stop()

    delivered = _delivered(session)
    assert delivered == alice.sent
    assert all(type(f.position) is int for f in session.sink.of(ALICE))
    assert alice.sent[-1][2] > 3 * WRAP  # the session samples went far past 32 bits
    # in the 26 hours, her timestamps wrapped once, between two frames of a spurt
    day = alice.sent[: len(packets)]
    assert [i for i, (a, b) in enumerate(itertools.pairwise(day)) if b[1] < a[1]] == [32 * 50]
    assert placed_by_rtp == 0  # 26 hours and a timestamp wrap placed by RTP arithmetic alone
    stats = session.receiver.stats[ALICE]
    assert stats.frames == len(alice.sent)
    assert (stats.lost, stats.concealed, stats.late, stats.duplicates, stats.dave_failures) == (0, 0, 0, 0, 0)
    assert not stats.dropped
