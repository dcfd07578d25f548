"""The mends to discord.py's voice connection state, in one file to delete when upstream fixes them.

:class:`_ConnectionState` is discord.py 2.7's ``VoiceConnectionState`` with its reconnection flaws
mended (see its docstring); :class:`_VoiceWebSocket` notes the MLS external sender it needs.
:class:`ConnectionDave` opens DAVE frames with the connection's keys, for a listening session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

import aiohttp
from discord.gateway import DiscordVoiceWebSocket
from discord.utils import MISSING
from discord.voice_state import ConnectionFlowState, VoiceConnectionState

from .crypto import DaveError, dave_decrypt

_log = logging.getLogger("listening_core.voice_client")

__all__ = ["DAVE_KEY_RETENTION", "ConnectionDave"]

DAVE_KEY_RETENTION = 10.0
"""Seconds a replaced DAVE group's keys still open frames (DAVE keeps old keys up to 10 s)."""


class _ConnectionState(VoiceConnectionState):
    """discord.py 2.7's voice connection state, with three of its reconnection flaws mended, so
    that a recording survives what a long-lived voice connection meets.

    - Resume: after close code 4015 ("voice server crashed, resume") discord.py sends a new voice
      state update and waits for fresh voice state and server updates, which, arriving while it
      still counts itself connected, never complete its flow; and it would then wait for a
      session description, which a resumed session is not sent again. It stalled until its
      timeout and left the channel, ending the recording. A resume needs neither: a new
      websocket, RESUME (op 7) with the same session, token and ``seq_ack``, and the transport
      key kept; the UDP socket, and so the audio, never stopped. If the server refuses the
      resume (it closes the new websocket, e.g. with 4006), discord.py's own reconnection takes
      over from there.
    - State changes are never missed (:meth:`_wait_for_state`): a move hung for the whole
      connect timeout, then left voice.
    - A new UDP socket wakes the reader thread (:meth:`_create_socket`): ``move_to`` hung for
      30 s.
    - Leaving expects Discord's confirmation before asking (:meth:`_voice_disconnect`): a
      ``disconnect()`` could wait its whole timeout.
    - A new DAVE group keeps the old one's keys for :data:`DAVE_KEY_RETENTION` seconds
      (:meth:`reinit_dave_session`): discord.py re-initialises its one davey session in place,
      so when the last other member left (Discord resets a sole member's group) the frames of
      theirs still on the way no longer opened, and were concealed.
    """

    _retired_dave: tuple[Any, float] | None = None
    dave_external_sender: bytes | None = None
    """The voice server's MLS external sender (op 25), which a new DAVE session is given."""

    async def _connect_websocket(self, resume: bool) -> DiscordVoiceWebSocket:
        seq_ack = -1 if self.ws is MISSING else self.ws.seq_ack
        ws = await _VoiceWebSocket.from_connection_state(self, resume=resume, hook=self.hook, seq_ack=seq_ack)
        self.state = ConnectionFlowState.websocket_connected
        return ws

    async def reinit_dave_session(self) -> None:
        old, sender = self.dave_session, self.dave_external_sender
        if self.dave_protocol_version > 0 and old is not None and old.ready and sender is not None:
            # Keep the ready session whole: discord.py builds a new one beside it, which the
            # external sender, set once per connection, is given as reinit would have kept it.
            self._retired_dave = (old, time.monotonic() + DAVE_KEY_RETENTION)
            self.dave_session = None
            await super().reinit_dave_session()
            if self.dave_session is not None:
                self.dave_session.set_external_sender(sender)
            return
        await super().reinit_dave_session()

    def retired_dave_session(self) -> Any:
        """The DAVE session a new group replaced, while its keys are kept; else None."""
        retired = self._retired_dave
        if retired is None:
            return None
        if time.monotonic() >= retired[1]:
            self._retired_dave = None
            return None
        return retired[0]

    async def _connect(
        self, reconnect: bool, timeout: float, self_deaf: bool, self_mute: bool, resume: bool
    ) -> None:
        previous = self.ws
        if not resume or previous is MISSING or not previous.secret_key:
            await super()._connect(reconnect, timeout, self_deaf, self_mute, resume)
            return
        _log.info("resuming the voice websocket")
        if previous._keep_alive is not None:  # its socket is closed: stop its heartbeats
            previous._keep_alive.stop()
        try:
            ws = await asyncio.wait_for(self._connect_websocket(True), timeout=timeout)
        except (TimeoutError, OSError, aiohttp.ClientError) as exc:
            _log.warning("could not resume the voice websocket (%r); connecting afresh", exc)
            await self.disconnect(cleanup=False)
            await super()._connect(reconnect, timeout, self_deaf, self_mute, False)
            return
        ws.secret_key = previous.secret_key
        self.ws = ws
        self.state = ConnectionFlowState.connected

    def _create_socket(self) -> None:
        old = self.socket
        super()._create_socket()
        if isinstance(old, socket.socket) and old is not self.socket:
            # discord.py's reader thread may sit in select() on the old socket for up to 30 s: a
            # move made by the bot (move_to) opens a new socket, and nothing comes to the old one
            # any more. Shutting the old one down wakes the reader, which then reads the new one.
            # (The move hung until then: the new server's IP discovery answer went unread.)
            with contextlib.suppress(OSError):
                old.shutdown(socket.SHUT_RDWR)

    async def _voice_disconnect(self) -> None:
        # discord.py marks the disconnect as expected, and clears the event its confirmation sets,
        # only after the gateway send has returned. Discord's confirmation (a voice state update
        # without a channel) handled in between was taken for an external disconnect, which
        # started a second one, and the first then waited its whole timeout for the confirmation
        # it had just cleared. Both are done before asking, as nothing can confirm before that.
        _log.info(
            "The voice handshake is being terminated for Channel ID %s (Guild ID %s)",
            self.voice_client.channel.id,
            self.voice_client.guild.id,
        )
        self.state = ConnectionFlowState.disconnected
        self._expecting_disconnect = True
        self._disconnected.clear()
        try:
            await self.voice_client.channel.guild.change_voice_state(channel=None)
        except BaseException:
            self._expecting_disconnect = False  # nothing was asked: a later update is not ours
            raise

    async def _wait_for_state(
        self, state: ConnectionFlowState, *other_states: ConnectionFlowState, timeout: float | None = None
    ) -> None:
        # discord.py sets and at once clears _state_event on every change of state: a waiter whose
        # wait() has not started running yet misses the change and sleeps until its timeout. A
        # move to another channel hung that way for the whole connect timeout, then gave up and
        # left voice. So the state is looked at again at least every 50 ms.
        states = (state, *other_states)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.state not in states:
            wait = 0.05 if deadline is None else min(0.05, deadline - loop.time())
            if wait <= 0:
                raise TimeoutError(f"voice connection state {self.state.name} did not change in time")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_event.wait(), wait)


class _VoiceWebSocket(DiscordVoiceWebSocket):
    """discord.py's voice websocket, noting the MLS external sender for :class:`_ConnectionState`."""

    async def received_binary_message(self, msg: bytes) -> None:
        conn = self._connection
        if len(msg) > 3 and msg[2] == self.MLS_EXTERNAL_SENDER and isinstance(conn, _ConnectionState):
            conn.dave_external_sender = bytes(msg[3:])
        await super().received_binary_message(msg)


class ConnectionDave:
    """Opens DAVE frames with a voice connection's current keys (what a listening session is given).

    Reads the connection's ``dave_session``, ``dave_protocol_version`` and ``dave_downgraded`` at
    each frame, so an epoch change, a downgrade or an upgrade applies at once; a frame that does
    not open under the current group is tried under the group a new one replaced in the last
    :data:`DAVE_KEY_RETENTION` seconds (a frame still on its way when the last other member left
    and the bot's group was reset).
    """

    __slots__ = ("_conn",)

    def __init__(self, connection: Any) -> None:
        self._conn = connection

    def decrypt(self, user_id: int, payload: bytes) -> bytes:
        """``payload`` opened; raises the current session's :class:`DaveError`."""
        conn = self._conn
        try:
            return dave_decrypt(
                conn.dave_session,
                user_id,
                payload,
                protocol_version=conn.dave_protocol_version,
                downgraded=bool(getattr(conn, "dave_downgraded", False)),
            )
        except DaveError as exc:
            retired_session = getattr(conn, "retired_dave_session", None)
            retired = retired_session() if retired_session is not None else None
            if retired is not None:
                with contextlib.suppress(DaveError):
                    return dave_decrypt(retired, user_id, payload, protocol_version=1)
            raise exc from None
