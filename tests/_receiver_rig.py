"""A listening session fed datagrams directly, on times the test chooses (no sockets, no threads).

What ``tests/test_padding_probe.py`` and ``tests/test_long_session_wrap.py`` share: the session's
pure core, a :class:`~listening_core.session.ReceiveSession`, with a real transport key (either
AEAD mode) and a real DAVE group (the bot and two members, formed the way the voice gateway forms
it), fed datagram by datagram with the moment each arrived. Hours of a call pass in a moment and
every arrival is exact: a frame that arrives on time belongs at ``clock.sample_at(arrival)``, to
the sample. What the session hands out goes to the sink in order, as the receiver's shell does.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from listening_core.crypto import dave_decrypt, transport_cipher
from listening_core.receiver import ListenOptions
from listening_core.rtp import RtpHeader
from listening_core.session import ReceiveSession
from listening_core.sinks import SAMPLE_RATE, AudioFrame, AudioSink, RtcpPacket
from listening_core.ssrc_map import SsrcMap
from listening_core.testing.dave_client import ClientMessage, DaveClient
from listening_core.testing.dave_group import DaveGroup, Outgoing

CHANNEL = 941_000_000_000_000_001
BOT, ALICE, BOB = 941_001, 941_002, 941_003
SSRC_ALICE, SSRC_BOB = 0x0A11CE10, 0x0B0B0010
SESSION_START = 5000.0  # the simulated monotonic time the session starts at
STEP = 960  # RTP timestamp units (48 kHz samples) per 20 ms frame


class Dave:
    """Opens DAVE frames with the bot's session of the group (DAVE protocol version 1)."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def decrypt(self, user_id: int, payload: bytes) -> bytes:
        return dave_decrypt(self.session, user_id, payload, protocol_version=1)


def dave_group(
    channel: int = CHANNEL, user_ids: tuple[int, ...] = (BOT, ALICE, BOB)
) -> dict[int, DaveClient]:
    """``user_ids`` (default the bot, Alice and Bob) in one DAVE group on ``channel``, formed as the
    voice gateway forms it (the loopback's MLS external sender)."""
    group = DaveGroup(channel)
    clients: dict[int, DaveClient] = {}
    replies: collections.deque[tuple[int, ClientMessage]] = collections.deque()

    def deliver(out: list[Outgoing]) -> None:
        for msg in out:
            client = clients.get(msg.user_id)
            if client is not None:
                replies.extend((msg.user_id, reply) for reply in client.handle(msg))

    for uid in user_ids:
        client = clients[uid] = DaveClient(uid, channel)  # as discord.py: no op 11 check
        key_package = client.session_description(1)
        deliver(group.join(uid))
        replies.extend((uid, m) for m in key_package)
        while replies:
            sender, reply = replies.popleft()
            deliver(group.receive(sender, reply))
    assert all(c.ready for c in clients.values())
    return clients


@dataclass
class KeepingSink(AudioSink):
    """Keeps every frame (as Opus: no decoder needed) and every RTCP packet."""

    wants_pcm = False
    frames: list[AudioFrame] = field(default_factory=list)
    stopped: bool = False

    def on_audio(self, frame: AudioFrame) -> None:
        self.frames.append(frame)

    def on_rtcp(self, packet: RtcpPacket) -> None:
        pass

    def on_stop(self, end: int) -> None:
        self.stopped = True

    def of(self, user_id: int) -> list[AudioFrame]:
        return [f for f in self.frames if f.user_id == user_id]


class Session:
    """A listening session's core on times the test chooses, fed datagram by datagram."""

    def __init__(self, mode: str, *, counter: int = 0) -> None:
        key = bytes(range(7, 39))
        self.cipher = transport_cipher(mode, key)
        self.clients = dave_group()
        self.counter = counter  # the transport nonce counter of the next packet (it wraps at 2**32)
        self.events: list[tuple[str, int]] = []
        self.key = key
        self.mode = mode
        self.sink = KeepingSink()
        self.ssrcs = SsrcMap()
        self.now = SESSION_START

    async def start(self, mapped: dict[int, int], options: ListenOptions | None = None) -> None:
        for ssrc, user_id in mapped.items():
            await self.announce(ssrc, user_id)
        self.options = options or ListenOptions()
        self.receiver = ReceiveSession(
            self.options,
            SESSION_START,
            self.ssrcs,
            Dave(self.clients[BOT].session),
            transport=transport_cipher(self.mode, self.key),
        )

    async def announce(self, ssrc: int, user_id: int) -> None:
        """Op 5: the voice gateway maps ``ssrc`` to ``user_id``."""
        self.ssrcs.map(ssrc, user_id)

    def sample(self, t: float) -> int:
        """The session sample of time ``t``."""
        return round((t - SESSION_START) * SAMPLE_RATE)

    def at(self, position: int) -> float:
        """The time at which session sample ``position`` is now."""
        return SESSION_START + position / SAMPLE_RATE

    def packet(
        self,
        user_id: int,
        ssrc: int,
        seq: int,
        ts: int,
        opus: bytes,
        *,
        padding: int = 0,
        extension_body: bytes = b"",
    ) -> bytes:
        """One datagram as a Discord client sends it: the frame DAVE-encrypted by ``user_id``
        (the silence frame as is), sealed under the session key, with ``padding`` RTP padding."""
        frame = opus if opus == b"\xf8\xff\xfe" else self.clients[user_id].encrypt_opus(opus)
        return self.seal(RtpHeader(False, 120, seq, ts, ssrc), frame, padding, extension_body)

    def seal(self, header: RtpHeader, payload: bytes, padding: int = 0, extension_body: bytes = b"") -> bytes:
        counter = self.counter
        self.counter = (counter + 1) & 0xFFFFFFFF
        return self.cipher.seal_rtp(
            header, payload, extension_body=extension_body, padding=padding, counter=counter
        )

    def feed(self, t: float, datagram: bytes) -> None:
        """``datagram`` arrives at time ``t``; the session's deadlines are looked at then too."""
        self.now = max(self.now, t)
        self.receiver.datagram(datagram, self.now)
        self.receiver.tick(self.now)
        self._hand_out()

    def tick(self, t: float) -> None:
        self.now = max(self.now, t)
        self.receiver.tick(self.now)
        self._hand_out()

    def _hand_out(self) -> None:
        events = self.receiver.drain()
        for user_id, speaking in events.speaking:
            self.events.append(
                ("listening_speaking_start" if speaking else "listening_speaking_stop", user_id)
            )
        for frame, _ in events.frames:
            self.sink.on_audio(frame)

    async def stop(self) -> None:
        """The session ends (after the receiver's stop grace): everything held is handed out."""
        self.now += self.options.stop_grace
        self.receiver.finish(self.now)
        self._hand_out()
        self.sink.on_stop(self.receiver.clock.sample_at(self.now))
        assert self.sink.stopped


def opus_of(n: int) -> bytes:
    """A stand-in Opus frame (CELT, 20 ms) that names its index: never the silence frame."""
    return b"\xfc" + n.to_bytes(4, "big") + bytes(12)


def seal_probe(session: Session, header: RtpHeader, length: int, extension_body: bytes = b"") -> bytes:
    """A padding-only packet (a bandwidth probe) as ``docs/voice-protocol.md`` section 6 describes
    it: after the extension, ``length`` bytes of padding, every one ``0xFF`` but the last, which is
    the count (so the count equals the whole payload); sealed under the session key, P bit set."""
    assert 1 <= length <= 255 and len(extension_body) % 4 == 0
    aad = header.serialize(extension_words=len(extension_body) // 4, padding=True)
    plain = extension_body + b"\xff" * (length - 1) + bytes((length,))
    counter = session.counter.to_bytes(4, "big")
    session.counter = (session.counter + 1) & 0xFFFFFFFF
    cipher = session.cipher
    return aad + cipher._encrypt(counter + cipher._nonce_pad, plain, aad) + counter
