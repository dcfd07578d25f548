"""DaveGroup (server side) against real davey sessions wrapped in DaveClient (client side)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import davey
import pytest

from listening_core.testing.dave_client import ClientMessage, DaveClient
from listening_core.testing.dave_group import DaveGroup, Outgoing
from listening_core.testing.mls import MLSFormatError, parse_commit_message, split_commit_welcome

CHANNEL = 555_000_000_000_000_001
A, B, C, D = 101, 202, 303, 404


class Net:
    """A loopback 'network': server messages are delivered before the server reads the next reply."""

    def __init__(self, group: DaveGroup) -> None:
        self.group = group
        self.clients: dict[int, DaveClient] = {}
        self.server_q: deque[tuple[int, ClientMessage]] = deque()
        self.log: list[Outgoing] = []

    def deliver(self, out: Iterable[Outgoing]) -> None:
        for msg in out:
            self.log.append(msg)
            client = self.clients.get(msg.user_id)
            if client is None:
                continue
            for reply in client.handle(msg):
                self.server_q.append((msg.user_id, reply))

    def pump(self, out: Iterable[Outgoing] = ()) -> None:
        self.deliver(out)
        while self.server_q:
            uid, reply = self.server_q.popleft()
            if uid not in self.clients:
                continue
            self.deliver(self.group.receive(uid, reply))

    def announce(self, uid: int) -> None:
        """Op 11 as the voice gateway sends it before any DAVE message: the others learn of ``uid``
        and ``uid`` (if it is one of the clients) of them."""
        others = [c for u, c in self.clients.items() if u != uid]
        if uid in self.clients and others:
            self.clients[uid].handle_json(11, {"user_ids": [str(o.user_id) for o in others]})
        for other in others:
            other.handle_json(11, {"user_ids": [str(uid)]})

    def connect(self, uid: int, *, pump: bool = True) -> DaveClient:
        """Voice session reaches op 4: discord.py sends op 26 at once, the server sends op 25."""
        client = DaveClient(uid, CHANNEL, enforce_recognised=True)
        self.clients[uid] = client
        key_package = client.session_description(1)  # op 4 -> reinit -> op 26 (sent immediately)
        self.announce(uid)
        self.deliver(self.group.join(uid))  # op 25
        self.server_q.extend((uid, m) for m in key_package)
        if pump:
            self.pump()
        return client

    def disconnect(self, uid: int) -> None:
        del self.clients[uid]
        for other in self.clients.values():
            other.handle_json(13, {"user_id": str(uid)})
        self.pump(self.group.leave(uid))


def assert_all_decrypt(net: Net) -> None:
    clients = net.clients
    for sender_id, sender in clients.items():
        frame = b"opus frame from %d" % sender_id
        encrypted = sender.encrypt_opus(frame)
        assert encrypted != frame
        for receiver_id, receiver in clients.items():
            if receiver_id != sender_id:
                assert receiver.decrypt(sender_id, encrypted) == frame


def assert_consistent(net: Net) -> None:
    group = net.group
    assert not group.pending_transitions, "every transition should have been executed"
    for uid, client in net.clients.items():
        assert client.ready
        assert client.epoch == group.epoch
        assert client.session is not None
        assert client.session.own_leaf_index == group.leaf_index(uid)
        assert client.group_user_ids() == set(group.members)
        assert not client.pending_transitions
        assert not client.invalid_reports


def test_a_member_alone_stays_pending_then_two_create_the_group_with_transition_zero() -> None:
    net = Net(DaveGroup(CHANNEL))
    client = net.connect(A)
    group = net.group
    # Alone: no group and no Add for anyone (a server-made member would be a user nobody announced).
    assert group.epoch is None and group.members == set() and group.pending_members == {A}
    assert [m.opcode for m in net.log] == [25]
    assert not client.ready and not client.can_encrypt
    net.connect(B)
    assert group.epoch == 1 and group.members == {A, B}
    (creation,) = group.transitions
    # The new group starts at once: transition id 0, no op 23 awaited, no op 22 sent.
    assert creation.transition_id == 0 and creation.executed and not creation.awaiting
    assert not any(m.opcode in (21, 22) for m in net.log)
    assert all(c.executed_transitions == [] and c.can_encrypt for c in net.clients.values())
    assert_consistent(net)
    assert_all_decrypt(net)


def test_three_members_join_one_by_one_then_leave() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    net.connect(A)
    net.connect(B)
    assert group.epoch == 1
    epochs: list[int] = [group.epoch]
    for uid in (C,):
        net.connect(uid)
        assert group.epoch is not None and group.epoch > epochs[-1]
        epochs.append(group.epoch)
        last = group.transitions[-1]
        assert uid in last.added and last.executed
        # The newcomer was welcomed by an existing member (the "welcomed" path).
        assert last.committer != uid
        assert any(m.user_id == uid and m.opcode == 30 for m in net.log)
        assert_consistent(net)
        assert_all_decrypt(net)
    assert group.members == {A, B, C}
    assert sorted(group.leaf_index(u) or 0 for u in (A, B, C)) == [0, 1, 2]

    # Every op 22 came after the corresponding op 23s: nothing is left pending and all executed it.
    tid = group.transitions[-1].transition_id
    for client in net.clients.values():
        assert tid in client.executed_transitions

    left = net.clients[B]
    b_leaf = group.leaf_index(B)
    old_frame = net.clients[A].encrypt_opus(b"before the leave")
    net.disconnect(B)
    assert group.members == {A, C}
    assert group.epoch == epochs[-1] + 1
    assert group.transitions[-1].removed == (B,)
    assert_consistent(net)
    assert_all_decrypt(net)
    assert net.clients[C].decrypt(A, old_frame) == b"before the leave"  # old keys are retained
    # B no longer follows the group: frames of the new epoch are opaque to it.
    with pytest.raises(ValueError):
        left.decrypt(A, net.clients[A].encrypt_opus(b"after the leave"))

    # D takes the blank leaf left by B.
    net.connect(D)
    assert group.leaf_index(D) == b_leaf
    assert_consistent(net)
    assert_all_decrypt(net)


def test_two_pending_members_race_and_loser_is_welcomed() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    # Both voice sessions reach op 4 before any proposal is processed by a client.
    a = DaveClient(A, CHANNEL, enforce_recognised=True)
    b = DaveClient(B, CHANNEL, enforce_recognised=True)
    net.clients.update({A: a, B: b})
    kp_a = a.session_description(1)[0].binary
    kp_b = b.session_description(1)[0].binary
    assert kp_a is not None and kp_b is not None
    out = group.join(A) + group.join(B)
    net.announce(A)
    net.announce(B)
    out += group.key_package(A, kp_a)  # lone pending member: nothing to propose
    out += group.key_package(B, kp_b)  # now two: Add(A) to B, Add(B) to A
    assert [(m.user_id, m.opcode, m.binary[0] if m.binary else None) for m in out[2:]] == [
        (B, 27, 0),
        (A, 27, 0),
    ]
    net.deliver(out)
    # Both committed the other's Add, B first: B's commit creates the group, A's is for epoch 0.
    commits = [(uid, m) for uid, m in net.server_q if m.opcode == 28]
    assert [uid for uid, _ in commits] == [B, A]
    net.pump()
    assert group.epoch == 1
    assert group.members == {A, B}
    first = group.transitions[0]
    assert first.committer == B and first.added == (A,) and first.transition_id == 0
    assert group.leaves == [B, A]
    reasons = [reason for _, reason in group.ignored_commits]
    assert any("epoch 0" in r for r in reasons)  # A lost the race
    assert a.invalid_reports == []
    assert any(m.user_id == A and m.opcode == 30 for m in net.log)  # the loser is welcomed
    assert_consistent(net)
    assert_all_decrypt(net)


def test_concurrent_commits_in_established_group_first_wins() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    net.connect(A)
    net.connect(B)
    before = len(group.ignored_commits)
    net.connect(C)
    # A and B both committed C's Add; only one of them won, the other's commit was for a stale epoch.
    last = group.transitions[-1]
    assert last.added == (C,)
    stale = [r for _, r in group.ignored_commits[before:] if "current epoch" in r]
    assert len(stale) == 1
    assert_consistent(net)
    assert_all_decrypt(net)


def test_joiner_commits_path() -> None:
    """The second joiner may win the creation race and commit the group."""
    group = DaveGroup(CHANNEL)
    net = Net(group)
    net.connect(A)
    b = DaveClient(B, CHANNEL, enforce_recognised=True)
    net.clients[B] = b
    net.announce(B)
    kp_b = b.session_description(1)
    net.deliver(group.join(B))
    out = group.key_package(B, kp_b[0].binary or b"")  # Add(B) to A, Add(A) to B
    # Deliver to B first and let B's commit reach the server first.
    out.sort(key=lambda m: m.user_id != B)
    net.deliver(out)
    net.server_q = deque(sorted(net.server_q, key=lambda item: item[0] != B))
    net.pump()
    assert group.transitions[0].committer == B
    assert group.transitions[0].added == (A,)
    assert group.leaves == [B, A]
    assert any(m.user_id == A and m.opcode == 30 for m in net.log)
    assert_consistent(net)
    assert_all_decrypt(net)


def test_force_epoch_change() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    for uid in (A, B):
        net.connect(uid)
    epoch = group.epoch
    assert epoch is not None
    net.pump(group.force_epoch_change())
    assert group.epoch == epoch + 2  # ghost added, then removed
    assert group.members == {A, B} and not group.ghost_in_group
    assert group.transitions[-2].added == (group.ghost_user_id,)
    assert group.transitions[-1].removed == (group.ghost_user_id,)
    assert_consistent(net)
    assert_all_decrypt(net)
    assert DaveGroup(CHANNEL).force_epoch_change() == []


def test_force_epoch_change_while_ghost_present_is_one_epoch() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    net.connect(A)
    net.connect(B)
    out = group.force_epoch_change()
    # Deliver only up to the ghost's Add: the ghost sits in the group and decrypts like a member.
    net.deliver(out)
    uid, reply = net.server_q.popleft()
    net.deliver(group.receive(uid, reply))
    assert group.ghost_in_group
    ghost = group.ghost
    assert ghost is not None and ghost.ready
    frame = net.clients[A].encrypt_opus(b"x")
    assert ghost.decrypt(A, frame) == b"x"
    net.pump()
    assert not group.ghost_in_group and group.ghost is None
    assert_consistent(net)


def test_invalid_commit_welcome_recovers() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    for uid in (A, B, C):
        net.connect(uid)
    epoch = group.epoch
    assert epoch is not None
    # C claims it could not process the last transition: discord.py sends op 31 and a new op 26.
    replies = net.clients[C]._recover_from_invalid_commit(group.transitions[-1].transition_id)
    assert [m.opcode for m in replies] == [31, 26]
    assert not net.clients[C].ready
    net.clients[C].invalid_reports.clear()
    net.server_q.extend((C, m) for m in replies)
    net.pump()
    last = group.transitions[-1]
    assert group.epoch == epoch + 1  # one commit removed the stale leaf and re-added C
    assert last.removed == (C,) and last.added == (C,)
    assert group.members == {A, B, C}
    assert_consistent(net)
    assert_all_decrypt(net)


def test_leave_of_pending_joiner_revokes_its_add() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    net.connect(A)
    net.connect(B)
    epoch = group.epoch
    c = DaveClient(C, CHANNEL, enforce_recognised=True)
    kp = c.session_description(1)
    net.announce(C)
    group.join(C)
    out = group.key_package(C, kp[0].binary or b"")
    assert {m.user_id for m in out} == {A, B}
    # Members see the Add, then C leaves before any commit arrives: the Add is revoked.
    net.deliver(out)
    net.server_q.clear()  # the commits are still "in flight"... and arrive after the revoke
    out = group.leave(C)
    assert sorted((m.user_id, m.opcode, m.binary[0] if m.binary else None) for m in out) == [
        (A, 27, 1),
        (B, 27, 1),
    ]
    net.pump(out)
    assert group.epoch == epoch and group.members == {A, B} and group.inflight_proposals == 0
    assert_consistent(net)
    assert_all_decrypt(net)


def test_sole_member_is_reset_then_a_new_group_forms() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    net.connect(A)
    net.connect(B)
    start = len(net.log)
    net.disconnect(A)
    # protocol.md's sole member reset: op 24 with epoch 1, then op 21 with transition id 0, to B.
    sent = [(m.user_id, m.opcode, m.json) for m in net.log[start:] if m.opcode in (21, 24)]
    assert sent == [
        (B, 24, {"transition_id": 0, "epoch": 1, "protocol_version": 1}),
        (B, 21, {"transition_id": 0, "protocol_version": 0 + 1}),
    ]
    b = net.clients[B]
    assert group.sole_member_resets == [B] and group.epoch is None and group.members == set()
    assert not b.ready and b.executed_transitions[-1] == 0  # it re-initialised and executed id 0
    assert group.pending_members == {B}  # with the new key package it sent
    net.disconnect(B)
    assert group.epoch is None and group.members == set()
    net.connect(C)
    assert group.epoch is None
    net.connect(D)
    assert group.members == {C, D} and group.transitions[-1].transition_id == 0
    assert_consistent(net)
    assert_all_decrypt(net)


def test_sole_member_reset_then_the_same_member_groups_again() -> None:
    net = Net(DaveGroup(CHANNEL))
    net.connect(A)
    net.connect(B)
    net.disconnect(A)
    net.connect(C)  # B's key package from the reset and C's create a new group
    assert net.group.members == {B, C} and net.group.epoch == 1
    assert_consistent(net)
    assert_all_decrypt(net)


def test_malformed_commit_welcome_is_rejected_without_state_change() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    net.connect(A)
    net.connect(B)
    c = DaveClient(C, CHANNEL, enforce_recognised=True)
    net.clients[C] = c
    net.announce(C)
    kp = c.session_description(1)
    net.deliver(group.join(C))
    net.deliver(group.key_package(C, kp[0].binary or b""))
    real = [(uid, m) for uid, m in net.server_q if m.opcode == 28]
    assert real
    uid, good = real[0]
    data = good.binary or b""
    commit, welcome = split_commit_welcome(data)
    assert welcome is not None and commit + welcome == data
    snapshot = (group.epoch, group.leaves, group.inflight_proposals, len(group.transitions))
    bad_inputs = [
        b"",
        b"\x00",
        data[:10],
        commit[:-1],
        data[:-1],
        data + b"\x00",
        commit + b"\xff" * 5,
        b"\x00\x01\x00\x02" + commit[4:],  # wire format 2 but a public body
        bytes([0xC0]) * 40,
    ]
    for bad in bad_inputs:
        with pytest.raises(MLSFormatError):
            group.commit_welcome(uid, bad)
        assert (group.epoch, group.leaves, group.inflight_proposals, len(group.transitions)) == snapshot
    # A well-formed commit for the wrong epoch is ignored, not an error.
    assert parse_commit_message(commit).epoch == group.epoch
    # The real commits still work afterwards.
    net.pump()
    assert group.members == {A, B, C}
    assert_consistent(net)
    assert_all_decrypt(net)


def test_foreign_or_malformed_key_package_rejected() -> None:
    group = DaveGroup(CHANNEL)
    group.join(A)
    other = davey.DaveSession(1, B, CHANNEL)
    with pytest.raises(MLSFormatError, match="user"):
        group.key_package(A, other.get_serialized_key_package())
    with pytest.raises(MLSFormatError):
        group.key_package(A, b"\x00\x01\x00")
    assert group.epoch is None and group.inflight_proposals == 0
    # A key package from a user who never joined is ignored.
    assert group.key_package(B, other.get_serialized_key_package()) == []


def test_outgoing_shapes() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    net.connect(A)
    net.connect(B)
    a = net.clients[A]
    c = DaveClient(C, CHANNEL, enforce_recognised=True)
    kp = c.session_description(1)
    net.clients[C] = c
    net.announce(C)
    (ext,) = group.join(C)
    assert ext.opcode == 25 and ext.json is None and ext.binary == group.sender.package()
    c.handle(ext)
    out = group.key_package(C, kp[0].binary or b"")
    assert sorted(m.user_id for m in out) == [A, B]
    proposals = next(m for m in out if m.user_id == A)
    assert proposals.opcode == 27 and proposals.binary is not None and proposals.binary[0] == 0
    (commit_msg,) = a.handle(proposals)
    net.clients[B].handle(next(m for m in out if m.user_id == B))  # B's own commit loses
    out = group.commit_welcome(A, commit_msg.binary or b"")
    assert sorted((m.user_id, m.opcode) for m in out) == [(A, 29), (B, 29), (C, 30)]
    tid = int.from_bytes(out[0].binary[:2], "big") if out[0].binary else -1
    assert tid == group.transitions[-1].transition_id != 0
    ready = {m.user_id: net.clients[m.user_id].handle(m) for m in out}
    assert all(r == [ClientMessage(23, json={"transition_id": tid})] for r in ready.values())
    assert group.transition_ready(A, tid) == group.transition_ready(B, tid) == []
    execute = group.transition_ready(C, tid)
    assert execute == [Outgoing(u, 22, {"transition_id": tid}, None) for u in (A, B, C)]
    assert group.transition_ready(A, tid) == []  # duplicate op 23 is harmless


def test_corrupted_welcome_triggers_op31_and_readd() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    net.connect(A)
    net.connect(B)
    epoch = group.epoch
    assert epoch is not None
    c = DaveClient(C, CHANNEL, enforce_recognised=True)
    net.clients[C] = c
    net.announce(C)
    kp = c.session_description(1)
    net.deliver(group.join(C))
    out = group.key_package(C, kp[0].binary or b"")
    net.deliver(out)
    uid, commit = next((u, m) for u, m in net.server_q if m.opcode == 28)
    net.server_q.clear()
    out = group.commit_welcome(uid, commit.binary or b"")
    corrupted: list[Outgoing] = []
    for m in out:
        if m.opcode == 30 and m.binary is not None:
            m = Outgoing(m.user_id, 30, None, m.binary[:-3] + bytes(b ^ 0xFF for b in m.binary[-3:]))
        corrupted.append(m)
    bad_tid = group.transitions[-1].transition_id
    net.pump(corrupted)
    assert c.invalid_reports == [bad_tid]
    c.invalid_reports.clear()
    # The group removed C's dead leaf and welcomed its new key package in one more epoch.
    assert group.epoch == epoch + 2
    assert group.transitions[-1].removed == (C,) and group.transitions[-1].added == (C,)
    assert group.transitions[-2].executed  # C stopped being waited for after op 31
    assert_consistent(net)
    assert_all_decrypt(net)


def _announce_commit_of_c(net: Net) -> tuple[int, list[Outgoing]]:
    """A and B in a group; C joins and A's commit of its Add is announced: (transition id, op 29/30)."""
    net.connect(A)
    net.connect(B)
    group = net.group
    c = DaveClient(C, CHANNEL, enforce_recognised=True)
    kp = c.session_description(1)
    net.clients[C] = c
    net.announce(C)
    for m in group.join(C):
        c.handle(m)
    out = group.key_package(C, kp[0].binary or b"")
    (commit,) = net.clients[A].handle(next(m for m in out if m.user_id == A))
    net.clients[B].handle(next(m for m in out if m.user_id == B))  # B's own commit loses
    out = group.commit_welcome(A, commit.binary or b"")
    return group.transitions[-1].transition_id, out


def test_execute_waits_for_every_transition_ready() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    tid, out = _announce_commit_of_c(net)
    replies = {m.user_id: net.clients[m.user_id].handle(m) for m in out}
    assert replies[A] == replies[C] == [ClientMessage(23, json={"transition_id": tid})]
    assert group.transition_ready(A, tid) == []
    assert group.transition_ready(C, tid) == []
    assert group.pending_transitions[tid].awaiting == {B}


def test_a_transition_executes_at_its_timeout_without_the_silent_member() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    tid, out = _announce_commit_of_c(net)
    for m in out:
        net.clients[m.user_id].handle(m)
    assert group.transition_ready(A, tid) == []  # B and C never answer
    execute = group.transition_timed_out(tid)
    assert execute == [Outgoing(u, 22, {"transition_id": tid}, None) for u in (A, B, C)]
    transition = group.transitions[-1]
    assert transition.executed and transition.timed_out and tid not in group.pending_transitions
    assert group.transition_timed_out(tid) == []  # once
    net.pump(execute)
    assert_consistent(net)
    assert_all_decrypt(net)


def test_a_transition_ready_in_time_is_not_timed_out() -> None:
    net = Net(DaveGroup(CHANNEL))
    group = net.group
    tid, out = _announce_commit_of_c(net)
    net.pump(out)
    assert not group.transitions[-1].timed_out
    assert group.transition_timed_out(tid) == []


# -- protocol version changes: downgrade to 0 and upgrade back to 1 -----------------------------------


def step(net: Net) -> None:
    """Let the server read exactly one client reply (and deliver what it answers)."""
    uid, reply = net.server_q.popleft()
    if uid in net.clients:
        net.deliver(net.group.receive(uid, reply))


def executes(net: Net, uid: int, start: int = 0) -> list[int]:
    """The transition ids of the op 22s sent to ``uid``, in order, from ``net.log[start:]``."""
    return [
        int(m.json["transition_id"])
        for m in net.log[start:]
        if m.user_id == uid and m.opcode == 22 and m.json is not None
    ]


def downgraded_net(*uids: int) -> Net:
    net = Net(DaveGroup(CHANNEL))
    for uid in uids:
        net.connect(uid)
    net.pump(net.group.downgrade())
    return net


def test_downgrade_prepares_then_executes_once_all_are_ready() -> None:
    net = Net(DaveGroup(CHANNEL))
    for uid in (A, B, C):
        net.connect(uid)
    group = net.group
    a, b = net.clients[A], net.clients[B]
    before = a.encrypt_opus(b"encrypted before the downgrade")
    out = group.downgrade()
    prepares = [m for m in out if m.opcode == 21]
    assert [m.user_id for m in prepares] == [A, B, C]
    tid = int(prepares[0].json["transition_id"]) if prepares[0].json else 0
    assert tid != 0
    assert all(m.json == {"transition_id": tid, "protocol_version": 0} for m in prepares)
    assert group.downgrading and group.protocol_version == 1
    assert group.pending_transitions[tid].kind == "downgrade"

    net.deliver(out)
    # op 21: passthrough on at once (discord.py: set_passthrough_mode(True, 120)), op 23 back, and
    # the clients keep encrypting until op 22.
    for client in net.clients.values():
        assert client.pending_transitions == {tid: 0}
        assert client.passthrough_calls == [(True, 120)]
        assert client.protocol_version == 1 and client.can_encrypt and not client.downgraded
    assert b.decrypt(A, b"plain during the transition") == b"plain during the transition"
    assert b.decrypt(A, before) == b"encrypted before the downgrade"
    assert sorted((uid, m.opcode) for uid, m in net.server_q) == [(A, 23), (B, 23), (C, 23)]

    start = len(net.log)
    step(net)
    step(net)
    assert executes(net, A, start) == []  # C has not answered yet
    step(net)
    assert [executes(net, uid, start) for uid in (A, B, C)] == [[tid]] * 3

    assert group.protocol_version == 0 and not group.downgrading
    assert group.epoch is None and group.members == set() and not group.pending_transitions
    assert [(t.kind, t.transition_id, t.executed) for t in group.version_changes] == [
        ("downgrade", tid, True)
    ]
    for client in net.clients.values():
        assert client.protocol_version == 0 and client.downgraded
        assert not client.can_encrypt and client.sends_unencrypted
        assert client.executed_transitions[-1] == tid and not client.pending_transitions
        # discord.py does not reset the session on a downgrade: old keys still open late frames
        assert client.ready
    assert net.clients[C].decrypt(A, b"plain after the transition") == b"plain after the transition"
    assert b.decrypt(C, b"plain from C") == b"plain from C"
    assert net.clients[C].decrypt(A, a.encrypt_opus(b"in flight")) == b"in flight"


def test_downgrade_freezes_mls_and_ignores_commits() -> None:
    net = Net(DaveGroup(CHANNEL))
    net.connect(A)
    net.connect(B)
    group = net.group
    epoch = group.epoch
    # C joins; A and B get Add(C) and commit it, but the commits are still on their way when the
    # downgrade is announced.
    c = DaveClient(C, CHANNEL, enforce_recognised=True)
    net.clients[C] = c
    net.announce(C)
    net.server_q.extend((C, m) for m in c.session_description(1))
    net.deliver(group.join(C))
    step(net)  # C's key package: Add(C) to A and B, who answer with commits
    commits = [(uid, m) for uid, m in net.server_q if m.opcode == 28]
    assert sorted(uid for uid, _ in commits) == [A, B]
    net.server_q.clear()
    out = group.downgrade()
    # C joined before the downgrade: it is a recipient too; the in-flight Add(C) is revoked.
    assert sorted(m.user_id for m in out if m.opcode == 21) == [A, B, C]
    assert sorted(m.user_id for m in out if m.opcode == 27 and m.binary and m.binary[0] == 1) == [A, B]
    assert group.inflight_proposals == 0
    uid, first = commits[0]
    assert group.receive(uid, first) == []  # references revoked proposals
    assert "exactly the proposals" in group.ignored_commits[-1][1]
    net.pump(out)
    assert group.protocol_version == 0 and group.epoch is None
    uid, second = commits[1]
    assert group.receive(uid, second) == []
    assert "version 0" in group.ignored_commits[-1][1]
    assert group.transitions[-1].epoch == epoch  # no epoch change happened
    for client in net.clients.values():
        assert client.protocol_version == 0 and client.sends_unencrypted
    # Nothing MLS happens at version 0: a forced epoch change is a no-op.
    assert group.force_epoch_change() == []


def test_downgrade_waits_for_commit_transitions_announced_before() -> None:
    net = Net(DaveGroup(CHANNEL))
    net.connect(A)
    net.connect(B)
    group = net.group
    net.connect(C, pump=False)
    # Run the handshake until C's Add is committed and announced but not yet executed.
    while not any(t.kind == "commit" for t in group.pending_transitions.values()):
        step(net)
    (commit_tid,) = [t.transition_id for t in group.pending_transitions.values()]
    start = len(net.log)
    out = group.downgrade()
    down_tid = next(int(m.json["transition_id"]) for m in out if m.opcode == 21 and m.json)
    net.pump(out)
    # discord.py would execute a commit's op 22 as "back to version 1": it must come first.
    for uid in (A, B, C):
        assert executes(net, uid, start) == [commit_tid, down_tid]
        assert net.clients[uid].protocol_version == 0
    assert group.protocol_version == 0


def test_member_leaving_during_downgrade_is_not_waited_for() -> None:
    net = Net(DaveGroup(CHANNEL))
    for uid in (A, B, C):
        net.connect(uid)
    group = net.group
    out = group.downgrade()
    tid = next(int(m.json["transition_id"]) for m in out if m.json)
    net.deliver(out)
    net.server_q = type(net.server_q)((uid, m) for uid, m in net.server_q if uid != C)
    del net.clients[C]
    step(net)
    step(net)
    assert group.downgrading  # still waiting for C
    start = len(net.log)
    net.deliver(group.leave(C))
    assert executes(net, A, start) == executes(net, B, start) == [tid]
    assert group.protocol_version == 0


def test_joining_at_version_zero_executes_transition_zero() -> None:
    net = downgraded_net(A, B)
    start = len(net.log)
    d = net.connect(D)
    assert [(m.opcode, m.json) for m in net.log[start:] if m.user_id == D] == [
        (25, None),
        (21, {"transition_id": 0, "protocol_version": 0}),
    ]
    # transition id 0: executed at once, no op 23 (discord.py).
    assert d.executed_transitions == [0] and d.protocol_version == 0 and d.downgraded
    assert d.sends_unencrypted and not d.can_encrypt
    assert net.group.members == set() and net.group.epoch is None


def test_upgrade_creates_a_new_group_and_everyone_encrypts_again() -> None:
    net = downgraded_net(A, B, C)
    group = net.group
    old_transitions = len(group.transitions)
    net.connect(D)  # joined at version 0: it is upgraded with the others
    out = group.upgrade()
    assert [m.user_id for m in out] == [A, B, C, D]
    tid = int(out[0].json["transition_id"]) if out[0].json else 0
    assert tid != 0
    assert all(
        m.opcode == 24 and m.json == {"transition_id": tid, "epoch": 1, "protocol_version": 1} for m in out
    )
    assert group.protocol_version == 1 and group.upgrading

    net.deliver(out)
    # op 24, epoch 1: version 1 at once, the session re-initialised, a new key package sent;
    # still "downgraded" (and so not yet passthrough-upgraded) until the new group's op 22.
    for client in net.clients.values():
        assert client.protocol_version == 1 and client.downgraded
        assert not client.ready and not client.can_encrypt and not client.sends_unencrypted
    assert sorted((uid, m.opcode) for uid, m in net.server_q) == [(A, 26), (B, 26), (C, 26), (D, 26)]

    # No proposal until every member's new key package is in: a group created from the first one
    # alone would have its members encrypt under an epoch the others never join.
    start = len(net.log)
    for _ in range(3):
        step(net)
    assert net.log[start:] == [] and group.epoch is None
    net.pump()
    assert not group.upgrading and group.version_changes[-1].executed
    assert [t.kind for t in group.version_changes] == ["downgrade", "upgrade"]
    new = group.transitions[old_transitions:]
    assert new[0].epoch == 1  # the group was created afresh
    assert group.members == {A, B, C, D}
    assert_consistent(net)
    assert_all_decrypt(net)
    for client in net.clients.values():
        assert not client.downgraded and client.can_encrypt
        # discord.py's upgrade: set_passthrough_mode(True, 10) when the first transition executes
        assert client.passthrough_calls[-1] == (True, 10)
        assert client.passthrough_calls.count((True, 10)) == 1
    # davey ignores the expiry when turning passthrough on: discord.py's receivers keep accepting
    # plain frames from members they had decryptors for when the upgrade executed.
    b = net.clients[B]
    assert b.decrypt(A, b"plain after the upgrade") == b"plain after the upgrade"


def test_upgrade_with_one_member_waits_for_a_second_then_grows() -> None:
    net = downgraded_net(A)
    group = net.group
    net.pump(group.upgrade())
    a = net.clients[A]
    # Alone after the upgrade: no group yet, and the upgrade is not complete.
    assert group.members == set() and group.upgrading and not a.ready
    net.connect(B)
    # The group that completes the upgrade gets a real transition: discord.py leaves the downgrade.
    assert group.transitions[-1].transition_id != 0 and not group.upgrading
    assert a.can_encrypt and not a.downgraded and a.passthrough_calls[-1] == (True, 10)
    assert_consistent(net)
    assert_all_decrypt(net)


def test_version_change_no_ops() -> None:
    net = Net(DaveGroup(CHANNEL))
    net.connect(A)
    group = net.group
    assert group.upgrade() == []  # already at version 1
    out = group.downgrade()
    assert out and group.downgrade() == []  # under way
    assert group.upgrade() == []  # not at version 0 yet
    net.pump(out)
    assert group.downgrade() == []  # already at version 0
    empty = DaveGroup(CHANNEL)
    assert empty.downgrade() == [] and empty.protocol_version == 0  # nobody to wait for
    assert empty.upgrade() == [] and empty.protocol_version == 1 and not empty.upgrading


def test_member_leaving_during_upgrade_is_not_waited_for() -> None:
    net = downgraded_net(A, B, C)
    group = net.group
    net.deliver(group.upgrade())
    net.server_q = type(net.server_q)((uid, m) for uid, m in net.server_q if uid != C)
    del net.clients[C]
    step(net)
    step(net)
    assert group.epoch is None and group.upgrading  # C's key package is still awaited
    net.pump(group.leave(C))
    assert group.members == {A, B} and not group.upgrading
    assert_consistent(net)
    assert_all_decrypt(net)
