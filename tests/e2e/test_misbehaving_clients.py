"""Misbehaving clients get what Discord would give them, and nobody else notices.

Raw aiohttp websockets play clients that send bad JSON, speak out of turn, present wrong tokens
or unknown modes; a plain UDP socket sends garbage, spoofed and truncated datagrams to a call's
relay. Each gets the voice or main gateway close code Discord uses, or is dropped and counted
under the right reason, and is never forwarded. Meanwhile a real discord.py listener keeps
receiving a virtual member's audio, frame for frame.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord
import pytest

from listening_core.crypto import TransportCipher, transport_cipher
from listening_core.rtp import DiscoveryPacket, RtpHeader
from listening_core.testing import LocalDiscord, Schedule
from listening_core.testing.call import VoiceCall
from listening_core.testing.clients import close_client, connect_client

from .helpers import BothModesVoiceClient, Listener, wait_dave_ready, wait_for

# Voice gateway opcodes and close codes (Discord's numbering).
V_IDENTIFY, V_SELECT_PROTOCOL, V_READY, V_HEARTBEAT, V_SESSION_DESCRIPTION = 0, 1, 2, 3, 4
V_HEARTBEAT_ACK, V_RESUME, V_HELLO, V_DAVE_TRANSITION_READY = 6, 7, 8, 23
UNKNOWN_OPCODE, DECODE_ERROR, NOT_AUTHENTICATED, AUTHENTICATION_FAILED = 4001, 4002, 4003, 4004
ALREADY_AUTHENTICATED, SESSION_INVALID, UNKNOWN_ENCRYPTION_MODE, DAVE_REQUIRED = 4005, 4006, 4016, 4017
BAD_REQUEST = 4020

# Main gateway opcodes.
G_HEARTBEAT, G_IDENTIFY, G_VOICE_STATE, G_HELLO, G_HEARTBEAT_ACK = 1, 2, 4, 10, 11

MODE = "aead_xchacha20_poly1305_rtpsize"
OPUS_SILENCE = b"\xf8\xff\xfe"
TIMEOUT = 5.0


# -- raw clients -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def http_session(local: LocalDiscord) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=local.connector()) as http:
        yield http


async def close_code_of(ws: aiohttp.ClientWebSocketResponse, timeout: float = TIMEOUT) -> int | None:
    """Read (and ignore) frames until the server closes; the code it closed with."""

    async def run() -> int | None:
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data)
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                return ws.close_code

    return await asyncio.wait_for(run(), timeout)


@dataclass
class Credentials:
    """What op 4 on the main gateway would have given a user: the voice Identify payload."""

    guild_id: int
    user_id: int
    session_id: str
    token: str

    def identify(self, **overrides: Any) -> dict[str, Any]:
        d: dict[str, Any] = {
            "server_id": str(self.guild_id),
            "user_id": str(self.user_id),
            "session_id": self.session_id,
            "token": self.token,
            "max_dave_protocol_version": 1,
        }
        d.update(overrides)
        return d


def authorise(local: LocalDiscord, call: VoiceCall, name: str) -> Credentials:
    user = local.add_user(name)
    session_id = secrets.token_hex(16)
    return Credentials(local.world.guild_id, user.id, session_id, call.authorise(user.id, session_id))


class RawVoice:
    """A voice gateway client driven by hand: it sends exactly what the test tells it to."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, call: VoiceCall, version: str = "8") -> RawVoice:
        return cls(await http.ws_connect(f"wss://{call.endpoint}/?v={version}"))

    async def send(self, op: int, d: Any) -> None:
        await self.ws.send_str(json.dumps({"op": op, "d": d}))

    async def expect(self, op: int, timeout: float = TIMEOUT) -> Any:
        """Skip frames until a JSON frame with ``op``; its ``d``."""

        async def run() -> Any:
            while True:
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    payload = json.loads(msg.data)
                    if payload["op"] == op:
                        return payload["d"]
                elif msg.type is not aiohttp.WSMsgType.BINARY:
                    raise AssertionError(
                        f"websocket ended ({msg.type}, {msg.data!r}) while waiting for op {op}"
                    )

        return await asyncio.wait_for(run(), timeout)

    async def hello(self) -> Any:
        d = await self.expect(V_HELLO)
        assert d["heartbeat_interval"] > 0
        return d

    async def close_code(self) -> int | None:
        return await close_code_of(self.ws)


@dataclass
class JoinedRaw:
    """A raw client that identified, did IP discovery from its own UDP socket and selected a mode."""

    voice: RawVoice
    creds: Credentials
    ssrc: int
    sock: socket.socket
    cipher: TransportCipher
    relay_addr: tuple[str, int]

    def seal(self, ssrc: int, sequence: int, payload: bytes, cipher: TransportCipher | None = None) -> bytes:
        header = RtpHeader(sequence=sequence, timestamp=sequence * 960, ssrc=ssrc)
        return (cipher or self.cipher).seal_rtp(header, payload, counter=sequence)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.relay_addr)

    async def close(self) -> None:
        self.sock.close()
        await self.voice.ws.close()


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def join_raw(local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall, name: str) -> JoinedRaw:
    creds = authorise(local, call, name)
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.send(V_IDENTIFY, creds.identify())
    ready = await voice.expect(V_READY)
    relay_addr = (ready["ip"], ready["port"])
    sock = udp_socket()
    sock.sendto(DiscoveryPacket.request(ready["ssrc"]).serialize(), relay_addr)
    answer = DiscoveryPacket.parse(
        await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 2048), TIMEOUT)
    )
    assert (answer.type, answer.ssrc) == (2, ready["ssrc"])
    assert (answer.address, answer.port) == sock.getsockname()
    await voice.send(
        V_SELECT_PROTOCOL,
        {"protocol": "udp", "data": {"address": answer.address, "port": answer.port, "mode": MODE}},
    )
    description = await voice.expect(V_SESSION_DESCRIPTION)
    assert description["mode"] == MODE
    cipher = transport_cipher(description["mode"], description["secret_key"])
    return JoinedRaw(voice, creds, ready["ssrc"], sock, cipher, relay_addr)


def pending(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock`` now."""
    found = []
    while True:
        try:
            found.append(sock.recv(4096))
        except BlockingIOError:
            return found


# -- the voice gateway cases -------------------------------------------------------------------
# Each case drives one raw client on a fresh connection and returns the close code it got.

Case = Callable[[LocalDiscord, aiohttp.ClientSession, VoiceCall], Awaitable["int | None"]]


async def invalid_json(local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall) -> int | None:
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.ws.send_str('{"op": 0, "d": {')
    return await voice.close_code()


async def json_without_op(local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall) -> int | None:
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.ws.send_str("[0, 1, 2]")
    return await voice.close_code()


async def select_before_identify(
    local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall
) -> int | None:
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.send(
        V_SELECT_PROTOCOL, {"protocol": "udp", "data": {"address": "127.0.0.1", "port": 1, "mode": MODE}}
    )
    return await voice.close_code()


async def binary_before_identify(
    local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall
) -> int | None:
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.ws.send_bytes(bytes([26]) + b"not a key package")  # op 26 MLS Key Package
    return await voice.close_code()


async def wrong_token(local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall) -> int | None:
    creds = authorise(local, call, "wrong-token")
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.send(V_IDENTIFY, creds.identify(token="0" * len(creds.token)))
    return await voice.close_code()


async def second_identify(local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall) -> int | None:
    creds = authorise(local, call, "identifies-twice")
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.send(V_IDENTIFY, creds.identify())
    await voice.expect(V_READY)
    await voice.send(V_IDENTIFY, creds.identify())
    return await voice.close_code()


async def unknown_opcode(local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall) -> int | None:
    creds = authorise(local, call, "unknown-opcode")
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.send(V_IDENTIFY, creds.identify())
    await voice.expect(V_READY)
    await voice.send(99, {})
    return await voice.close_code()


async def unsupported_mode(local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall) -> int | None:
    creds = authorise(local, call, "old-mode")
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.send(V_IDENTIFY, creds.identify())
    ready = await voice.expect(V_READY)
    assert "xsalsa20_poly1305_lite" not in ready["modes"]
    await voice.send(
        V_SELECT_PROTOCOL,
        {"protocol": "udp", "data": {"address": "127.0.0.1", "port": 9, "mode": "xsalsa20_poly1305_lite"}},
    )
    return await voice.close_code()


async def without_dave(local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall) -> int | None:
    creds = authorise(local, call, "no-dave")
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.send(V_IDENTIFY, creds.identify(max_dave_protocol_version=0))
    return await voice.close_code()


async def old_version(local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall) -> int | None:
    voice = await RawVoice.open(http, call, version="4")
    return await voice.close_code()


async def resume_unknown_session(
    local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall
) -> int | None:
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.send(
        V_RESUME,
        {
            "server_id": str(local.world.guild_id),
            "session_id": secrets.token_hex(16),
            "token": secrets.token_hex(8),
            "seq_ack": 3,
        },
    )
    return await voice.close_code()


async def malformed_known_opcode(
    local: LocalDiscord, http: aiohttp.ClientSession, call: VoiceCall
) -> int | None:
    # valid JSON, a known opcode, but a payload that cannot be decoded: Discord's 4002
    creds = authorise(local, call, "malformed-payload")
    voice = await RawVoice.open(http, call)
    await voice.hello()
    await voice.send(V_IDENTIFY, creds.identify())
    await voice.expect(V_READY)
    await voice.send(V_DAVE_TRANSITION_READY, {"no_transition_id": True})
    return await voice.close_code()


VOICE_CASES: list[tuple[Case, int]] = [
    (invalid_json, DECODE_ERROR),
    (json_without_op, DECODE_ERROR),
    (select_before_identify, NOT_AUTHENTICATED),
    (binary_before_identify, NOT_AUTHENTICATED),
    (wrong_token, AUTHENTICATION_FAILED),
    (second_identify, ALREADY_AUTHENTICATED),
    (unknown_opcode, UNKNOWN_OPCODE),
    (unsupported_mode, UNKNOWN_ENCRYPTION_MODE),
    (without_dave, DAVE_REQUIRED),
    (old_version, BAD_REQUEST),
    (resume_unknown_session, SESSION_INVALID),
    (malformed_known_opcode, DECODE_ERROR),
]


@pytest.mark.parametrize(("case", "code"), VOICE_CASES, ids=[case.__name__ for case, _ in VOICE_CASES])
async def test_voice_gateway_closes_a_misbehaving_client_with_discords_code(case: Case, code: int) -> None:
    async with LocalDiscord() as local:
        call = await local.call_for(local.world.voice_channel_id)
        async with http_session(local) as http:
            assert await case(local, http, call) == code
            # the server is still serving: a well-behaved client identifies right after
            creds = authorise(local, call, "well-behaved")
            voice = await RawVoice.open(http, call)
            await voice.hello()
            await voice.send(V_IDENTIFY, creds.identify())
            ready = await voice.expect(V_READY)
            assert ready["ssrc"] == call.sessions[creds.user_id].ssrc
            await voice.ws.close()


async def test_identify_without_dave_is_accepted_when_dave_is_not_required() -> None:
    async with LocalDiscord(dave_required=False) as local:
        call = await local.call_for(local.world.voice_channel_id)
        async with http_session(local) as http:
            creds = authorise(local, call, "no-dave")
            voice = await RawVoice.open(http, call)
            await voice.hello()
            await voice.send(V_IDENTIFY, creds.identify(max_dave_protocol_version=0))
            assert (await voice.expect(V_READY))["ssrc"] > 0
            await voice.send(V_HEARTBEAT, {"t": 1234, "seq_ack": 1})
            assert await voice.expect(V_HEARTBEAT_ACK) == {"t": 1234}
            await voice.ws.close()


async def test_a_client_the_server_disconnects_reads_the_close_code_even_while_writing() -> None:
    # The server ends a voice connection from outside its handler (here: the user left the call,
    # 4014). A client that writes before it has read the close frame, as discord.py does when it
    # answers a DAVE message that was already in flight, must still get the close code: the
    # server finishes the close handshake instead of dropping the TCP connection under it.
    async with LocalDiscord(modes=(MODE,)) as local:
        call = await local.call_for(local.world.voice_channel_id)
        async with http_session(local) as http:
            raw = await join_raw(local, http, call, "leaver")
            try:
                # the server's side runs on its own, as when op 4 arrives on the main gateway
                leaving = asyncio.ensure_future(call.leave(raw.creds.user_id))
                await asyncio.sleep(0.2)  # the close frame is now waiting, unread, at the client
                await raw.voice.send(V_HEARTBEAT, {"t": 1, "seq_ack": 1})
                await raw.voice.ws.send_bytes(bytes([26]) + b"late key package")
                assert await raw.voice.close_code() == 4014
                await asyncio.wait_for(leaving, TIMEOUT)
                assert raw.creds.user_id not in call.sessions
            finally:
                raw.sock.close()


# -- the main gateway cases --------------------------------------------------------------------

GATEWAY_URL = "wss://gateway.discord.gg/?v=10&encoding=json"


async def main_gateway_close_code(http: aiohttp.ClientSession, *frames: str) -> int | None:
    ws = await http.ws_connect(GATEWAY_URL)
    hello = json.loads((await asyncio.wait_for(ws.receive(), TIMEOUT)).data)
    assert hello["op"] == G_HELLO and hello["d"]["heartbeat_interval"] > 0
    for frame in frames:
        await ws.send_str(frame)
    return await close_code_of(ws)


def _identify(token: str) -> str:
    return json.dumps(
        {"op": G_IDENTIFY, "d": {"token": token, "intents": 513, "properties": {"os": "linux"}}}
    )


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("bad-json", 4002),
        ("voice-state-before-identify", 4003),
        ("bad-token", 4004),
        ("identify-twice", 4005),
        ("unknown-opcode", 4001),
    ],
)
async def test_main_gateway_closes_a_misbehaving_client_with_discords_code(name: str, code: int) -> None:
    async with LocalDiscord() as local:
        account = local.add_bot("good")
        frames = {
            "bad-json": ["{'op': 1"],
            "voice-state-before-identify": [
                json.dumps({"op": G_VOICE_STATE, "d": {"guild_id": str(local.world.guild_id)}})
            ],
            "bad-token": [_identify("not-a-token")],
            "identify-twice": [_identify(account.token), _identify(account.token)],
            "unknown-opcode": [_identify(account.token), json.dumps({"op": 99, "d": None})],
        }[name]
        async with http_session(local) as http:
            assert await main_gateway_close_code(http, *frames) == code
        # and a real bot still logs in afterwards
        client = await connect_client(local, account)
        try:
            assert client.user is not None and client.user.id == account.user.id
        finally:
            await close_client(client)


# -- UDP -----------------------------------------------------------------------------------------


async def misbehave_over_udp(
    local: LocalDiscord, raw: JoinedRaw, victim_ssrc: int
) -> collections.Counter[str]:
    """Send the relay every kind of bad datagram; the drop reasons each one must be counted under."""
    stranger = udp_socket()  # an address the relay never saw in IP discovery
    try:
        wrong_key = transport_cipher(MODE, bytes(32))
        expected: collections.Counter[str] = collections.Counter()

        raw.send(b"\x00\x05garbage!")  # neither RTP, RTCP, discovery nor keep-alive
        raw.send(b"\x3f" * 40)
        expected["unknown-kind"] += 2
        # a valid packet, sealed with the right key, from an address no member discovered from
        stranger.sendto(raw.seal(raw.ssrc, 1, OPUS_SILENCE), raw.relay_addr)
        stranger.sendto(bytes([0x80, 200]) + bytes(30), raw.relay_addr)  # RTCP too
        expected["unknown-source"] += 2
        # a member's own address and key, but another member's SSRC: a spoof
        raw.send(raw.seal(victim_ssrc, 2, OPUS_SILENCE))
        raw.send(raw.seal(0xDEADBEEF, 3, OPUS_SILENCE))
        expected["unknown-ssrc"] += 2
        # truncated RTP: a header and no room for the tag and nonce; and CSRCs past the end
        raw.send(raw.seal(raw.ssrc, 4, OPUS_SILENCE)[:20])
        raw.send(bytes([0x8F, 0x78]) + bytes(14))
        expected["truncated"] += 2
        # the right SSRC sealed with the wrong key
        raw.send(raw.seal(raw.ssrc, 5, OPUS_SILENCE, cipher=wrong_key))
        expected["bad-tag"] += 1
        # IP discovery for an SSRC nobody has, and for a virtual member's (it has no address to hijack)
        stranger.sendto(DiscoveryPacket.request(0x0BADC0DE).serialize(), raw.relay_addr)
        stranger.sendto(DiscoveryPacket.request(victim_ssrc).serialize(), raw.relay_addr)
        expected["discovery-unknown-ssrc"] += 2
        # a discovery *response* sent to the server
        stranger.sendto(DiscoveryPacket.response(raw.ssrc, "127.0.0.1", 9).serialize(), raw.relay_addr)
        expected["discovery-response"] += 1

        call = local.calls[local.world.voice_channel_id]
        await wait_for(lambda: sum(call.relay.stats.dropped.values()) >= sum(expected.values()), TIMEOUT)
        await asyncio.sleep(0.05)
        assert pending(stranger) == []  # no discovery answer, nothing relayed to the stranger
        return expected
    finally:
        stranger.close()


async def test_bad_datagrams_are_dropped_counted_and_never_forwarded() -> None:
    async with LocalDiscord(modes=(MODE,)) as local:
        alice = local.add_member("alice")  # a virtual member, whose SSRC the sender tries to use
        await alice.join()
        call = local.calls[local.world.voice_channel_id]
        async with http_session(local) as http:
            sender = await join_raw(local, http, call, "sender")
            receiver = await join_raw(local, http, call, "receiver")
            try:
                pending(receiver.sock)
                before = call.relay.stats.forwarded_rtp
                expected = await misbehave_over_udp(local, sender, victim_ssrc=alice.ssrc)
                assert call.relay.stats.dropped == expected
                assert call.relay.stats.forwarded_rtp == before
                assert not call.relay.sent
                await asyncio.sleep(0.05)
                assert pending(receiver.sock) == []
                assert pending(sender.sock) == []

                # the same path with a good packet does get through: the drops above were not vacuous
                sender.send(sender.seal(sender.ssrc, 6, OPUS_SILENCE))
                got = await asyncio.wait_for(
                    asyncio.get_running_loop().sock_recv(receiver.sock, 4096), TIMEOUT
                )
                header, payload = receiver.cipher.open_rtp(got)
                assert (header.ssrc, header.sequence, payload) == (sender.ssrc, 6, OPUS_SILENCE)
                assert [
                    f.sequence for f in call.relay.sent[(sender.creds.user_id, receiver.creds.user_id)]
                ] == [6]
                assert call.relay.stats.dropped == expected
            finally:
                await sender.close()
                await receiver.close()


# -- everything at once, while a real listener listens -----------------------------------------


async def _join(local: LocalDiscord, name: str) -> tuple[discord.Client, discord.VoiceClient]:
    client = await connect_client(local, local.add_bot(name))
    channel = client.get_channel(local.world.voice_channel_id)
    assert isinstance(channel, discord.VoiceChannel)
    vc = await asyncio.wait_for(channel.connect(cls=BothModesVoiceClient), 20)
    return client, vc


async def test_listener_keeps_receiving_while_clients_misbehave() -> None:
    async with LocalDiscord(modes=(MODE,)) as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await _join(local, "listener")
        try:
            await wait_dave_ready(vc)
            assert client.user is not None
            call = local.calls[local.world.voice_channel_id]
            epoch = vc._connection.dave_session.epoch
            listener = Listener(vc, {alice.ssrc: alice.user_id})
            speaking = alice.speak(Schedule.from_clips([("alice", 0.0), ("bob", 3.2)]))
            await asyncio.sleep(0.5)
            sent_before = len(alice.sent)
            assert sent_before > 0

            async with http_session(local) as http:
                raw = await join_raw(local, http, call, "misbehaver")
                try:
                    voice_codes = await asyncio.gather(*(case(local, http, call) for case, _ in VOICE_CASES))
                    # (the exact code of each case is asserted case by case above; here, only that each
                    # misbehaving connection was closed while the listener carried on)
                    assert all(code is not None for code in voice_codes)
                    gateway_codes = await asyncio.gather(
                        main_gateway_close_code(http, "not json"),
                        main_gateway_close_code(http, json.dumps({"op": G_VOICE_STATE, "d": {}})),
                        main_gateway_close_code(http, _identify("bogus")),
                    )
                    assert list(gateway_codes) == [4002, 4003, 4004]
                    expected = await misbehave_over_udp(local, raw, victim_ssrc=alice.ssrc)
                    # all of that happened while alice was speaking
                    assert sent_before < len(alice.sent) and not speaking.done()

                    await speaking
                    await listener.settle()
                finally:
                    await raw.close()

            sent = [s.opus for s in alice.sent]
            assert len(sent) > 250
            assert listener.opus_of(alice.user_id) == sent
            assert not listener.failures and listener.held == 0
            assert set(listener.frames) == {alice.user_id}
            assert call.relay.stats.dropped == expected
            assert {sender for sender, _ in call.relay.sent} == {alice.user_id}
            # the listener was never disturbed: same voice connection, same DAVE epoch
            assert vc.is_connected() and vc._connection.dave_session.epoch == epoch
        finally:
            await close_client(client)
