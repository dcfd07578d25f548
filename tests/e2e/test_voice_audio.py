"""Audio through the loopback: what a receiver opens is exactly what was sent.

A discord.py client joins voice with a bare socket listener attached; it receives from virtual
members and from a second, real discord.py client playing a clip, in both AEAD modes, in both
DAVE join paths, and across epoch changes in the middle of the stream.
"""

from __future__ import annotations

import asyncio

import discord
import pytest

from listening_core.testing import FaultConfig, LocalDiscord, Schedule
from listening_core.testing.clients import close_client, connect_client
from listening_core.testing.media import SILENCE_FRAME, OpusEncoder, load_pcm

from .helpers import BothModesVoiceClient, Listener, wait_dave_ready, wait_for

MODES = ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"]


async def _join(local: LocalDiscord, name: str = "listener") -> tuple[discord.Client, discord.VoiceClient]:
    client = await connect_client(local, local.add_bot(name))
    channel = client.get_channel(local.world.voice_channel_id)
    assert isinstance(channel, discord.VoiceChannel)
    vc = await asyncio.wait_for(channel.connect(cls=BothModesVoiceClient), 20)
    return client, vc


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["welcomed", "commits"])
async def test_virtual_member_frames_arrive_exactly(mode: str, path: str) -> None:
    async with LocalDiscord(modes=(mode,)) as local:
        alice = local.add_member("alice")
        if path == "welcomed":
            await alice.join()  # alice's group exists; the bot is added by her commit
        client, vc = await _join(local)
        try:
            assert vc._connection.mode == mode
            group = local.calls[local.world.voice_channel_id].dave
            assert client.user is not None
            bot_id = client.user.id
            if path == "commits":
                # the bot is alone: pending, with no group (as on Discord); alice's join creates the
                # group from both key packages, each gets the other's Add and alice (in-process)
                # commits first, so the bot is welcomed into the group at its creation
                await wait_for(lambda: group.joined == {bot_id})
                await alice.join()
            await wait_dave_ready(vc, epoch=1)
            committers = {t.committer for t in group.transitions}
            assert committers == {alice.user_id}
            creation = group.transitions[0]  # a new group starts at once: transition id 0
            assert creation.epoch == 1 and creation.transition_id == 0 and bot_id in creation.added

            listener = Listener(vc, {alice.ssrc: alice.user_id})
            await alice.speak(Schedule.from_clips([("alice", 0.0), ("bob", 3.2)]))
            await listener.settle()

            sent = [s.opus for s in alice.sent]
            assert len(sent) > 250 and sent.count(SILENCE_FRAME) == 10
            assert listener.opus_of(alice.user_id) == sent
            assert not listener.failures and listener.held == 0
            # the DAVE layer really was on: what crossed the relay is not the plain Opus
            wire = [s.payload for s in alice.sent if not s.silence]
            assert all(p != s.opus for p, s in zip(wire, alice.sent, strict=False))
        finally:
            await close_client(client)


@pytest.mark.parametrize("mode", MODES)
async def test_epoch_changes_mid_stream_lose_nothing(mode: str) -> None:
    async with LocalDiscord(modes=(mode,)) as local:
        alice, bob = local.add_member("alice"), local.add_member("bob")
        await alice.join()
        client, vc = await _join(local)
        try:
            await wait_dave_ready(vc)
            call = local.calls[local.world.voice_channel_id]
            listener = Listener(vc, {alice.ssrc: alice.user_id})
            speaking = alice.speak(Schedule.from_clips([("alice", 0.0), ("carol", 3.1)]))
            epochs = [vc._connection.dave_session.epoch]
            await asyncio.sleep(1.0)
            await call.force_epoch_change()  # a commit with no real member change
            await wait_dave_ready(vc, epoch=epochs[0] + 1)
            epochs.append(vc._connection.dave_session.epoch)
            await asyncio.sleep(1.0)
            await bob.join()  # a member joining mid-stream: another epoch
            listener.user_of_ssrc[bob.ssrc] = bob.user_id
            await wait_dave_ready(vc, epoch=epochs[-1] + 1)
            epochs.append(vc._connection.dave_session.epoch)
            await asyncio.sleep(1.0)
            await bob.leave()  # and one leaving
            await speaking
            await listener.settle()
            assert epochs == sorted(set(epochs)) and len(epochs) == 3
            assert vc._connection.dave_session.epoch > epochs[-1]
            assert listener.opus_of(alice.user_id) == [s.opus for s in alice.sent]
            assert not listener.failures and listener.held == 0
        finally:
            await close_client(client)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["welcomed", "commits"])
async def test_real_discord_py_client_playing_a_clip(mode: str, path: str) -> None:
    async with LocalDiscord(modes=(mode,)) as local:
        # "commits": the listener joins first; "welcomed": the player does.  Alone, the first has no
        # group (as on Discord); the second's join creates it from both key packages, each client gets
        # the other's Add, and whichever commits first brings the other in (epoch 1).
        first, second = ("listener", "player") if path == "commits" else ("player", "listener")
        joined = {}
        for name in (first, second):
            joined[name] = await _join(local, name)
        (client, vc), (player_client, player_vc) = joined["listener"], joined["player"]
        try:
            await wait_dave_ready(vc, epoch=1)
            await wait_dave_ready(player_vc, epoch=1)
            call = local.calls[local.world.voice_channel_id]
            player_user, listener_user = player_client.user, client.user
            assert player_user is not None and listener_user is not None
            creation = call.dave.transitions[0]
            users = {listener_user.id, player_user.id}
            assert creation.epoch == 1 and creation.committer in users
            assert set(creation.added) == users - {creation.committer}
            assert call.dave.members == users
            player_ssrc = call.sessions[player_user.id].ssrc
            listener = Listener(vc, {player_ssrc: player_user.id})

            pcm = load_pcm("dave")
            finished = asyncio.Event()
            player_vc.play(
                discord.PCMAudio(_BytesIO(pcm)),
                after=lambda _: player_client.loop.call_soon_threadsafe(finished.set),
            )
            await asyncio.sleep(1.0)
            epoch = vc._connection.dave_session.epoch
            await call.force_epoch_change()  # new keys in the middle of the clip
            await wait_dave_ready(vc, epoch=epoch + 1)
            await asyncio.wait_for(finished.wait(), 15)
            await listener.settle(0.5)

            # discord.py encodes with its default Encoder settings; the same encoder on the same PCM
            # gives the same frames, followed by the five silence frames it sends at the end.
            expected = OpusEncoder().encode_pcm(pcm[: len(pcm) - len(pcm) % 3840])
            expected += [SILENCE_FRAME] * 5
            assert listener.opus_of(player_user.id) == expected
            assert not listener.failures and listener.held == 0
            assert len(call.relay.sent[(player_user.id, listener_user.id)]) == len(expected)
        finally:
            await close_client(player_client)
            await close_client(client)


class _BytesIO:
    """A file-like object over bytes, as PCMAudio reads it."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int) -> bytes:
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk


async def test_faults_reach_the_receiver_as_configured() -> None:
    faults = FaultConfig(seed=7, loss=0.05, burst_rate=0.02, burst_length=3, duplicate=0.02, garbage=0.02)
    async with LocalDiscord(faults=faults) as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await _join(local)
        try:
            await wait_dave_ready(vc)
            listener = Listener(vc, {alice.ssrc: alice.user_id})
            await alice.speak(Schedule.from_clips([("alice", 0.0), ("three-phrases", 3.2)]))
            await listener.settle(0.3)
            call = local.calls[local.world.voice_channel_id]
            assert client.user is not None
            stats = call.relay.injector(alice.user_id, client.user.id).stats
            sent_seqs = [s.sequence for s in alice.sent]
            got = listener.frames[alice.user_id]
            arrived = listener.arrivals[alice.user_id]
            assert stats.total_lost > 0 and stats.duplicated > 0 and stats.garbage > 0
            # what arrived is exactly what was sent, minus the injected losses, plus the duplicates
            assert set(arrived) == set(sent_seqs) - stats.all_lost_seqs
            assert len(arrived) == len(sent_seqs) - stats.total_lost + stats.duplicated
            assert listener.duplicates == stats.duplicated
            assert sorted(r.sequence for r in got) == sorted(set(arrived))
            # garbage never opens: each forged datagram fails the transport tag
            assert listener.failures["bad-tag"] + listener.failures["truncated"] == stats.garbage
            by_seq = {s.sequence: s.opus for s in alice.sent}
            assert all(r.opus == by_seq[r.sequence] for r in got)
        finally:
            await close_client(client)


async def test_same_seed_same_faults() -> None:
    async def run(seed: int) -> tuple[list[int], list[int]]:
        faults = FaultConfig(seed=seed, loss=0.1, reorder=0.05, duplicate=0.05)
        async with LocalDiscord(faults=faults, seed=seed) as local:
            alice = local.add_member("alice")
            await alice.join()
            client, vc = await _join(local)
            try:
                await wait_dave_ready(vc)
                await alice.speak(Schedule.from_clips([("carol", 0.0)]))
                await asyncio.sleep(0.2)
                assert client.user is not None
                stats = (
                    local.calls[local.world.voice_channel_id]
                    .relay.injector(alice.user_id, client.user.id)
                    .stats
                )
                offsets = [s.sequence - alice.sent[0].sequence for s in alice.sent]
                lost = sorted((seq - alice.sent[0].sequence) % 65536 for seq in stats.all_lost_seqs)
                return offsets, lost
            finally:
                await close_client(client)

    first, second, other = await run(3), await run(3), await run(4)
    assert first == second
    assert first[1] and first[1] != other[1]


async def test_header_extensions_padding_and_speaking_events() -> None:
    """Discord clients send RTP header extensions and padding; op 5 maps each SSRC to its user."""
    async with LocalDiscord() as local:
        alice = local.add_member("alice", extension_body=bytes.fromhex("10ff0000 22123456"), padding=13)
        await alice.join()
        client, vc = await _join(local)
        speaking: list[dict] = []  # type: ignore[type-arg]

        async def hook(ws, msg):  # type: ignore[no-untyped-def]
            if msg["op"] == 5:
                speaking.append(msg["d"])

        vc._connection.ws._hook = hook
        try:
            await wait_dave_ready(vc)
            listener = Listener(vc, {alice.ssrc: alice.user_id})
            await alice.speak(Schedule.from_clips([("carol", 0.0)]))
            await listener.settle()
            assert listener.opus_of(alice.user_id) == [s.opus for s in alice.sent]
            assert not listener.failures
            assert speaking[0] == {"user_id": str(alice.user_id), "ssrc": alice.ssrc, "speaking": 1}
            assert speaking[-1]["speaking"] == 0
        finally:
            await close_client(client)
