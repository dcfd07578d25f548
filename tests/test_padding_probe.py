"""RTP padding on real Discord (``docs/voice-protocol.md`` section 6), through the real receive path.

Two things other receive libraries learned in 2026:

- Discord clients set the P bit, and the RTP padding follows the DAVE trailer inside the
  transport ciphertext: the trailer's ``FA FA`` is not the last two bytes until the padding is
  stripped. A padded DAVE frame must open and be delivered exact, in both AEAD modes.
- A packet that is all padding (the padding count equals the whole payload after the extension)
  is a bandwidth probe: no audio. It is dropped and counted per user as ``"probe"`` (logged at
  WARNING the first time), never handed to DAVE or a decoder, starts no stream, talk spurt or
  speaking event. Sent on a member's audio SSRC it takes a sequence number of their stream: that
  number is not a lost frame, so nothing is concealed and the frames around it keep their places.

Each test runs a real :class:`~listening_core.session.ReceiveSession` with a real transport key
and a real DAVE group on a simulated clock (``tests/_receiver_rig.py``).
"""

from __future__ import annotations

import logging

import pytest

from listening_core.crypto import DAVE_MAGIC, SUPPORTED_MODES, is_dave_frame
from listening_core.jitter import NO_MEDIA, FrameKind, JitterBuffer, JitterStats
from listening_core.rtp import RtpHeader, build_extension_body, seq_add, ts_add
from listening_core.sinks import FrameKind as SinkKind
from tests._receiver_rig import (
    ALICE,
    BOB,
    SSRC_ALICE,
    SSRC_BOB,
    STEP,
    Session,
    opus_of,
    seal_probe,
)

SLOT = 0.02
FIRST = 24_000  # Alice's first frame arrives half a second into the session (a session sample)
SEQ0 = 40_000
TS0 = 123_456_789


def _warnings(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "listening_core.receiver" and r.levelno == logging.WARNING and what in r.getMessage()
    ]


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
async def test_padded_dave_frames_open_and_are_delivered_exact(mode: str) -> None:
    """Every padding length Discord may use (1..255), with and without a header extension: the
    DAVE trailer sits before the padding, and every frame opens and lands where it was sent."""
    session = Session(mode)
    await session.start({SSRC_ALICE: ALICE})
    paddings = [1, 2, 3, 13, 64, 200, 254, 255]
    sent = []
    for k in range(80):
        padding = paddings[k % len(paddings)]
        ext = build_extension_body([(1, bytes([k]))]) if k % 3 else b""
        packet = session.packet(
            ALICE, SSRC_ALICE, SEQ0 + k, TS0 + k * STEP, opus_of(k), padding=padding, extension_body=ext
        )
        # what the wire carries: the transport plaintext ends in padding, not in the DAVE magic
        header, plain = session.cipher.open_rtp(packet)
        assert header.padding and is_dave_frame(plain)
        raw = session.cipher._decrypt(
            packet[-4:] + session.cipher._nonce_pad,
            packet[header.header_size : -4],
            packet[: header.header_size],
        )
        assert raw[-1] == padding and raw[len(ext) : len(raw) - padding][-2:] == DAVE_MAGIC
        session.feed(session.at(FIRST + k * STEP), packet)
        sent.append((SEQ0 + k, TS0 + k * STEP, FIRST + k * STEP, opus_of(k)))
    await session.stop()
    got = [(f.sequence, f.timestamp, f.position, f.opus) for f in session.sink.of(ALICE)]
    assert got == sent
    assert {f.kind for f in session.sink.of(ALICE)} == {SinkKind.RECEIVED}
    stats = session.receiver.stats[ALICE]
    assert (stats.packets, stats.decrypted, stats.dave_decrypted, stats.frames) == (80, 80, 80, 80)
    assert (stats.dave_failures, stats.lost, stats.concealed, dict(stats.dropped)) == (0, 0, 0, {})


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
async def test_a_probe_is_dropped_counted_and_takes_its_sequence_number(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Probes on Alice's audio SSRC, in her sequence-number space, around two talk spurts: one
    before her first frame, single and back-to-back ones mid-spurt (with and without a header
    extension, with the last frame's timestamp or any other), one that arrives after the frame
    that follows it, one in a start window and one in the silence between the spurts. Each is
    counted once as ``probe``; her frames are all delivered, exact, none lost or concealed; no
    speaking event comes from a probe."""
    caplog.set_level(logging.WARNING, logger="listening_core")
    session = Session(mode)
    await session.start({SSRC_ALICE: ALICE})
    # what Alice's client sends, in order: ("frame", slot) or ("probe", slot, options)
    plan: list[tuple] = [("probe", -5, {"ts": TS0 - 7})]  # before her stream begins: no seq of it
    plan += [("frame", s) for s in range(0, 2)]
    plan += [("probe", 1, {"late": False})]  # in her start window (it closes 60 ms after slot 0)
    plan += [("frame", s) for s in range(2, 20)]
    plan += [("probe", 19, {"ext": True})]
    plan += [("frame", s) for s in range(20, 30)]
    plan += [("probe", 29, {}), ("probe", 29, {"ext": True, "ts": 77}), ("probe", 29, {})]
    plan += [("frame", s) for s in range(30, 40)]
    plan += [("probe", 39, {"late": True})]  # reaches the bot 10 ms after the frame sent after it
    plan += [("frame", s) for s in range(40, 60)]
    plan += [("probe", 110, {})]  # alone in the silence between her spurts
    plan += [("frame", s) for s in range(160, 200)]
    datagrams: list[tuple[float, bytes]] = []
    expected = []
    seq = SEQ0
    probes = 0
    for step in plan:
        slot = step[1]
        t = session.at(FIRST + slot * STEP)
        if step[0] == "frame":
            ts = ts_add(TS0, slot * STEP)
            datagrams.append((t, session.packet(ALICE, SSRC_ALICE, seq, ts, opus_of(slot))))
            expected.append((seq, ts, FIRST + slot * STEP, opus_of(slot)))
            seq = seq_add(seq, 1)
            continue
        options = step[2]
        probes += 1
        header = RtpHeader(
            False,
            120,
            seq if slot >= 0 else seq_add(seq, -20),
            options.get("ts", ts_add(TS0, slot * STEP)),
            SSRC_ALICE,
        )
        ext = build_extension_body([(3, b"\x01\x02\x03")]) if options.get("ext") else b""
        probe = seal_probe(session, header, 1 + (probes * 37) % 255, ext)
        if slot >= 0:
            seq = seq_add(seq, 1)  # it took a sequence number of her stream
        if options.get("late"):
            datagrams.append((t + SLOT + 0.01, probe))  # after the next frame (which is appended next)
        else:
            datagrams.append((t + 0.005, probe))
    datagrams.sort(key=lambda d: d[0])
    for t, datagram in datagrams:
        session.feed(t, datagram)
    session.tick(datagrams[-1][0] + 1.0)
    await session.stop()

    frames = session.sink.of(ALICE)
    assert [(f.sequence, f.timestamp, f.position, f.opus) for f in frames] == expected
    assert {f.kind for f in frames} == {SinkKind.RECEIVED}
    stats = session.receiver.stats[ALICE]
    assert dict(stats.dropped) == {"probe": probes}
    assert (stats.lost, stats.concealed, stats.recovered_fec, stats.late, stats.duplicates) == (0, 0, 0, 0, 0)
    assert (stats.dave_failures, stats.dave_decrypted, stats.frames) == (0, len(expected), len(expected))
    assert stats.packets == len(expected) + probes
    # two talk spurts, two speaking starts: the probe in the silence started none
    assert [e for e in session.events if e[0] == "listening_speaking_start"] == [
        ("listening_speaking_start", ALICE)
    ] * 2
    warned = _warnings(caplog, "(probe)")
    assert len(warned) == 1 and f"user {ALICE}" in warned[0] and "bandwidth probe" in warned[0]
    assert not _warnings(caplog, "lost")


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
async def test_a_probe_from_an_ssrc_announced_later_is_counted_for_its_user(mode: str) -> None:
    """Packets of an SSRC no user is mapped to yet are held; a probe among them is attributed
    with them, and counted as Bob's probe, not as a frame."""
    session = Session(mode)
    await session.start({SSRC_ALICE: ALICE})
    t0 = session.at(FIRST)
    session.feed(t0, session.packet(BOB, SSRC_BOB, 10, 9600, opus_of(0)))
    session.feed(t0 + 0.005, seal_probe(session, RtpHeader(False, 120, 11, 9600, SSRC_BOB), 255))
    session.feed(t0 + SLOT, session.packet(BOB, SSRC_BOB, 12, 9600 + STEP, opus_of(1)))
    await session.announce(SSRC_BOB, BOB)
    for k in range(2, 10):
        session.feed(t0 + k * SLOT, session.packet(BOB, SSRC_BOB, 11 + k, 9600 + k * STEP, opus_of(k)))
    session.tick(t0 + 1.0)
    await session.stop()
    frames = session.sink.of(BOB)
    assert [f.opus for f in frames] == [opus_of(k) for k in range(10)]
    assert [f.position for f in frames] == [FIRST + k * STEP for k in range(10)]
    assert {f.kind for f in frames} == {SinkKind.RECEIVED}
    stats = session.receiver.stats[BOB]
    assert dict(stats.dropped) == {"probe": 1}
    assert (stats.packets, stats.frames, stats.lost, stats.concealed) == (11, 10, 0, 0)
    assert not session.receiver.unattributed


# -- the jitter buffer's part: a NO_MEDIA packet takes its sequence number --------------------


def _kinds(out: list) -> list[tuple[int, FrameKind]]:
    return [(p.sequence, p.kind) for p in out]


def test_no_media_fills_its_slot_and_releases_nothing() -> None:
    jb = JitterBuffer(0.06)
    assert _kinds(jb.push(5, 0, b"a", 0.0)) == [(5, FrameKind.RECEIVED)]
    assert jb.push(6, 0, NO_MEDIA, 0.01) == []  # in order: taken at once
    assert _kinds(jb.push(7, STEP, b"b", 0.02)) == [(7, FrameKind.RECEIVED)]
    # out of order: the frame after it waits for it, then both go, no loss
    assert jb.push(9, 2 * STEP, b"c", 0.03) == []
    assert jb.next_deadline() == pytest.approx(0.09)
    assert _kinds(jb.push(8, 2 * STEP, NO_MEDIA, 0.035)) == [(9, FrameKind.RECEIVED)]
    assert jb.stats == JitterStats(received=3, no_media=2, reordered=0)
    assert jb.held == 0 and jb.expected == 10


def test_no_media_never_starts_restarts_or_waits() -> None:
    jb = JitterBuffer(0.06, max_gap=50)
    assert jb.push(100, 0, NO_MEDIA, 0.0) == [] and jb.expected is None  # a stream starts with a frame
    jb.push(1, 0, b"a", 0.0)
    assert jb.push(1000, 0, NO_MEDIA, 0.01) == [] and jb.expected == 2  # out of line: no restart
    assert jb.push(1, 0, NO_MEDIA, 0.01) == [] and jb.expected == 2  # already passed
    # ahead of a gap, alone: nothing waits behind the gap, so no deadline conceals it
    assert jb.push(4, 0, NO_MEDIA, 0.02) == [] and jb.next_deadline() is None
    assert jb.poll(10.0) == []
    # the frames of the gap arrive, seconds later (a silence): no loss
    assert _kinds(jb.push(2, STEP, b"b", 10.0)) == [(2, FrameKind.RECEIVED)]
    assert _kinds(jb.push(3, 2 * STEP, b"c", 10.02)) == [(3, FrameKind.RECEIVED)]
    assert _kinds(jb.push(5, 3 * STEP, b"d", 10.04)) == [(5, FrameKind.RECEIVED)]
    assert jb.stats.resets == 0 and jb.stats.lost == 0 and jb.stats.no_media == 4


def test_a_gap_before_a_probe_is_concealed_after_the_previous_frame() -> None:
    """A frame lost just before a probe: concealed in its own slot (the probe's timestamp is
    not trusted to say where), and the frame after the probe follows."""
    jb = JitterBuffer(0.06, has_fec=lambda p: True)
    jb.push(1, 1000, b"a", 0.0)
    assert jb.push(3, 55, NO_MEDIA, 0.03) == []
    assert jb.push(4, 1000 + 2 * STEP, b"c", 0.04) == []
    out = jb.poll(0.04 + 0.06)
    assert [(p.sequence, p.timestamp, p.kind) for p in out] == [
        (2, 1000 + STEP, FrameKind.PLC),
        (4, 1000 + 2 * STEP, FrameKind.RECEIVED),
    ]
    assert jb.stats.lost == 1 and jb.stats.concealed == 1
