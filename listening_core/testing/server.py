"""``LocalDiscord``: a stand-in for Discord on 127.0.0.1 that unmodified discord.py clients use.

One HTTPS/WSS port serves the REST API (``discord.com``), the main gateway
(``gateway.discord.gg``), attachments (``cdn.discordapp.com``) and every voice gateway
(``*.loopback.discord.media``), told apart by the ``Host`` header; each voice call has its own UDP
relay socket. A client is pointed here with :meth:`LocalDiscord.connector`: an aiohttp connector
whose resolver maps those names to the loopback port (and refuses every other name) and whose
TLS context trusts only this instance's throwaway CA. discord.py itself is not modified.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from ..crypto import SUPPORTED_MODES
from .call import VoiceCall
from .faults import FaultConfig
from .main_gateway import MainGateway
from .members import VirtualMember
from .remote import LoopbackAddress
from .rest import ApiError, RestApi, json_response
from .tls import TestCertificateAuthority
from .voice_gateway import VoiceGateway
from .world import Account, Message, User, World

_log = logging.getLogger(__name__)

__all__ = ["LocalDiscord", "LoopbackResolver"]


class LoopbackResolver(AbstractResolver):
    """Resolves the loopback's host names to its port on 127.0.0.1 and refuses everything else.

    A client wired to the loopback therefore cannot reach the real Discord by accident.
    """

    def __init__(self, hosts: Callable[[str], bool], port: int) -> None:
        self._is_ours = hosts
        self._port = port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if not self._is_ours(host):
            raise OSError(f"the loopback Discord does not serve {host!r}; refusing to resolve it")
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=self._port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


class LocalDiscord:
    """A loopback Discord: REST, main gateway, voice gateways with DAVE, UDP relays, virtual members.

    Use it as ``async with LocalDiscord() as discord_:``. Options:

    ``modes``
        the transport encryption modes offered in voice Ready, in order of preference.
    ``dave``
        DAVE protocol version offered (1) or 0 for transport encryption only.
    ``dave_required``
        close clients that do not support DAVE with 4017, as Discord does since 2026-03-01.
    ``faults``
        a :class:`~listening_core.testing.faults.FaultConfig` applied to every relayed stream.
    ``seed``
        seeds SSRCs and everything else random that tests may want to reproduce.
    ``dave_delay``
        seconds by which DAVE messages to real clients lag (media does not): frames under a new
        key then reach a client before the key does, as happens on Discord after joins and
        epoch changes.
    ``transition_timeout``
        seconds the voice gateway waits for every op 23 of a DAVE transition before it executes it
        anyway (op 22), as Discord does; None waits for ever.
    """

    API_HOST = "discord.com"
    GATEWAY_HOST = "gateway.discord.gg"
    CDN_HOST = "cdn.discordapp.com"
    VOICE_DOMAIN = "loopback.discord.media"

    def __init__(
        self,
        *,
        modes: tuple[str, ...] = SUPPORTED_MODES,
        dave: int = 1,
        dave_required: bool = True,
        faults: FaultConfig | None = None,
        seed: int = 0,
        guild_name: str = "Loopback Guild",
        record: bool = True,
        dave_delay: float = 0.0,
        transition_timeout: float | None = 3.0,
    ) -> None:
        unknown = [m for m in modes if m not in SUPPORTED_MODES]
        if unknown or not modes:
            raise ValueError(f"modes must be a non-empty subset of {SUPPORTED_MODES}, got {modes!r}")
        self.modes: tuple[str, ...] = tuple(modes)
        self.dave_version = dave
        self.dave_required: bool = dave_required and dave > 0
        self.faults: FaultConfig = faults or FaultConfig(seed=seed)
        self.seed = seed
        self.record = record
        self.dave_delay = dave_delay
        if transition_timeout is not None and not transition_timeout > 0:
            raise ValueError(f"transition_timeout must be > 0 seconds or None, got {transition_timeout!r}")
        self.transition_timeout = transition_timeout
        self.rng: random.Random = random.Random(seed)
        self.world: World = World(guild_name=guild_name)
        self.gateway: MainGateway = MainGateway(self)
        self.rest: RestApi = RestApi(self)
        self.voice: VoiceGateway = VoiceGateway(self)
        self.calls: dict[int, VoiceCall] = {}
        self._calls_by_host: dict[str, VoiceCall] = {}
        self._endpoint_counter = 0
        self._ca = TestCertificateAuthority(
            [self.API_HOST, self.GATEWAY_HOST, self.CDN_HOST, f"*.{self.VOICE_DOMAIN}"]
        )
        self._client_ssl = self._ca.client_context()
        self._runner: web.AppRunner | None = None
        self.port: int = 0
        self._members: dict[int, VirtualMember] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> LocalDiscord:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start listening on 127.0.0.1 (an ephemeral port)."""
        app = web.Application(middlewares=[self._by_host], client_max_size=64 * 1024 * 1024)
        app.add_routes(self.rest.routes())
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ca.server_context())
        await site.start()
        server = site._server
        assert server is not None and isinstance(server, asyncio.base_events.Server)
        self.port = int(server.sockets[0].getsockname()[1])
        _log.info("loopback Discord listening on 127.0.0.1:%d", self.port)

    async def close(self) -> None:
        """Stop every virtual member, call and connection."""
        for member in list(self._members.values()):
            await member.stop()
        for task in list(self._tasks):
            task.cancel()
        for call in list(self.calls.values()):
            await call.close()
        for conn in list(self.gateway.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"loopback Discord closing")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background for as long as this loopback lives."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- wiring clients ----------------------------------------------------------------------

    def is_our_host(self, host: str) -> bool:
        """Whether the loopback serves ``host``: the REST, gateway and CDN hosts and every voice server
        (``*.loopback.discord.media``); case and a trailing dot are ignored."""
        host = host.lower().rstrip(".")
        return host in (self.API_HOST, self.GATEWAY_HOST, self.CDN_HOST) or host.endswith(
            "." + self.VOICE_DOMAIN
        )

    def connector(self) -> aiohttp.TCPConnector:
        """An aiohttp connector that leads a client here: pass it as ``discord.Client(connector=...)``.

        Must be called with an event loop running (aiohttp's rule for connectors).
        """
        if not self.port:
            raise RuntimeError(
                "start the LocalDiscord (async with LocalDiscord() as d:) before wiring clients"
            )
        return aiohttp.TCPConnector(
            resolver=LoopbackResolver(self.is_our_host, self.port),
            ssl=self._client_ssl,
            limit=0,
            use_dns_cache=False,
        )

    @property
    def ca_pem(self) -> bytes:
        """The throwaway CA certificate clients must trust (already in :meth:`connector`)."""
        return self._ca.ca_pem

    def address(self, account: Account) -> LoopbackAddress:
        """What a bot in another process needs to log in here as ``account``: save it with
        :meth:`LoopbackAddress.save <listening_core.testing.remote.LoopbackAddress.save>` and
        hand the file to the bot (``examples/record_bot.py --local FILE``)."""
        if not self.port:
            raise RuntimeError("start the LocalDiscord before asking for its address")
        return LoopbackAddress(
            port=self.port,
            ca_pem=self.ca_pem.decode("ascii"),
            token=account.token,
            bot_name=account.user.name,
        )

    def add_bot(self, name: str = "bot") -> Account:
        """A bot account in the guild; give its ``token`` to ``discord.Client.start``."""
        return self.world.add_account(name)

    def add_user(self, name: str) -> User:
        """A human guild member (no client): it can post messages and be voiced by a virtual member."""
        user = self.world.add_user(name)
        self.world.add_member(user)
        return user

    def add_member(self, name: str, **options: Any) -> VirtualMember:
        """A virtual member (a guild member the loopback voices); ``await member.join()`` to enter voice.

        ``options`` go to :class:`~listening_core.testing.members.VirtualMember`; e.g.
        ``dave="libdave"`` has it run Discord's own DAVE library instead of davey.
        """
        user = self.add_user(name)
        options.setdefault("rng", random.Random(self.rng.getrandbits(64)))
        member = VirtualMember(self, user, **options)
        self._members[user.id] = member
        return member

    # -- messages ----------------------------------------------------------------------------

    async def post_message(self, author: User, content: str) -> Message:
        """``author`` writes ``content`` in the text channel; every bot gets MESSAGE_CREATE."""
        message = self.world.add_message(author, content)
        await self.gateway.dispatch_message(message)
        return message

    def messages(self) -> list[Message]:
        """Every message in the text channel, oldest first."""
        return [m for m in self.world.messages.values() if m.channel_id == self.world.text_channel_id]

    # -- voice -------------------------------------------------------------------------------

    async def call_for(self, channel_id: int) -> VoiceCall:
        """The call of a voice channel, started on a fresh voice server if there is none."""
        call = self.calls.get(channel_id)
        if call is None:
            call = await self._new_call(channel_id)
        return call

    async def _new_call(self, channel_id: int) -> VoiceCall:
        self._endpoint_counter += 1
        endpoint = f"c-{self._endpoint_counter}.{self.VOICE_DOMAIN}"
        call = VoiceCall(
            self,
            channel_id,
            endpoint,
            modes=self.modes,
            dave_version=self.dave_version,
            dave_required=self.dave_required,
            faults=self.faults,
            rng=self.rng,
            record=self.record,
        )
        await call.start()
        self.calls[channel_id] = call
        self._calls_by_host[endpoint] = call
        return call

    async def voice_state_update(self, user: User, d: Any) -> None:
        """Op 4 from ``user``'s gateway (or a virtual member): join, move or leave voice."""
        raw_channel = (d or {}).get("channel_id")
        channel_id = None if raw_channel is None else int(raw_channel)
        if channel_id is not None and channel_id not in self.world.voice_channel_ids:
            _log.warning(
                "loopback Discord: user %d asked to join %s, not a voice channel", user.id, raw_channel
            )
            return
        previous = self.world.voice_states.get(user.id)
        if previous is not None and previous[0] != channel_id:
            old_call = self.calls.get(previous[0])
            if old_call is not None:
                await old_call.leave(user.id)
        if channel_id is None:
            self.world.voice_states.pop(user.id, None)
            await self.gateway.broadcast("VOICE_STATE_UPDATE", self.world.voice_state_payload(user.id))
            return
        conn = self.gateway.connection_of(user.id)
        session_id = conn.session_id if conn is not None else secrets.token_hex(16)
        self.world.voice_states[user.id] = (channel_id, session_id)
        call = await self.call_for(channel_id)
        token = call.authorise(user.id, session_id)
        await self.gateway.broadcast("VOICE_STATE_UPDATE", self.world.voice_state_payload(user.id))
        if conn is not None:
            await conn.dispatch(
                "VOICE_SERVER_UPDATE",
                {"token": token, "guild_id": str(self.world.guild_id), "endpoint": call.endpoint},
            )

    async def change_voice_server(self, channel_id: int | None = None) -> VoiceCall:
        """Move a channel's call to a new voice server: new endpoint, keys and SSRCs (a fault).

        Every real client gets VOICE_SERVER_UPDATE with the new endpoint and token, as when Discord
        migrates a call; virtual members move over and rejoin the new server's DAVE group. The old
        server is shut down a moment later.
        """
        channel_id = channel_id or self.world.voice_channel_id
        old = self.calls.get(channel_id)
        if old is None:
            raise ValueError(f"channel {channel_id} has no call to move")
        old.closed = True
        new = await self._new_call(channel_id)
        for user_id in list(old.sessions):
            state = self.world.voice_states.get(user_id)
            conn = self.gateway.connection_of(user_id)
            if state is None or conn is None:
                continue
            token = new.authorise(user_id, state[1])
            await conn.dispatch(
                "VOICE_SERVER_UPDATE",
                {"token": token, "guild_id": str(self.world.guild_id), "endpoint": new.endpoint},
            )
        for member in list(old.virtual.values()):
            if isinstance(member, VirtualMember):
                await member.move_to(new)
        self.spawn(self._close_later(old, 2.0))
        return new

    async def _close_later(self, call: VoiceCall, delay: float) -> None:
        await asyncio.sleep(delay)
        self._calls_by_host.pop(call.endpoint, None)
        await call.close()

    async def interrupt_voice(self, user_id: int, code: int = 4015) -> None:
        """Close a real client's voice websocket with ``code`` (4015: "voice server crashed, resume")."""
        for call in self.calls.values():
            session = call.sessions.get(user_id)
            if session is not None:
                await session.close(
                    code, "Voice server crashed" if code == 4015 else "Interrupted by the test"
                )
                return
        raise ValueError(f"user {user_id} has no voice connection")

    # -- HTTP plumbing -----------------------------------------------------------------------

    @web.middleware
    async def _by_host(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        host = (request.host or "").split(":")[0].lower()
        if host == self.GATEWAY_HOST:
            return await self.gateway.handle(request)
        if host.endswith("." + self.VOICE_DOMAIN):
            call = self._calls_by_host.get(host)
            if call is None or call.closed:
                return json_response({"message": "Unknown voice server", "code": 0}, status=404)
            return await self.voice.handle(request, call)
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            if request.match_info.http_exception is None:
                raise  # a route's own error (Unknown Channel, 10003) already has Discord's shape
            return await self.rest.not_found(request)
