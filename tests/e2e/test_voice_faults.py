"""Faults the loopback injects happen as configured and are seen by a real discord.py receiver."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from listening_core.testing import FaultConfig, LocalDiscord, Schedule
from listening_core.testing.clients import close_client

from .helpers import Listener, wait_dave_ready, wait_for
from .test_voice_audio import _join


async def test_reordering_and_jitter_reach_the_receiver() -> None:
    faults = FaultConfig(seed=11, reorder=0.08, reorder_delay=0.05, jitter=0.01)
    async with LocalDiscord(faults=faults) as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await _join(local)
        try:
            await wait_dave_ready(vc)
            listener = Listener(vc, {alice.ssrc: alice.user_id})
            await alice.speak(Schedule.from_clips([("alice", 0.0)]))
            await listener.settle(0.3)
            assert client.user is not None
            stats = (
                local.calls[local.world.voice_channel_id].relay.injector(alice.user_id, client.user.id).stats
            )
            arrived = listener.arrivals[alice.user_id]
            sent = [s.sequence for s in alice.sent]
            assert stats.reordered > 0 and stats.total_lost == 0
            assert sorted(arrived) == sorted(sent)  # nothing lost, nothing added
            assert arrived != sent  # but not in order
            position = {seq: i for i, seq in enumerate(arrived)}
            for seq in stats.reordered_seqs:
                later = (seq + 1) & 0xFFFF
                if later in position and later not in stats.reordered_seqs:
                    assert position[later] < position[seq], f"seq {seq} was held back but arrived in order"
            # reordering changes the order, never the content
            by_seq = {s.sequence: s.opus for s in alice.sent}
            assert all(r.opus == by_seq[r.sequence] for r in listener.frames[alice.user_id])
        finally:
            await close_client(client)


async def test_truncated_datagrams_fail_to_open_and_are_counted() -> None:
    async with LocalDiscord(faults=FaultConfig(seed=5, truncate=0.05)) as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await _join(local)
        try:
            await wait_dave_ready(vc)
            listener = Listener(vc, {alice.ssrc: alice.user_id})
            await alice.speak(Schedule.from_clips([("bob", 0.0)]))
            await listener.settle(0.3)
            assert client.user is not None
            stats = (
                local.calls[local.world.voice_channel_id].relay.injector(alice.user_id, client.user.id).stats
            )
            assert stats.truncated > 0
            opened = set(listener.arrivals[alice.user_id])
            assert opened == {s.sequence for s in alice.sent} - set(stats.truncated_seqs)
            # a cut datagram is either too short to be RTP at all, or fails the transport tag
            broken = (
                sum(listener.failures.values()) + listener.non_rtp["UNKNOWN"] + listener.non_rtp["KEEPALIVE"]
            )
            assert broken == stats.truncated
        finally:
            await close_client(client)


async def test_voice_server_change_moves_everyone_to_new_keys_and_ssrcs() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await _join(local)
        try:
            await wait_dave_ready(vc)
            old_call = local.calls[local.world.voice_channel_id]
            old_key, old_ssrc, old_alice_ssrc = (
                bytes(vc._connection.secret_key),
                vc._connection.ssrc,
                alice.ssrc,
            )
            listener = Listener(vc, {alice.ssrc: alice.user_id})
            speaking = alice.speak(Schedule.from_clips([("alice", 0.0), ("carol", 3.2)]))
            await asyncio.sleep(1.0)
            new_call = await local.change_voice_server()
            listener.user_of_ssrc[alice.ssrc] = alice.user_id
            await wait_for(lambda: vc._connection.ws.gateway == f"wss://{new_call.endpoint}/?v=8", 15)
            await speaking
            await listener.settle(0.3)

            assert new_call.endpoint != old_call.endpoint and new_call.udp_port != old_call.udp_port
            assert bytes(vc._connection.secret_key) != old_key
            assert vc._connection.ssrc != old_ssrc and alice.ssrc != old_alice_ssrc
            assert vc.is_connected()
            assert client.user is not None
            key = (alice.user_id, client.user.id)
            before, after = old_call.relay.sent[key], new_call.relay.sent[key]
            got = [r.sequence for r in listener.frames[alice.user_id]]
            by_seq = {s.sequence: s.opus for s in alice.sent}
            # what arrived opened to exactly what alice sent, in order
            assert listener.opus_of(alice.user_id) == [by_seq[seq] for seq in got]
            # Only frames around the switch may miss: the old server's last ones, in flight while
            # the bot moved its socket, and the new server's first ones, which can reach the bot
            # before the new key does (as on Discord): transport key (op 4) or DAVE key. This
            # bare listener opens DAVE in arrival order, so a frame that waited for the DAVE key
            # stays unopened once a later one opened (libdave refuses older frames); the
            # receiver proper orders them first.
            old_seqs, new_seqs = [r.sequence for r in before], [r.sequence for r in after]
            assert got == [s for s in old_seqs + new_seqs if s in set(got)]  # in order, nothing else
            missed_old = [s for s in old_seqs if s not in set(got)]
            missed_new = [s for s in new_seqs if s not in set(got)]
            assert missed_old == old_seqs[len(old_seqs) - len(missed_old) :] and len(missed_old) <= 5
            assert missed_new == new_seqs[: len(missed_new)] and len(missed_new) <= 5
            assert len(after) > 100
            assert set(listener.failures) <= {"bad-tag"}
            assert listener.failures["bad-tag"] + listener.held == len(missed_new)
        finally:
            await close_client(client)


async def _raw_voice(local: LocalDiscord, call, user, session_id: str, token: str):  # type: ignore[no-untyped-def]
    http = aiohttp.ClientSession(connector=local.connector())
    ws = await http.ws_connect(f"wss://{call.endpoint}/?v=8")
    return http, ws


async def _next(ws: aiohttp.ClientWebSocketResponse) -> dict:  # type: ignore[type-arg]
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def test_websocket_resume_replays_what_the_client_missed() -> None:
    async with LocalDiscord() as local:
        user = local.add_user("raw-client")
        channel_id = local.world.voice_channel_id
        call = await local.call_for(channel_id)
        token = call.authorise(user.id, "raw-session")
        http, ws = await _raw_voice(local, call, user, "raw-session", token)
        try:
            assert (await _next(ws))["op"] == 8  # Hello
            identify = {
                "server_id": str(local.world.guild_id),
                "user_id": str(user.id),
                "session_id": "raw-session",
                "token": token,
                "max_dave_protocol_version": 1,
            }
            await ws.send_json({"op": 0, "d": identify})
            ready = await _next(ws)
            assert ready["op"] == 2 and ready["d"]["port"] == call.udp_port
            mode = "aead_xchacha20_poly1305_rtpsize"
            await ws.send_json(
                {"op": 1, "d": {"protocol": "udp", "data": {"address": "127.0.0.1", "port": 9, "mode": mode}}}
            )
            description = await _next(ws)
            assert description["op"] == 4 and len(description["d"]["secret_key"]) == 32
            last_seen = ready["seq"]  # pretend the session description was lost with the connection

            await local.interrupt_voice(user.id, 4015)
            while (closing := await asyncio.wait_for(ws.receive(), 5)).type is not aiohttp.WSMsgType.CLOSE:
                assert closing.type is aiohttp.WSMsgType.BINARY  # op 25, the DAVE external sender
            assert closing.data == 4015
            await ws.close()

            ws = await http.ws_connect(f"wss://{call.endpoint}/?v=8")
            assert (await _next(ws))["op"] == 8
            resume = {
                "server_id": str(local.world.guild_id),
                "session_id": "raw-session",
                "token": token,
                "seq_ack": last_seen,
            }
            await ws.send_json({"op": 7, "d": resume})
            assert (await _next(ws))["op"] == 9  # Resumed
            replayed = await _next(ws)
            assert replayed["op"] == 4 and replayed["seq"] == description["seq"]
            assert replayed["d"]["secret_key"] == description["d"]["secret_key"]
            assert call.sessions[user.id].ws is not None  # the same session, not a new one
            # the session goes on: a heartbeat is answered
            await ws.send_json({"op": 3, "d": {"t": 123, "seq_ack": replayed["seq"]}})
            while True:
                msg = await asyncio.wait_for(ws.receive(), 5)
                if msg.type is aiohttp.WSMsgType.TEXT and (answer := json.loads(msg.data))["op"] == 6:
                    break
            assert answer["d"]["t"] == 123
        finally:
            await ws.close()
            await http.close()


@pytest.mark.parametrize("leaves", [False, True])
async def test_members_joining_and_leaving_mid_stream_are_announced(leaves: bool) -> None:
    async with LocalDiscord() as local:
        alice, bob = local.add_member("alice"), local.add_member("bob")
        await alice.join()
        client, vc = await _join(local)
        events: list[tuple[int, dict]] = []  # type: ignore[type-arg]

        async def hook(ws, msg):  # type: ignore[no-untyped-def]
            events.append((msg["op"], msg["d"]))

        vc._connection.hook = hook
        vc._connection.ws._hook = hook
        try:
            await wait_dave_ready(vc)
            epoch = vc._connection.dave_session.epoch
            await bob.join()
            await wait_dave_ready(vc, epoch=epoch + 1)
            assert (11, {"user_ids": [str(bob.user_id)]}) in events
            if leaves:
                await bob.leave()
                await wait_for(lambda: (13, {"user_id": str(bob.user_id)}) in events)
                await wait_dave_ready(vc, epoch=epoch + 2)
                group = local.calls[local.world.voice_channel_id].dave
                assert bob.user_id not in group.members and alice.user_id in group.members
        finally:
            await close_client(client)


async def test_rtcp_is_resealed_for_each_member() -> None:
    async with LocalDiscord(faults=FaultConfig(seed=1, loss=0.5)) as local:  # RTCP is not subject to faults
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await _join(local)
        try:
            await wait_dave_ready(vc)
            listener = Listener(vc, {alice.ssrc: alice.user_id})
            reports = [alice.send_sender_report() for _ in range(5)]
            await listener.settle(0.2)
            assert listener.rtcp == reports
            assert all(len(r) == 28 and r[1] == 200 for r in reports)
        finally:
            await close_client(client)
