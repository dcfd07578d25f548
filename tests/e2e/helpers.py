"""Helpers for end-to-end tests: a bare socket listener on a discord.py voice connection.

The listener does what every receiver must: open the transport encryption with the connection's
key and mode, then the DAVE layer with the connection's ``davey`` session, keyed by the sender's
user id (known from the loopback, which assigned the SSRCs).
"""

from __future__ import annotations

import asyncio
import collections
import struct
from dataclasses import dataclass, field

import davey
import discord

from listening_core.crypto import transport_cipher
from listening_core.errors import PacketError
from listening_core.rtp import PacketKind, classify

OPUS_SILENCE = b"\xf8\xff\xfe"


class BothModesVoiceClient(discord.VoiceClient):
    """discord.py's VoiceClient taught to *send* in AES-GCM too, so a test can select either mode.

    (discord.py 2.7.1 sends only XChaCha; Discord offers AES-GCM first where it can.)
    """

    supported_modes = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")  # type: ignore[assignment]

    def _encrypt_aead_aes256_gcm_rtpsize(self, header: bytes, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = struct.pack(">I", self._incr_nonce)
        self.checked_add("_incr_nonce", 1, 4294967295)
        return (
            header
            + AESGCM(bytes(self.secret_key)).encrypt(nonce + bytes(8), bytes(data), bytes(header))
            + nonce
        )


@dataclass
class Received:
    sequence: int
    timestamp: int
    ssrc: int
    opus: bytes


@dataclass
class Listener:
    """Records every datagram a voice connection receives and opens it (transport, then DAVE)."""

    vc: discord.VoiceClient
    user_of_ssrc: dict[int, int] = field(default_factory=dict)
    frames: dict[int, list[Received]] = field(default_factory=lambda: collections.defaultdict(list))
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    non_rtp: collections.Counter[str] = field(default_factory=collections.Counter)
    datagrams: int = 0
    #: user id -> RTP sequence numbers of every datagram that opened, duplicates included
    arrivals: dict[int, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    duplicates: int = 0
    rtcp: list[bytes] = field(default_factory=list)
    _seen: set[tuple[int, int]] = field(default_factory=set)
    _held: list[tuple[int, bytes, int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.vc._connection.add_socket_listener(self._on_datagram)

    def close(self) -> None:
        self.vc._connection.remove_socket_listener(self._on_datagram)

    def _on_datagram(self, data: bytes) -> None:  # SocketReader thread
        self._loop.call_soon_threadsafe(self._process, bytes(data))

    def _process(self, data: bytes) -> None:
        self.datagrams += 1
        kind = classify(data)
        if kind is PacketKind.RTCP:
            conn = self.vc._connection
            try:
                self.rtcp.append(transport_cipher(conn.mode, bytes(conn.secret_key)).open_rtcp(data))
            except PacketError as exc:
                self.failures["rtcp:" + exc.reason] += 1
            return
        if kind is not PacketKind.RTP:
            self.non_rtp[kind.name] += 1
            return
        conn = self.vc._connection
        try:
            header, payload = transport_cipher(conn.mode, bytes(conn.secret_key)).open_rtp(data)
        except PacketError as exc:
            self.failures[exc.reason] += 1
            return
        user_id = self.user_of_ssrc.get(header.ssrc)
        if user_id is None:
            self.failures["unknown-ssrc"] += 1
            return
        self.arrivals[user_id].append(header.sequence)
        if (header.ssrc, header.sequence) in self._seen:
            # DAVE refuses a frame it already opened (replay protection): dedupe before it
            self.duplicates += 1
            return
        self._seen.add((header.ssrc, header.sequence))
        self._held.append((user_id, payload, header.sequence, header.timestamp, header.ssrc))
        self._drain()

    def _drain(self) -> None:
        session = self.vc._connection.dave_session
        keep = []
        for user_id, payload, seq, ts, ssrc in self._held:
            try:
                if payload == OPUS_SILENCE or session is None:
                    opus = payload
                else:
                    opus = bytes(session.decrypt(user_id, davey.MediaType.audio, payload))
            except ValueError as exc:
                if "NoValidCryptorFound" in str(exc) or "NoDecryptorForUser" in str(exc):
                    keep.append((user_id, payload, seq, ts, ssrc))  # key not here yet: retry later
                else:
                    self.failures["dave:" + str(exc)[:60]] += 1
                continue
            self.frames[user_id].append(Received(seq, ts, ssrc, opus))
        self._held = keep

    async def settle(self, seconds: float = 0.3) -> None:
        """Give in-flight datagrams time to arrive, then retry held frames one last time."""
        await asyncio.sleep(seconds)
        self._drain()

    @property
    def held(self) -> int:
        return len(self._held)

    def opus_of(self, user_id: int) -> list[bytes]:
        """The frames opened for ``user_id``, in arrival order."""
        return [r.opus for r in self.frames[user_id]]


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


async def wait_dave_ready(vc: discord.VoiceClient, epoch: int | None = None, timeout: float = 10.0) -> None:
    def ok() -> bool:
        session = vc._connection.dave_session
        return bool(session and session.ready and (epoch is None or session.epoch >= epoch))

    await wait_for(ok, timeout)


__all__ = ["BothModesVoiceClient", "Listener", "wait_dave_ready", "wait_for"]
