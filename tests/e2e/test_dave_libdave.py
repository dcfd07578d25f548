"""DAVE as Discord's clients speak it: virtual members on libdave, the loopback as Discord runs DAVE.

Real Discord clients run libdave (Discord's C++ library, ``dave-py`` here); discord.py and every other
test here run davey.  These tests have libdave members encrypt and a real discord.py 2.7.1 client
listen with :class:`listening_core.VoiceClient`: every frame must arrive exactly, in both transport
modes, whether the bot joins before the members (it is welcomed into the group they create, with
transition id 0) or after (it is welcomed by a commit with a real transition), across an epoch change
and a member leaving.  They also hold the loopback to Discord where it used to differ: a member alone
gets no group (no Add for a user nobody announced) and a sole member is reset with transition id 0,
a member that never answers op 23 does not stall a transition, and frames leave 20 ms apart from the
first one of a spurt.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import pytest

from listening_core import FrameKind
from listening_core.crypto import is_dave_frame
from listening_core.testing import FaultConfig, LocalDiscord, Schedule
from listening_core.testing.clients import close_client
from listening_core.testing.dave_client import OP_TRANSITION_READY
from listening_core.testing.libdave_client import LibdaveClient
from listening_core.testing.media import SILENCE_FRAME, Spurt, load_pcm, reference_decode
from listening_core.testing.members import VirtualMember

from .helpers import wait_dave_ready, wait_for
from .test_listen import MODES, CollectingSink, _recorder, _stop_and_wait

#: Per transport mode: [frames libdave members sent, frames the bot delivered exactly].
EXACT_TALLY: dict[str, list[int]] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_tally() -> Iterator[None]:
    yield
    for mode, (sent, exact) in sorted(EXACT_TALLY.items()):
        print(f"\nlibdave frames exact, {mode}: {exact} of {sent}")


def _assert_exact(member: VirtualMember, sink: CollectingSink, stats: dict[int, object]) -> int:
    """Every frame ``member`` sent reached the sink in order, decoded exactly; returns how many."""
    got = sink.frames[member.user_id]
    sent = member.sent
    assert sent, f"{member!r} sent nothing"
    assert [f.sequence for f in got] == [s.sequence for s in sent]
    assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in got)
    assert b"".join(f.pcm or b"" for f in got) == reference_decode([s.opus for s in sent])
    user = stats[member.user_id]
    assert getattr(user, "dave_failures") == 0, getattr(user, "dropped")  # noqa: B009
    assert getattr(user, "frames") == len(sent)  # noqa: B009
    return len(sent)


def _no_refusals(*members: VirtualMember) -> None:
    for member in members:
        assert member.dave is not None and member.dave.mls_failures == [], member.dave.mls_failures


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bot_joins", ["first", "last"])
async def test_libdave_members_exact_across_an_epoch_change_and_a_leave(mode: str, bot_joins: str) -> None:
    async with LocalDiscord(modes=(mode,)) as local:
        call_members = [local.add_member(name, dave="libdave") for name in ("alice", "bob")]
        alice, bob = call_members
        if bot_joins == "first":
            client, vc = await _recorder(local)  # alone: pending, no group (as on Discord)
            for member in call_members:
                await member.join()
        else:
            for member in call_members:
                await member.join()
            client, vc = await _recorder(local)
        try:
            await wait_dave_ready(vc, epoch=1)
            call = local.calls[local.world.voice_channel_id]
            group = call.dave
            assert client.user is not None
            bot_id = client.user.id
            await wait_for(lambda: group.members == {bot_id, alice.user_id, bob.user_id})
            await wait_for(lambda: not group.pending_transitions)
            assert all(isinstance(m.dave, LibdaveClient) and m.dave.can_encrypt for m in call_members)
            # the group was created with transition id 0 (executed at once, no op 23 / op 22)
            assert group.transitions[0].transition_id == 0 and group.transitions[0].epoch == 1
            if bot_joins == "first":
                assert bot_id in group.transitions[0].added  # welcomed into the group at its creation
            else:
                assert group.transitions[-1].added == (bot_id,) and group.transitions[-1].transition_id
            await asyncio.sleep(0.2)

            sink = CollectingSink()
            vc.listen(sink)
            speech = b"".join(load_pcm(name) for name in ("alice", "bob"))
            alice_speaks = alice.speak(Schedule([Spurt(0.0, speech)]))
            bob_speaks = bob.speak(Schedule([Spurt(0.1, load_pcm("carol"))]))
            await asyncio.sleep(1.0)
            epoch = group.epoch
            assert epoch is not None
            await call.force_epoch_change()  # a silent client joins and leaves: two epochs
            await wait_for(lambda: group.epoch is not None and group.epoch >= epoch + 2, 5)
            await wait_for(lambda: not group.pending_transitions, 5)
            await asyncio.sleep(0.5)
            await bob.leave()  # mid-spurt: another epoch, bob's frames so far must all be there
            await wait_for(lambda: group.members == {bot_id, alice.user_id}, 5)
            await alice_speaks
            bob_speaks.cancel()
            await asyncio.sleep(0.3)
            await _stop_and_wait(vc)

            stats = vc.listening_stats()
            exact = sum(_assert_exact(m, sink, stats) for m in call_members)
            _no_refusals(alice)
            assert bob.dave is not None and bob.dave.mls_failures == []
            # libdave sent every frame DAVE-encrypted, the silence frames too (davey sends those plain)
            assert all(is_dave_frame(s.payload) for s in alice.sent)
            assert [s.opus for s in alice.sent].count(SILENCE_FRAME) == 5
            assert alice.unsent_not_ready == 0
            tally = EXACT_TALLY.setdefault(mode, [0, 0])
            tally[0] += sum(len(m.sent) for m in call_members)
            tally[1] += exact
        finally:
            await close_client(client)


@pytest.mark.parametrize("dave", ["libdave", "davey"])
async def test_sole_member_reset_and_transition_zero(dave: str) -> None:
    # The bot and alice; alice leaves: the bot is reset as Discord does (op 24 epoch 1, then op 21
    # with transition id 0) and has no group; carol joins: a new group, announced with transition id
    # 0.  The bot must honour id 0 both times and hear carol exactly.  Every datagram takes 40 ms
    # longer than the gateway, so alice's last frames are still on their way when the reset comes:
    # they open with the replaced group's keys, which DAVE keeps for a while.
    faults = FaultConfig(reorder=1.0, reorder_delay=0.04)
    async with LocalDiscord(modes=(MODES[1],), faults=faults) as local:
        alice = local.add_member("alice", dave=dave)
        carol = local.add_member("carol", dave=dave)
        await alice.join()
        client, vc = await _recorder(local)
        try:
            await wait_dave_ready(vc, epoch=1)
            call = local.calls[local.world.voice_channel_id]
            group = call.dave
            assert client.user is not None
            bot_id = client.user.id
            sink = CollectingSink()
            vc.listen(sink)
            await alice.speak(Schedule.from_clips([("alice", 0.0)]))
            await alice.leave()
            await wait_for(lambda: group.sole_member_resets == [bot_id], 5)
            assert group.epoch is None and group.members == set()
            await wait_for(lambda: not vc._connection.dave_session.ready, 5)  # reset: no group

            await carol.join()
            await wait_dave_ready(vc, epoch=1)
            creation = group.transitions[-1]
            assert creation.transition_id == 0 and creation.epoch == 1
            assert creation.committer in (bot_id, carol.user_id)
            await asyncio.sleep(0.2)
            await carol.speak(Schedule.from_clips([("carol", 0.0)]))
            await asyncio.sleep(0.3)
            await _stop_and_wait(vc)

            stats = vc.listening_stats()
            for member in (alice, carol):
                _assert_exact(member, sink, stats)
            _no_refusals(carol)
        finally:
            await close_client(client)


async def test_a_member_that_never_answers_op_23_does_not_stall_the_transition() -> None:
    async with LocalDiscord(modes=(MODES[0],), transition_timeout=0.5) as local:
        alice, bob, mute = (local.add_member(n) for n in ("alice", "bob", "mute"))
        for member in (alice, bob, mute):
            await member.join()
        client, vc = await _recorder(local)
        try:
            await wait_dave_ready(vc, epoch=1)
            call = local.calls[local.world.voice_channel_id]
            group = call.dave
            await wait_for(lambda: not group.pending_transitions, 5)
            assert mute.dave is not None
            answer = mute.dave.handle

            def never_ready(message):  # type: ignore[no-untyped-def]
                return [m for m in answer(message) if m.opcode != OP_TRANSITION_READY]

            mute.dave.handle = never_ready  # type: ignore[method-assign]
            sink = CollectingSink()
            vc.listen(sink)
            speaking = alice.speak(Schedule.from_clips([("alice", 0.0)]))
            await asyncio.sleep(0.5)
            epoch = group.epoch
            assert epoch is not None
            loop = asyncio.get_running_loop()
            started = loop.time()
            await call.force_epoch_change()
            await wait_for(lambda: group.epoch is not None and group.epoch >= epoch + 2, 5)
            await wait_for(lambda: not group.pending_transitions, 5)
            # two transitions, each executed at its timeout: well under the 5 s this waited at most
            assert loop.time() - started < 4.0
            forced = [t for t in group.transitions if t.epoch > epoch]
            assert len(forced) == 2 and all(t.timed_out and t.executed for t in forced)
            # the members execute them too (op 22 reaches a virtual member a moment after the group
            # marks the transition executed)
            ids = [t.transition_id for t in forced]
            dave = alice.dave
            assert dave is not None
            await wait_for(lambda: dave.executed_transitions[-2:] == ids, 5)
            await speaking
            await asyncio.sleep(0.3)
            await _stop_and_wait(vc)
            _assert_exact(alice, sink, vc.listening_stats())
        finally:
            await close_client(client)


async def test_frames_leave_20_ms_apart_from_the_first_and_bursts_stay_a_fault() -> None:
    async with LocalDiscord(dave=0) as local:
        paced = local.add_member("paced")
        bursty = local.add_member("bursty", spurt_burst=4)
        for member in (paced, bursty):
            await member.join()
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.1
        schedule = Schedule([Spurt(0.0, load_pcm("alice")[: 3840 * 40]), Spurt(1.0, load_pcm("bob")[:38400])])
        await asyncio.gather(paced.speak(schedule, start_at=start), bursty.speak(schedule, start_at=start))
        for member in (paced, bursty):
            assert len(member.sent) == len(list(schedule.frames()))
        spurt_starts = [0, 40 + 5]
        for first in spurt_starts:
            times = [s.time for s in paced.sent[first : first + 6]]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert min(gaps) >= 0.010, gaps  # never a catch-up burst at a spurt's start
            burst = [s.time for s in bursty.sent[first : first + 4]]
            assert burst[-1] - burst[0] < 0.005  # the fault: four frames back to back
        # the paced member's first frame left in its slot, not after encoding the spurt
        assert paced.sent[0].time - start < 0.015
