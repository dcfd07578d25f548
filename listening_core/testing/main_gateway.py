"""The main gateway of the loopback Discord (``wss://gateway.discord.gg``, API v10).

Speaks the compression the client asks for (``zlib-stream`` or ``zstd-stream``), sends HELLO,
READY and GUILD_CREATE, answers heartbeats, and turns op 4 voice state updates into
VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE dispatches. Messages posted in the guild reach every
connected bot as MESSAGE_CREATE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import zlib
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import WSMsgType, web

from .world import Account, Message

if TYPE_CHECKING:
    from .server import LocalDiscord

_log = logging.getLogger(__name__)

__all__ = ["MainGateway"]

# Main gateway opcodes and close codes (Discord's numbering).
DISPATCH, HEARTBEAT, IDENTIFY, PRESENCE, VOICE_STATE, RESUME, RECONNECT, REQUEST_MEMBERS = (
    0,
    1,
    2,
    3,
    4,
    6,
    7,
    8,
)
INVALID_SESSION, HELLO, HEARTBEAT_ACK = 9, 10, 11
CLOSE_UNKNOWN_OPCODE, CLOSE_DECODE_ERROR, CLOSE_NOT_AUTHENTICATED = 4001, 4002, 4003
CLOSE_AUTHENTICATION_FAILED, CLOSE_ALREADY_AUTHENTICATED = 4004, 4005

HEARTBEAT_INTERVAL_MS = 41250


class _Compressor(Protocol):
    def __call__(self, data: bytes) -> bytes: ...


def _compressor(kind: str | None) -> _Compressor | None:
    """One stream context for the whole connection, flushed after each message, as Discord does."""
    if kind == "zlib-stream":
        zctx = zlib.compressobj()
        return lambda data: zctx.compress(data) + zctx.flush(zlib.Z_SYNC_FLUSH)
    if kind == "zstd-stream":
        import zstandard

        cobj = zstandard.ZstdCompressor().compressobj()
        return lambda data: cobj.compress(data) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    return None


class GatewayConnection:
    """One client's main gateway websocket."""

    def __init__(self, gateway: MainGateway, ws: web.WebSocketResponse, compress: str | None) -> None:
        self._gateway = gateway
        self.ws = ws
        self._compress = _compressor(compress)
        self._seq = 0
        self._lock = asyncio.Lock()
        self.account: Account | None = None
        self.session_id: str = secrets.token_hex(16)

    async def send(self, op: int, d: Any, t: str | None = None) -> None:
        """Send one gateway payload (op ``op``, data ``d``; a dispatch numbered and named ``t``),
        compressed if the client asked for it; nothing once the websocket is closed."""
        if self.ws.closed:
            return
        payload: dict[str, Any] = {"op": op, "d": d}
        async with self._lock:
            if op == DISPATCH:
                self._seq += 1
                payload["s"], payload["t"] = self._seq, t
            else:
                payload["s"], payload["t"] = None, None
            raw = json.dumps(payload).encode()
            with contextlib.suppress(ConnectionError, RuntimeError):
                if self._compress is None:
                    await self.ws.send_str(raw.decode())
                else:
                    await self.ws.send_bytes(self._compress(raw))

    async def dispatch(self, event: str, data: Any) -> None:
        """Send the dispatch event ``event`` (op 0) with ``data``."""
        await self.send(DISPATCH, data, event)

    async def close(self, code: int, reason: str) -> None:
        """Close the websocket with ``code`` and ``reason``, as Discord ends a gateway session."""
        _log.info("loopback gateway: closing a connection with %d (%s)", code, reason)
        await self.ws.close(code=code, message=reason.encode())


class MainGateway:
    """All main gateway connections of one loopback Discord."""

    def __init__(self, discord: LocalDiscord) -> None:
        self._discord = discord
        self._world = discord.world
        self.connections: list[GatewayConnection] = []
        self._sessions: dict[str, Account] = {}

    def connection_of(self, user_id: int) -> GatewayConnection | None:
        """``user_id``'s identified main gateway connection, or None (not connected, or a virtual member)."""
        for conn in self.connections:
            if conn.account is not None and conn.account.user.id == user_id:
                return conn
        return None

    async def broadcast(self, event: str, data: Any) -> None:
        """Dispatch ``event`` to every identified connection."""
        for conn in list(self.connections):
            if conn.account is not None:
                await conn.dispatch(event, data)

    async def dispatch_message(self, message: Message) -> None:
        """Dispatch MESSAGE_CREATE for ``message`` (with its author's member object) to every identified
        connection."""
        await self.broadcast("MESSAGE_CREATE", message.payload(self._world.member_payload(message.author.id)))

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """Serve a ``wss://gateway.discord.gg`` websocket: send HELLO (compressed as ``?compress=`` asks),
        then handle the client's ops until it closes (4002 on undecodable JSON); answers the websocket."""
        ws = web.WebSocketResponse(max_msg_size=0, heartbeat=None)
        await ws.prepare(request)
        conn = GatewayConnection(self, ws, request.query.get("compress"))
        self.connections.append(conn)
        try:
            await conn.send(HELLO, {"heartbeat_interval": HEARTBEAT_INTERVAL_MS})
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT and msg.type is not WSMsgType.BINARY:
                    break
                try:
                    payload = json.loads(msg.data)
                    op, d = payload["op"], payload.get("d")
                except (ValueError, KeyError, TypeError):
                    await conn.close(CLOSE_DECODE_ERROR, "Decode error")
                    break
                try:
                    await self._on_message(conn, op, d)
                except Exception:  # a bug or bad input in one request must not end the connection
                    _log.exception("loopback gateway: error handling op %r", op)
                if ws.closed:
                    break
        finally:
            self.connections.remove(conn)
        return ws

    async def _on_message(self, conn: GatewayConnection, op: Any, d: Any) -> None:
        if op == HEARTBEAT:
            await conn.send(HEARTBEAT_ACK, None)
            return
        if op == IDENTIFY:
            if conn.account is not None:
                await conn.close(CLOSE_ALREADY_AUTHENTICATED, "Already authenticated")
                return
            account = self._world.accounts.get(str((d or {}).get("token", "")).removeprefix("Bot "))
            if account is None:
                await conn.close(CLOSE_AUTHENTICATION_FAILED, "Authentication failed")
                return
            conn.account = account
            await self._ready(conn)
            return
        if op == RESUME:
            await self._resume(conn, d)
            return
        if conn.account is None:
            await conn.close(CLOSE_NOT_AUTHENTICATED, "Not authenticated")
            return
        if op == VOICE_STATE:
            await self._discord.voice_state_update(conn.account.user, d)
        elif op == REQUEST_MEMBERS:
            members = [self._world.member_payload(uid) for uid in self._world.members]
            await conn.dispatch(
                "GUILD_MEMBERS_CHUNK",
                {
                    "guild_id": str(self._world.guild_id),
                    "members": members,
                    "chunk_index": 0,
                    "chunk_count": 1,
                    "nonce": (d or {}).get("nonce"),
                },
            )
        elif op == PRESENCE:
            pass
        else:
            await conn.close(CLOSE_UNKNOWN_OPCODE, "Unknown opcode")

    async def _resume(self, conn: GatewayConnection, d: Any) -> None:
        """Resume a session this gateway issued (events missed meanwhile are not replayed)."""
        session_id = str((d or {}).get("session_id", ""))
        account = self._sessions.get(session_id)
        token = str((d or {}).get("token", "")).removeprefix("Bot ")
        if account is None or account.token != token:
            await conn.send(INVALID_SESSION, False)
            return
        conn.account, conn.session_id = account, session_id
        await conn.dispatch("RESUMED", {})

    async def _ready(self, conn: GatewayConnection) -> None:
        assert conn.account is not None
        user = conn.account.user
        self._sessions[conn.session_id] = conn.account
        await conn.dispatch(
            "READY",
            {
                "v": 10,
                "user": {**user.payload(), "verified": True, "mfa_enabled": False, "email": None},
                "guilds": [{"id": str(self._world.guild_id), "unavailable": True}],
                "session_id": conn.session_id,
                "resume_gateway_url": f"wss://{self._discord.GATEWAY_HOST}",
                "application": {"id": str(user.id), "flags": 0},
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "user_settings": {},
                "geo_ordered_rtc_regions": ["loopback"],
                "_trace": ["listening-core loopback"],
            },
        )
        await conn.dispatch("GUILD_CREATE", self._world.guild_payload())
