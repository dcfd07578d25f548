"""Live streams (``listening_core.live``) under load: what one ``async for`` loop sustains.

:func:`stream_bench` is the hook for the suite: ``stream_bench(speakers=(10, 100), seconds=5.0)``
returns

- ``throughput``: one ``async for frame in live.frames()`` loop fed by a thread as fast as it can
  deliver (no socket, no decode): frames per second through delivery thread → event loop →
  consumer, and the delivery thread's cost per frame (what the session pays for a stream);
- ``latency``: for each speaker count, a real session under the suite's load (the loopback
  Discord, ``speakers`` virtual members, ``bench/generator.py`` replaying packets at real-time
  pace at the bot's socket, as :func:`bench.run.trial` builds it) with the bot consuming every
  frame in one ``async for`` loop: frames per second consumed, arrival → consumer latency
  (p50, p99, max), frames the stream dropped, the bot process's CPU.

``python -m bench.streams [--speakers 10,100] [--seconds 5]`` prints the result as JSON. The bot
side of a trial is this module too: ``python -m bench.streams bot --address FILE --channel ID``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _percentiles(values: array.array[float]) -> dict[str, float | None]:
    import numpy as np

    data = np.sort(np.frombuffer(values, dtype=np.float64))
    if not len(data):
        return {"latency_p50_ms": None, "latency_p99_ms": None, "latency_max_ms": None}

    def at(q: float) -> float:
        return round(float(data[min(len(data) - 1, int(q * len(data)))]) * 1000, 3)

    return {"latency_p50_ms": at(0.5), "latency_p99_ms": at(0.99), "latency_max_ms": at(1.0)}


# ------------------------------------------------------------------------ the loop on its own


async def loop_throughput(speakers: int = 100, frames: int = 200_000) -> dict[str, Any]:
    """``frames`` frames (``speakers`` at a time, as one tick of a call) pushed by a thread into a
    :class:`~listening_core.live.LiveSink` as fast as it can; one ``async for`` loop takes them."""
    from listening_core import AudioFrame, FrameKind, LiveSink

    live = LiveSink(maxsize=frames)  # large enough that nothing is dropped: this measures the pipe
    tick = [
        AudioFrame(user, user, 0, 0, 0, FrameKind.RECEIVED, pcm=bytes(3840))
        for user in range(1, speakers + 1)
    ]
    ticks = max(1, frames // speakers)
    total = ticks * speakers
    producer_seconds: list[float] = []

    def produce() -> None:
        start = time.thread_time()
        for _ in range(ticks):
            for frame in tick:
                live.on_audio(frame)
        producer_seconds.append(time.thread_time() - start)
        live.cleanup()

    consumed = 0
    async with live.frames() as stream:
        thread = threading.Thread(target=produce, name="bench-delivery")
        t0 = time.perf_counter()
        thread.start()
        async for _ in stream:
            consumed += 1
        elapsed = time.perf_counter() - t0
    thread.join()
    return {
        "speakers": speakers,
        "frames": consumed,
        "sent": total,
        "seconds": round(elapsed, 3),
        "frames_per_second": round(consumed / elapsed),
        "delivery_cpu_us_per_frame": round(producer_seconds[0] / total * 1e6, 3),
        "dropped": sum(live.overflow.values()),
    }


# ---------------------------------------------------------------------------- the bot side


async def _bot(args: argparse.Namespace) -> int:
    import discord

    import listening_core
    from listening_core import AudioProcessPool, FrameKind, LiveSink
    from listening_core.testing import LoopbackAddress

    from .bot import cpu_seconds, udp_drops

    address = LoopbackAddress.load(args.address)
    client = discord.Client(
        intents=discord.Intents.default(), connector=address.connector(), guild_ready_timeout=0.1
    )
    runner = asyncio.ensure_future(client.start(address.token))
    await asyncio.wait_for(asyncio.ensure_future(client.wait_until_ready()), 60)
    channel = client.get_channel(args.channel)
    assert isinstance(channel, discord.VoiceChannel)
    vc = await asyncio.wait_for(channel.connect(cls=listening_core.VoiceClient), 60)
    pool = AudioProcessPool()
    pool.start(pool.max_workers)
    live = LiveSink()
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()
    vc.listen(live, pool=pool, after=lambda s, e: loop.call_soon_threadsafe(finished.set))
    port = vc._connection.socket.getsockname()[1]
    counts = {"frames": 0}
    latency: array.array[float] = array.array("d")
    received = FrameKind.RECEIVED

    async def consume() -> None:  # the loop under test
        monotonic = time.monotonic
        async with live.frames() as stream:
            async for frame in stream:
                counts["frames"] += 1
                if frame.arrival is not None and frame.kind is received and len(latency) < 2_000_000:
                    latency.append(monotonic() - frame.arrival)

    async def consume_pcm(rate: int) -> None:  # the loop under test, at rate Hz mono
        per_frame = rate // 50
        async with live.pcm(rate=rate, channels=1) as stream:
            async for chunk in stream:
                counts["frames"] += chunk.samples / per_frame  # in frames' worth of audio

    consumer = asyncio.create_task(consume_pcm(args.pcm_rate) if args.pcm_rate else consume())
    print(f"READY {port}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    mark: dict[str, Any] = {}
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "mark":
            del latency[:]
            mark = {
                "time": time.monotonic(),
                "frames": counts["frames"],
                "cpu": cpu_seconds(os.getpid()),
                "drops": udp_drops(port),
                "overflow": sum(live.overflow.values()),
            }
        elif line == "report":
            now = time.monotonic()
            stats = vc.listening_stats().values()
            drops = udp_drops(port)
            seconds = now - mark["time"]
            frames = counts["frames"] - mark["frames"]
            result = {
                "seconds": round(seconds, 3),
                "frames": round(frames),
                "frames_per_second": round(frames / seconds, 1),
                "cpu_main_seconds": round(cpu_seconds(os.getpid()) - mark["cpu"], 3),
                "stream_dropped": sum(live.overflow.values()) - mark["overflow"],
                "lost": sum(s.lost for s in stats),
                "kernel_drops": None if drops is None or mark["drops"] is None else drops - mark["drops"],
                **_percentiles(latency),
            }
            print(json.dumps(result), flush=True)
        elif line in ("stop", ""):
            vc.stop_listening()
            await asyncio.wait_for(finished.wait(), 120)
            await asyncio.wait_for(consumer, 30)  # the end of the session ended the loop
            print(json.dumps({"stopped": True}), flush=True)
            break
    pool.shutdown()
    await vc.disconnect(force=True)
    await client.close()
    runner.cancel()
    return 0


# ------------------------------------------------------------------------ a trial under load


async def stream_trial(
    speakers: int, seconds: float = 5.0, *, warmup: float = 2.0, pcm_rate: int | None = None
) -> dict[str, Any]:
    """One session of ``speakers`` members speaking for ``warmup + seconds`` (the load of
    :func:`bench.run.trial`: loopback Discord, no DAVE, XChaCha, the generator at real-time
    pace), consumed by one ``async for`` loop in the bot; the figures of the last ``seconds``.
    With ``pcm_rate``, the loop takes ``live.pcm(rate=pcm_rate, channels=1)`` (no latency then:
    chunks carry no arrival time) and ``frames`` counts frames' worth of audio."""
    from listening_core.testing import LocalDiscord

    from .floor import speech_frames
    from .run import MODE, _read_json_line, _wait_line, log

    frames = speech_frames()
    with tempfile.TemporaryDirectory(prefix="listening-bench-streams-") as tmp_name:
        tmp = Path(tmp_name)
        async with LocalDiscord(dave=0, modes=(MODE,), record=False) as local:
            account = local.add_bot("bench")
            address = local.address(account).save(tmp / "loopback.json")
            channel_id = local.world.voice_channel_id
            bot_log = (tmp / "bot.log").open("w")  # closed when the process ends
            bot = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.streams",
                "bot",
                "--address",
                str(address),
                "--channel",
                str(channel_id),
                "--pcm-rate",
                str(pcm_rate or 0),
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=bot_log,
            )
            generator: asyncio.subprocess.Process | None = None
            try:
                assert bot.stdout is not None and bot.stdin is not None
                await _wait_line(bot.stdout, "READY", 90)
                call = local.calls[channel_id]
                members = [local.add_member(f"s{i}") for i in range(speakers)]
                for member in members:
                    await member.join(wait_ready=False)
                for member in members:
                    await call.speaking(member, 1)
                session = next(p for p in call.participants() if p.user_id == account.user.id)
                spec: dict[str, Any] = {
                    "host": session.udp_addr[0],
                    "port": session.udp_addr[1],
                    "mode": session.mode,
                    "key": bytes(session.secret_key).hex(),
                    "seconds": warmup + seconds + 1,
                    "speakers": [{"ssrc": m.ssrc} for m in members],
                    "frames": [base64.b64encode(f).decode() for f in frames],
                    "bind": list(call.relay.address),  # the generator takes the relay's port over
                }
                call.relay.close()
                (tmp / "spec.json").write_text(json.dumps(spec))
                generator = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(HERE / "generator.py"),
                    str(tmp / "spec.json"),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                assert generator.stdout is not None and generator.stdin is not None
                await _wait_line(generator.stdout, "READY", 600)
                generator.stdin.write(b"go\n")
                await generator.stdin.drain()
                await asyncio.sleep(warmup)
                bot.stdin.write(b"mark\n")
                await bot.stdin.drain()
                await asyncio.sleep(seconds)
                bot.stdin.write(b"report\n")
                await bot.stdin.drain()
                result: dict[str, Any] = {
                    "speakers": speakers,
                    "consumer": f"pcm {pcm_rate} Hz mono" if pcm_rate else "frames",
                    **await _read_json_line(bot.stdout, 60),
                }
                result["generator"] = await _read_json_line(generator.stdout, seconds + 120)
                bot.stdin.write(b"stop\n")
                await bot.stdin.drain()
                result.update(await _read_json_line(bot.stdout, 180))
                result["expected_frames_per_second"] = speakers * 50
                problems = [
                    f"{key}: {result[key]}"
                    for key in ("stream_dropped", "lost", "kernel_drops")
                    if result.get(key)  # None (unknown) is not a problem; any count is
                ]
                if result["frames_per_second"] < 0.95 * speakers * 50:
                    problems.append(
                        f"the loop took {result['frames_per_second']} frames/s of {speakers * 50}"
                    )
                result["held"], result["problems"] = not problems, problems
                return result
            except BaseException:
                log("the stream bot's log:\n" + (tmp / "bot.log").read_text()[-3000:])
                raise
            finally:
                for process in (generator, bot):
                    if process is not None and process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                        await process.wait()


def stream_bench(
    speakers: tuple[int, ...] = (10, 100), seconds: float = 5.0, *, pcm16k: bool = True
) -> dict[str, Any]:
    """The hook for the suite (see the module docstring): ``{"throughput": {...}, "latency":
    {"10": {...}, "100": {...}}, "pcm16k": {"10": {...}, "100": {...}}}`` (``pcm16k``: the same
    trials with the loop taking 16 kHz mono chunks; left out with ``pcm16k=False``)."""

    async def run() -> dict[str, Any]:
        result = {
            "throughput": await loop_throughput(max(speakers)),
            "latency": {str(n): await stream_trial(n, seconds) for n in speakers},
        }
        if pcm16k:
            result["pcm16k"] = {str(n): await stream_trial(n, seconds, pcm_rate=16_000) for n in speakers}
        return result

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    bot = sub.add_parser("bot", help="the bot side of a trial (started by stream_trial)")
    bot.add_argument("--address", required=True)
    bot.add_argument("--channel", type=int, required=True)
    bot.add_argument("--pcm-rate", type=int, default=0, help="consume PCM chunks at this rate (0: frames)")
    parser.add_argument("--speakers", default="10,100", help="comma-separated speaker counts")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-pcm16k", action="store_true", help="leave out the 16 kHz chunk trials")
    args = parser.parse_args(argv)
    if args.command == "bot":
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return asyncio.run(_bot(args))
    speakers = tuple(int(n) for n in args.speakers.split(",") if n)
    print(json.dumps(stream_bench(speakers, args.seconds, pcm16k=not args.no_pcm16k), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
