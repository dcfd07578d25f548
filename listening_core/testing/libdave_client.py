"""A DAVE participant backed by libdave, Discord's own C++ DAVE library (``pip install dave-py``).

:class:`LibdaveClient` has :class:`~listening_core.testing.dave_client.DaveClient`'s interface, so a
virtual member can run either; it reacts to the voice gateway's DAVE opcodes the way libdave's own
``DaveSessionManager`` sample (the flow Discord's clients follow) does:

* op 4 / op 24 with ``epoch == 1``: ``Session.init`` (a new pending local group) and a new key package;
* op 27: ``process_proposals`` with the recognised user ids (op 11 announcements and itself): an Add
  for anyone else is refused, as protocol.md requires;
* op 29 / op 30: ``process_commit`` / ``process_welcome``; on success the receive ratchets are
  prepared for the transition and op 23 answers a non-zero id, while id 0 executes at once; a failed
  commit or welcome is answered with op 31 and a new key package (an ignored commit with nothing);
* op 21: receive ratchets prepared for the announced version, op 23 for a non-zero id, id 0 executed;
* op 22: the pending transition executes: the sender's own key ratchet (from the current group, none
  at version 0) goes into its ``Encryptor``; version 0 also resets the MLS session.

Media is encrypted by libdave's ``Encryptor``: it uses the key ratchet set at the last executed
transition, so a libdave sender switches keys on op 22 exactly, and encrypts even the Opus silence
frame (davey sends ``F8 FF FE`` as is).
"""

from __future__ import annotations

import logging
from typing import Any

from .dave_client import (
    OP_ANNOUNCE_COMMIT,
    OP_COMMIT_WELCOME,
    OP_EXECUTE_TRANSITION,
    OP_EXTERNAL_SENDER,
    OP_INVALID_COMMIT_WELCOME,
    OP_KEY_PACKAGE,
    OP_PREPARE_EPOCH,
    OP_PREPARE_TRANSITION,
    OP_PROPOSALS,
    OP_TRANSITION_READY,
    OP_WELCOME,
    ClientMessage,
    RecognisedUsers,
)

_dave: Any
try:
    import dave as _dave
except ImportError:  # pragma: no cover - exercised only where dave-py is missing
    _dave = None

_log = logging.getLogger(__name__)

__all__ = ["LibdaveClient", "libdave_available"]


def libdave_available() -> bool:
    """Whether libdave's Python bindings (``dave-py``, import name ``dave``) can be imported."""
    return _dave is not None


def _require_dave() -> Any:
    if _dave is None:
        raise ImportError(
            "a libdave member needs libdave's Python bindings: pip install dave-py "
            "(or install listening-core's test extra)"
        )
    return _dave


class LibdaveClient(RecognisedUsers):
    """A Discord-client-like DAVE participant for one user, on libdave (sans-I/O).

    ``ssrc`` is the audio SSRC the encryptor is told about (its codec is Opus).  ``mls_failures``
    collects every ``(source, reason)`` libdave reported through its failure callback, such as a
    refused Add proposal for an unrecognised user.
    """

    def __init__(self, user_id: int, channel_id: int) -> None:
        dave = _require_dave()
        super().__init__(user_id, enforce_recognised=True)  # libdave always checks Adds
        self.channel_id = channel_id
        self.mls_failures: list[tuple[str, str]] = []
        self.session: Any = None
        self.encryptor: Any = dave.Encryptor()
        self.encryptor.set_passthrough_mode(False)
        self._decryptors: dict[int, Any] = {}
        self._passthrough: set[int] = set()
        self.ssrc = 0
        self._ssrcs_assigned: set[int] = set()
        self.protocol_version: int = 0
        """The version of the last executed transition: what the encryptor sends with."""
        self.pending_transitions: dict[int, int] = {}
        self.executed_transitions: list[int] = []
        self.invalid_reports: list[int] = []
        self.downgraded: bool = False
        self.passthrough_calls: list[tuple[bool, int]] = []
        """Kept for :class:`DaveClient`'s interface; libdave's session has no passthrough switch."""

    def _failure(self, source: str, reason: str) -> None:
        _log.debug("user %d: libdave %s failed: %s", self.user_id, source, reason)
        self.mls_failures.append((source, reason))

    # -- state -------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True when the session holds an established MLS group."""
        return self.session is not None and bool(self.session.has_established_group())

    @property
    def epoch(self) -> int | None:
        """libdave's bindings do not expose the epoch: None (the server's view is in DaveGroup)."""
        return None

    @property
    def can_encrypt(self) -> bool:
        """The encryptor holds a key ratchet for a non-zero version (set by an executed transition)."""
        return self.protocol_version != 0 and bool(self.encryptor.has_key_ratchet())

    @property
    def sends_unencrypted(self) -> bool:
        """At protocol version 0 (after a downgrade executed) the encryptor passes frames through."""
        return self.session is not None and self.protocol_version == 0

    def can_passthrough(self, user_id: int) -> bool:
        """Whether ``user_id``'s decryptor is in passthrough mode (version 0 prepared for it)."""
        return user_id in self._passthrough

    def group_user_ids(self) -> set[int]:
        """Not exposed by libdave's bindings beyond a commit's roster changes: the recognised users
        that have a key ratchet, plus itself."""
        if not self.ready:
            return set()
        found = {self.user_id}
        for uid in self.recognised:
            if self.session.get_key_ratchet(str(uid)) is not None:
                found.add(uid)
        return found

    # -- media ---------------------------------------------------------------------------------------

    def _encrypt(self, media_type: Any, frame: bytes) -> bytes:
        dave = _require_dave()
        ssrc = self.ssrc if media_type == dave.MediaType.audio else self.ssrc ^ 0xFFFFFFFF
        if ssrc not in self._ssrcs_assigned:
            codec = dave.Codec.opus if media_type == dave.MediaType.audio else dave.Codec.h264
            self.encryptor.assign_ssrc_to_codec(ssrc, codec)
            self._ssrcs_assigned.add(ssrc)
        result = self.encryptor.encrypt(media_type, ssrc, bytes(frame))
        if result is None:
            raise ValueError(f"user {self.user_id}: libdave could not encrypt (no key ratchet)")
        return bytes(result)

    def encrypt_opus(self, frame: bytes) -> bytes:
        """DAVE-encrypt one Opus frame with libdave's encryptor (raises ValueError without a key)."""
        return self._encrypt(_require_dave().MediaType.audio, frame)

    def encrypt(self, frame: bytes) -> bytes:
        """DAVE-encrypt a video frame (as H.264), as a client with its camera on does."""
        return self._encrypt(_require_dave().MediaType.video, frame)

    def decrypt(self, user_id: int, frame: bytes) -> bytes:
        """DAVE-decrypt one Opus frame sent by ``user_id`` with libdave's decryptor for that user."""
        decryptor = self._decryptors.get(user_id)
        if decryptor is None:
            raise ValueError(f"user {self.user_id}: no decryptor for user {user_id}")
        result = decryptor.decrypt(_require_dave().MediaType.audio, bytes(frame))
        if result is None:
            raise ValueError(f"user {self.user_id}: libdave could not decrypt a frame of user {user_id}")
        return bytes(result)

    # -- signalling ----------------------------------------------------------------------------------

    def session_description(self, dave_protocol_version: int = 1) -> list[ClientMessage]:
        """Op 4 received: a non-zero version initialises the session and sends a key package; version
        0 executes transition 0 at once (the encryptor passes frames through)."""
        if self.session is None:
            self.session = _require_dave().Session(self._failure)
        if dave_protocol_version > 0:
            return self._init_group(dave_protocol_version)
        self._prepare_ratchets(0, 0)
        return []

    def _init_group(self, version: int) -> list[ClientMessage]:
        assert self.session is not None
        self.session.init(version, self.channel_id, str(self.user_id), None)
        return self._key_package()

    def _key_package(self) -> list[ClientMessage]:
        key_package = self.session.get_marshalled_key_package()
        if not key_package:
            raise RuntimeError(f"user {self.user_id}: libdave made no key package")
        return [ClientMessage(OP_KEY_PACKAGE, binary=bytes(key_package))]

    def handle_json(self, opcode: int, data: dict[str, Any]) -> list[ClientMessage]:
        """Ops 11 and 13 (who is recognised), 21, 22 and 24, as libdave's session manager."""
        if self.clients_changed(opcode, data) or self.session is None:
            return []
        out: list[ClientMessage] = []
        if opcode == OP_PREPARE_TRANSITION:
            tid, version = int(data["transition_id"]), int(data["protocol_version"])
            self._prepare_ratchets(tid, version)
            if tid != 0:
                out.append(ClientMessage(OP_TRANSITION_READY, json={"transition_id": tid}))
        elif opcode == OP_EXECUTE_TRANSITION:
            self._execute_transition(int(data["transition_id"]))
        elif opcode == OP_PREPARE_EPOCH and int(data["epoch"]) == 1:
            out.extend(self._init_group(int(data["protocol_version"])))
        return out

    def handle_binary(self, opcode: int, payload: bytes) -> list[ClientMessage]:
        """Ops 25, 27, 29 and 30 (payload after the opcode byte)."""
        session = self.session
        if session is None:
            return []
        if opcode == OP_EXTERNAL_SENDER:
            session.set_external_sender(bytes(payload))
        elif opcode == OP_PROPOSALS:
            allowed = {str(uid) for uid in self.allowed_adds()}
            result = session.process_proposals(bytes(payload), allowed)
            if result is not None:
                return [ClientMessage(OP_COMMIT_WELCOME, binary=bytes(result))]
        elif opcode == OP_ANNOUNCE_COMMIT:
            tid = int.from_bytes(payload[:2], "big")
            result = session.process_commit(bytes(payload[2:]))
            if result == _require_dave().RejectType.ignored:
                _log.debug("user %d: commit of transition %d ignored", self.user_id, tid)
                return []
            if not isinstance(result, dict):
                self.invalid_reports.append(tid)
                out = [ClientMessage(OP_INVALID_COMMIT_WELCOME, json={"transition_id": tid})]
                return out + self._init_group(max(self._session_version(), 1))
            return self._joined(tid)
        elif opcode == OP_WELCOME:
            tid = int.from_bytes(payload[:2], "big")
            allowed = {str(uid) for uid in self.allowed_adds()}
            roster = session.process_welcome(bytes(payload[2:]), allowed)
            if roster is None:
                self.invalid_reports.append(tid)
                invalid = ClientMessage(OP_INVALID_COMMIT_WELCOME, json={"transition_id": tid})
                return [invalid, *self._key_package()]
            return self._joined(tid)
        return []

    # -- internals -----------------------------------------------------------------------------------

    def _session_version(self) -> int:
        return int(self.session.get_protocol_version()) if self.session is not None else 0

    def _joined(self, transition_id: int) -> list[ClientMessage]:
        self._prepare_ratchets(transition_id, self._session_version())
        if transition_id == 0:
            return []
        return [ClientMessage(OP_TRANSITION_READY, json={"transition_id": transition_id})]

    def _prepare_ratchets(self, transition_id: int, version: int) -> None:
        dave = _require_dave()
        for uid in self.recognised:
            if uid == self.user_id:
                continue
            decryptor = self._decryptors.get(uid)
            if decryptor is None:
                decryptor = self._decryptors[uid] = dave.Decryptor()
            ratchet = self.session.get_key_ratchet(str(uid)) if version != 0 else None
            if ratchet is not None:
                decryptor.transition_to_key_ratchet(ratchet)
                self._passthrough.discard(uid)
            elif version == 0:
                decryptor.transition_to_passthrough_mode(True)
                self._passthrough.add(uid)
        if transition_id == 0:
            self._set_own_ratchet(version)
            self.executed_transitions.append(0)
        else:
            self.pending_transitions[transition_id] = version

    def _execute_transition(self, transition_id: int) -> None:
        if transition_id not in self.pending_transitions:
            _log.warning("user %d: execute for unknown transition id %d", self.user_id, transition_id)
            return
        version = self.pending_transitions.pop(transition_id)
        if version == 0:
            self.session.reset()
        self._set_own_ratchet(version)
        self.executed_transitions.append(transition_id)

    def _set_own_ratchet(self, version: int) -> None:
        old = self.protocol_version
        self.protocol_version = version
        if version == 0:
            self.downgraded = old != 0 or self.downgraded
            self.encryptor.set_key_ratchet(None)
            self.encryptor.set_passthrough_mode(True)
            return
        self.downgraded = False
        self.encryptor.set_passthrough_mode(False)
        self.encryptor.set_key_ratchet(self.session.get_key_ratchet(str(self.user_id)))
