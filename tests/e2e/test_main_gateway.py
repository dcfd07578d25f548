"""The main gateway and REST API, as unmodified discord.py clients use them.

Bots see the guild, its channels and members; messages posted by users reach ``on_message``;
a bot's message with an attachment is stored, broadcast and downloadable; voice state changes
reach other bots' caches; both gateway compressions work byte for byte; heartbeats are answered;
bad tokens and unknown routes fail the way Discord fails them. And on the voice gateway, the
``seq`` the server sends is what discord.py acknowledges.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp
import discord
import pytest
import zstandard

from listening_core.testing import LocalDiscord
from listening_core.testing.clients import close_client, connect_client

from .helpers import wait_dave_ready, wait_for

TIMEOUT = 10.0


class Recorder(discord.Client):
    """A client that keeps every message it is told about."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.received: list[discord.Message] = []

    async def on_message(self, message: discord.Message) -> None:
        self.received.append(message)


# -- what a bot sees ---------------------------------------------------------------------------


async def test_client_sees_guild_channels_and_members() -> None:
    async with LocalDiscord(guild_name="Test Guild") as local:
        alice = local.add_member("alice")  # virtual member, added before the bot connects
        bob = local.add_user("bob")
        await alice.join()  # and already in voice
        account = local.add_bot("recorder")
        client = await connect_client(local, account)
        try:
            world = local.world
            assert client.user is not None and client.user.id == account.user.id and client.user.bot
            assert [g.id for g in client.guilds] == [world.guild_id]
            guild = client.get_guild(world.guild_id)
            assert guild is not None and guild.name == "Test Guild"

            text = guild.get_channel(world.text_channel_id)
            assert isinstance(text, discord.TextChannel)
            assert guild.text_channels == [text]
            assert [c.id for c in guild.voice_channels] == world.voice_channel_ids
            assert len(world.voice_channel_ids) == 2
            assert all(isinstance(c, discord.VoiceChannel) for c in guild.voice_channels)

            members = {m.id: m for m in guild.members}
            assert set(members) == {world.owner.id, alice.user_id, bob.id, account.user.id}
            assert members[alice.user_id].name == "alice" and not members[alice.user_id].bot
            assert members[bob.id].name == "bob"
            assert members[account.user.id].bot
            assert guild.owner_id == world.owner.id
            assert guild.member_count == 4

            # alice's voice state came with GUILD_CREATE
            voice = guild.voice_channels[0]
            assert [m.id for m in voice.members] == [alice.user_id]
            state = members[alice.user_id].voice
            assert state is not None and state.channel == voice
            assert guild.voice_channels[1].members == []
        finally:
            await close_client(client)


# -- messages ----------------------------------------------------------------------------------


async def test_posted_message_reaches_every_bots_on_message() -> None:
    async with LocalDiscord() as local:
        user = local.add_user("carol")
        first = await connect_client(local, local.add_bot("first"), cls=Recorder)
        second = await connect_client(local, local.add_bot("second"), cls=Recorder)
        try:
            posted = await local.post_message(user, "!record")
            await wait_for(lambda: first.received and second.received, TIMEOUT)
            for client in (first, second):
                [message] = client.received
                assert message.id == posted.id
                assert message.content == "!record"
                assert message.author.id == user.id and message.author.name == "carol"
                assert isinstance(message.author, discord.Member)
                assert message.channel.id == local.world.text_channel_id
                assert message.guild is not None and message.guild.id == local.world.guild_id
            assert local.messages()[-1].content == "!record"
        finally:
            await close_client(first)
            await close_client(second)


async def test_message_with_attachment_is_stored_broadcast_and_downloadable() -> None:
    data = random.Random(1).randbytes(300_000)
    async with LocalDiscord() as local:
        sender_account = local.add_bot("sender")
        sender = await connect_client(local, sender_account, cls=Recorder)
        watcher = await connect_client(local, local.add_bot("watcher"), cls=Recorder)
        try:
            channel = sender.get_channel(local.world.text_channel_id)
            assert isinstance(channel, discord.TextChannel)
            sent = await channel.send("hi", file=discord.File(io.BytesIO(data), "x.bin"))

            # the loopback stored it, bytes intact
            stored = local.messages()[-1]
            assert stored.id == sent.id and stored.content == "hi"
            assert stored.author.id == sender_account.user.id
            assert [(a.filename, a.data) for a in stored.attachments] == [("x.bin", data)]

            # the REST answer describes it
            [attachment] = sent.attachments
            assert (attachment.filename, attachment.size) == ("x.bin", len(data))

            # every other bot got MESSAGE_CREATE (and so did the sender)
            await wait_for(lambda: watcher.received and sender.received, TIMEOUT)
            [seen] = watcher.received
            assert (seen.id, seen.content, seen.author.id) == (sent.id, "hi", sender_account.user.id)
            assert [(a.filename, a.size) for a in seen.attachments] == [("x.bin", len(data))]

            # and the attachment downloads through each client's own HTTP session
            assert await attachment.read() == data
            assert await seen.attachments[0].read() == data
        finally:
            await close_client(sender)
            await close_client(watcher)


# -- voice state -------------------------------------------------------------------------------


async def test_voice_state_updates_reach_another_bots_cache() -> None:
    async with LocalDiscord() as local:
        watcher = await connect_client(local, local.add_bot("watcher"))
        joiner = await connect_client(local, local.add_bot("joiner"))
        alice, bob = local.add_member("alice"), local.add_member("bob")
        try:
            guild = watcher.get_guild(local.world.guild_id)
            assert guild is not None and joiner.user is not None
            first, second = guild.voice_channels
            assert first.members == [] and first.voice_states == {} and second.voice_states == {}

            # virtual members joining either channel
            await alice.join()
            await bob.join(second.id)
            await wait_for(lambda: [m.id for m in first.members] == [alice.user_id], TIMEOUT)
            await wait_for(lambda: [m.id for m in second.members] == [bob.user_id], TIMEOUT)
            assert set(first.voice_states) == {alice.user_id}

            # a real bot joining voice through op 4
            channel = joiner.get_channel(first.id)
            assert isinstance(channel, discord.VoiceChannel)
            vc = await asyncio.wait_for(channel.connect(), 20)
            await wait_for(lambda: set(first.voice_states) == {alice.user_id, joiner.user.id}, TIMEOUT)
            assert {m.id for m in first.members} == {alice.user_id, joiner.user.id}
            member = guild.get_member(joiner.user.id)
            assert member is not None and member.voice is not None and member.voice.channel == first
            assert member.voice.session_id == local.world.voice_states[joiner.user.id][1]

            # and leaving
            await alice.leave()
            await vc.disconnect()
            await wait_for(lambda: not first.voice_states, TIMEOUT)
            assert first.members == [] and [m.id for m in second.members] == [bob.user_id]
            gone = guild.get_member(alice.user_id)
            assert gone is not None and gone.voice is None
        finally:
            await close_client(joiner)
            await close_client(watcher)


# -- compression -------------------------------------------------------------------------------


class _ZlibStreamContext:
    """discord.py's own zlib-stream context (it only defines it when zstandard is missing)."""

    COMPRESSION_TYPE = "zlib-stream"
    messages = 0

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.context = zlib.decompressobj()

    def decompress(self, data: bytes, /) -> str | None:
        self.buffer.extend(data)
        if len(data) < 4 or data[-4:] != b"\x00\x00\xff\xff":
            return None
        msg = self.context.decompress(self.buffer)
        self.buffer = bytearray()
        type(self).messages += 1
        return msg.decode("utf-8")


async def test_real_clients_on_zstd_and_on_zlib_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    async with LocalDiscord() as local:
        user = local.add_user("carol")
        # the default: zstd-stream, because zstandard is importable
        assert discord.utils._ActiveDecompressionContext.COMPRESSION_TYPE == "zstd-stream"
        zstd_client = await connect_client(local, local.add_bot("zstd"), cls=Recorder)
        monkeypatch.setattr(discord.utils, "_ActiveDecompressionContext", _ZlibStreamContext)
        zlib_client = await connect_client(local, local.add_bot("zlib"), cls=Recorder)
        monkeypatch.undo()
        try:
            assert zstd_client.ws._decompressor.COMPRESSION_TYPE == "zstd-stream"
            assert isinstance(zlib_client.ws._decompressor, _ZlibStreamContext)
            assert _ZlibStreamContext.messages >= 3  # HELLO, READY, GUILD_CREATE at least
            for client in (zstd_client, zlib_client):
                assert client.get_guild(local.world.guild_id) is not None
            await local.post_message(user, "both ways")
            await wait_for(lambda: zstd_client.received and zlib_client.received, TIMEOUT)
            assert [m.content for m in zstd_client.received] == [m.content for m in zlib_client.received]
            # the first heartbeat (sent on HELLO) was answered with op 11 on both
            await wait_for(lambda: math.isfinite(zstd_client.latency) and math.isfinite(zlib_client.latency))
        finally:
            await close_client(zstd_client)
            await close_client(zlib_client)


def _zlib_stream() -> Callable[[bytes], dict[str, Any]]:
    context = zlib.decompressobj()

    def decode(frame: bytes) -> dict[str, Any]:
        assert frame.endswith(b"\x00\x00\xff\xff")  # each message flushed with Z_SYNC_FLUSH
        return json.loads(context.decompress(frame))

    return decode


def _zstd_stream() -> Callable[[bytes], dict[str, Any]]:
    context = zstandard.ZstdDecompressor().decompressobj()

    def decode(frame: bytes) -> dict[str, Any]:
        return json.loads(context.decompress(frame))

    return decode


@pytest.mark.parametrize(
    ("compress", "decoder"), [("zlib-stream", _zlib_stream), ("zstd-stream", _zstd_stream)]
)
async def test_raw_gateway_speaks_the_asked_compression(
    compress: str, decoder: Callable[[], Callable[[bytes], dict[str, Any]]]
) -> None:
    async with LocalDiscord() as local:
        account = local.add_bot("raw")
        decode = decoder()
        async with aiohttp.ClientSession(connector=local.connector()) as http:
            ws = await http.ws_connect(f"wss://gateway.discord.gg/?v=10&encoding=json&compress={compress}")

            async def receive() -> dict[str, Any]:
                msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
                assert msg.type is aiohttp.WSMsgType.BINARY, msg
                return decode(msg.data)

            hello = await receive()
            assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] > 0 and hello["s"] is None

            await ws.send_str(json.dumps({"op": 1, "d": None}))
            assert (await receive())["op"] == 11

            await ws.send_str(
                json.dumps({"op": 2, "d": {"token": account.token, "intents": 513, "properties": {}}})
            )
            ready = await receive()
            assert (ready["op"], ready["t"], ready["s"]) == (0, "READY", 1)
            assert ready["d"]["user"]["id"] == str(account.user.id)
            assert ready["d"]["session_id"]
            guild = await receive()
            assert (guild["t"], guild["s"]) == ("GUILD_CREATE", 2)
            assert guild["d"]["id"] == str(local.world.guild_id)

            # the stream context carries on across messages
            await ws.send_str(json.dumps({"op": 1, "d": 2}))
            assert (await receive())["op"] == 11
            await local.post_message(local.add_user("dave"), "still compressed")
            created = await receive()
            assert (created["t"], created["s"], created["d"]["content"]) == (
                "MESSAGE_CREATE",
                3,
                "still compressed",
            )
            await ws.close()


async def test_uncompressed_gateway_heartbeat_is_acknowledged() -> None:
    async with LocalDiscord() as local, aiohttp.ClientSession(connector=local.connector()) as http:
        ws = await http.ws_connect("wss://gateway.discord.gg/?v=10&encoding=json")
        hello = await ws.receive_json(timeout=TIMEOUT)
        assert hello["op"] == 10
        await ws.send_json({"op": 1, "d": None})  # allowed before IDENTIFY
        ack = await ws.receive_json(timeout=TIMEOUT)
        assert ack["op"] == 11
        await ws.close()


# -- REST errors -------------------------------------------------------------------------------


async def test_bad_token_is_a_login_failure() -> None:
    async with LocalDiscord() as local:
        local.add_bot("real")
        client = discord.Client(intents=discord.Intents.default(), connector=local.connector())
        try:
            with pytest.raises(discord.LoginFailure):
                await client.login("MTIz.not-a-token.at-all")
        finally:
            await client.close()


async def test_unknown_rest_route_answers_404_json() -> None:
    async with LocalDiscord() as local:
        account = local.add_bot("bot")
        async with aiohttp.ClientSession(connector=local.connector()) as http:
            headers = {"Authorization": f"Bot {account.token}"}
            async with http.get("https://discord.com/api/v10/no/such/route", headers=headers) as resp:
                assert resp.status == 404
                assert resp.content_type == "application/json"
                body = await resp.json()
                assert isinstance(body["message"], str) and body["code"] == 0

        # discord.py turns it into NotFound
        client = await connect_client(local, account)
        try:
            with pytest.raises(discord.NotFound) as info:
                await client.http.request(discord.http.Route("GET", "/no/such/route"))
            assert info.value.status == 404
        finally:
            await close_client(client)


async def test_unknown_message_and_unknown_channel_have_discords_error_codes() -> None:
    async with LocalDiscord() as local:
        client = await connect_client(local, local.add_bot("bot"))
        try:
            channel = client.get_channel(local.world.text_channel_id)
            assert isinstance(channel, discord.TextChannel)
            with pytest.raises(discord.NotFound) as unknown_message:
                await channel.fetch_message(1234)
            assert unknown_message.value.code == 10008  # Unknown Message
            with pytest.raises(discord.NotFound) as unknown_channel:
                await client.http.get_message(4321, 1234)
            assert unknown_channel.value.code == 10003  # Unknown Channel
        finally:
            await close_client(client)


# -- the voice gateway's seq and heartbeats ----------------------------------------------------


async def test_voice_seq_ack_follows_the_servers_seq_and_heartbeats_are_acknowledged() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        client = await connect_client(local, local.add_bot("bot"))
        try:
            channel = client.get_channel(local.world.voice_channel_id)
            assert isinstance(channel, discord.VoiceChannel) and client.user is not None
            vc = await asyncio.wait_for(channel.connect(), 20)
            await wait_dave_ready(vc)
            session = local.calls[local.world.voice_channel_id].sessions[client.user.id]
            ws = vc._connection.ws
            # Ready, Session Description, op 11 and the DAVE frames were all sequenced
            assert session._seq >= 5
            await wait_for(lambda: ws.seq_ack == session._seq, TIMEOUT)

            # another epoch: more sequenced messages, binary and JSON, and the ack follows
            before = session._seq
            await local.calls[local.world.voice_channel_id].force_epoch_change()
            await wait_dave_ready(vc, epoch=2)
            await wait_for(lambda: session._seq > before and ws.seq_ack == session._seq, TIMEOUT)

            # discord.py heartbeats every min(13.75, 5) s; the server's op 6 sets its latency
            await wait_for(lambda: math.isfinite(vc.latency), 12)
            assert vc.latency >= 0
            assert ws.seq_ack == session._seq  # heartbeat ACKs are not sequenced
            await vc.disconnect()
        finally:
            await close_client(client)
