"""Helpers for running real discord.py clients against a :class:`LocalDiscord`."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, TypeVar

import discord

if TYPE_CHECKING:
    from .server import LocalDiscord
    from .world import Account

__all__ = ["close_client", "connect_client", "join_voice"]

ClientT = TypeVar("ClientT", bound=discord.Client)


async def connect_client(
    local: LocalDiscord,
    account: Account,
    *,
    cls: type[ClientT] = discord.Client,  # type: ignore[assignment]
    intents: discord.Intents | None = None,
    timeout: float = 30.0,
    **options: Any,
) -> ClientT:
    """Make a ``cls`` client wired to ``local``, log it in as ``account`` and wait until it is ready.

    This is what a test would write by hand: ``cls(intents=..., connector=local.connector())``
    then ``start(account.token)``. ``guild_ready_timeout`` defaults to 0.1 s here (discord.py
    waits 2 s for more guilds otherwise). Stop it with :func:`close_client`.
    """
    if intents is None:
        intents = discord.Intents.default()
        intents.message_content = True
        intents.members = True
    options.setdefault("guild_ready_timeout", 0.1)
    client = cls(intents=intents, connector=local.connector(), **options)
    runner = asyncio.ensure_future(client.start(account.token))
    ready = asyncio.ensure_future(client.wait_until_ready())
    done, _ = await asyncio.wait({runner, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if runner in done:
            runner.result()  # raises the client's error
        runner.cancel()
        with contextlib.suppress(BaseException):
            await client.close()
        raise TimeoutError(f"discord.py client for {account.user.name!r} was not ready after {timeout} s")
    local.spawn(runner)
    return client


async def close_client(client: discord.Client) -> None:
    """Disconnect every voice client of ``client`` and close it."""
    for vc in list(client.voice_clients):
        with contextlib.suppress(Exception):
            await vc.disconnect(force=True)
    await client.close()


async def join_voice(
    local: LocalDiscord,
    name: str = "recorder",
    *,
    channel_id: int | None = None,
    timeout: float = 20.0,
) -> tuple[discord.Client, Any]:
    """Log a new bot in, connect it to a voice channel with ``listening_core.VoiceClient`` and
    wait until its DAVE session is ready (when the call uses DAVE).

    Returns ``(client, voice_client)``; stop both with :func:`close_client`.
    """
    from ..voice_client import VoiceClient

    client: discord.Client = await connect_client(local, local.add_bot(name))
    channel = client.get_channel(channel_id or local.world.voice_channel_id)
    if not isinstance(channel, discord.VoiceChannel):
        raise ValueError(f"{channel_id} is not a voice channel of the loopback guild")
    vc = await asyncio.wait_for(channel.connect(cls=VoiceClient), timeout)
    if local.dave_version > 0:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (vc._connection.dave_session and vc._connection.dave_session.ready):
            if loop.time() > deadline:
                raise TimeoutError(f"{name}'s DAVE session was not ready after {timeout} s")
            await asyncio.sleep(0.02)
    return client, vc
