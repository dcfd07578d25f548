"""The receiver under a fuzz run: a million hostile datagrams while a member speaks.

What a bot's voice socket can receive from a hostile network is fed, one datagram at a time,
with the moment it arrived, into the pure core of a listening session (a real
:class:`~listening_core.session.ReceiveSession`, what the receiver's thread runs) with a real
transport key (each test runs in both AEAD modes) and a real DAVE group: random bytes; genuine
packets truncated, lengthened, with bits flipped, a bad tag or counter, header-extension lengths
that lie; packets sealed with the right key whose extension length or padding lies; RTCP
lookalikes (payload types 72-76, with and without the marker bit); video and other payload
types; replays of recent and of old packets; valid packets from SSRCs no user was announced for;
and frames of a mapped member, Mallory, whose DAVE trailer has a bad size or magic or whose body
is mangled (his stream also loses and reorders frames). Between them, at the same time, Alice
speaks in talk spurts.

Time is the run's: each datagram is handed over with its arrival time, and the session's
deadlines are looked at whenever they are due (as the receiver's shell does), so a million
datagrams cover about seventeen minutes of a call in well under a minute, and the outcome is the
same on a loaded machine as on an idle one.

The run asserts, datagram by datagram where the outcome is immediate and in total at the end: no
exception escapes (the session and its error paths stay quiet, the session ends normally); every
bad datagram is counted once, under the reason the wire description gives it (``docs/voice-
protocol.md``), against the user whose SSRC it carries, and each kind of drop is logged at
WARNING the first time; memory stays bounded (every structure the receiver keeps within its cap,
checked throughout, and no growth in the allocator's blocks once the run is under way); and
Alice's audio is intact: every frame she sent is delivered exactly once, in order, with its
payload, at the session sample she sent it at.

``LISTENING_FUZZ_DATAGRAMS`` sets the number of hostile datagrams per run (default 10**6) and
``LISTENING_FUZZ_SEED`` the seed; a failure names the datagram (hex), its kind and its index.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import logging
import os
import random
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import nacl.bindings
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from listening_core.crypto import OPUS_SILENCE, SUPPORTED_MODES, transport_cipher
from listening_core.rtp import RtcpHeader, RtpHeader, build_extension_body, seq_diff
from listening_core.session import MAX_UNMAPPED, ListenOptions, ReceiveSession
from listening_core.sinks import SAMPLE_RATE, AudioFrame, AudioSink, FrameKind, RtcpPacket
from listening_core.ssrc_map import SsrcMap
from listening_core.testing.dave_client import DaveClient
from tests._receiver_rig import Dave, dave_group

AES, XCHACHA = SUPPORTED_MODES
DATAGRAMS = int(os.environ.get("LISTENING_FUZZ_DATAGRAMS", str(10**6)))
SEED = int(os.environ.get("LISTENING_FUZZ_SEED", "8121"))
CHECK_EVERY = 4096  # datagrams between checks of the receiver's structures and of Alice's audio

CHANNEL = 930_000_000_000_000_001
BOT, ALICE, MALLORY = 930_001, 930_002, 930_003
SSRC_ALICE, SSRC_MALLORY, SSRC_VIDEO = 0x0A11CE00, 0x0BADBAD0, 0x0A11CE01
MAPPED = {SSRC_ALICE: ALICE, SSRC_MALLORY: MALLORY}
VIDEO_OWNER = {SSRC_VIDEO: ALICE}
SESSION_START = 1000.0  # the simulated monotonic time the session starts at
FIRST_SLOT = 0.5  # Alice's first 20 ms slot starts this long after the session started
SLOT = 0.02
STEP = 960
BAD_PER_SLOT = 20  # hostile datagrams per 20 ms of call, on average
#: The defaults, but unannounced SSRCs are held long enough for one to reach its cap of packets.
OPTIONS = ListenOptions(unmapped_hold=5.0)
TS0 = 2**32 - 40 * STEP  # Alice's RTP timestamps wrap early in the run
SEQ0 = 65535 - 30  # and so do her sequence numbers


# -- a DAVE group of three: the bot, Alice and Mallory --------------------------------------------


def _dave_group() -> dict[int, DaveClient]:
    clients = dave_group(CHANNEL, (BOT, ALICE, MALLORY))
    assert clients[BOT].group_user_ids() >= {ALICE, MALLORY}
    return clients


# -- the voice client and the sink ----------------------------------------------------------------


@dataclass
class Sent:
    """One genuine frame of Alice's: what the sink must receive for it."""

    sequence: int
    timestamp: int
    position: int
    opus: bytes


@dataclass
class CheckingSink(AudioSink):
    """Keeps Opus (no decoding); checks Alice's frames against what she sent, as they come."""

    expected: collections.deque[Sent]
    wants_pcm = False
    alice_frames: int = 0
    mismatches: list[str] = field(default_factory=list)
    kinds: dict[int, collections.Counter[FrameKind]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    rtcp: int = 0
    stopped: bool = False

    def on_audio(self, frame: AudioFrame) -> None:
        self.kinds[frame.user_id][frame.kind] += 1
        if frame.user_id != ALICE:
            return
        want = self.expected.popleft() if self.expected else None
        kind = FrameKind.SILENCE if want is not None and want.opus == OPUS_SILENCE else FrameKind.RECEIVED
        got = (frame.sequence, frame.timestamp, frame.position, frame.kind, frame.opus)
        wanted = None if want is None else (want.sequence, want.timestamp, want.position, kind, want.opus)
        if got != wanted and len(self.mismatches) < 10:
            self.mismatches.append(f"frame {self.alice_frames}: got {got}, expected {want}")
        self.alice_frames += 1

    def on_rtcp(self, packet: RtcpPacket) -> None:
        if (packet.ssrc, packet.user_id) != (SSRC_ALICE, ALICE) and len(self.mismatches) < 10:
            self.mismatches.append(f"RTCP packet {packet} is not Alice's")
        self.rtcp += 1

    def on_stop(self, end: int) -> None:
        self.stopped = True


# -- the wire description, as the verdict on a datagram that does not authenticate ----------------

Verdict = tuple[int | None, str] | None
"""(user the drop is counted against, or None; reason), or None for a datagram that is no drop."""


def wire_verdict(d: bytes) -> Verdict:
    """What ``docs/voice-protocol.md`` makes of a datagram not sealed with the session's key.

    Keep-alives (8 bytes) and IP discovery are the connection's business, not drops; RTCP is
    second byte 200..204 (whatever the marker bit says) and opens only under the key; RTP's clear
    header must be whole; payload types other than Opus and video SSRCs are not audio; the rest
    fails transport decryption: no room for tag and counter, an extension longer than the
    payload, or the tag.
    """
    n = len(d)
    if n == 8:
        return None
    if n < 2:
        return (None, "not-rtp")
    b0, b1 = d[0], d[1]
    if b0 >> 6 != 2:
        if n == 74 and b0 == 0 and b1 in (1, 2):
            return None
        return (None, "not-rtp")
    if 200 <= b1 <= 204:
        if n < 8:
            return (None, "not-rtp")
        return (None, "rtcp-truncated" if n - 20 < 8 else "rtcp-bad-tag")
    if n < 12:
        return (None, "not-rtp")
    cc = b0 & 0x0F
    extension = bool(b0 & 0x10)
    header_size = 12 + 4 * cc + (4 if extension else 0)
    if n < header_size:
        return (None, "truncated")
    ssrc = struct.unpack_from(">I", d, 8)[0]
    user = MAPPED.get(ssrc)
    if ssrc in VIDEO_OWNER or b1 & 0x7F != 120:
        return (user or VIDEO_OWNER.get(ssrc), "not-audio")
    body = n - 20 - header_size
    if body < 0:
        return (user, "truncated")
    words = struct.unpack_from(">H", d, 12 + 4 * cc + 2)[0] if extension else 0
    if 4 * words > body:
        return (user, "bad-extension")
    return (user, "bad-tag")


# -- the datagrams ----------------------------------------------------------------------------------

KINDS = {
    # kind: weight. Mutations of Alice's genuine packets, judged by the wire description:
    "random": 8,  # random bytes, often with an RTP first byte and an Opus or RTCP second byte
    "truncated": 8,
    "wrong-length": 5,  # bytes appended, or cut from the middle
    "bit-flip": 10,  # 1 to 3 bits anywhere
    "bad-tag": 5,  # the tag or the nonce counter
    "extension-length-lie": 5,  # a wild length word in the clear extension preamble
    "rtcp-lookalike": 6,  # payload type 72-76: RTCP's 200-204 with the marker bit, RTP without
    # sealed under the session key, and still wrong:
    "sealed-extension-lie": 4,  # an extension longer than the payload
    "sealed-padding-lie": 4,  # a padding length of 0, or longer than what follows the extension
    "not-opus": 4,  # from Alice's SSRC, another payload type
    "video": 3,  # from Alice's video SSRC (op 12)
    "unknown-ssrc": 12,  # from SSRCs nobody announced, with wild but consistent extensions
    "dave-trailer": 12,  # from Mallory: a DAVE trailer with a bad size or magic, a mangled body
    "replay": 5,  # a copy of one of Alice's last 100 packets
    "stale-replay": 1,  # a copy of one of Alice's packets from 256 to tens of thousands back
    # not drops: the connection's business, or delivered
    "keep-alive": 1,
    "discovery": 1,
    "rtcp": 1,
}

#: Kinds whose drop the receiver counts while it handles the datagram (the others: later, or never).
IMMEDIATE = {
    "random",
    "truncated",
    "wrong-length",
    "bit-flip",
    "bad-tag",
    "extension-length-lie",
    "rtcp-lookalike",
    "sealed-extension-lie",
    "sealed-padding-lie",
    "not-opus",
    "video",
}


class Fuzzer:
    """Builds the datagrams of the run and the tally of what the receiver must count."""

    def __init__(self, mode: str, key: bytes, clients: dict[int, DaveClient], seed: int) -> None:
        self.rng = random.Random(seed)
        self.key = key
        self.cipher = transport_cipher(mode, key)
        self.aes = AESGCM(key) if mode == AES else None
        self.alice = clients[ALICE]
        self.mallory = clients[MALLORY]
        self.counter = 0
        self.expected: collections.Counter[tuple[int | None, str]] = collections.Counter()
        """(user or None, reason) -> how many drops the receiver must count."""
        self.kinds: collections.Counter[str] = collections.Counter()
        self.benign = 0
        """Datagrams that are no drop: keep-alives, IP discovery, RTCP that opens."""
        self.a_seq = SEQ0
        self.recent: collections.deque[bytes] = collections.deque(maxlen=100)  # Alice's last packets
        self.history: collections.deque[bytes] = collections.deque(maxlen=256)
        self.old: collections.deque[bytes] = collections.deque(maxlen=50)  # 256 to ~1300 packets back
        self.ancient: list[bytes] = []
        self.m_seq = 0
        self.m_ts = 0
        self.mallory_frames = 0
        self.mallory_skipped = 0
        self.mallory_next: list[tuple[bytes, Verdict]] = []  # his frame that arrives after the next
        self.rtcp_sent = 0
        self.strangers = [s for s in (self.rng.getrandbits(32) for _ in range(5000)) if s not in MAPPED]
        self.kind_names = list(KINDS)
        self.kind_weights = list(itertools.accumulate(KINDS.values()))

    def _counter(self) -> int:
        self.counter = (self.counter + 1) & 0xFFFFFFFF
        return self.counter

    def raw_seal(self, aad: bytes, plain: bytes) -> bytes:
        """Seal ``plain`` under the session key straight from the wire description (lies kept)."""
        ctr = struct.pack(">I", self._counter())
        if self.aes is not None:
            return aad + self.aes.encrypt(ctr + bytes(8), plain, aad) + ctr
        sealed: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plain, aad, ctr + bytes(20), self.key
        )
        return aad + sealed + ctr

    def seal(self, header: RtpHeader, payload: bytes) -> bytes:
        """An RTP packet the way Discord's clients send it: often with an extension and padding."""
        rng = self.rng
        ext = b""
        if rng.random() < 0.7:
            ext = build_extension_body([(1, bytes([rng.randrange(128)]))] * rng.randint(1, 3))
        padding = rng.choice((0, 0, 0, rng.randint(1, 32)))
        return self.cipher.seal_rtp(
            header, payload, extension_body=ext, padding=padding, counter=self._counter()
        )

    # -- Alice ------------------------------------------------------------------------------------

    def alice_packet(self, slot: int, opus: bytes) -> tuple[bytes, Sent]:
        """Alice's frame for 20 ms slot ``slot``: DAVE-encrypted unless it is the silence frame."""
        seq = self.a_seq
        self.a_seq = (seq + 1) & 0xFFFF
        ts = (TS0 + slot * STEP) & 0xFFFFFFFF  # a Discord client's clock keeps counting through silence
        frame = opus if opus == OPUS_SILENCE else self.alice.encrypt_opus(opus)
        packet = self.seal(RtpHeader(False, 120, seq, ts, SSRC_ALICE), frame)
        if len(self.history) == self.history.maxlen and self.rng.random() < 0.05:
            self.old.append(self.history[0])
        if len(self.ancient) < 50:  # her first packets, tens of thousands back by the end
            self.ancient.append(packet)
        self.history.append(packet)
        self.recent.append(packet)
        return packet, Sent(seq, ts, round((FIRST_SLOT + slot * SLOT) * SAMPLE_RATE), opus)

    # -- hostile datagrams ------------------------------------------------------------------------

    def hostile(self) -> tuple[str, bytes, Verdict]:
        """One hostile datagram: its kind, its bytes, and the drop it must be counted as.

        Mutations of genuine packets are judged by :func:`wire_verdict`: any change to a sealed
        packet must make it fail, and the wire description says how.
        """
        rng = self.rng
        kind = (
            "dave-trailer"
            if self.mallory_next
            else rng.choices(self.kind_names, cum_weights=self.kind_weights)[0]
        )
        base = rng.choice(self.recent)
        data = b""
        verdict: Verdict = None
        if kind == "random":
            n = rng.choice((rng.randrange(0, 40), rng.randrange(0, 1500)))
            data = rng.randbytes(n)
            if rng.random() < 0.5 and n >= 2:  # RTP version 2 and, often, Opus or an RTCP type
                b1 = rng.choice((120, 0xF8, rng.randrange(200, 205), rng.randrange(256)))
                data = bytes((0x80 | (data[0] & 0x3F), b1)) + data[2:]
        elif kind == "truncated":
            data = base[: rng.choice((rng.randrange(len(base)), rng.randrange(len(base) - 24, len(base))))]
        elif kind == "wrong-length":
            if rng.random() < 0.5:
                data = base + rng.randbytes(rng.randint(1, 64))
            else:
                i = rng.randrange(len(base))
                data = base[:i] + base[i + rng.randint(1, 8) :]
        elif kind == "bit-flip":
            buf = bytearray(base)
            for _ in range(rng.randint(1, 3)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            if buf == base:  # two flips of the same bit
                buf[-1] ^= 0x80
            data = bytes(buf)
        elif kind == "bad-tag":
            buf = bytearray(base)
            buf[len(buf) - rng.randint(1, 20)] ^= rng.randint(1, 255)
            data = bytes(buf)
        elif kind == "extension-length-lie":
            offset = 12 + 4 * (base[0] & 0x0F)
            data = (
                base
                if base[0] & 0x10
                else bytes((base[0] | 0x10,)) + base[1:offset] + b"\xbe\xde" + base[offset:]
            )
            words = rng.choice((0, 1, rng.randrange(65536), 0xFFFF))
            data = data[: offset + 2] + struct.pack(">H", words) + data[offset + 4 :]
            if data == base:
                data = data[:-1]
        elif kind == "rtcp-lookalike":
            data = bytes((base[0], rng.randrange(72, 77) | (0x80 if rng.random() < 0.6 else 0))) + base[2:]
            if rng.random() < 0.3:
                data = data[: rng.randrange(2, 40)]
        elif kind == "sealed-extension-lie":
            words = rng.randint(1, 600)
            aad = RtpHeader(sequence=rng.randrange(65536), ssrc=SSRC_ALICE).serialize(extension_words=words)
            data, verdict = (
                self.raw_seal(aad, rng.randbytes(rng.randrange(4 * words))),
                (ALICE, "bad-extension"),
            )
        elif kind == "sealed-padding-lie":
            words = rng.choice((0, 0, 1, 3))
            aad = RtpHeader(sequence=rng.randrange(65536), ssrc=SSRC_ALICE).serialize(
                extension_words=words, padding=True
            )
            rest = rng.randrange(256)  # bytes after the extension body, the padding length last
            plain = rng.randbytes(4 * words + rest)
            if rest:
                pad = 0 if rest == 255 or rng.random() < 0.3 else rng.randint(rest + 1, 255)
                plain = plain[:-1] + bytes((pad,))
            data, verdict = self.raw_seal(aad, plain), (ALICE, "bad-padding")
        elif kind == "not-opus":  # RTX, video codecs, comfort noise...
            pt = rng.choice((96, 97, 101, 102, 121, 127, 0, 13))
            header = RtpHeader(False, pt, rng.randrange(65536), rng.getrandbits(32), SSRC_ALICE)
            data, verdict = self.seal(header, rng.randbytes(rng.randrange(1, 300))), (ALICE, "not-audio")
        elif kind == "video":
            header = RtpHeader(rng.random() < 0.1, 120, rng.randrange(65536), rng.getrandbits(32), SSRC_VIDEO)
            data, verdict = self.seal(header, rng.randbytes(rng.randrange(1, 900))), (ALICE, "not-audio")
        elif kind == "unknown-ssrc":
            header = RtpHeader(
                rng.random() < 0.2,
                120,
                rng.randrange(65536),
                rng.getrandbits(32),
                # a stranger who keeps sending (and reaches the per-SSRC cap), or one of thousands
                self.strangers[0] if rng.random() < 0.5 else rng.choice(self.strangers),
                tuple(rng.getrandbits(32) for _ in range(rng.choice((0, 0, 0, rng.randint(1, 15))))),
                extension_profile=rng.choice((0xBEDE, 0x1000, rng.randrange(65536))),
            )
            ext = rng.randbytes(4 * rng.choice((0, 1, 2, rng.randrange(64))))
            data = self.cipher.seal_rtp(
                header,
                rng.randbytes(rng.randrange(400)),
                extension_body=ext,
                padding=rng.randrange(256),
                counter=self._counter(),
            )
            verdict = (None, "unknown-ssrc")
        elif kind == "dave-trailer":
            data, verdict = self.mallory_packet()
        elif kind == "replay":
            data, verdict = base, (ALICE, "duplicate")
        elif kind == "stale-replay":
            data, verdict = rng.choice(rng.choice((self.old, self.ancient)) or self.ancient), (ALICE, "stale")
            if -300 <= seq_diff(struct.unpack_from(">H", data, 2)[0], self.a_seq) <= 800:
                kind, data, verdict = "replay", base, (ALICE, "duplicate")  # not far enough back yet
        elif kind == "keep-alive":
            data = rng.randbytes(8)
        elif kind == "discovery":
            data = struct.pack(">HHI", rng.choice((1, 2)), 70, rng.getrandbits(32)) + bytes(66)
        else:
            assert kind == "rtcp"
            self.rtcp_sent += 1
            plain = RtcpHeader(rng.randrange(200, 205), SSRC_ALICE, length=3).serialize() + rng.randbytes(8)
            data = self.cipher.seal_rtcp(plain, counter=self._counter())
        if kind in IMMEDIATE and verdict is None:
            verdict = wire_verdict(data)
        self.kinds[kind] += 1
        if verdict is None:
            self.benign += 1
        else:
            self.expected[verdict] += 1
        return kind, data, verdict

    def mallory_packet(self) -> tuple[bytes, Verdict]:
        """A frame from Mallory, a mapped member: sealed right, but its DAVE layer is broken.

        His stream loses a frame now and then (his jitter buffer holds what follows, then has the
        gap concealed), and two frames swap places on the way (the second follows at once).
        """
        if self.mallory_next:
            return self.mallory_next.pop()
        rng = self.rng
        if rng.random() < 0.05 and self.mallory_frames:
            self.mallory_skipped += 1
            self.m_seq = (self.m_seq + 1) & 0xFFFF
            self.m_ts = (self.m_ts + STEP) & 0xFFFFFFFF
        if rng.random() < 0.05:
            first = self._mallory_frame()
            self.mallory_next.append(first)
            return self._mallory_frame()
        return self._mallory_frame()

    def _mallory_frame(self) -> tuple[bytes, Verdict]:
        rng = self.rng
        frame = bytearray(self.mallory.encrypt_opus(b"\xfc" + rng.randbytes(rng.randrange(3, 60))))
        reason = "dave"  # the bot cannot always tell a tampered frame from one it has no key for
        how = rng.randrange(6)
        if how == 0:  # a supplemental size byte that lies
            size = frame[-3]
            frame[-3] = rng.choice((0, 1, 11, len(frame) + 1, 255, rng.randrange(256)))
            if frame[-3] == size:
                frame[-3] ^= 0x40
        elif how == 1:  # bad magic: not a DAVE frame at all, and passthrough is off
            frame[-1 - rng.randrange(2)] ^= rng.randint(1, 255)
            reason = "dave-unencrypted"
        elif how == 2:  # the supplemental bytes cut short, magic kept
            frame = frame[: -rng.randint(4, 12)] + b"\xfa\xfa"
        elif how == 3:  # the ciphertext, tag, nonce or ranges tampered with
            frame[rng.randrange(len(frame) - 3)] ^= rng.randint(1, 255)
        elif how == 4:  # a plain Opus frame while passthrough is off
            frame = bytearray(b"\xfc" + rng.randbytes(rng.randrange(80)))
            reason = "dave-unencrypted"
        else:  # garbage ending in a plausible trailer
            frame = bytearray(rng.randbytes(rng.randrange(40))) + bytes((rng.randrange(256),)) + b"\xfa\xfa"
        self.mallory_frames += 1
        header = RtpHeader(False, 120, self.m_seq, self.m_ts, SSRC_MALLORY)
        self.m_seq = (self.m_seq + 1) & 0xFFFF
        self.m_ts = (self.m_ts + STEP) & 0xFFFFFFFF
        return self.seal(header, bytes(frame)), (MALLORY, reason)


def alice_talks(rng: random.Random) -> Iterator[bytes | None]:
    """What Alice sends in each 20 ms slot: talk spurts of 0.3-4 s, each ended by five silence
    frames, with pauses of 0.2-2 s between them (None: nothing sent)."""
    slot = 0
    while True:
        for _ in range(rng.randint(15, 200)):
            yield b"\xfc\xff\xfe" + struct.pack(">I", slot) + rng.randbytes(rng.randrange(8, 60))
            slot += 1
        for _ in range(5):
            yield OPUS_SILENCE
            slot += 1
        for _ in range(rng.randint(10, 100)):
            yield None
            slot += 1


# -- what the receiver holds ------------------------------------------------------------------------


def _over_cap(sizes: dict[str, int]) -> list[str]:
    """The structures beyond their documented caps."""
    per_stream = OPTIONS.max_held_per_stream
    caps = {
        "unmapped SSRCs": MAX_UNMAPPED,
        "held per unmapped SSRC": per_stream,
        "not-audio SSRCs": MAX_UNMAPPED,
        "streams": len(MAPPED),
        "jitter held": 512,  # JitterBuffer's max_packets
        "DAVE pending": per_stream,
        "DAVE opened ahead": per_stream,
        "warnings given": 64,  # once per user and kind of trouble, not per datagram or SSRC
        "drop reasons": 40,
        "users": len(MAPPED),
    }
    return [f"{name}: {sizes[name]} > {cap}" for name, cap in caps.items() if sizes[name] > cap]


def _change(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What a datagram added to a drop counter, leaving out the reasons the receiver's thread
    counts meanwhile (held packets expiring, DAVE failures, stale copies from a start window)."""
    return {
        reason: n - before.get(reason, 0)
        for reason, n in after.items()
        if n != before.get(reason, 0)
        and reason not in ("unknown-ssrc", "stale")
        and not reason.startswith("dave-")
    }


def _allocated_blocks() -> int:
    """The allocator's blocks in use (what was delivered is with the sink already)."""
    gc.collect()
    return sys.getallocatedblocks()


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Session:
    """A listening session's core, fed datagram by datagram with their arrival times."""

    receiver: ReceiveSession
    sink: CheckingSink
    fuzzer: Fuzzer
    now: float = SESSION_START

    def on_datagram(self, data: bytes) -> None:
        """One datagram arrives at :attr:`now`; what is due then is released, and handed out."""
        receiver = self.receiver
        receiver.datagram(data, self.now)
        due = receiver.next_deadline()
        if due is not None and self.now >= due:
            receiver.tick(self.now)
        self._hand_out()

    def tick(self, now: float) -> None:
        self.now = max(self.now, now)
        self.receiver.tick(self.now)
        self._hand_out()

    def _hand_out(self) -> None:
        events = self.receiver.drain()
        for frame, _ in events.frames:
            self.sink.on_audio(frame)
        for packet in events.rtcp:
            self.sink.on_rtcp(packet)

    async def stop(self) -> None:
        """The session ends (after the receiver's stop grace): everything held is handed out."""
        self.now += OPTIONS.stop_grace
        self.receiver.finish(self.now)
        self._hand_out()
        self.sink.on_stop(self.receiver.clock.sample_at(self.now))
        assert self.sink.stopped


async def _session(mode: str) -> Session:
    key = random.Random(SEED).randbytes(32)
    clients = _dave_group()
    ssrcs = SsrcMap()
    for ssrc, user_id in MAPPED.items():  # op 5, as the voice gateway announces who speaks
        ssrcs.map(ssrc, user_id)
    ssrcs.map(SSRC_ALICE, ALICE)  # op 12: Alice's audio and video SSRCs
    ssrcs.add_video(SSRC_VIDEO, ALICE)
    receiver = ReceiveSession(
        OPTIONS, SESSION_START, ssrcs, Dave(clients[BOT].session), transport=transport_cipher(mode, key)
    )
    sink = CheckingSink(collections.deque())
    return Session(receiver, sink, Fuzzer(mode, key, clients, SEED))


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
async def test_fuzz_run(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="listening_core")
    session = await _session(mode)
    receiver, sink = session.receiver, session.sink
    on_datagram, fuzzer = session.on_datagram, session.fuzzer
    expected = sink.expected
    largest: collections.Counter[str] = collections.Counter()
    run: dict[str, Any] = {}

    def fail(message: str, kind: str, index: int, data: bytes) -> None:
        raise AssertionError(
            f"{message}\n  datagram #{index} ({kind}, seed {SEED}, {len(data)} bytes): {data.hex()}"
        )

    def feed() -> None:
        """discord.py's reader thread: Alice's frame at each 20 ms slot, hostile datagrams between."""
        talk = alice_talks(random.Random(SEED + 1))
        index = slot = 0
        blocks_at: int | None = None
        while index < DATAGRAMS:
            start = SESSION_START + FIRST_SLOT + slot * SLOT
            session.now = start
            opus = next(talk)
            if opus is not None:
                packet, sent = fuzzer.alice_packet(slot, opus)
                expected.append(sent)
                on_datagram(packet)
                run["alice"] = run.get("alice", 0) + 1
            n = min(fuzzer.rng.randint(0, 2 * BAD_PER_SLOT), DATAGRAMS - index)
            for j in range(n):
                session.now = start + (j + 1) * SLOT / (n + 1)
                kind, data, verdict = fuzzer.hostile()
                counter: collections.Counter[str] | None = None
                if kind in IMMEDIATE and verdict is not None:
                    counter = (
                        receiver.unattributed if verdict[0] is None else receiver.stats[verdict[0]].dropped
                    )
                    before = dict(counter)
                try:
                    on_datagram(data)
                except BaseException as exc:
                    fail(f"the socket listener raised {exc!r}", kind, index, data)
                if counter is not None:
                    change = _change(before, dict(counter))
                    if change != {verdict[1]: 1}:  # type: ignore[index]
                        fail(f"counted as {change}, not once as {verdict}", kind, index, data)
                if index % CHECK_EVERY == 0:
                    if sink.mismatches:
                        fail(f"Alice's audio is not intact: {sink.mismatches}", kind, index, data)
                    sizes = receiver.sizes()
                    for name, size in sizes.items():
                        largest[name] = max(largest[name], size)
                    if _over_cap(sizes):
                        fail(f"beyond their caps: {_over_cap(sizes)}", kind, index, data)
                    if blocks_at is None and index >= DATAGRAMS // 5:
                        blocks_at = _allocated_blocks()
                index += 1
            slot += 1
        run.update(slots=slot, blocks=(blocks_at, _allocated_blocks()))

    began = time.perf_counter()
    await asyncio.to_thread(feed)
    await session.stop()  # the session ended normally
    print(
        f"\n{mode}: {DATAGRAMS} hostile datagrams over {run['slots'] * SLOT:.0f} s of call in"
        f" {time.perf_counter() - began:.1f} s; kinds {dict(fuzzer.kinds)}; largest {dict(largest)};"
        f" allocated blocks at 20 % and at the end {run['blocks']}"
    )

    # nothing escaped: no error was logged by the listener's or the thread's error paths
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]

    # every hostile datagram counted once, under its reason, against the user whose SSRC it has
    counted: collections.Counter[tuple[int | None, str]] = collections.Counter()
    for reason, n in receiver.unattributed.items():
        counted[(None, reason)] += n
    for user_id, stats in receiver.stats.items():
        for reason, n in stats.dropped.items():
            counted[(user_id, reason)] += n
        counted[(user_id, "duplicate")] += stats.duplicates
        counted[(user_id, "late")] += stats.late
    must = +fuzzer.expected
    assert sum(must.values()) + fuzzer.benign == DATAGRAMS  # each hostile datagram is a drop, or none
    # what opens Mallory's frames cannot always tell a tampered one from one it has no key for
    dave = sum(n for (who, reason), n in counted.items() if who == MALLORY and reason.startswith("dave-"))
    assert dave == must.pop((MALLORY, "dave")) + must[(MALLORY, "dave-unencrypted")] == fuzzer.mallory_frames
    assert counted[(MALLORY, "dave-unencrypted")] >= must.pop((MALLORY, "dave-unencrypted"))
    counted = +collections.Counter(
        {k: n for k, n in counted.items() if not (k[0] == MALLORY and k[1].startswith("dave-"))}
    )
    assert counted == must
    alice, mallory = receiver.stats[ALICE], receiver.stats[MALLORY]
    assert mallory.dave_failures == fuzzer.mallory_frames
    assert mallory.lost == fuzzer.mallory_skipped
    # each of his frames concealed, and each he never sent: his track keeps time
    assert sink.kinds[MALLORY] == {FrameKind.PLC: fuzzer.mallory_frames + fuzzer.mallory_skipped}

    # each kind of drop was logged at WARNING the first time, for its user, and only then
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "listening_core.receiver" and r.levelno == logging.WARNING
    ]
    assert len(warnings) <= 30, warnings
    for who, reason in fuzzer.expected:
        if reason == "duplicate":
            continue  # a copy of a frame that was delivered: nothing was lost
        whose = "unattributed audio" if who is None else f"user {who}"
        what = {
            "dave": "DAVE decryption failed",
            "dave-unencrypted": "DAVE decryption failed",
            "unknown-ssrc": "no user was mapped to",
        }.get(reason, f"({reason})")
        assert any(whose in w and what in w for w in warnings), (who, reason, warnings)

    # Alice's audio is intact: every frame, once, in order, with its payload, where she sent it
    assert not sink.mismatches
    assert not expected, f"{len(expected)} of Alice's frames were never delivered"
    assert sink.alice_frames == run["alice"] == alice.frames
    assert set(sink.kinds[ALICE]) == {FrameKind.RECEIVED, FrameKind.SILENCE}
    assert (alice.lost, alice.concealed, alice.dave_failures, alice.late) == (0, 0, 0, 0)
    assert sink.rtcp == fuzzer.rtcp_sent  # and her RTCP, in between, too

    # memory: flat once the run was under way (the structures above stayed within their caps)
    first, last = run["blocks"]
    assert last - first < 5_000, run["blocks"]


# -- the bugs the run found, one at a time --------------------------------------------------------


async def test_a_replayed_old_packet_moves_nothing() -> None:
    """One copy of a packet from seconds ago, far out of the jitter buffer's window, used to restart
    the member's stream: the frames across the jump were concealed and the rest of the track moved."""
    session = await _session(AES)
    sent = []
    for slot in range(400):
        session.now = SESSION_START + FIRST_SLOT + slot * SLOT
        packet, frame = session.fuzzer.alice_packet(slot, b"\xfc" + struct.pack(">I", slot))
        sent.append(packet)
        session.sink.expected.append(frame)
        session.on_datagram(packet)
        if slot in (300, 350):
            session.on_datagram(sent[slot - 250])  # a replay, 250 packets back
            session.on_datagram(sent[slot - 249])  # and the one after it
        session.tick(session.now)
    await session.stop()
    assert not session.sink.mismatches and not session.sink.expected
    stats = session.receiver.stats[ALICE]
    assert stats.dropped == {"stale": 4}
    assert (stats.frames, stats.lost, stats.concealed, stats.dave_failures) == (400, 0, 0, 0)


async def test_frames_that_never_open_wait_no_longer_than_dave_hold() -> None:
    """A member whose frames never open (say the bot never got their key): each frame is held
    ``dave_hold`` at most. Timed from when the frame reached the head of the queue, one went
    through per ``dave_hold`` while fifty a second queued behind it, without bound."""
    session = await _session(AES)
    fuzzer, receiver = session.fuzzer, session.receiver
    stream_sizes = []
    for k in range(3000):  # a minute at 50 frames a second
        session.now = SESSION_START + k * SLOT
        header = RtpHeader(False, 120, k, k * STEP, SSRC_MALLORY)
        tampered = bytearray(fuzzer.mallory.encrypt_opus(b"\xfc" + bytes(20)))
        tampered[0] ^= 1  # DAVE cannot tell this from a frame under a key it does not have
        session.on_datagram(fuzzer.seal(header, bytes(tampered)))
        session.tick(session.now)
        stream_sizes.append(receiver.sizes()["DAVE pending"])
    # each waits dave_hold (2 s: 100 frames), and no longer
    assert max(stream_sizes) <= OPTIONS.dave_hold / SLOT + 2
    await session.stop()
    stats = receiver.stats[MALLORY]
    assert stats.dave_failures == 3000 == stats.dropped["dave-no-key"]
    assert session.sink.kinds[MALLORY] == {FrameKind.PLC: 3000}
