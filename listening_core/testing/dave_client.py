"""An in-process mirror of what discord.py 2.7.1's voice websocket does with DAVE messages.

:class:`DaveClient` wraps a :class:`davey.DaveSession` and reacts to the server's DAVE opcodes exactly
like ``discord.gateway.DiscordVoiceWebSocket`` + ``discord.voice_state.VoiceConnectionState`` do, but
returns what the client would send instead of sending it.  The loopback server uses it for its
virtual members and tests use it to drive :class:`~listening_core.testing.dave_group.DaveGroup`.

Protocol version changes follow discord.py 2.7.1 to the letter:

* op 21 ``{transition_id, protocol_version}``: the version is recorded as pending for that id; id 0
  executes at once, any other id is answered with op 23, after turning passthrough on
  (``set_passthrough_mode(True, 120)``) when the new version is 0;
* op 22: ``_execute_transition`` makes the pending version current; a change to 0 sets
  ``downgraded`` (discord.py's ``dave_downgraded``), and the next executed non-zero transition
  while downgraded clears it and calls ``set_passthrough_mode(True, 10)``;
* op 24 with ``epoch == 1``: the version becomes the announced one at once and the session is
  re-initialised (a new key package, op 26); any other epoch is ignored;
* op 29 / op 30 with a non-zero id record the *current* version as pending for that id and answer
  op 23, so the upgrade's first commit executes as "version 1 while downgraded".

A client encrypts when :attr:`DaveClient.can_encrypt` (version non-zero and session ready), as
``VoiceConnectionState.can_encrypt``; after a downgrade it sends plain frames
(:attr:`DaveClient.sends_unencrypted`).  Note that davey's ``set_passthrough_mode(True, n)`` turns
passthrough on with no expiry (``n`` only applies when turning it off), so after an upgrade
discord.py keeps accepting unencrypted frames from the members it had decryptors for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import davey

if TYPE_CHECKING:
    from .dave_group import Outgoing

_log = logging.getLogger(__name__)

__all__ = ["ClientMessage", "DaveClient", "RecognisedUsers"]

OP_PREPARE_TRANSITION = 21
OP_EXECUTE_TRANSITION = 22
OP_TRANSITION_READY = 23
OP_PREPARE_EPOCH = 24
OP_EXTERNAL_SENDER = 25
OP_KEY_PACKAGE = 26
OP_PROPOSALS = 27
OP_COMMIT_WELCOME = 28
OP_ANNOUNCE_COMMIT = 29
OP_WELCOME = 30
OP_INVALID_COMMIT_WELCOME = 31
OP_CLIENTS_CONNECT = 11
OP_CLIENT_DISCONNECT = 13


@dataclass(frozen=True)
class ClientMessage:
    """A message the client sends to the voice gateway (JSON ``d`` payload or binary payload)."""

    opcode: int
    json: dict[str, Any] | None = None
    binary: bytes | None = None


class RecognisedUsers:
    """Who a client expects in its call: the users op 11 (Clients Connect) announced and op 13 did not
    take back.  protocol.md: every member must refuse an Add proposal for anyone else."""

    def __init__(self, user_id: int, *, enforce_recognised: bool = True) -> None:
        self.user_id = user_id
        self.enforce_recognised = enforce_recognised
        self.recognised: set[int] = set()

    def recognise(self, user_ids: Any) -> None:
        """Users announced by op 11 (ids as ints or strings)."""
        self.recognised.update(int(uid) for uid in user_ids)

    def forget_user(self, user_id: int) -> None:
        """A user announced by op 13 as gone."""
        self.recognised.discard(int(user_id))

    def allowed_adds(self) -> set[int]:
        """The users an Add proposal may name: the recognised ones and the client itself."""
        return self.recognised | {self.user_id}

    def clients_changed(self, opcode: int, data: dict[str, Any]) -> bool:
        """Handle op 11 / op 13; True when ``opcode`` was one of them."""
        if opcode == OP_CLIENTS_CONNECT:
            self.recognise(data.get("user_ids") or [])
            return True
        if opcode == OP_CLIENT_DISCONNECT:
            self.forget_user(int(data["user_id"]))
            return True
        return False

    def handle(self, message: Outgoing) -> list[ClientMessage]:
        """Process one server message addressed to this user; return the client's replies."""
        if message.user_id != self.user_id:
            raise ValueError(f"message for user {message.user_id} delivered to user {self.user_id}")
        if message.binary is not None:
            return self.handle_binary(message.opcode, message.binary)
        return self.handle_json(message.opcode, message.json or {})

    def handle_json(self, opcode: int, data: dict[str, Any]) -> list[ClientMessage]:
        """A JSON DAVE opcode (11, 13, 21, 22, 24); each client answers as its library does."""
        raise NotImplementedError

    def handle_binary(self, opcode: int, payload: bytes) -> list[ClientMessage]:
        """A binary DAVE opcode (25, 27, 29, 30); each client answers as its library does."""
        raise NotImplementedError


class DaveClient(RecognisedUsers):
    """A discord.py-like DAVE participant for one user (sans-I/O).

    With ``enforce_recognised`` it hands davey the recognised user ids with every op 27, so an Add
    for a user no op 11 announced raises (davey's ``UnexpectedUser``), as protocol.md requires; off
    by default, as in discord.py 2.7.1, which passes none (virtual members turn it on).

    Errors from ``set_external_sender`` / ``process_proposals`` propagate, as they do in discord.py
    (where they escape the websocket handler); failures of ``process_commit`` / ``process_welcome``
    are answered with op 31 and a fresh key package, as discord.py's ``_recover_from_invalid_commit``.
    """

    def __init__(self, user_id: int, channel_id: int, *, enforce_recognised: bool = False) -> None:
        super().__init__(user_id, enforce_recognised=enforce_recognised)
        self.channel_id = channel_id
        self.mls_failures: list[tuple[str, str]] = []
        """``(operation, error)`` for every op 27 davey refused."""
        self.session: davey.DaveSession | None = None
        self.protocol_version: int = 0
        self.pending_transitions: dict[int, int] = {}
        self.executed_transitions: list[int] = []
        self.invalid_reports: list[int] = []
        self.downgraded: bool = False
        """discord.py's ``dave_downgraded``: set when a transition to version 0 executes."""
        self.passthrough_calls: list[tuple[bool, int]] = []
        """Every ``set_passthrough_mode(mode, expiry)`` call made on the session, in order."""

    # -- state -------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True when the davey session can encrypt and decrypt."""
        return self.session is not None and bool(self.session.ready)

    @property
    def epoch(self) -> int | None:
        """The davey session's MLS epoch (None without a group)."""
        return None if self.session is None else self.session.epoch

    @property
    def can_encrypt(self) -> bool:
        """discord.py's ``VoiceConnectionState.can_encrypt``."""
        return self.protocol_version != 0 and self.ready

    @property
    def sends_unencrypted(self) -> bool:
        """DAVE is off for this client (it has a session, at protocol version 0): it sends plain Opus.

        That is the state after a downgrade (op 21 to version 0, then op 22) and until an op 24
        announces the upgrade; discord.py's ``_get_voice_packet`` then sends the frame as is.
        """
        return self.session is not None and self.protocol_version == 0

    def can_passthrough(self, user_id: int) -> bool:
        """Whether the session accepts an unencrypted frame from ``user_id`` right now."""
        return self.session is not None and bool(self.session.can_passthrough(user_id))

    def group_user_ids(self) -> set[int]:
        """User ids in the local MLS group (davey returns them as strings)."""
        if self.session is None:
            return set()
        return {int(uid) for uid in self.session.get_user_ids() or []}

    # -- media ---------------------------------------------------------------------------------------

    def _require_session(self) -> davey.DaveSession:
        if self.session is None:
            raise RuntimeError(f"user {self.user_id} has no DAVE session (no session description yet)")
        return self.session

    def encrypt_opus(self, frame: bytes) -> bytes:
        """DAVE-encrypt one Opus frame (davey raises ValueError when not ready)."""
        return bytes(self._require_session().encrypt_opus(frame))

    def encrypt(self, frame: bytes, media_type: davey.MediaType = davey.MediaType.video) -> bytes:
        """DAVE-encrypt a non-Opus frame (video by default), as a client with its camera on does."""
        codec = davey.Codec.h264 if media_type == davey.MediaType.video else davey.Codec.opus
        return bytes(self._require_session().encrypt(media_type, codec, frame))

    def decrypt(self, user_id: int, frame: bytes) -> bytes:
        """DAVE-decrypt one Opus frame sent by ``user_id``."""
        return bytes(self._require_session().decrypt(user_id, davey.MediaType.audio, frame))

    # -- signalling ----------------------------------------------------------------------------------

    def session_description(self, dave_protocol_version: int = 1) -> list[ClientMessage]:
        """Op 4 received: (re)create the DAVE session and return the op 26 key package.

        As discord.py, only a non-zero version re-initialises the session.
        """
        self.protocol_version = dave_protocol_version
        return self._reinit() if dave_protocol_version > 0 else []

    def _set_passthrough(self, mode: bool, expiry: int) -> None:
        assert self.session is not None
        self.session.set_passthrough_mode(mode, expiry)
        self.passthrough_calls.append((mode, expiry))

    def _reinit(self) -> list[ClientMessage]:
        if self.protocol_version > 0:
            if self.session is not None:
                self.session.reinit(self.protocol_version, self.user_id, self.channel_id)
            else:
                self.session = davey.DaveSession(self.protocol_version, self.user_id, self.channel_id)
            return [ClientMessage(OP_KEY_PACKAGE, binary=bytes(self.session.get_serialized_key_package()))]
        if self.session is not None:
            self.session.reset()
            self._set_passthrough(True, 10)
        return []

    def handle_json(self, opcode: int, data: dict[str, Any]) -> list[ClientMessage]:
        """Mirror of ``DiscordVoiceWebSocket.received_message`` for DAVE opcodes 21, 22 and 24 (and the
        op 11 / op 13 announcements of who is in the call)."""
        if self.clients_changed(opcode, data) or self.session is None:
            return []
        out: list[ClientMessage] = []
        if opcode == OP_PREPARE_TRANSITION:
            tid = int(data["transition_id"])
            self.pending_transitions[tid] = int(data["protocol_version"])
            if tid == 0:
                self._execute_transition(tid)
            else:
                if data["protocol_version"] == 0:
                    self._set_passthrough(True, 120)
                out.append(ClientMessage(OP_TRANSITION_READY, json={"transition_id": tid}))
        elif opcode == OP_EXECUTE_TRANSITION:
            self._execute_transition(int(data["transition_id"]))
        elif opcode == OP_PREPARE_EPOCH and data["epoch"] == 1:
            self.protocol_version = int(data["protocol_version"])
            out.extend(self._reinit())
        return out

    def handle_binary(self, opcode: int, payload: bytes) -> list[ClientMessage]:
        """Mirror of ``DiscordVoiceWebSocket.received_binary_message`` (payload after the opcode byte)."""
        session = self.session
        if session is None:
            return []
        if opcode == OP_EXTERNAL_SENDER:
            session.set_external_sender(payload)
        elif opcode == OP_PROPOSALS:
            if not payload:
                raise ValueError("empty op 27 payload")
            optype = (
                davey.ProposalsOperationType.append
                if payload[0] == 0
                else davey.ProposalsOperationType.revoke
            )
            expected = sorted(self.allowed_adds()) if self.enforce_recognised else None
            try:
                result = session.process_proposals(optype, payload[1:], expected)
            except ValueError as exc:
                self.mls_failures.append(("process_proposals", str(exc)))
                raise
            if result is not None:
                data = bytes(result.commit) + (bytes(result.welcome) if result.welcome else b"")
                return [ClientMessage(OP_COMMIT_WELCOME, binary=data)]
        elif opcode in (OP_ANNOUNCE_COMMIT, OP_WELCOME):
            tid = int.from_bytes(payload[:2], "big")
            try:
                if opcode == OP_ANNOUNCE_COMMIT:
                    session.process_commit(payload[2:])
                else:
                    session.process_welcome(payload[2:])
            except Exception as exc:
                _log.debug("user %d: op %d for transition %d failed: %s", self.user_id, opcode, tid, exc)
                return self._recover_from_invalid_commit(tid)
            if tid != 0:
                self.pending_transitions[tid] = self.protocol_version
                return [ClientMessage(OP_TRANSITION_READY, json={"transition_id": tid})]
        return []

    def _recover_from_invalid_commit(self, transition_id: int) -> list[ClientMessage]:
        self.invalid_reports.append(transition_id)
        out = [ClientMessage(OP_INVALID_COMMIT_WELCOME, json={"transition_id": transition_id})]
        out.extend(self._reinit())
        return out

    def _execute_transition(self, transition_id: int) -> None:
        if transition_id not in self.pending_transitions:
            _log.warning("user %d: execute for unknown transition id %d", self.user_id, transition_id)
            return
        old_version = self.protocol_version
        self.protocol_version = self.pending_transitions.pop(transition_id)
        if old_version != self.protocol_version and self.protocol_version == 0:
            self.downgraded = True
        elif transition_id > 0 and self.downgraded:
            self.downgraded = False
            if self.session is not None:
                self._set_passthrough(True, 10)
        self.executed_transitions.append(transition_id)
