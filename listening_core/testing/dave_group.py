"""Server-side (voice gateway) coordinator for one voice channel's DAVE MLS group, sans-I/O.

:class:`DaveGroup` plays Discord's voice gateway in the DAVE handshake: it is the group's external
sender, proposes Adds and Removes, picks the winning commit for each epoch and sequences transitions.
It never touches sockets: every input returns the list of :class:`Outgoing` messages to deliver.

Policy (kept close to Discord's documented behaviour, see discord/dave-protocol ``protocol.md``):

* ``join`` sends op 25 (external sender).  A key package (op 26) makes the member *pending*.
* No established group (``epoch is None``): every pending member with a key package gets the Add
  proposals (epoch 0) of all *other* pending members; the first valid commit wins and creates the
  group at epoch 1, announced (op 29 to the committer, op 30 to the others) with transition id 0,
  which clients execute at once: nobody sent media under DAVE before, so nothing needs coordinating
  (the group that completes an upgrade is the exception: it gets a real transition).  A member alone
  stays pending, with no group, as on Discord: nobody else would hear it.
* Sole member reset (protocol.md): when the last other member leaves an established group, the one
  left gets op 24 ``{transition_id: 0, epoch: 1}`` (it re-creates its local group and sends a new key
  package) and op 21 ``{transition_id: 0}`` (executed at once); the gateway forgets the group.
* Established group: proposals go to every healthy member (in the tree, connected, not reset); the
  first commit for the current epoch that references exactly the unrevoked proposals that member was
  sent wins; other commits (stale epoch, partial, unknown references) are ignored.  Proposals that
  are no longer wanted (e.g. the joiner left) are revoked with an op 27 revoke.
* The winner's commit goes out as op 29 with a fresh non-zero transition id to every healthy member of
  the new group that was in the old one (including the committer), and the Welcome as op 30 with the
  same id to each added member.  Op 22 goes to all of them once every one answered op 23, or when the
  caller says the transition timed out (:meth:`DaveGroup.transition_timed_out`; the loopback's calls
  do after ``transition_timeout`` seconds, as Discord does); members that leave or report op 31 stop
  being waited for.  New proposals may be sent before op 22;
  per-connection ordering keeps them after the op 29 / op 30 that they depend on.
* Op 31 or a new key package from a member that is in the tree marks its leaf stale: it is removed and
  re-added with its new key package (possibly in the same commit).
* If no healthy member remains in an established group, the gateway forgets the group and starts over
  with group creation.

Protocol version changes (the whitepaper's "initial transitory phase"; :meth:`DaveGroup.downgrade` and
:meth:`DaveGroup.upgrade` stand in for a client without DAVE joining and leaving):

* Downgrade: op 21 ``{transition_id, protocol_version: 0}`` (non-zero id) to every connected member.
  From then on the MLS group is frozen: in-flight proposals are revoked and no new ones are sent, so
  no commit can start.  Once every member answered op 23 *and* every commit transition announced
  before has executed (so that no op 22 of a commit, which discord.py would execute as "back to
  version 1", follows the downgrade's), op 22 goes out and the group is at protocol version 0: the
  gateway forgets the MLS group (members keep their davey sessions; discord.py never resets them).
  Senders send plain Opus from their op 22; receivers accept plain frames through the passthrough
  mode that op 21 turned on.
* At protocol version 0 a joining member gets op 25 and then op 21 ``{transition_id: 0,
  protocol_version: 0}`` (executed at once); its key package is kept for nothing, commits are ignored
  and :meth:`~DaveGroup.force_epoch_change` does nothing.
* Upgrade: op 24 ``{transition_id, epoch: 1, protocol_version: 1}`` to every connected member (the
  op 24 id is informational: discord.py ignores it and no op 23 answers it).  Each member re-inits its
  davey session and sends a new key package.  The gateway waits for the key packages of all of them
  (members that leave are not waited for) and then creates the group afresh exactly as above.
  Waiting matters: senders encrypt as soon as their
  session is ready again (discord.py set its version to 1 on op 24), and a group created from the
  first key package alone would have them encrypt under an epoch the later members never join.
  A member alone after the upgrade stays pending (no group) until another one joins.
  The winning commit's op 29 / op 30 transition, once executed (op 22), completes the upgrade:
  discord.py clears ``dave_downgraded`` and turns passthrough on for the members it has keys for.

Malformed binary input raises :class:`~listening_core.testing.mls.MLSFormatError` before any state is
changed; well-formed but unwanted input is logged and ignored (an empty list is returned).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

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
    DaveClient,
)
from .mls import (
    CIPHERSUITE_P256,
    SENDER_MEMBER,
    WIRE_PUBLIC,
    ExternalSender,
    MLSFormatError,
    parse_commit_message,
    parse_key_package,
    parse_welcome,
    proposal_ref,
    proposals_payload,
    revoke_payload,
    split_commit_welcome,
)

_log = logging.getLogger(__name__)

__all__ = ["DEFAULT_GHOST_USER_ID", "DaveGroup", "Outgoing", "Transition"]

OP_CLIENTS_CONNECT = 11
OP_CLIENT_DISCONNECT = 13


DEFAULT_GHOST_USER_ID = 0x7FFF_FFFF_FFFF_FFFE


@dataclass(frozen=True)
class Outgoing:
    """One message for one member: a JSON ``d`` payload or a binary payload (after the opcode byte)."""

    user_id: int
    opcode: int
    json: dict[str, Any] | None
    binary: bytes | None


@dataclass
class Transition:
    """One transition: an epoch change (a winning commit) or a protocol version change.

    For an epoch change: who committed it, who joined/left, and who still owes an op 23.  A version
    change (``kind`` ``"downgrade"`` or ``"upgrade"``) has no committer (0) and no members added or
    removed; its ``epoch`` is the MLS epoch it was announced in (a downgrade) or 1 (an upgrade).
    """

    transition_id: int
    epoch: int
    committer: int
    added: tuple[int, ...]
    removed: tuple[int, ...]
    recipients: frozenset[int]
    awaiting: set[int] = field(default_factory=set)
    executed: bool = False
    protocol_version: int = 1
    """The DAVE protocol version in effect once the transition has executed."""
    kind: Literal["commit", "downgrade", "upgrade"] = "commit"
    timed_out: bool = False
    """Executed on a timeout while some recipients had not answered op 23."""


@dataclass
class _Proposal:
    kind: Literal["add", "remove"]
    user_id: int
    leaf_index: int | None
    key_package: bytes | None
    message: bytes
    ref: bytes
    recipients: set[int] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, int, int | None, bytes | None]:
        return (self.kind, self.user_id, self.leaf_index, self.key_package)


@dataclass(frozen=True)
class _Spec:
    kind: Literal["add", "remove"]
    user_id: int
    leaf_index: int | None
    key_package: bytes | None
    recipients: frozenset[int]

    @property
    def key(self) -> tuple[str, int, int | None, bytes | None]:
        return (self.kind, self.user_id, self.leaf_index, self.key_package)


class DaveGroup:
    """The voice gateway's view of one channel's MLS group (see the module docstring for the policy)."""

    def __init__(
        self,
        channel_id: int,
        protocol_version: int = 1,
        *,
        sender: ExternalSender | None = None,
        ghost_user_id: int = DEFAULT_GHOST_USER_ID,
    ) -> None:
        if protocol_version != 1:
            raise ValueError(f"unsupported DAVE protocol version {protocol_version}")
        self.channel_id = channel_id
        self.protocol_version: int = protocol_version
        """The DAVE protocol version in effect: 1, or 0 after a downgrade has executed."""
        self.group_id: bytes = channel_id.to_bytes(8, "big")
        self.sender: ExternalSender = sender if sender is not None else ExternalSender()
        self.ghost_user_id = ghost_user_id
        self.epoch: int | None = None
        self.transitions: list[Transition] = []
        """Every winning commit, oldest first."""
        self.ignored_commits: list[tuple[int, str]] = []
        """(user id, reason) for every well-formed commit that did not win."""
        self.version_changes: list[Transition] = []
        """Every downgrade and upgrade announced, oldest first."""
        self.sole_member_resets: list[int] = []
        """The user of every sole member reset, oldest first."""
        self._joined: dict[int, None] = {}
        self._key_packages: dict[int, bytes] = {}
        self._leaves: list[int | None] = []
        self._stale: set[int] = set()
        self._inflight: dict[bytes, _Proposal] = {}
        self._pending: dict[int, Transition] = {}
        self._next_tid = 1
        self._force = False
        self._ghost: DaveClient | None = None
        self._ghost_kp: bytes | None = None
        self._ghost_announced = False
        self._downgrade: Transition | None = None
        self._upgrade: Transition | None = None

    # -- read-only views -----------------------------------------------------------------------------

    @property
    def members(self) -> set[int]:
        """User ids (without the ghost) in the committed group."""
        return {u for u in self._leaves if u is not None and u != self.ghost_user_id}

    @property
    def leaves(self) -> list[int | None]:
        """The committed ratchet tree's leaves as user ids (None = blank; may include the ghost)."""
        return list(self._leaves)

    @property
    def joined(self) -> set[int]:
        """Users whose voice session is connected (``join`` called, ``leave`` not yet)."""
        return set(self._joined)

    @property
    def pending_members(self) -> set[int]:
        """Connected users that are not healthy members of the committed group."""
        healthy = self._healthy_users()
        return {u for u in self._joined if u not in healthy}

    @property
    def ghost_in_group(self) -> bool:
        """Whether the server-held ghost session currently occupies a leaf."""
        return self.ghost_user_id in self._leaves

    @property
    def pending_transitions(self) -> dict[int, Transition]:
        """Transitions announced but not yet executed, by transition id."""
        return dict(self._pending)

    @property
    def inflight_proposals(self) -> int:
        """Number of proposals sent for the current epoch and not yet committed or revoked."""
        return len(self._inflight)

    def leaf_index(self, user_id: int) -> int | None:
        """The leaf index of ``user_id``'s healthy leaf, if any."""
        for i, u in enumerate(self._leaves):
            if u == user_id and i not in self._stale:
                return i
        return None

    @property
    def ghost_announced(self) -> bool:
        """Whether the ghost is announced to the members (op 11 sent, op 13 not yet)."""
        return self._ghost_announced

    @property
    def ghost(self) -> DaveClient | None:
        """The server-held ghost client (for tests), if one exists."""
        return self._ghost

    @property
    def downgrading(self) -> bool:
        """A downgrade was announced (op 21) and has not executed yet: the MLS group is frozen."""
        return self._downgrade is not None

    @property
    def upgrading(self) -> bool:
        """An upgrade was announced (op 24) and the new group's first transition has not executed."""
        return self._upgrade is not None

    # -- inputs --------------------------------------------------------------------------------------

    def join(self, user_id: int) -> list[Outgoing]:
        """A member's voice session reached op 4: returns op 25 for it (a re-join resets its state)."""
        if user_id == self.ghost_user_id:
            raise ValueError(f"user id {user_id} is reserved for the ghost member")
        out: list[Outgoing] = []
        if user_id in self._joined:
            _log.debug("user %d joined again; treating its DAVE state as reset", user_id)
            self._client_reset(user_id, out)
        self._joined[user_id] = None
        if self._ghost_announced:
            out.append(self._ghost_connect(user_id))
        out.append(Outgoing(user_id, OP_EXTERNAL_SENDER, None, self.sender.package()))
        downgrade = self._downgrade
        if downgrade is not None:
            # It joins a call that is about to drop DAVE: it takes part in that transition too.
            downgrade.recipients = downgrade.recipients | {user_id}
            downgrade.awaiting.add(user_id)
            out.append(self._prepare_transition(user_id, downgrade.transition_id))
        elif self.protocol_version == 0:
            # The call has no DAVE: transition id 0 is executed by the client at once.
            out.append(self._prepare_transition(user_id, 0))
        self._reconcile(out)
        return out

    def key_package(self, user_id: int, data: bytes) -> list[Outgoing]:
        """Op 26 received.  Raises MLSFormatError for a malformed or foreign key package."""
        info = parse_key_package(data)
        if info.user_id != user_id:
            raise MLSFormatError(f"key package credential is for user {info.user_id}, sent by user {user_id}")
        if info.cipher_suite != CIPHERSUITE_P256:
            raise MLSFormatError(f"key package uses cipher suite {info.cipher_suite}, expected 2")
        if user_id not in self._joined:
            _log.warning("key package from user %d that has not joined; ignored", user_id)
            return []
        out: list[Outgoing] = []
        self._client_reset(user_id, out)
        self._key_packages[user_id] = bytes(data)
        self._reconcile(out)
        return out

    def commit_welcome(self, user_id: int, data: bytes) -> list[Outgoing]:
        """Op 28 received.  Raises MLSFormatError for malformed bytes; losing commits are ignored."""
        commit, welcome = split_commit_welcome(data)
        info = parse_commit_message(commit)
        welcome_info = parse_welcome(welcome) if welcome is not None else None
        if info.wire_format != WIRE_PUBLIC or info.proposal_refs is None:
            raise MLSFormatError("commit is a PrivateMessage; DAVE commits must be PublicMessages")

        def ignore(reason: str) -> list[Outgoing]:
            _log.debug("ignoring commit from user %d: %s", user_id, reason)
            self.ignored_commits.append((user_id, reason))
            return []

        if self.protocol_version == 0:
            return ignore("the call is at DAVE protocol version 0 (no MLS group)")
        if info.group_id != self.group_id:
            return ignore(f"wrong group id {info.group_id.hex()}")
        if user_id not in self._joined:
            return ignore("user is not connected")
        if info.sender_type != SENDER_MEMBER:
            return ignore(f"sender type {info.sender_type} is not a member")
        if self.epoch is None:
            expected_epoch, expected_leaf = 0, 0
            if user_id not in self._key_packages:
                return ignore("user is not a pending member with a key package")
        else:
            expected_epoch = self.epoch
            leaf = self.leaf_index(user_id)
            if leaf is None:
                return ignore("user is not a healthy group member")
            expected_leaf = leaf
        if info.epoch != expected_epoch:
            return ignore(f"commit is for epoch {info.epoch}, current epoch is {expected_epoch}")
        if info.sender_index != expected_leaf:
            return ignore(f"commit sender leaf {info.sender_index} != {expected_leaf}")
        if info.inline_proposals:
            return ignore("commit carries inline proposals")
        expected = {ref for ref, p in self._inflight.items() if user_id in p.recipients}
        refs = info.proposal_refs
        if not refs or len(set(refs)) != len(refs) or set(refs) != expected:
            return ignore("commit does not reference exactly the proposals sent to this member")
        proposals = [self._inflight[ref] for ref in refs]
        adds = [p for p in proposals if p.kind == "add"]
        removes = [p for p in proposals if p.kind == "remove"]
        if adds and welcome_info is None:
            return ignore("commit adds members but carries no welcome")
        if welcome_info is not None and welcome_info.secrets != len(adds):
            return ignore(f"welcome has {welcome_info.secrets} secrets for {len(adds)} added member(s)")
        if any(p.leaf_index == self.leaf_index(user_id) for p in removes):
            return ignore("commit removes its own committer")
        out: list[Outgoing] = []
        self._apply_commit(user_id, info.epoch, commit, welcome, adds, removes, out)
        self._reconcile(out)
        return out

    def transition_ready(self, user_id: int, transition_id: int) -> list[Outgoing]:
        """Op 23 received: once every recipient of the transition is ready, op 22 goes out."""
        out: list[Outgoing] = []
        transition = self._pending.get(transition_id)
        if transition is None:
            _log.debug("op 23 from user %d for unknown transition %d", user_id, transition_id)
            return out
        transition.awaiting.discard(user_id)
        self._maybe_execute(transition, out)
        return out

    def transition_timed_out(self, transition_id: int) -> list[Outgoing]:
        """The gateway stops waiting for op 23 on ``transition_id``: it executes (op 22) now, unless it
        already did (then []).  A downgrade still executes after the commits announced before it."""
        out: list[Outgoing] = []
        transition = self._pending.get(transition_id)
        if transition is None or not transition.awaiting:
            return out
        _log.info(
            "channel %d: transition %d timed out waiting for %s",
            self.channel_id,
            transition_id,
            sorted(transition.awaiting),
        )
        transition.awaiting.clear()
        transition.timed_out = True
        self._maybe_execute(transition, out)
        return out

    def invalid_commit_welcome(self, user_id: int, transition_id: int) -> list[Outgoing]:
        """Op 31 received: the member reset its session; it is removed and re-added on its next op 26."""
        if user_id not in self._joined:
            return []
        _log.info("user %d reported an invalid commit/welcome for transition %d", user_id, transition_id)
        out: list[Outgoing] = []
        self._client_reset(user_id, out)
        self._reconcile(out)
        return out

    def leave(self, user_id: int) -> list[Outgoing]:
        """The member disconnected: its pending proposals are revoked and its leaf removed."""
        if user_id not in self._joined:
            return []
        out: list[Outgoing] = []
        del self._joined[user_id]
        self._key_packages.pop(user_id, None)
        self._forget_recipient(user_id, out)
        self._reconcile(out)
        return out

    def force_epoch_change(self) -> list[Outgoing]:
        """Cause an epoch change without a real member's change: a silent client joins and leaves.

        Any commit satisfies the request; when nothing else is pending the ghost is announced to
        every member (op 11, so that members enforcing the recognised-user rule accept its Add), added
        (one epoch), removed again (a second epoch) and announced gone (op 13).  Returns [] when there
        is no established group.
        """
        if self.epoch is None:
            _log.debug("force_epoch_change without an established group; nothing to do")
            return []
        out: list[Outgoing] = []
        self._force = True
        if not self._ghost_announced:
            self._ghost_announced = True
            out.extend(self._ghost_connect(user_id) for user_id in self._joined)
        self._reconcile(out)
        return out

    def downgrade(self) -> list[Outgoing]:
        """Move the call to protocol version 0 (transport encryption only), as when a client without
        DAVE joins: op 21 to every connected member now, op 22 once all of them answered op 23.

        Returns [] when the call is already at version 0 or a downgrade is under way.
        """
        if self.protocol_version == 0 or self._downgrade is not None:
            _log.debug("downgrade requested at protocol version %d; nothing to do", self.protocol_version)
            return []
        recipients = frozenset(self._joined)
        tid = self._allocate_transition_id()
        transition = Transition(
            tid,
            0 if self.epoch is None else self.epoch,
            0,
            (),
            (),
            recipients,
            set(recipients),
            protocol_version=0,
            kind="downgrade",
        )
        self.version_changes.append(transition)
        self._pending[tid] = transition
        self._downgrade = transition
        self._upgrade = None
        _log.info("channel %d: downgrade to DAVE protocol version 0 (transition %d)", self.channel_id, tid)
        out = [self._prepare_transition(user_id, tid) for user_id in sorted(recipients)]
        self._reconcile(out)  # revokes what is in flight: no commit may start any more
        self._maybe_execute(transition, out)
        return out

    def upgrade(self) -> list[Outgoing]:
        """Move the call back to protocol version 1, as when the last client without DAVE left.

        Sends op 24 (epoch 1: a new MLS group) to every connected member; their new key packages
        then create the group as usual.  Returns [] unless the call is at protocol version 0.
        """
        if self.protocol_version != 0:
            _log.debug("upgrade requested at protocol version %d; nothing to do", self.protocol_version)
            return []
        recipients = frozenset(self._joined)
        tid = self._allocate_transition_id()
        transition = Transition(tid, 1, 0, (), (), recipients, protocol_version=1, kind="upgrade")
        self.version_changes.append(transition)
        self.protocol_version = 1
        self._key_packages.clear()  # every member re-inits its session and sends a new one
        if recipients:
            self._upgrade = transition
        else:
            transition.executed = True
        _log.info("channel %d: upgrade to DAVE protocol version 1 (transition %d)", self.channel_id, tid)
        payload = {"transition_id": tid, "epoch": 1, "protocol_version": 1}
        return [Outgoing(user_id, OP_PREPARE_EPOCH, dict(payload), None) for user_id in sorted(recipients)]

    def receive(self, user_id: int, message: ClientMessage) -> list[Outgoing]:
        """Dispatch a client message (op 23, 26, 28 or 31) to the matching input method."""
        if message.opcode == OP_KEY_PACKAGE and message.binary is not None:
            return self.key_package(user_id, message.binary)
        if message.opcode == OP_COMMIT_WELCOME and message.binary is not None:
            return self.commit_welcome(user_id, message.binary)
        if message.opcode == OP_TRANSITION_READY and message.json is not None:
            return self.transition_ready(user_id, int(message.json["transition_id"]))
        if message.opcode == OP_INVALID_COMMIT_WELCOME and message.json is not None:
            return self.invalid_commit_welcome(user_id, int(message.json["transition_id"]))
        raise ValueError(f"unexpected client DAVE message op {message.opcode}")

    # -- internals -----------------------------------------------------------------------------------

    def _healthy_users(self) -> set[int]:
        return {
            u
            for i, u in enumerate(self._leaves)
            if u is not None and u != self.ghost_user_id and u in self._joined and i not in self._stale
        }

    def _client_reset(self, user_id: int, out: list[Outgoing]) -> None:
        """The user's davey session was (or will be) re-initialised: forget what it held."""
        for i, u in enumerate(self._leaves):
            if u == user_id:
                self._stale.add(i)
        self._key_packages.pop(user_id, None)
        # A re-initialised session still answers op 21: only its commit transitions stop waiting.
        self._forget_recipient(user_id, out, commits_only=True)

    def _forget_recipient(self, user_id: int, out: list[Outgoing], *, commits_only: bool = False) -> None:
        for proposal in self._inflight.values():
            proposal.recipients.discard(user_id)
        for transition in list(self._pending.values()):
            if commits_only and transition.kind != "commit":
                continue
            transition.awaiting.discard(user_id)
            self._maybe_execute(transition, out)

    def _prepare_transition(self, user_id: int, transition_id: int, version: int = 0) -> Outgoing:
        payload = {"transition_id": transition_id, "protocol_version": version}
        return Outgoing(user_id, OP_PREPARE_TRANSITION, payload, None)

    def _ghost_connect(self, user_id: int) -> Outgoing:
        return Outgoing(user_id, OP_CLIENTS_CONNECT, {"user_ids": [str(self.ghost_user_id)]}, None)

    def _ghost_gone(self, out: list[Outgoing]) -> None:
        """The ghost left the group (or the group is gone): announce it gone (op 13) once."""
        self._ghost = None
        self._ghost_kp = None
        if self._ghost_announced:
            self._ghost_announced = False
            for user_id in self._joined:
                out.append(
                    Outgoing(user_id, OP_CLIENT_DISCONNECT, {"user_id": str(self.ghost_user_id)}, None)
                )

    def _maybe_execute(self, transition: Transition, out: list[Outgoing]) -> None:
        if transition.awaiting or transition.executed:
            return
        if transition.kind == "downgrade" and any(t.kind == "commit" for t in self._pending.values()):
            return  # commits announced earlier execute first (see the module docstring)
        transition.executed = True
        self._pending.pop(transition.transition_id, None)
        for user_id in sorted(transition.recipients):
            if user_id in self._joined:
                out.append(
                    Outgoing(
                        user_id, OP_EXECUTE_TRANSITION, {"transition_id": transition.transition_id}, None
                    )
                )
        if transition.kind == "downgrade":
            self._apply_downgrade()
            return
        upgrade = self._upgrade
        if upgrade is not None and transition.epoch == 1:
            upgrade.executed = True
            self._upgrade = None
            _log.info("channel %d: upgrade to DAVE protocol version 1 complete", self.channel_id)
        if self._downgrade is not None:
            self._maybe_execute(self._downgrade, out)

    def _apply_downgrade(self) -> None:
        """The downgrade executed: the call is at protocol version 0 and the MLS group is forgotten."""
        _log.info("channel %d: now at DAVE protocol version 0", self.channel_id)
        self.protocol_version = 0
        self._downgrade = None
        self._upgrade = None
        self.epoch = None
        self._leaves = []
        self._stale.clear()
        self._inflight.clear()
        self._key_packages.clear()
        self._force = False
        self._ghost = None
        self._ghost_kp = None
        self._ghost_announced = False

    def _allocate_transition_id(self) -> int:
        while True:
            tid = self._next_tid
            self._next_tid = 1 if tid >= 0xFFFF else tid + 1
            if tid not in self._pending:
                return tid

    def _apply_commit(
        self,
        committer: int,
        commit_epoch: int,
        commit: bytes,
        welcome: bytes | None,
        adds: list[_Proposal],
        removes: list[_Proposal],
        out: list[Outgoing],
    ) -> None:
        old_healthy = self._healthy_users()
        ghost_was_in = self.ghost_in_group
        creation = self.epoch is None
        if self.epoch is None:
            self._leaves = [committer]
            self._stale.clear()
        for p in removes:
            assert p.leaf_index is not None
            self._leaves[p.leaf_index] = None
            self._stale.discard(p.leaf_index)
        while self._leaves and self._leaves[-1] is None:
            self._leaves.pop()
        for p in adds:
            try:
                index = self._leaves.index(None)
            except ValueError:
                index = len(self._leaves)
                self._leaves.append(p.user_id)
            else:
                self._leaves[index] = p.user_id
        self.epoch = commit_epoch + 1
        self._inflight.clear()
        self._force = False
        healthy = self._healthy_users()
        for user_id in list(self._key_packages):
            if user_id in healthy:
                del self._key_packages[user_id]

        added_real = [p.user_id for p in adds if p.user_id != self.ghost_user_id]
        removed_ids = tuple(p.user_id for p in removes)
        # A new group (but the one that completes an upgrade) starts at once: transition id 0.
        tid = 0 if creation and self._upgrade is None else self._allocate_transition_id()
        commit_recipients = ({committer} | old_healthy) & healthy
        recipients = frozenset(commit_recipients | set(added_real))
        transition = Transition(
            tid,
            self.epoch,
            committer,
            tuple(p.user_id for p in adds),
            removed_ids,
            recipients,
            set(recipients) if tid else set(),
            executed=tid == 0,
        )
        self.transitions.append(transition)
        if tid:
            self._pending[tid] = transition
        _log.info(
            "channel %d: epoch %d by user %d (transition %d, +%s -%s)",
            self.channel_id,
            self.epoch,
            committer,
            tid,
            list(transition.added),
            list(removed_ids),
        )
        prefix = tid.to_bytes(2, "big")
        for user_id in sorted(commit_recipients):
            out.append(Outgoing(user_id, OP_ANNOUNCE_COMMIT, None, prefix + commit))
        if welcome is not None:
            for user_id in added_real:
                out.append(Outgoing(user_id, OP_WELCOME, None, prefix + welcome))
        self._ghost_follow(ghost_was_in, commit, welcome, prefix, adds, removes, out)

    def _ghost_follow(
        self,
        ghost_was_in: bool,
        commit: bytes,
        welcome: bytes | None,
        prefix: bytes,
        adds: list[_Proposal],
        removes: list[_Proposal],
        out: list[Outgoing],
    ) -> None:
        ghost = self._ghost
        if ghost is None:
            return
        if any(p.user_id == self.ghost_user_id for p in removes):
            self._ghost_gone(out)
            return
        if any(p.user_id == self.ghost_user_id for p in adds) and welcome is not None:
            replies = ghost.handle(Outgoing(ghost.user_id, OP_WELCOME, None, prefix + welcome))
            self._ghost_kp = None
        elif ghost_was_in:
            replies = ghost.handle(Outgoing(ghost.user_id, OP_ANNOUNCE_COMMIT, None, prefix + commit))
        else:
            return
        if any(r.opcode == OP_INVALID_COMMIT_WELCOME for r in replies):
            _log.warning("the ghost member failed to follow the group; it will be removed")

    def _ensure_ghost_key_package(self) -> bytes:
        if self._ghost is None or self._ghost_kp is None:
            ghost = DaveClient(self.ghost_user_id, self.channel_id)
            replies = ghost.session_description(self.protocol_version)
            ghost.handle(Outgoing(ghost.user_id, OP_EXTERNAL_SENDER, None, self.sender.package()))
            kp = next(r.binary for r in replies if r.opcode == OP_KEY_PACKAGE and r.binary is not None)
            self._ghost, self._ghost_kp = ghost, kp
        return self._ghost_kp

    def _desired(self) -> list[_Spec]:
        specs: list[_Spec] = []
        if self.protocol_version == 0 or self._downgrade is not None:
            return specs  # no MLS at version 0; frozen while a downgrade is pending
        if self.epoch is None:
            if self._awaiting_upgrade_key_packages():
                return specs
            candidates = [u for u in self._joined if u in self._key_packages]
            if len(candidates) >= 2:
                for candidate in candidates:
                    others = frozenset(c for c in candidates if c != candidate)
                    specs.append(_Spec("add", candidate, None, self._key_packages[candidate], others))
            return specs
        committers = frozenset(self._healthy_users())
        for i, leaf_user in enumerate(self._leaves):
            if leaf_user is None:
                continue
            if leaf_user == self.ghost_user_id or leaf_user not in self._joined or i in self._stale:
                specs.append(_Spec("remove", leaf_user, i, None, committers))
        for u in self._joined:
            if u in self._key_packages and u not in committers:
                specs.append(_Spec("add", u, None, self._key_packages[u], committers))
        if not specs and self._force:
            kp = self._ensure_ghost_key_package()
            specs.append(_Spec("add", self.ghost_user_id, None, kp, committers))
        return specs

    def _forget_group(self, out: list[Outgoing]) -> None:
        self.epoch = None
        self._leaves = []
        self._stale.clear()
        self._inflight.clear()
        self._force = False
        self._ghost_gone(out)

    def _sole_member(self) -> int | None:
        """The one connected user, when it is alone in an established group that others have left."""
        if self.epoch is None or self._downgrade is not None or len(self._joined) != 1:
            return None
        (user_id,) = self._joined
        return user_id if self._healthy_users() == {user_id} else None

    def _reset_sole_member(self, out: list[Outgoing]) -> None:
        """protocol.md's sole member reset: op 24 (epoch 1) and op 21 (transition 0); no group left."""
        user_id = self._sole_member()
        assert user_id is not None
        _log.info("channel %d: user %d is alone; its group is reset", self.channel_id, user_id)
        self.sole_member_resets.append(user_id)
        self._forget_group(out)
        self._key_packages.pop(user_id, None)  # it sends a new one on op 24
        self._forget_recipient(user_id, out, commits_only=True)
        version = self.protocol_version
        out.append(
            Outgoing(
                user_id,
                OP_PREPARE_EPOCH,
                {"transition_id": 0, "epoch": 1, "protocol_version": version},
                None,
            )
        )
        out.append(self._prepare_transition(user_id, 0, version))

    def _awaiting_upgrade_key_packages(self) -> bool:
        """During an upgrade, whether a connected recipient of op 24 has not sent its key package yet."""
        upgrade = self._upgrade
        if upgrade is None:
            return False
        return any(u in self._joined and u not in self._key_packages for u in upgrade.recipients)

    def _reconcile(self, out: list[Outgoing]) -> None:
        """Bring the in-flight proposals in line with who should be in the group."""
        if self.epoch is not None and not self._healthy_users():
            _log.info("channel %d: no healthy member left; the group will be re-created", self.channel_id)
            self._forget_group(out)
        elif self._sole_member() is not None:
            self._reset_sole_member(out)
        specs = self._desired()
        wanted = {s.key: s for s in specs}
        live = set(self._joined)

        revokes: dict[int, list[bytes]] = {}
        for ref, stale in list(self._inflight.items()):
            if stale.key not in wanted:
                del self._inflight[ref]
                for user_id in stale.recipients & live:
                    revokes.setdefault(user_id, []).append(ref)

        by_key = {p.key: p for p in self._inflight.values()}
        appends: dict[int, list[bytes]] = {}
        epoch = 0 if self.epoch is None else self.epoch
        for spec in specs:
            proposal = by_key.get(spec.key)
            if proposal is None:
                if spec.kind == "add":
                    assert spec.key_package is not None
                    message = self.sender.add_proposal(self.group_id, epoch, spec.key_package)
                else:
                    assert spec.leaf_index is not None
                    message = self.sender.remove_proposal(self.group_id, epoch, spec.leaf_index)
                proposal = _Proposal(
                    spec.kind, spec.user_id, spec.leaf_index, spec.key_package, message, proposal_ref(message)
                )
                self._inflight[proposal.ref] = proposal
            for user_id in sorted(spec.recipients - proposal.recipients):
                appends.setdefault(user_id, []).append(proposal.message)
                proposal.recipients.add(user_id)

        for user_id, refs in revokes.items():
            out.append(Outgoing(user_id, OP_PROPOSALS, None, revoke_payload(refs)))
        for user_id, messages in appends.items():
            out.append(Outgoing(user_id, OP_PROPOSALS, None, proposals_payload(messages)))
