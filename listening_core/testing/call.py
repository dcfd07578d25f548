"""A voice call: the members of one voice channel on one voice server.

Holds the real clients' :class:`~listening_core.testing.voice_gateway.VoiceSession` objects and
the virtual members, the channel's DAVE group (the server as MLS external sender) and the UDP
relay. Joining, leaving and speaking are announced to the others as Discord does (op 11, op 13,
op 5); DAVE messages are routed to real clients over their websocket and to virtual members
in-process.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .dave_group import DaveGroup, Outgoing
from .faults import FaultConfig
from .relay import Endpoint, UdpRelay
from .voice_gateway import CLIENT_DISCONNECT, CLIENTS_CONNECT, SPEAKING, VoiceSession

if TYPE_CHECKING:
    from .server import LocalDiscord

_log = logging.getLogger(__name__)

__all__ = ["CallStats", "Participant", "VoiceCall"]

#: How long a real client whose websocket dropped may take to resume before it is removed.
RESUME_GRACE = 10.0


class Participant(Endpoint, Protocol):
    """What the call needs from a real session or a virtual member."""

    async def deliver_dave(self, out: Outgoing) -> list[Outgoing]:
        """Hand over one DAVE message from the call's group; returns the answers to feed back at once
        (a real client answers later over its websocket, so it returns none)."""

    async def send_json(self, op: int, d: Any, *, sequenced: bool = True) -> None:
        """Send a voice gateway message ``{"op": op, "d": d}``; ``sequenced`` ones carry a ``seq`` kept
        for replay on resume (a virtual member drops them all)."""


@dataclass
class CallStats:
    """Counters of protocol events in one call."""

    joins: int = 0
    leaves: int = 0
    bad_mls_messages: int = 0
    dave_messages: int = 0


class VoiceCall:
    """The members of one voice channel on one voice server (one endpoint, one UDP socket)."""

    def __init__(
        self,
        discord: LocalDiscord,
        channel_id: int,
        endpoint: str,
        *,
        modes: tuple[str, ...],
        dave_version: int,
        dave_required: bool,
        faults: FaultConfig,
        rng: random.Random,
        record: bool = True,
    ) -> None:
        self.discord = discord
        self.channel_id = channel_id
        self.endpoint = endpoint
        self.modes = modes
        self.dave_version = dave_version
        self.dave_required = dave_required
        self.dave: DaveGroup = DaveGroup(channel_id, max(dave_version, 1))
        self.relay: UdpRelay = UdpRelay(self, faults, record=record)
        self.stats: CallStats = CallStats()
        self.sessions: dict[int, VoiceSession] = {}
        self.virtual: dict[int, Participant] = {}
        self._tokens: dict[int, tuple[str, str]] = {}  # user id -> (session id, token)
        self._rng = rng
        self._ssrcs: set[int] = set()
        self._grace: dict[int, asyncio.TimerHandle] = {}
        self.udp_host = "127.0.0.1"
        self.udp_port: int = 0
        self._route_lock = asyncio.Lock()
        self._transition_timers: dict[int, asyncio.TimerHandle] = {}
        self.closed: bool = False

    async def start(self) -> None:
        """Open the call's UDP relay socket on 127.0.0.1 (an ephemeral port, then in ``udp_port``)."""
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self.relay, local_addr=(self.udp_host, 0))
        self.udp_port = self.relay.address[1]

    async def close(self, code: int = 4014, reason: str = "Disconnected") -> None:
        """Shut the call down: cancel the resume grace timers, close every real client's voice websocket
        with ``code`` and ``reason``, and close the relay socket."""
        self.closed = True
        for handle in [*self._grace.values(), *self._transition_timers.values()]:
            handle.cancel()
        for session in list(self.sessions.values()):
            await session.close(code, reason)
        self.relay.close()

    # -- membership --------------------------------------------------------------------------

    def new_ssrc(self) -> int:
        """A random SSRC (1 to 2**32 - 1) not used in this call yet, reserved from now on."""
        while True:
            ssrc = self._rng.randrange(1, 2**32)
            if ssrc not in self._ssrcs:
                self._ssrcs.add(ssrc)
                return ssrc

    def authorise(self, user_id: int, session_id: str) -> str:
        """Record a main-gateway voice join; returns the voice token the client must present."""
        token = secrets.token_hex(8)
        self._tokens[user_id] = (session_id, token)
        return token

    def check_token(self, user_id: int, server_id: int, session_id: str, token: str) -> bool:
        """Whether a voice Identify or Resume names this guild and the session id and token
        :meth:`authorise` recorded for ``user_id``."""
        return server_id == self.discord.world.guild_id and self._tokens.get(user_id) == (session_id, token)

    def user_of_session(self, session_id: str) -> int | None:
        """The user whose voice join :meth:`authorise` recorded with ``session_id``, or None."""
        for user_id, (sid, _) in self._tokens.items():
            if sid == session_id:
                return user_id
        return None

    def new_session(self, user_id: int, session_id: str) -> VoiceSession:
        """A new :class:`VoiceSession` with a fresh SSRC for an identified client; it replaces the user's
        previous session, whose address and SSRC the relay forgets."""
        old = self.sessions.pop(user_id, None)
        if old is not None:
            self.relay.forget(old)
            self._ssrcs.discard(old.ssrc)
        session = VoiceSession(self, user_id, session_id, self.new_ssrc())
        self.sessions[user_id] = session
        return session

    def participants(self) -> list[Participant]:
        """The real sessions, then the virtual members, that have joined (have their transport key)."""
        found: list[Participant] = [s for s in self.sessions.values() if s.joined]
        found.extend(m for m in self.virtual.values() if m.joined)
        return found

    def endpoints(self) -> list[Endpoint]:
        """:meth:`participants`, as the relay sees them: who media is forwarded to."""
        return list(self.participants())

    def endpoint_by_ssrc(self, ssrc: int) -> Endpoint | None:
        """The real session or virtual member whose audio SSRC is ``ssrc`` (joined or not), or None."""
        for session in self.sessions.values():
            if session.ssrc == ssrc:
                return session
        for member in self.virtual.values():
            if member.ssrc == ssrc:
                return member
        return None

    async def join(self, participant: Participant) -> None:
        """``participant`` has its transport key: announce it, and bring it into the DAVE group."""
        if participant.is_virtual:
            self.virtual[participant.user_id] = participant
        participant.joined = True
        self.stats.joins += 1
        grace = self._grace.pop(participant.user_id, None)
        if grace is not None:
            grace.cancel()
        others = [p for p in self.participants() if p is not participant]
        if others:
            await participant.send_json(CLIENTS_CONNECT, {"user_ids": [str(p.user_id) for p in others]})
        for other in others:
            await other.send_json(CLIENTS_CONNECT, {"user_ids": [str(participant.user_id)]})
            speaking = getattr(other, "speaking", 0)
            if speaking:
                await participant.send_json(
                    SPEAKING, {"user_id": str(other.user_id), "ssrc": other.ssrc, "speaking": speaking}
                )
        if self.dave_version > 0 and (participant.is_virtual or self._dave_capable(participant)):
            await self.route(self.dave.join(participant.user_id))

    def _dave_capable(self, participant: Participant) -> bool:
        return isinstance(participant, VoiceSession) and participant.max_dave_version >= 1

    async def leave(self, user_id: int) -> None:
        """``user_id`` left the channel: tell the others and take it out of the DAVE group."""
        grace = self._grace.pop(user_id, None)
        if grace is not None:
            grace.cancel()
        participant: Participant | None = self.sessions.pop(user_id, None) or self.virtual.pop(user_id, None)
        self._tokens.pop(user_id, None)
        if participant is None:
            return
        was_joined = participant.joined
        participant.joined = False
        self.relay.forget(participant)
        self._ssrcs.discard(participant.ssrc)
        if isinstance(participant, VoiceSession):
            await participant.close(4014, "Disconnected")
        if not was_joined:
            return
        self.stats.leaves += 1
        for other in self.participants():
            await other.send_json(CLIENT_DISCONNECT, {"user_id": str(user_id)})
        if self.dave_version > 0:
            await self.route(self.dave.leave(user_id))

    async def connection_lost(self, session: VoiceSession, close_code: int | None) -> None:
        """A real client's websocket closed: it may resume within :data:`RESUME_GRACE` seconds."""
        if self.sessions.get(session.user_id) is not session or self.closed:
            return
        # A client that leaves says so on the main gateway (op 4 with no channel); a dropped
        # websocket alone, whatever its close code, may still be resumed.
        loop = asyncio.get_running_loop()

        def expire() -> None:
            self._grace.pop(session.user_id, None)
            if session.ws is None and self.sessions.get(session.user_id) is session:
                self.discord.spawn(self.leave(session.user_id))

        self._grace[session.user_id] = loop.call_later(RESUME_GRACE, expire)

    def resumed(self, session: VoiceSession) -> None:
        """``session``'s client resumed its voice websocket: cancel its removal at the end of the grace."""
        grace = self._grace.pop(session.user_id, None)
        if grace is not None:
            grace.cancel()

    # -- speaking and DAVE -------------------------------------------------------------------

    async def speaking(self, participant: Participant, flags: int, ssrc: Any = None) -> None:
        """Relay a speaking-state change (op 5) to every other member."""
        setattr(participant, "speaking", flags)  # noqa: B010 - both participant kinds keep it
        for other in self.participants():
            if other is not participant:
                await other.send_json(
                    SPEAKING,
                    {"user_id": str(participant.user_id), "ssrc": participant.ssrc, "speaking": flags},
                )

    async def route(self, outgoing: list[Outgoing]) -> None:
        """Deliver DAVE messages; a virtual member's answers are fed back into the group at once."""
        queue = collections.deque(outgoing)
        async with self._route_lock:
            while queue:
                out = queue.popleft()
                participant = self.sessions.get(out.user_id) or self.virtual.get(out.user_id)
                if participant is None:
                    continue
                self.stats.dave_messages += 1
                queue.extend(await participant.deliver_dave(out))
            self._time_transitions()

    def _time_transitions(self) -> None:
        """Give every transition announced since the last look ``transition_timeout`` seconds to be
        ready; then it executes without the members that never answered op 23 (as Discord does)."""
        pending = self.dave.pending_transitions
        for tid in [t for t in self._transition_timers if t not in pending]:
            self._transition_timers.pop(tid).cancel()
        timeout = self.discord.transition_timeout
        if timeout is None:
            return
        loop = asyncio.get_running_loop()
        for tid in pending:
            if tid not in self._transition_timers:
                self._transition_timers[tid] = loop.call_later(timeout, self._transition_timed_out, tid)

    def _transition_timed_out(self, transition_id: int) -> None:
        self._transition_timers.pop(transition_id, None)
        if not self.closed:
            self.discord.spawn(self.route(self.dave.transition_timed_out(transition_id)))

    async def force_epoch_change(self) -> None:
        """Move the DAVE group to a new epoch without a real member change (a fault for tests)."""
        await self.route(self.dave.force_epoch_change())

    async def downgrade_dave(self) -> None:
        """Drop DAVE to protocol version 0 (op 21, op 23s, op 22), as when a client without it joins."""
        await self.route(self.dave.downgrade())

    async def upgrade_dave(self) -> None:
        """Bring DAVE back (op 24, epoch 1: a new MLS group), as when the last client without it left."""
        await self.route(self.dave.upgrade())
