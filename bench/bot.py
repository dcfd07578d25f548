"""The receiving side of a benchmark run: a discord.py bot listening with listening-core.

``python bench/bot.py --address FILE --channel ID --sink wav|ogg-opus --output DIR
[--sink-options JSON]`` logs in to
the loopback Discord (``FILE`` from ``LoopbackAddress.save``), joins the voice channel with
``listening_core.VoiceClient`` and listens with the sink (plus a probe that times each frame from
its datagram's arrival to ``on_audio``). It prints ``READY <udp port>`` and then obeys stdin:

``mark``
    start a measurement window (CPU of this process and its decoding workers, kernel socket
    drops, frames, latencies);
``report``
    print one JSON line with what happened since ``mark``;
``stop``
    stop listening (every frame is delivered and the files closed), print the final JSON, exit.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import discord

import listening_core
from listening_core import AudioFrame, AudioProcessPool, AudioSink, FrameKind
from listening_core.testing import LoopbackAddress

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process's threads, by role (a profile that needs no sampler)."""
    roles = {
        "listening-core-receiver": "receiver",
        "listening-core-delivery": "delivery",
        "listening-core-pool-results": "pool results",
        "voice-socket-reader": "socket reader (discord.py)",
        "MainThread": "event loop",
    }
    by_role: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.native_id is None:
            continue
        role = next((r for prefix, r in roles.items() if thread.name.startswith(prefix)), "other")
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / _TICKS
        by_role[role] = by_role.get(role, 0.0) + seconds
    return by_role


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def udp_drops(port: int) -> int | None:
    """The kernel's drop count for the UDP socket bound to ``port`` (``/proc/net/udp``)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[-1])
    return None


class Probe(AudioSink):
    """Counts frames by kind and records each received frame's latency (arrival to on_audio)."""

    wants_pcm = False

    def __init__(self) -> None:
        self.frames = 0
        self.kinds: dict[str, int] = {}
        self.latency = array.array("d")
        self.lock = threading.Lock()

    def on_audio(self, frame: AudioFrame) -> None:
        now = time.monotonic()
        self.frames += 1
        self.kinds[frame.kind.value] = self.kinds.get(frame.kind.value, 0) + 1
        if frame.arrival is not None and frame.kind is FrameKind.RECEIVED:
            with self.lock:
                if len(self.latency) < 2_000_000:
                    self.latency.append(now - frame.arrival)

    def take_latency(self) -> Any:
        """The latencies since the last call, sorted, as a numpy array (no Python float objects:
        sorting a million of those would grow this process's RSS and spoil the memory figures)."""
        import numpy as np

        with self.lock:
            values, self.latency = self.latency, array.array("d")
        return np.sort(np.frombuffer(values, dtype=np.float64))


def percentile(values: Any, q: float) -> float | None:
    if not len(values):
        return None
    return float(values[min(len(values) - 1, int(q * len(values)))])


class Bench:
    def __init__(self, vc: listening_core.VoiceClient, pool: AudioProcessPool, probe: Probe) -> None:
        self.vc = vc
        self.pool = pool
        self.probe = probe
        self.port = vc._connection.socket.getsockname()[1]
        self.mark: dict[str, Any] = {}

    def pids(self) -> list[int]:
        return [os.getpid(), *self.pool.processes]

    def snapshot(self) -> dict[str, Any]:
        stats = self.vc.listening_stats().values()
        return {
            "time": time.monotonic(),
            "cpu": sum(cpu_seconds(pid) for pid in self.pids()),
            "cpu_main": cpu_seconds(os.getpid()),
            "cpu_threads": thread_cpu_seconds(),
            "cpu_workers": sum(cpu_seconds(pid) for pid in self.pool.processes),
            "frames": self.probe.frames,
            "kinds": dict(self.probe.kinds),
            "packets": sum(s.packets for s in stats),
            "lost": sum(s.lost for s in stats),
            "late": sum(s.late for s in stats),
            "dropped": sum(sum(s.dropped.values()) for s in stats),
            "kernel_drops": udp_drops(self.port),
            "unattributed": sum(self.vc._receiver.unattributed.values()) if self.vc._receiver else 0,
        }

    def start(self) -> None:
        self.probe.take_latency()
        self.mark = self.snapshot()

    def report(self) -> dict[str, Any]:
        latency = self.probe.take_latency()  # first: its sample buffer is freed before RSS is read
        now = self.snapshot()
        before = self.mark
        delta = {
            k: now[k] - before[k]
            for k in (
                "time",
                "cpu",
                "cpu_main",
                "frames",
                "packets",
                "lost",
                "late",
                "dropped",
                "unattributed",
            )
        }
        threads = {
            role: round(seconds - before["cpu_threads"].get(role, 0.0), 3)
            for role, seconds in now["cpu_threads"].items()
        }
        threads["decoding workers"] = round(now["cpu_workers"] - before["cpu_workers"], 3)
        drops = None
        if now["kernel_drops"] is not None and before["kernel_drops"] is not None:
            drops = now["kernel_drops"] - before["kernel_drops"]
        return {
            "seconds": round(delta["time"], 3),
            "cpu_seconds": round(delta["cpu"], 3),
            "cpu_main_seconds": round(delta["cpu_main"], 3),
            "cpu_by_thread_seconds": threads,
            "frames": delta["frames"],
            "packets": delta["packets"],
            "lost": delta["lost"],
            "late": delta["late"],
            "dropped": delta["dropped"],
            "unattributed": delta["unattributed"],
            "kernel_drops": drops,
            "latency_p50_ms": None
            if not len(latency)
            else round(float(latency[len(latency) // 2]) * 1000, 3),
            "latency_p99_ms": None if not len(latency) else round(percentile(latency, 0.99) * 1000, 3),  # type: ignore[operator]
            "latency_max_ms": None if not len(latency) else round(float(latency[-1]) * 1000, 3),
            "rss_bytes": sum(rss_bytes(pid) for pid in self.pids()),
            "rss_main_bytes": rss_bytes(os.getpid()),
            "workers": len(self.pool.processes),
        }


async def run(args: argparse.Namespace) -> int:
    address = LoopbackAddress.load(args.address)
    intents = discord.Intents.default()
    client = discord.Client(intents=intents, connector=address.connector(), guild_ready_timeout=0.1)
    runner = asyncio.ensure_future(client.start(address.token))
    await asyncio.wait_for(asyncio.ensure_future(client.wait_until_ready()), 60)
    channel = client.get_channel(args.channel)
    assert isinstance(channel, discord.VoiceChannel)
    vc = await asyncio.wait_for(channel.connect(cls=listening_core.VoiceClient), 60)
    pool = AudioProcessPool(args.workers)
    pool.start(pool.max_workers)
    probe = Probe()
    options: dict[str, Any] = {}
    if args.sink != "none":
        options[args.sink] = {"directory": str(args.output), **json.loads(args.sink_options)}
    sinks: list[Any] = [args.sink, probe] if args.sink != "none" else [probe]
    finished = asyncio.Event()
    loop = asyncio.get_running_loop()
    vc.listen(
        sinks, options=options or None, pool=pool, after=lambda s, e: loop.call_soon_threadsafe(finished.set)
    )
    bench = Bench(vc, pool, probe)
    print(f"READY {bench.port}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    result: dict[str, Any] = {}
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "mark":
            bench.start()
        elif line == "report":
            result = bench.report()
            print(json.dumps(result), flush=True)
        elif line in ("stop", ""):
            t0 = time.monotonic()
            vc.stop_listening()
            await asyncio.wait_for(finished.wait(), 120)
            print(json.dumps({"stopped_in_seconds": round(time.monotonic() - t0, 3)}), flush=True)
            break
    pool.shutdown()
    await vc.disconnect(force=True)
    await client.close()
    runner.cancel()
    return 0


def main() -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--sink", default="wav")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--sink-options",
        default="{}",
        help='JSON: the sink\'s options besides directory, e.g. {"sample_rate": 16000}',
    )
    parser.add_argument("--workers", type=int, default=None)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
