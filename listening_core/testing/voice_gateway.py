"""The voice gateway of the loopback Discord (``wss://{endpoint}/?v=8``).

One :class:`VoiceSession` per real client: Hello, Identify, Ready, Select Protocol, Session
Description, Speaking, heartbeats with ``seq_ack``, resume with replay, and the DAVE opcodes,
which it hands to its :class:`~listening_core.testing.call.VoiceCall`. Misbehaving clients get
the close codes Discord uses; the others are not disturbed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import struct
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from ..crypto import TransportCipher, transport_cipher

if TYPE_CHECKING:
    from .call import VoiceCall
    from .dave_group import Outgoing
    from .server import LocalDiscord

_log = logging.getLogger(__name__)

__all__ = ["VoiceGateway", "VoiceSession"]

# Voice opcodes (Discord's numbering).
IDENTIFY, SELECT_PROTOCOL, READY, HEARTBEAT, SESSION_DESCRIPTION, SPEAKING = 0, 1, 2, 3, 4, 5
HEARTBEAT_ACK, RESUME, HELLO, RESUMED = 6, 7, 8, 9
CLIENTS_CONNECT, CLIENT_CONNECT, CLIENT_DISCONNECT = 11, 12, 13
DAVE_PREPARE_TRANSITION, DAVE_EXECUTE_TRANSITION, DAVE_TRANSITION_READY, DAVE_PREPARE_EPOCH = 21, 22, 23, 24
MLS_EXTERNAL_SENDER, MLS_KEY_PACKAGE, MLS_PROPOSALS, MLS_COMMIT_WELCOME = 25, 26, 27, 28
MLS_ANNOUNCE_COMMIT_TRANSITION, MLS_WELCOME, MLS_INVALID_COMMIT_WELCOME = 29, 30, 31

# Voice close codes.
CLOSE_UNKNOWN_OPCODE = 4001
CLOSE_DECODE_ERROR = 4002
CLOSE_NOT_AUTHENTICATED = 4003
CLOSE_AUTHENTICATION_FAILED = 4004
CLOSE_ALREADY_AUTHENTICATED = 4005
CLOSE_SESSION_INVALID = 4006
CLOSE_SESSION_TIMEOUT = 4009
CLOSE_UNKNOWN_PROTOCOL = 4012
CLOSE_DISCONNECTED = 4014
CLOSE_SERVER_CRASHED = 4015
CLOSE_UNKNOWN_ENCRYPTION_MODE = 4016
CLOSE_DAVE_REQUIRED = 4017
CLOSE_BAD_REQUEST = 4020

HEARTBEAT_INTERVAL_MS = 13750
#: How many sequenced messages are kept for replay on resume.
REPLAY_BUFFER = 256
#: Ops a client may send before it has identified.
_PRE_IDENTIFY = {IDENTIFY, RESUME, HEARTBEAT}


class VoiceSession:
    """One real client's voice connection: its websocket, SSRC, transport key and UDP address."""

    def __init__(self, call: VoiceCall, user_id: int, session_id: str, ssrc: int) -> None:
        self.call = call
        self.user_id = user_id
        self.session_id = session_id
        self.ssrc = ssrc
        self.ws: web.WebSocketResponse | None = None
        self.mode: str | None = None
        self.secret_key: bytes | None = None
        self.cipher: TransportCipher | None = None
        self.udp_addr: tuple[str, int] | None = None
        self.video_ssrc = 0
        self.speaking = 0
        self.max_dave_version = 0
        self.joined = False  # op 4 sent: part of the call's media and DAVE group
        self._seq = 0
        self._replay: collections.deque[tuple[int, str | bytes]] = collections.deque(maxlen=REPLAY_BUFFER)
        self._counter = secrets.randbits(32)
        self._send_lock = asyncio.Lock()
        self._dave_outbox: collections.deque[tuple[float, Outgoing]] = collections.deque()
        self._dave_pump: asyncio.Future[None] | None = None

    # -- what the call and relay use ---------------------------------------------------------

    @property
    def is_virtual(self) -> bool:
        """Always False: a real client's session."""
        return False

    def next_counter(self) -> int:
        """The next transport nonce counter for packets sealed to this client."""
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        return self._counter

    async def send_json(self, op: int, d: Any, *, sequenced: bool = True) -> None:
        """Send a JSON frame; sequenced frames carry ``seq`` and are kept for replay on resume."""
        payload: dict[str, Any] = {"op": op, "d": d}
        async with self._send_lock:
            if sequenced:
                self._seq += 1
                payload["seq"] = self._seq
            raw = json.dumps(payload)
            if sequenced:
                self._replay.append((self._seq, raw))
            await self._send(raw)

    async def send_binary(self, op: int, payload: bytes) -> None:
        """Send a binary DAVE frame: ``u16 seq ‖ u8 opcode ‖ payload``."""
        async with self._send_lock:
            self._seq += 1
            raw = struct.pack(">HB", self._seq & 0xFFFF, op) + payload
            self._replay.append((self._seq, raw))
            await self._send(raw)

    async def _send(self, raw: str | bytes) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            if isinstance(raw, str):
                await ws.send_str(raw)
            else:
                await ws.send_bytes(raw)

    async def deliver_dave(self, out: Outgoing) -> list[Outgoing]:
        """Send one DAVE message from the call's group; replies arrive later on the websocket.

        With the loopback's ``dave_delay`` the message leaves that much later (in order), as when
        the gateway is slower than media: frames under a new key reach the client before the key.
        """
        delay = self.call.discord.dave_delay
        if delay <= 0 and not self._dave_outbox:
            await self._send_dave(out)
            return []
        self._dave_outbox.append((asyncio.get_running_loop().time() + delay, out))
        if self._dave_pump is None or self._dave_pump.done():
            self._dave_pump = asyncio.ensure_future(self._pump_dave())
        return []

    async def _send_dave(self, out: Outgoing) -> None:
        if out.binary is not None:
            await self.send_binary(out.opcode, out.binary)
        else:
            await self.send_json(out.opcode, out.json)

    async def _pump_dave(self) -> None:
        loop = asyncio.get_running_loop()
        while self._dave_outbox:
            due, out = self._dave_outbox[0]
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            self._dave_outbox.popleft()
            await self._send_dave(out)

    async def close(self, code: int, reason: str) -> None:
        """Close the client's voice websocket with ``code`` and ``reason`` (through
        :meth:`VoiceGateway.close`); nothing if it is not open."""
        ws = self.ws
        if ws is not None and not ws.closed:
            _log.info("loopback voice: closing user %d's websocket with %d (%s)", self.user_id, code, reason)
            await self.call.discord.voice.close(ws, code, reason.encode())

    async def replay_after(self, seq_ack: int) -> None:
        """Resend, in order, the kept sequenced messages whose ``seq`` is above ``seq_ack`` (on resume)."""
        async with self._send_lock:
            for seq, raw in list(self._replay):
                if seq > seq_ack:
                    await self._send(raw)


class VoiceGateway:
    """Voice websocket handling for one loopback Discord (all endpoints)."""

    def __init__(self, discord: LocalDiscord) -> None:
        self._discord = discord
        #: id(ws) -> (its handler task, close request): how other tasks have a handler close its ws
        self._closers: dict[int, tuple[asyncio.Task[Any] | None, asyncio.Future[tuple[int, bytes]]]] = {}

    async def close(self, ws: web.WebSocketResponse, code: int, message: bytes) -> None:
        """Close ``ws`` from any task with a full close handshake (done by its handler).

        Calling ``ws.close()`` while the handler waits in ``receive()`` makes aiohttp drop the TCP
        connection right after the close frame, so a client writing at that moment gets a
        connection error instead of ``code``. So another task only asks; the handler closes.
        """
        handler, close_request = self._closers.get(id(ws), (None, None))
        if close_request is None or handler is asyncio.current_task():  # no reader waiting
            await ws.close(code=code, message=message)
        elif not close_request.done():
            close_request.set_result((code, message))

    async def handle(self, request: web.Request, call: VoiceCall) -> web.WebSocketResponse:
        """Serve a voice websocket of ``call`` (``wss://{endpoint}/?v=8``, else closed with 4020): send
        Hello, then handle the client's messages until either side closes; a session whose websocket
        ends is reported to the call (it may resume). Answers the websocket."""
        ws = web.WebSocketResponse(max_msg_size=0, heartbeat=None)
        await ws.prepare(request)
        if request.query.get("v") != "8":
            await ws.close(code=CLOSE_BAD_REQUEST, message=b"voice gateway v8 only")
            return ws
        await ws.send_str(
            json.dumps({"op": HELLO, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS, "v": 8}})
        )
        session: VoiceSession | None = None
        close_request: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._closers[id(ws)] = (asyncio.current_task(), close_request)
        try:
            while True:
                receive = asyncio.ensure_future(ws.receive())
                waiting: set[asyncio.Future[Any]] = {receive, close_request}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if close_request.done():
                    receive.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await receive
                    code, message = close_request.result()
                    await ws.close(code=code, message=message)
                    break
                msg = receive.result()
                if msg.type is WSMsgType.TEXT:
                    try:
                        payload = json.loads(msg.data)
                        op, d = int(payload["op"]), payload.get("d")
                    except (ValueError, KeyError, TypeError):
                        await ws.close(code=CLOSE_DECODE_ERROR, message=b"Failed to decode payload")
                        break
                    if session is None and op not in _PRE_IDENTIFY:
                        await ws.close(code=CLOSE_NOT_AUTHENTICATED, message=b"Not authenticated")
                        break
                    try:
                        session = await self._on_json(ws, call, session, op, d)
                    except (KeyError, TypeError, ValueError, AttributeError):
                        # valid JSON and a known opcode, but a payload that does not decode
                        await ws.close(code=CLOSE_DECODE_ERROR, message=b"Failed to decode payload")
                        break
                elif msg.type is WSMsgType.BINARY:
                    if session is None or not session.joined:
                        await ws.close(code=CLOSE_NOT_AUTHENTICATED, message=b"Not authenticated")
                        break
                    await self._on_binary(session, bytes(msg.data))
                else:
                    break
                if ws.closed:
                    break
        finally:
            self._closers.pop(id(ws), None)
            if session is not None and session.ws is ws:
                session.ws = None
                close_code = close_request.result()[0] if close_request.done() else ws.close_code
                await call.connection_lost(session, close_code)
        return ws

    async def _on_json(
        self, ws: web.WebSocketResponse, call: VoiceCall, session: VoiceSession | None, op: int, d: Any
    ) -> VoiceSession | None:
        if op == HEARTBEAT:
            nonce = d.get("t") if isinstance(d, dict) else d
            await ws.send_str(json.dumps({"op": HEARTBEAT_ACK, "d": {"t": nonce}}))
            return session
        if op == IDENTIFY:
            if session is not None:
                await ws.close(code=CLOSE_ALREADY_AUTHENTICATED, message=b"Already authenticated")
                return session
            return await self._identify(ws, call, d)
        if op == RESUME:
            if session is not None:
                await ws.close(code=CLOSE_ALREADY_AUTHENTICATED, message=b"Already authenticated")
                return session
            return await self._resume(ws, call, d)
        assert session is not None
        if op == SELECT_PROTOCOL:
            await self._select_protocol(session, d)
        elif op == SPEAKING:
            await call.speaking(session, int((d or {}).get("speaking", 0)), (d or {}).get("ssrc"))
        elif op == CLIENT_CONNECT:
            session.video_ssrc = int((d or {}).get("video_ssrc") or 0)
        elif op == DAVE_TRANSITION_READY:
            await call.route(call.dave.transition_ready(session.user_id, int(d["transition_id"])))
        elif op == MLS_INVALID_COMMIT_WELCOME:
            await call.route(call.dave.invalid_commit_welcome(session.user_id, int(d["transition_id"])))
        else:
            await session.close(CLOSE_UNKNOWN_OPCODE, f"Unknown opcode {op}")
        return session

    async def _identify(self, ws: web.WebSocketResponse, call: VoiceCall, d: Any) -> VoiceSession | None:
        try:
            user_id = int(d["user_id"])
            server_id = int(d["server_id"])
            session_id = str(d["session_id"])
            token = str(d["token"])
            max_dave = int(d.get("max_dave_protocol_version") or 0)
        except (KeyError, TypeError, ValueError):
            await ws.close(code=CLOSE_DECODE_ERROR, message=b"Failed to decode payload")
            return None
        if not call.check_token(user_id, server_id, session_id, token):
            await ws.close(code=CLOSE_AUTHENTICATION_FAILED, message=b"Authentication failed")
            return None
        if call.dave_required and max_dave < 1:
            await ws.close(code=CLOSE_DAVE_REQUIRED, message=b"E2EE/DAVE protocol required")
            return None
        session = call.new_session(user_id, session_id)
        session.max_dave_version = max_dave
        session.ws = ws
        await session.send_json(
            READY,
            {
                "ssrc": session.ssrc,
                "ip": call.udp_host,
                "port": call.udp_port,
                "modes": list(call.modes),
                "heartbeat_interval": 1,
                "experiments": [],
                "streams": [],
            },
        )
        return session

    async def _resume(self, ws: web.WebSocketResponse, call: VoiceCall, d: Any) -> VoiceSession | None:
        try:
            user_id = int(call.user_of_session(str(d["session_id"])) or 0)
            session = call.sessions.get(user_id)
            seq_ack = int(d.get("seq_ack", -1))
            valid = session is not None and call.check_token(
                user_id, int(d["server_id"]), str(d["session_id"]), str(d["token"])
            )
        except (KeyError, TypeError, ValueError):
            await ws.close(code=CLOSE_DECODE_ERROR, message=b"Failed to decode payload")
            return None
        if not valid or session is None:
            await ws.close(code=CLOSE_SESSION_INVALID, message=b"Session is no longer valid")
            return None
        old = session.ws
        session.ws = ws
        if old is not None and not old.closed:
            await self.close(old, CLOSE_SESSION_INVALID, b"Resumed elsewhere")
        await ws.send_str(json.dumps({"op": RESUMED, "d": None}))
        await session.replay_after(seq_ack)
        call.resumed(session)
        return session

    async def _select_protocol(self, session: VoiceSession, d: Any) -> None:
        call = session.call
        try:
            if d["protocol"] != "udp":
                await session.close(CLOSE_UNKNOWN_PROTOCOL, "Unknown protocol")
                return
            data = d["data"]
            mode = str(data["mode"])
        except (KeyError, TypeError):
            await session.close(CLOSE_DECODE_ERROR, "Failed to decode payload")
            return
        if mode not in call.modes:
            await session.close(CLOSE_UNKNOWN_ENCRYPTION_MODE, f"Unknown encryption mode {mode}")
            return
        if session.udp_addr is None:
            # IP discovery did not reach us (or the client skipped it): trust what it says.
            with contextlib.suppress(KeyError, TypeError, ValueError):
                session.udp_addr = (str(data["address"]), int(data["port"]))
        key = secrets.token_bytes(32)
        session.mode, session.secret_key = mode, key
        session.cipher = transport_cipher(mode, key)
        dave_version = call.dave_version if session.max_dave_version >= 1 else 0
        await session.send_json(
            SESSION_DESCRIPTION,
            {
                "mode": mode,
                "secret_key": list(key),
                "dave_protocol_version": dave_version,
                "audio_codec": "opus",
                "video_codec": None,
                "media_session_id": secrets.token_hex(16),
            },
        )
        await call.join(session)

    async def _on_binary(self, session: VoiceSession, data: bytes) -> None:
        call = session.call
        if not data:
            await session.close(CLOSE_DECODE_ERROR, "Empty binary frame")
            return
        op, payload = data[0], data[1:]
        try:
            if op == MLS_KEY_PACKAGE:
                await call.route(call.dave.key_package(session.user_id, payload))
            elif op == MLS_COMMIT_WELCOME:
                await call.route(call.dave.commit_welcome(session.user_id, payload))
            else:
                await session.close(CLOSE_UNKNOWN_OPCODE, f"Unknown binary opcode {op}")
        except ValueError as exc:
            # Discord answers a bad MLS message by not accepting it; the group stays as it was.
            _log.warning(
                "loopback voice: user %d sent a bad MLS message (op %d): %s", session.user_id, op, exc
            )
            call.stats.bad_mls_messages += 1
