"""The pipeline under loss, reordering and duplicates, and across DAVE key changes."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from listening_core import FrameKind
from listening_core.opus import packet_has_fec
from listening_core.rtp import seq_add, seq_diff, ts_diff
from listening_core.testing import FaultConfig, LocalDiscord, Schedule
from listening_core.testing.clients import close_client

from .helpers import wait_dave_ready, wait_for
from .test_listen import MODES, CollectingSink, _recorder, _stop_and_wait

LOSSY = FaultConfig(
    seed=2024,
    loss=0.05,
    burst_rate=0.02,
    burst_length=3,
    reorder=0.05,
    reorder_delay=0.04,
    jitter=0.01,
    duplicate=0.01,
)


@pytest.mark.parametrize("mode", MODES)
async def test_loss_reordering_and_duplicates(mode: str) -> None:
    async with LocalDiscord(modes=(mode,), faults=LOSSY) as local:
        members = [local.add_member(name) for name in ("alice", "bob", "carol")]
        for member in members:
            await member.join()
        client, vc = await _recorder(local)
        try:
            await wait_dave_ready(vc, epoch=1)
            await asyncio.sleep(0.3)
            sink = CollectingSink()
            vc.listen(sink)
            clips = [("alice", "dave"), ("bob", "carol"), ("carol", "alice")]
            await asyncio.gather(
                *(
                    m.speak(Schedule.from_clips([(a, 0.1 * i), (b, 3.5)]))
                    for i, (m, (a, b)) in enumerate(zip(members, clips, strict=True))
                )
            )
            await asyncio.sleep(0.3)
            await _stop_and_wait(vc)
            assert client.user is not None
            call = local.calls[local.world.voice_channel_id]
            stats = vc.listening_stats()
            for member in members:
                injected = call.relay.injector(member.user_id, client.user.id).stats
                assert injected.total_lost > 0 and injected.duplicated > 0 and injected.reordered > 0
                got = sink.frames[member.user_id]
                sent = {s.sequence: s for s in member.sent}
                # strictly in order, none missing: consecutive sequence numbers from the first sent
                assert got[0].sequence == member.sent[0].sequence
                assert all(seq_diff(b.sequence, a.sequence) == 1 for a, b in itertools.pairwise(got))
                last = got[-1].sequence
                # only frames lost at the very end of the stream can be missed (nothing reveals them)
                missing_tail = [s.sequence for s in member.sent if seq_diff(s.sequence, last) > 0]
                assert set(missing_tail) <= injected.all_lost_seqs
                # when each frame was due by its sender's clock, at the latest: no later than any
                # frame sent after it, minus their distance in RTP time (the loopback paces frames
                # on that clock; after an event-loop stall it catches up, sending frames late)
                due: dict[int, float] = {}
                bound = float("inf")
                for later in reversed(member.sent):
                    rtp_time = ts_diff(later.timestamp, member.sent[0].timestamp) / 48000
                    bound = min(bound, later.time - rtp_time)
                    due[later.sequence] = bound + rtp_time
                # every lost frame was rebuilt from FEC when the next frame carried it, else concealed
                for frame in got:
                    if frame.sequence in injected.all_lost_seqs:
                        nxt = sent.get(seq_add(frame.sequence, 1))
                        next_arrived = nxt is not None and nxt.sequence not in injected.all_lost_seqs
                        contiguous = nxt is not None and nxt.timestamp - frame.timestamp == 960
                        fec = next_arrived and contiguous and packet_has_fec(nxt.opus)
                        assert frame.kind is (FrameKind.FEC if fec else FrameKind.PLC), frame
                        assert frame.arrival is None  # a lost frame never arrived
                    else:
                        assert frame.kind in (FrameKind.RECEIVED, FrameKind.SILENCE)
                        assert frame.opus == sent[frame.sequence].opus
                        # when its packet arrived, before it reached the sink; the first frame of a
                        # start window carries the receiver's estimate from its successors' arrivals
                        # and RTP times, which precedes its own send by as much as the sender was
                        # late (a stall of 0.1-0.2 s under load), but never the time it was due
                        assert frame.arrival is not None
                        assert due[frame.sequence] <= frame.arrival <= time.monotonic()
                # track length equals the sent length (up to the last frame received)
                assert sum(f.samples for f in got) == 960 * (len(member.sent) - len(missing_tail))
                # the statistics equal what the relay injected
                user = stats[member.user_id]
                lost_inside = injected.total_lost - len(missing_tail)
                assert user.lost == lost_inside
                assert user.recovered_fec + user.concealed == lost_inside
                assert user.recovered_fec == sum(f.kind is FrameKind.FEC for f in got)
                assert user.duplicates == injected.duplicated
                assert user.dave_failures == 0 and user.late == 0
        finally:
            await close_client(client)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["welcomed", "commits"])
async def test_frames_before_the_key_arrives_are_held_not_dropped(mode: str, path: str) -> None:
    # DAVE messages reach the bot 150 ms after media: a new member's first frames, and the frames
    # after an epoch change, arrive before the bot can decrypt them.
    async with LocalDiscord(modes=(mode,), dave_delay=0.15) as local:
        alice, bob = local.add_member("alice"), local.add_member("bob")
        if path == "welcomed":
            await alice.join()  # the bot is added by alice's commit
            client, vc = await _recorder(local)
        else:
            # the bot is first: alone it has no group (as on Discord); alice's join creates the group
            # from both key packages and alice, in-process, commits first, welcoming the bot
            client, vc = await _recorder(local)
            assert client.user is not None
            bot_id = client.user.id
            await wait_for(lambda: local.calls[local.world.voice_channel_id].dave.joined == {bot_id})
            await alice.join()
        try:
            await wait_dave_ready(vc, epoch=1)
            group = local.calls[local.world.voice_channel_id].dave
            assert client.user is not None
            bot_id = client.user.id
            await wait_for(lambda: group.members == {bot_id, alice.user_id})
            creation = group.transitions[0]  # either path: alice commits, the bot is welcomed
            assert creation.epoch == 1 and creation.committer == alice.user_id and bot_id in creation.added
            await asyncio.sleep(0.5)
            sink = CollectingSink()
            vc.listen(sink)
            epoch = vc._connection.dave_session.epoch
            await bob.join()  # bob holds the new epoch's key at once; the bot 150 ms later
            bob_speaks = bob.speak(Schedule.from_clips([("bob", 0.0)]))
            alice_speaks = alice.speak(Schedule.from_clips([("carol", 0.0)]))
            await asyncio.sleep(1.0)
            epoch_before = vc._connection.dave_session.epoch
            assert epoch_before > epoch
            await local.calls[local.world.voice_channel_id].force_epoch_change()
            await wait_for(lambda: vc._connection.dave_session.epoch > epoch_before, 5)
            await asyncio.gather(bob_speaks, alice_speaks)
            await asyncio.sleep(0.3)
            await _stop_and_wait(vc)

            stats = vc.listening_stats()
            for member in (alice, bob):
                got = sink.frames[member.user_id]
                assert [f.sequence for f in got] == [s.sequence for s in member.sent]
                assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in got)
                assert stats[member.user_id].dave_failures == 0
            # bob's first 200 ms (ten frames) were among the frames that had to wait for the key
            assert [f.opus for f in sink.frames[bob.user_id][:10]] == [s.opus for s in bob.sent[:10]]
            assert stats[bob.user_id].dave_held >= 5
            # and alice's frames right after the forced epoch change waited too
            assert stats[alice.user_id].dave_held >= 5
        finally:
            await close_client(client)
