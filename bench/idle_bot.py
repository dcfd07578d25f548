"""The receiving side of the idle benchmark: one bot process, N voice clients, each in its own
silent call.

``python -m bench.idle_bot --addresses A1.json,A2.json,... --channels C1,C2,... --sink wav
--output DIR`` logs in one ``discord.Client`` per address file (the loopback Discord has one
guild, and a bot user sits in one voice channel per guild, so "a bot in N quiet guilds" is N bot
accounts here, all in this one process), connects each to its own voice channel with
``listening_core.VoiceClient`` and prints ``READY``. Nobody else is in those calls: nothing is
ever sent to the bot but the voice server's own keep-alives. Then it obeys stdin:

``mark``
    start a measurement window (CPU of this process and of the shared decoding pool's workers);
``listen``
    every client starts listening with the sink (one :class:`AudioProcessPool` shared by all, as
    a bot would share it);
``report``
    print one JSON line: CPU and wall seconds since ``mark``, how many clients are connected and
    how many are listening, this process's threads;
``stop``
    stop listening, disconnect, print ``{"stopped": true}``, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import discord

import listening_core
from listening_core import AudioProcessPool
from listening_core.testing import LoopbackAddress

from .bot import cpu_seconds


class Idle:
    def __init__(self) -> None:
        self.clients: list[discord.Client] = []
        self.runners: list[asyncio.Future[None]] = []
        self.voice: list[listening_core.VoiceClient] = []
        self.pool: AudioProcessPool | None = None
        self.ended: list[str] = []  # sessions that ended by themselves, with their error
        self.mark: tuple[float, float] = (0.0, 0.0)

    def cpu(self) -> float:
        """CPU seconds of this process (all threads; exact) and of the pool's workers (ticks)."""
        total = time.process_time()
        for pid in self.pool.processes if self.pool is not None else ():
            with contextlib.suppress(OSError):  # a worker that has just gone
                total += cpu_seconds(pid)
        return total

    async def connect(self, address_file: str, channel_id: int) -> None:
        address = LoopbackAddress.load(address_file)
        client = discord.Client(
            intents=discord.Intents.default(), connector=address.connector(), guild_ready_timeout=0.1
        )
        self.clients.append(client)
        self.runners.append(asyncio.ensure_future(client.start(address.token)))
        await asyncio.wait_for(asyncio.ensure_future(client.wait_until_ready()), 120)
        channel = client.get_channel(channel_id)
        assert isinstance(channel, discord.VoiceChannel), channel
        self.voice.append(await asyncio.wait_for(channel.connect(cls=listening_core.VoiceClient), 120))

    def listen(self, sink: str, output: Path, options: dict[str, Any]) -> None:
        self.pool = AudioProcessPool()
        for index, vc in enumerate(self.voice):
            directory = output / str(index)
            directory.mkdir(parents=True, exist_ok=True)

            def after(_sink: Any, error: BaseException | None, index: int = index) -> None:
                self.ended.append(f"session {index} ended: {error!r}")

            vc.listen(sink, options={"directory": str(directory), **options}, pool=self.pool, after=after)

    def start(self) -> None:
        self.mark = (time.monotonic(), self.cpu())

    def report(self) -> dict[str, Any]:
        wall0, cpu0 = self.mark
        return {
            "seconds": round(time.monotonic() - wall0, 3),
            "cpu_seconds": round(self.cpu() - cpu0, 4),
            "sessions": len(self.voice),
            "connected": sum(1 for vc in self.voice if vc.is_connected()),
            "listening": sum(1 for vc in self.voice if vc.is_listening()),
            "threads": threading.active_count(),
            "workers": len(self.pool.processes) if self.pool is not None else 0,
            "ended": list(self.ended),
        }

    async def stop(self) -> None:
        for vc in self.voice:
            if vc.is_listening():
                vc.stop_listening()
        if self.pool is not None:
            self.pool.shutdown()
        for vc in self.voice:
            await vc.disconnect(force=True)
        for client in self.clients:
            await client.close()
        for runner in self.runners:
            runner.cancel()


async def run(args: argparse.Namespace) -> int:
    idle = Idle()
    addresses = args.addresses.split(",")
    channels = [int(c) for c in args.channels.split(",")]
    # One at a time, as a bot's guilds come up: N handshakes at once would only measure the loopback.
    for address, channel in zip(addresses, channels, strict=True):
        await idle.connect(address, channel)
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "mark":
            idle.start()
        elif line == "listen":
            idle.listen(args.sink, args.output, json.loads(args.sink_options))
            print("LISTENING", flush=True)
        elif line == "report":
            print(json.dumps(idle.report()), flush=True)
        elif line in ("stop", ""):
            await idle.stop()
            print(json.dumps({"stopped": True}), flush=True)
            break
    return 0


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--addresses", required=True, help="address files, comma-separated")
    parser.add_argument("--channels", required=True, help="voice channel ids, comma-separated")
    parser.add_argument("--sink", default="wav")
    parser.add_argument("--sink-options", default="{}", help="JSON: the sink's options besides directory")
    parser.add_argument("--output", type=Path, required=True)
    code = asyncio.run(run(parser.parse_args()))
    sys.stdout.flush()
    os._exit(code)  # every client is closed; do not wait on library threads winding down


if __name__ == "__main__":
    main()
