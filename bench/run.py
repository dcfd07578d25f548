"""The benchmark suite: ``tox -e bench`` (or ``python bench/run.py``).

Every figure comes from this run on this machine, and every ratio is against a baseline measured
in the same run (the machine is shared and noisy):

1. **Floor**: raw libopus decode plus the transport AEAD open of the same frames, tight loop.
2. **Pipeline cost**: CPU µs per frame, datagram to sink (the bot process and its decoding
   workers, per-user WAV), at 10, 100 and the most speakers held; as a ratio to the floor.
3. **Capacity**: the most concurrent speakers held in real time (no kernel socket drop, no lost
   or dropped frame, latency bounded) with per-user WAV and with ``ogg-opus`` (no decode).
4. **Latency**: datagram arrival to ``on_audio``, p50 and p99, at 100 and 300 speakers.
5. **Memory**: RSS per active speaker, and RSS late in a long run against after one minute.
6. **Peers**: discord-ext-voice-recv 0.5.x in its own environment, same packets, for pipeline
   cost and capacity; the seed's design (a note: it cannot run on discord.py 2.7).
7. **16 kHz**: per-user WAV at 16 kHz mono (resampled, downmixed) against 48 kHz stereo, 100
   speakers, back to back: the ratio of their cost per frame.
8. **Idle**: 20 listening sessions in one bot process, each alone in a silent call: CPU per
   session while listening, against the same clients connected and not listening.
9. **DAVE**: the extra cost per frame with DAVE on, at a size a DAVE group reaches here.

A run that the suite does not call *held* (the generator fell behind, a datagram or frame was
dropped or lost, latency ran away, an idle client went away) never gives a figure: it is run again
(``--retries``, 2 by default) and otherwise the table says "not held" and why. Each figure with a
target says whether it is met or by how much it is not. ``--only idle,resample16`` (any of
``PARTS``) measures a subset and prints its table, writing files only where ``--output`` /
``--json`` are given.

The load: a loopback Discord (``listening_core.testing``) hosts the call; the bot under test runs
in its own process and joins it like any bot; N virtual members join and announce their SSRCs;
then ``bench/generator.py``, another process, replays pre-encrypted packets straight at the bot's
UDP socket at real-time pace. Transport encryption is XChaCha20-Poly1305 (the one mode the peer
supports) and the calls run without DAVE so that the peer can take the same packets and so that
thousands of members can join (each virtual member is a full MLS client; building a DAVE group
costs O(N²)); DAVE's own cost is measured separately at a size a DAVE group can reach here.

Results: ``BENCHMARKS.md`` (a table) and ``bench/results.json`` (every figure, with the machine,
date, versions and command).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODE = "aead_xchacha20_poly1305_rtpsize"
PEER_PYTHON = ROOT / ".bench" / "voice-recv" / "bin" / "python"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- a trial


async def _read_json_line(stream: asyncio.StreamReader, timeout: float) -> dict[str, Any]:
    while True:
        line = await asyncio.wait_for(stream.readline(), timeout)
        if not line:
            raise RuntimeError("the process ended without a result")
        text = line.decode().strip()
        if text.startswith("{"):
            return json.loads(text)


async def _wait_line(stream: asyncio.StreamReader, prefix: str, timeout: float) -> str:
    while True:
        line = await asyncio.wait_for(stream.readline(), timeout)
        if not line:
            raise RuntimeError(f"the process ended before saying {prefix!r}")
        text = line.decode().strip()
        if text.startswith(prefix):
            return text


async def trial(
    receiver: str,
    speakers: int,
    seconds: float,
    *,
    sink: str = "wav",
    sink_options: dict[str, Any] | None = None,
    warmup: float = 3.0,
    dave: bool = False,
    reports: tuple[float, ...] = (),
) -> dict[str, Any]:
    """One run: ``speakers`` members speak for ``warmup + seconds``; ``receiver`` is ``"ours"``
    (listening-core with ``sink``, configured by ``sink_options`` besides its directory) or
    ``"peer"`` (discord-ext-voice-recv). ``reports``: extra
    report times (seconds after the mark) for memory over time."""
    from listening_core.testing import LocalDiscord

    from .floor import speech_frames
    from .generator import write_dave_frames

    frames = speech_frames()
    with tempfile.TemporaryDirectory(prefix="listening-bench-") as tmp_name:
        tmp = Path(tmp_name)
        async with LocalDiscord(dave=1 if dave else 0, modes=(MODE,), record=False) as local:
            account = local.add_bot("bench")
            address = local.address(account).save(tmp / "loopback.json")
            channel_id = local.world.voice_channel_id
            if receiver == "ours":
                command = [
                    sys.executable,
                    str(HERE / "bot.py"),
                    "--address",
                    str(address),
                    "--channel",
                    str(channel_id),
                    "--sink",
                    sink,
                    "--output",
                    str(tmp / "out"),
                    "--sink-options",
                    json.dumps(sink_options or {}),
                ]
            else:
                command = [
                    str(PEER_PYTHON),
                    str(HERE / "peer_voice_recv.py"),
                    "--address",
                    str(address),
                    "--channel",
                    str(channel_id),
                    "--seconds",
                    str(seconds + warmup - 1),
                    "--sink",
                    "wave" if sink == "wav" else "count",
                    "--output",
                    str(tmp / "out"),
                    "--ready-file",
                    str(tmp / "ready"),
                ]
            (tmp / "out").mkdir()
            bot_log = (tmp / "bot.log").open("w")  # closed when the process ends
            bot = await asyncio.create_subprocess_exec(
                *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=bot_log
            )
            generator: asyncio.subprocess.Process | None = None
            try:
                assert bot.stdout is not None and bot.stdin is not None
                if receiver == "ours":
                    await _wait_line(bot.stdout, "READY", 90)
                else:
                    deadline = time.monotonic() + 90
                    while not (tmp / "ready").exists():
                        if bot.returncode is not None or time.monotonic() > deadline:
                            raise RuntimeError("the peer did not start listening")
                        await asyncio.sleep(0.1)
                call = local.calls[channel_id]
                members = [local.add_member(f"s{i}") for i in range(speakers)]
                for member in members:
                    await member.join(wait_ready=dave)
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
                }
                if dave:
                    await asyncio.sleep(1.0)
                    ticks = int(spec["seconds"] * 50)
                    for index, (member, entry) in enumerate(zip(members, spec["speakers"], strict=True)):
                        path = tmp / f"dave-{index}.bin"
                        assert member.dave is not None
                        write_dave_frames(
                            path,
                            [
                                member.dave.encrypt_opus(frames[(index * 37 + k) % len(frames)])
                                for k in range(ticks)
                            ],
                        )
                        entry["dave_frames"] = str(path)
                # discord.py's voice socket is connected to the voice server (the relay): the kernel
                # drops datagrams from anywhere else. The generator takes the relay's port over.
                spec["bind"] = list(call.relay.address)
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
                result: dict[str, Any] = {
                    "receiver": receiver,
                    "sink": sink,
                    "speakers": speakers,
                    "dave": dave,
                }
                if sink_options:
                    result["sink_options"] = sink_options
                if receiver == "ours":
                    await asyncio.sleep(warmup)
                    bot.stdin.write(b"mark\n")
                    await bot.stdin.drain()
                    if os.environ.get("BENCH_PROFILE"):  # py-spy's view of the bot process, for a profile
                        await asyncio.create_subprocess_exec(
                            "py-spy",
                            "record",
                            "--threads",
                            "--idle",
                            "-r",
                            "200",
                            "-d",
                            str(int(seconds) - 1),
                            "-f",
                            "raw",
                            "-o",
                            os.environ["BENCH_PROFILE"],
                            "-p",
                            str(bot.pid),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    marks = sorted({*reports, seconds})
                    start = time.monotonic()
                    timeline = []
                    for at in marks:
                        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
                        bot.stdin.write(b"report\n")
                        await bot.stdin.drain()
                        try:
                            timeline.append({"at": at, **await _read_json_line(bot.stdout, 60)})
                        except TimeoutError:
                            if os.environ.get("BENCH_DEBUG") and shutil.which("py-spy"):
                                dump = subprocess.run(
                                    ["py-spy", "dump", "-p", str(bot.pid)], capture_output=True, text=True
                                )
                                log("the bot did not answer; py-spy dump:\n" + dump.stdout[-6000:])
                            result["held"] = False
                            result["problems"] = [
                                f"the bot did not answer within 60 s ({speakers} speakers): overloaded"
                            ]
                            result["generator"] = {"max_behind_ms": None}
                            return result
                    result.update(next(r for r in timeline if r["at"] == seconds))
                    result["timeline"] = timeline
                    result["generator"] = await _read_json_line(generator.stdout, seconds + 120)
                    bot.stdin.write(b"stop\n")
                    await bot.stdin.drain()
                    result.update(await _read_json_line(bot.stdout, 180))
                else:
                    result["peer"] = await _read_json_line(bot.stdout, seconds + warmup + 120)
                    result["generator"] = await _read_json_line(generator.stdout, seconds + 120)
                if os.environ.get("BENCH_DEBUG"):
                    log("the bot's log:\n" + (tmp / "bot.log").read_text()[-3000:])
                return judge(result, seconds)
            except BaseException:
                log("the bot's log:\n" + (tmp / "bot.log").read_text()[-3000:])
                raise
            finally:
                for process in (generator, bot):
                    if process is not None and process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                        await process.wait()


def judge(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Whether the run was held in real time, and its cost per frame."""
    speakers = result["speakers"]
    generator = result["generator"]
    problems = []
    if generator["max_behind_ms"] > 20:
        problems.append(
            f"the generator fell {generator['max_behind_ms']} ms behind (the machine is overloaded)"
        )
    if result["receiver"] == "ours":
        expected = speakers * 50 * seconds
        if result.get("kernel_drops"):
            problems.append(f"{result['kernel_drops']} datagrams dropped by the kernel (socket buffer full)")
        if result["lost"] or result["dropped"] or result["late"]:
            problems.append(
                f"{result['lost']} lost, {result['late']} late, {result['dropped']} dropped frames"
            )
        if result["frames"] < 0.98 * expected:
            problems.append(f"delivered {result['frames']} frames of {expected:.0f} sent in the window")
        if result["latency_p99_ms"] is None or result["latency_p99_ms"] > 200:
            problems.append(f"latency p99 {result['latency_p99_ms']} ms: falling behind")
        if result["frames"]:
            result["cpu_us_per_frame"] = round(result["cpu_seconds"] / result["frames"] * 1e6, 2)
    else:
        peer = result["peer"]
        frames = sum(peer["frames"].values())
        expected = speakers * 50 * peer["wall_seconds"]
        if peer.get("socket_drops"):
            problems.append(f"{peer['socket_drops']} datagrams dropped by the kernel (socket buffer full)")
        if peer.get("session_ended_early"):
            problems.append("voice-recv ended its session: " + "; ".join(peer.get("errors", []))[:300])
        if frames < 0.98 * expected:
            problems.append(f"delivered {frames} frames of {expected:.0f} sent in the window")
        result["frames"] = frames
        if frames:
            result["cpu_us_per_frame"] = round(peer["cpu_seconds"] / frames * 1e6, 2)
    result["held"] = not problems
    result["problems"] = problems
    return result


# ------------------------------------------------------------------------------------ idle sessions


async def idle_trial(
    sessions: int, seconds: float, *, sink: str = "wav", dave: bool = True, settle: float = 5.0
) -> dict[str, Any]:
    """``sessions`` voice clients in one bot process, each alone in its own silent call: the CPU of
    that process (and its decoding workers) over ``seconds`` while they are only connected, then
    over ``seconds`` while they all listen with ``sink``. Nobody speaks; DAVE is on, as on Discord."""
    from listening_core.testing import LocalDiscord

    with tempfile.TemporaryDirectory(prefix="listening-bench-idle-") as tmp_name:
        tmp = Path(tmp_name)
        async with LocalDiscord(dave=1 if dave else 0, modes=(MODE,), record=False) as local:
            world = local.world
            while len(world.voice_channel_ids) < sessions:  # one call each (read at GUILD_CREATE)
                world.voice_channel_ids.append(world.snowflake())
            channels = world.voice_channel_ids[:sessions]
            addresses = [
                str(local.address(local.add_bot(f"idle-{i}")).save(tmp / f"bot-{i}.json"))
                for i in range(sessions)
            ]
            bot_log = (tmp / "bot.log").open("w")  # closed when the process ends
            bot = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.idle_bot",
                "--addresses",
                ",".join(addresses),
                "--channels",
                ",".join(str(c) for c in channels),
                "--sink",
                sink,
                "--output",
                str(tmp / "out"),
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=bot_log,
            )
            assert bot.stdout is not None and bot.stdin is not None
            stdin, stdout = bot.stdin, bot.stdout

            async def say(command: str) -> None:
                stdin.write(command.encode() + b"\n")
                await stdin.drain()

            async def window() -> dict[str, Any]:
                await say("mark")
                await asyncio.sleep(seconds)
                await say("report")
                return await _read_json_line(stdout, 60)

            try:
                await _wait_line(stdout, "READY", 60 + 5 * sessions)
                await asyncio.sleep(settle)
                connected = await window()
                await say("listen")
                await _wait_line(stdout, "LISTENING", 60)
                await asyncio.sleep(settle)
                listening = await window()
                await say("stop")
                await _read_json_line(stdout, 60)
            except BaseException:
                log("the idle bot's log:\n" + (tmp / "bot.log").read_text()[-3000:])
                raise
            finally:
                if bot.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        bot.kill()
                    await bot.wait()
            return judge_idle(
                {
                    "sessions": sessions,
                    "sink": sink,
                    "dave": dave,
                    "connected": connected,
                    "listening": listening,
                },
                seconds,
            )


def judge_idle(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Whether the idle run was held (every client connected in both windows and listening in the
    second, no session ended, no window stretched by a stalled machine), and its CPU per session
    as a percentage of one core: connected only, listening, and listening's own (the difference)."""
    n = result["sessions"]
    problems = []
    for phase in ("connected", "listening"):
        window = result[phase]
        if window["connected"] < n:
            problems.append(f"{phase} window: {window['connected']} of {n} clients connected")
        if window["seconds"] > 1.2 * seconds + 1:
            problems.append(
                f"{phase} window lasted {window['seconds']} s for {seconds:.0f} s asked: the machine stalled"
            )
        if window.get("ended"):
            problems.append(f"{phase} window: " + "; ".join(window["ended"])[:300])
    if result["connected"]["listening"]:
        problems.append(
            f"{result['connected']['listening']} clients were listening in the connected-only window"
        )
    if result["listening"]["listening"] < n:
        problems.append(f"listening window: {result['listening']['listening']} of {n} clients listening")
    for phase in ("connected", "listening"):
        window = result[phase]
        if window["seconds"] > 0:
            result[f"{phase}_pct_per_session"] = round(window["cpu_seconds"] / window["seconds"] / n * 100, 4)
    if "connected_pct_per_session" in result and "listening_pct_per_session" in result:
        result["own_pct_per_session"] = round(
            result["listening_pct_per_session"] - result["connected_pct_per_session"], 4
        )
    result["held"] = not problems
    result["problems"] = problems
    return result


# -------------------------------------------------------------------------------------- the suite


def capacity(
    receiver: str, sink: str, candidates: list[int], search_seconds: float, confirm_seconds: float
) -> dict[str, Any]:
    """The most speakers held: ascending short trials until one fails, then a long confirmation."""
    tried = []
    best = None
    for n in candidates:
        log(f"capacity {receiver}/{sink}: {n} speakers for {search_seconds:.0f} s")
        result = asyncio.run(trial(receiver, n, search_seconds, sink=sink))
        tried.append(_brief(result))
        log(f"  -> {'held' if result['held'] else 'NOT held: ' + '; '.join(result['problems'])}")
        if not result["held"]:
            break
        best = n
    confirmed = None
    while best is not None:
        log(f"capacity {receiver}/{sink}: confirming {best} speakers for {confirm_seconds:.0f} s")
        result = asyncio.run(trial(receiver, best, confirm_seconds, sink=sink))
        tried.append(_brief(result))
        if result["held"]:
            confirmed = result
            break
        log(f"  -> NOT held: {'; '.join(result['problems'])}")
        lower = [n for n in candidates if n < best]
        best = lower[-1] if lower else None
    return {
        "speakers": best,
        "at_least": best is not None and best == candidates[-1],  # every candidate held: the limit is higher
        "confirmed": _brief(confirmed) if confirmed else None,
        "trials": tried,
    }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


PEER_DIST = "discord-ext-voice-recv"
# The peer's version as its own environment has it: the distribution's metadata, else the module's
# __version__; prints nothing when neither is there.
_PEER_VERSION_CODE = f"""
import importlib.metadata as m
try:
    print(m.version({PEER_DIST!r}))
except m.PackageNotFoundError:
    try:
        from discord.ext import voice_recv
    except ImportError:
        pass
    else:
        print(getattr(voice_recv, "__version__", "") or "")
"""


def peer_version() -> str | None:
    """The installed discord-ext-voice-recv in the peer's environment, or None (not installed)."""
    if not PEER_PYTHON.exists():
        return None
    done = subprocess.run(
        [str(PEER_PYTHON), "-c", _PEER_VERSION_CODE], capture_output=True, text=True, check=False
    )
    lines = done.stdout.strip().splitlines()
    return lines[-1].strip() if lines and lines[-1].strip() not in ("", "None") else None


def versions() -> dict[str, Any]:
    from listening_core.opus import libopus_version

    found: dict[str, Any] = {"libopus": libopus_version()}
    for dist in ("listening-core", "discord.py", "davey", "PyNaCl", "cryptography"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    version = peer_version()
    if version is not None:
        found[PEER_DIST] = version
    return found


def peer_version_text(r: dict[str, Any]) -> str:
    """The peer's version as the table's header says it: never "None"."""
    version = r.get("versions", {}).get(PEER_DIST)
    if version and version != "None":
        return f"{PEER_DIST} {version}"
    if r.get("capacity_peer", {}).get("error"):
        return f"{PEER_DIST} not installed (its environment could not be built)"
    if "capacity_peer" not in r and "peer_cost" not in r:
        return f"{PEER_DIST} not run"
    return f"{PEER_DIST} (version unknown)"


def ensure_peer_env() -> str | None:
    """Build the peer's own virtualenv if it is missing; None when ready, else why not."""
    if PEER_PYTHON.exists():
        return None
    requirements = HERE / "peers" / "voice-recv-requirements.txt"
    log("building the peer's environment (.bench/voice-recv) from " + str(requirements.relative_to(ROOT)))
    env_dir = PEER_PYTHON.parent.parent
    steps = [
        [sys.executable, "-m", "venv", str(env_dir)],
        [
            str(PEER_PYTHON),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(requirements),
        ],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode:
            return f"{shlex.join(step)} failed: {done.stderr[-500:]}"
    return None


def held_trial(
    receiver: str, speakers: int, seconds: float, *, retries: int, what: str, **options: Any
) -> dict[str, Any]:
    """:func:`trial` until a run is held, at most ``1 + retries`` runs: the held run, or the last
    one (``held`` False, its problems); ``tries`` says how many ran, ``earlier_problems`` why the
    earlier ones did not count."""
    earlier: list[list[str]] = []
    for attempt in range(1 + retries):
        log(f"{what}: {speakers} speakers, {seconds:.0f} s" + (f" (try {attempt + 1})" if attempt else ""))
        result = asyncio.run(trial(receiver, speakers, seconds, **options))
        if result["held"]:
            break
        log(f"  -> NOT held: {'; '.join(result['problems'])}")
        earlier.append(result["problems"])
    result["tries"] = attempt + 1
    result["earlier_problems"] = earlier[:-1] if not result["held"] else earlier
    return result


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "speakers",
        "sink",
        "sink_options",
        "receiver",
        "held",
        "problems",
        "tries",
        "earlier_problems",
        "cpu_us_per_frame",
        "cpu_by_thread_seconds",
        "frames",
        "seconds",
        "latency_p50_ms",
        "latency_p99_ms",
        "kernel_drops",
        "rss_bytes",
        "generator",
    )
    return {k: result[k] for k in keep if k in result}


def dave_cost(speakers: int, seconds: float, retries: int) -> dict[str, Any]:
    """The same load with and without DAVE, at a size a DAVE group reaches quickly here; the extra
    cost only from two held runs."""
    plain = held_trial("ours", speakers, seconds, retries=retries, what="DAVE cost, without DAVE")
    dave = held_trial("ours", speakers, seconds, retries=retries, what="DAVE cost, with DAVE", dave=True)
    out = {"speakers": speakers, "without": _brief(plain), "with": _brief(dave)}
    if plain["held"] and dave["held"]:
        out["extra_us_per_frame"] = round(dave["cpu_us_per_frame"] - plain["cpu_us_per_frame"], 2)
    return out


def resample_cost(speakers: int, seconds: float, retries: int) -> dict[str, Any]:
    """Per-user WAV at 48 kHz stereo (as received) and at 16 kHz mono (resampled, downmixed), the
    same load back to back; the ratio of their cost per frame, only from two held runs."""
    stereo = held_trial("ours", speakers, seconds, retries=retries, what="48 kHz stereo WAV")
    mono = held_trial(
        "ours",
        speakers,
        seconds,
        retries=retries,
        what="16 kHz mono WAV",
        sink_options={"sample_rate": 16000, "channels": 1},
    )
    out: dict[str, Any] = {"speakers": speakers, "stereo_48k": _brief(stereo), "mono_16k": _brief(mono)}
    if stereo["held"] and mono["held"]:
        out["ratio"] = round(mono["cpu_us_per_frame"] / stereo["cpu_us_per_frame"], 2)
    return out


def streams_part(seconds: float, retries: int) -> dict[str, Any]:
    """Live streams (``bench/streams.py``): what one ``async for`` loop takes when a thread feeds
    it as fast as it can, then a real session at 10 and 100 speakers with one loop consuming
    every frame, and one consuming 16 kHz mono chunks; a trial not held is run again."""
    from .streams import loop_throughput, stream_trial

    async def trial(speakers: int, pcm_rate: int | None) -> dict[str, Any]:
        earlier: list[list[str]] = []
        for attempt in range(1 + retries):
            what = f"{pcm_rate} Hz chunks" if pcm_rate else "frames"
            log(
                f"live stream, {what}: {speakers} speakers, {seconds:.0f} s"
                + (f" (try {attempt + 1})" if attempt else "")
            )
            result = await stream_trial(speakers, seconds, pcm_rate=pcm_rate)
            behind = (result.get("generator") or {}).get("max_behind_ms") or 0
            if behind > 20:
                result["held"] = False
                result["problems"].append(
                    f"the generator fell {behind} ms behind (the machine is overloaded)"
                )
            if result["held"]:
                break
            log(f"  -> NOT held: {'; '.join(result['problems'])}")
            earlier.append(result["problems"])
        result["tries"] = attempt + 1
        result["earlier_problems"] = earlier[:-1] if not result["held"] else earlier
        return result

    async def run() -> dict[str, Any]:
        log("live stream throughput")
        out: dict[str, Any] = {"throughput": await loop_throughput(100)}
        out["frames"] = {str(n): await trial(n, None) for n in (10, 100)}
        out["pcm16k"] = {str(n): await trial(n, 16_000) for n in (10, 100)}
        return out

    return asyncio.run(run())


def transcribe_part(retries: int) -> dict[str, Any]:
    """The ``transcribe`` sink with faster-whisper (``tiny.en`` int8, ``bench/transcribe.py``): 1, 4
    and 8 members speaking at once; a member count whose run lost anything is run again."""
    from .transcribe import measure_transcription

    runs = []
    out: dict[str, Any] = {}
    for count in (1, 4, 8):
        for attempt in range(1 + retries):
            log(f"transcription: {count} members at once" + (f" (try {attempt + 1})" if attempt else ""))
            result = measure_transcription((count,))
            run = result["runs"][0] | {"tries": attempt + 1}
            if run["held"]:
                break
            log(f"  -> NOT held: {run}")
        out = {k: v for k, v in result.items() if k != "runs"}
        runs.append(run)
    return out | {"runs": runs}


def idle_cost(sessions: int, seconds: float, retries: int) -> dict[str, Any]:
    """:func:`idle_trial` until a run is held, at most ``1 + retries`` runs."""
    earlier: list[list[str]] = []
    for attempt in range(1 + retries):
        log(
            f"idle: {sessions} sessions, {seconds:.0f} s connected then {seconds:.0f} s listening"
            + (f" (try {attempt + 1})" if attempt else "")
        )
        result = asyncio.run(idle_trial(sessions, seconds))
        if result["held"]:
            break
        log(f"  -> NOT held: {'; '.join(result['problems'])}")
        earlier.append(result["problems"])
    result["tries"] = attempt + 1
    result["earlier_problems"] = earlier[:-1] if not result["held"] else earlier
    result["seconds"] = seconds
    return result


def memory_over_time(speakers: int, seconds: float, retries: int) -> dict[str, Any]:
    """RSS after one minute and at the end of a long run (per-user WAV)."""
    reports = tuple(t for t in (60.0, 120.0, 300.0) if t < seconds)
    result = held_trial("ours", speakers, seconds, retries=retries, what="memory", reports=reports)
    out = {
        "speakers": speakers,
        "seconds": seconds,
        "held": result["held"],
        "problems": result["problems"],
        "tries": result["tries"],
    }
    if "timeline" not in result:  # the bot never answered: no point at all
        return out
    points = [
        {"at": r["at"], "rss_bytes": r["rss_bytes"], "rss_main_bytes": r["rss_main_bytes"]}
        for r in result["timeline"]
    ]
    first = next((p for p in points if p["at"] == 60.0), points[0])
    return out | {
        "points": points,
        "growth_bytes": points[-1]["rss_bytes"] - first["rss_bytes"],
        "growth_ratio": round(points[-1]["rss_bytes"] / first["rss_bytes"], 4),
    }


#: What ``--only`` can name; a full run measures them all.
PARTS = ("floor", "capacity", "peer", "cost", "resample16", "idle", "dave", "memory", "streams", "transcribe")
#: The pipeline cost's speaker counts (plus the per-user WAV capacity, when that is higher).
COST_SPEAKERS = (10, 100, 300)


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    from .floor import measure_floor

    parts = set(args.only or PARTS)
    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": ("tox -e bench" if os.environ.get("TOX_ENV_NAME") == "bench" else "python -m bench.run")
        + (
            " -- "
            if os.environ.get("TOX_ENV_NAME") == "bench" and sys.argv[1:]
            else " "
            if sys.argv[1:]
            else ""
        )
        + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "versions": versions(),
        "mode": MODE,
        "parts": [p for p in PARTS if p in parts],
    }
    retries = args.retries
    floor_us = None
    if parts & {"floor", "cost", "peer"}:  # the ratios' baseline: seconds, so always with them
        log("floor")
        results["floor"] = {
            "xchacha": measure_floor(MODE),
            "aes_gcm": measure_floor("aead_aes256_gcm_rtpsize"),
        }
        floor_us = results["floor"]["xchacha"]["both"]["best_us"]

    if "capacity" in parts:
        results["capacity_wav"] = capacity(
            "ours", "wav", args.wav_candidates, args.search_seconds, args.confirm_seconds
        )
        results["capacity_ogg"] = capacity(
            "ours", "ogg-opus", args.ogg_candidates, args.search_seconds, args.confirm_seconds
        )
    problem = None
    if "peer" in parts:
        problem = ensure_peer_env()
        results["versions"] = versions()  # now that the peer's environment is there
        if problem is None:
            results["capacity_peer"] = capacity(
                "peer", "wav", args.peer_candidates, args.search_seconds, args.confirm_seconds
            )
        else:
            results["capacity_peer"] = {"speakers": None, "error": problem}

    if "cost" in parts:
        assert floor_us is not None
        cost = {}
        top = results.get("capacity_wav", {}).get("speakers")
        for n in sorted({*COST_SPEAKERS, *([top] if top else [])}):
            r = held_trial("ours", n, args.cost_seconds, retries=retries, what="pipeline cost")
            cost[str(n)] = _brief(r) | {
                "ratio_to_floor": round(r["cpu_us_per_frame"] / floor_us, 2)
                if r["held"] and r.get("cpu_us_per_frame")
                else None,
            }
        results["pipeline_cost"] = cost
        results["latency"] = {
            str(n): {k: cost[str(n)].get(k) for k in ("held", "problems", "latency_p50_ms", "latency_p99_ms")}
            for n in (100, 300)
        }
        rss = {int(n): c["rss_bytes"] for n, c in cost.items() if c.get("held") and c.get("rss_bytes")}
        lo, hi = (min(rss), max(rss)) if rss else (0, 0)
        results["memory_per_speaker_bytes"] = round((rss[hi] - rss[lo]) / (hi - lo)) if hi > lo else None
    if "peer" in parts and problem is None:
        assert floor_us is not None
        peer_n = min(results["capacity_peer"].get("speakers") or 10, 10)
        r = held_trial("peer", peer_n, args.cost_seconds, retries=retries, what="peer pipeline cost")
        reported = r.get("peer", {}).get("versions", {}).get(PEER_DIST)
        if reported and reported != "None":  # the version the measured process itself imported
            results["versions"][PEER_DIST] = reported
        results["peer_cost"] = _brief(r) | {
            "ratio_to_floor": round(r["cpu_us_per_frame"] / floor_us, 2)
            if r["held"] and r.get("cpu_us_per_frame")
            else None
        }
    if "resample16" in parts:
        results["resample16"] = resample_cost(args.resample_speakers, args.cost_seconds, retries)
    if "idle" in parts:
        results["idle"] = idle_cost(args.idle_sessions, args.idle_seconds, retries)
    if "dave" in parts:
        results["dave_cost"] = dave_cost(args.dave_speakers, args.cost_seconds, retries)
    if "streams" in parts:
        results["streams"] = streams_part(args.stream_seconds, retries)
    if "transcribe" in parts:
        results["transcribe"] = transcribe_part(retries)
    if "memory" in parts:
        results["memory_over_time"] = memory_over_time(100, args.soak_seconds, min(retries, 1))
    results["seed"] = (
        "discord-ext-listening 0.0.3 (the seed's design) cannot run here: on discord.py 2.7.1 its listen() "
        "raises AttributeError (it reads voice-client internals that are gone), and even with "
        "compatibility shims it only opens the xsalsa20 modes Discord retired on 2024-11-18; no "
        "current call offers them, so there is no packet it could receive."
    )
    results["duration_seconds"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds())
    return results


# -------------------------------------------------------------------------------------- the table


def _at_least(capacity: dict[str, Any]) -> str:
    return "at least " if capacity.get("at_least") else ""


def _speakers(capacity: dict[str, Any]) -> str:
    """A capacity as the table shows it: none held at all is said, not printed as "None"."""
    if capacity.get("error"):
        return f"not measured ({capacity['error'][:200]})"
    n = capacity.get("speakers")
    if n is None:
        return "no load held (see the log: every candidate failed its confirmation)"
    return f"{_at_least(capacity)}{n} speakers"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f} MiB"


NOT_RUN = "not measured in this run"


def not_held(result: dict[str, Any]) -> str:
    """What the table says instead of a figure from a run that was not held."""
    tries = result.get("tries", 1)
    why = "; ".join(result.get("problems") or ["no reason recorded"])
    return f"not held ({why}{f'; {tries} tries' if tries > 1 else ''})"


def verdict(value: float | None, op: str, target: float, unit: str = "") -> str:
    """The last column: "met", or how far the figure is from ``op target``; "" without a figure."""
    if value is None:
        return ""
    if op == "≤":
        return "met" if value <= target else f"not met: {value - target:.3g}{unit} over"
    return "met" if value >= target else f"not met: {target - value:.3g}{unit} short"


#: The targets (issue 13): pipeline cost per frame as a multiple of the floor, by speakers.
COST_TARGETS = {10: 2.0, 100: 1.4, 300: 1.3}
LATENCY_TARGETS_MS = {100: 10.0, 300: 20.0}
CAPACITY_WAV_TARGET = 400
CAPACITY_OGG_TARGET = 1000
IDLE_TARGET_PCT = 0.05
RESAMPLE_TARGET = 1.3


def _rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, measured, target, verdict) for every row of the table, targets or not."""
    rows: list[tuple[str, str, str, str]] = []
    if "floor" in r:
        floor = r["floor"]["xchacha"]["both"]["best_us"]
        measured = f"{floor:.1f} µs (AES-GCM: {r['floor']['aes_gcm']['both']['best_us']:.1f} µs)"
    else:
        measured = NOT_RUN
    rows.append(("floor: libopus decode + XChaCha20 open, per frame", measured, "", ""))

    cost = r.get("pipeline_cost", {})
    for n in sorted({*COST_TARGETS, *(int(k) for k in cost)}):
        target = COST_TARGETS.get(n)
        what = f"pipeline cost, {n} speakers, per-user WAV"
        c = cost.get(str(n))
        if c is None:
            rows.append((what, NOT_RUN, f"≤ {target:g}x" if target else "", ""))
        elif not c.get("held"):
            rows.append((what, not_held(c), f"≤ {target:g}x" if target else "", "not held: no figure"))
        else:
            ratio = c.get("ratio_to_floor")
            rows.append(
                (
                    what,
                    f"{c.get('cpu_us_per_frame')} µs/frame = {ratio}x floor",
                    f"≤ {target:g}x" if target else "",
                    verdict(ratio, "≤", target, "x") if target else "",
                )
            )
    if "peer_cost" in r:
        pc = r["peer_cost"]
        measured = (
            f"{pc.get('cpu_us_per_frame')} µs/frame = {pc.get('ratio_to_floor')}x floor"
            if pc.get("held")
            else not_held(pc)
        )
        rows.append((f"discord-ext-voice-recv cost, {pc['speakers']} speakers, WAV", measured, "", ""))

    res = r.get("resample16")
    what = f"16 kHz mono WAV (resampled) vs 48 kHz stereo, {res['speakers'] if res else 100} speakers"
    if res is None:
        rows.append((what, NOT_RUN, f"≤ {RESAMPLE_TARGET}x", ""))
    elif res.get("ratio") is None:
        bad = res["mono_16k"] if not res["mono_16k"].get("held") else res["stereo_48k"]
        label = "16 kHz" if bad is res["mono_16k"] else "48 kHz"
        rows.append((what, f"{label} run {not_held(bad)}", f"≤ {RESAMPLE_TARGET}x", "not held: no figure"))
    else:
        rows.append(
            (
                what,
                f"{res['mono_16k']['cpu_us_per_frame']} vs {res['stereo_48k']['cpu_us_per_frame']} µs/frame "
                f"= {res['ratio']}x",
                f"≤ {RESAMPLE_TARGET}x",
                verdict(res["ratio"], "≤", RESAMPLE_TARGET, "x"),
            )
        )

    cap_wav, cap_ogg, cap_peer = r.get("capacity_wav"), r.get("capacity_ogg"), r.get("capacity_peer")
    held_n = cap_wav.get("speakers") if cap_wav else None
    rows.append(
        (
            "capacity, per-user WAV (60 s held: real time, no drop)",
            _speakers(cap_wav) if cap_wav else NOT_RUN,
            f"≥ {CAPACITY_WAV_TARGET}",
            verdict(held_n, "≥", CAPACITY_WAV_TARGET, " speakers") if cap_wav else "",
        )
    )
    rows.append(
        (
            "capacity, discord-ext-voice-recv, same packets",
            _speakers(cap_peer) if cap_peer else NOT_RUN,
            "",
            "",
        )
    )
    peer_n = cap_peer.get("speakers") if cap_peer else None
    if held_n and peer_n and cap_peer:
        ratio_value = held_n / peer_n
        ratio = ("at most " if cap_peer.get("at_least") else "") + f"{ratio_value:.1f}x"
        rows.append(
            ("capacity vs discord-ext-voice-recv", ratio, "≥ 3x", verdict(ratio_value, "≥", 3.0, "x"))
        )
    else:
        rows.append(
            ("capacity vs discord-ext-voice-recv", "n/a" if cap_wav and cap_peer else NOT_RUN, "≥ 3x", "")
        )
    ogg_n = cap_ogg.get("speakers") if cap_ogg else None
    rows.append(
        (
            "capacity, ogg-opus (no decode)",
            _speakers(cap_ogg) if cap_ogg else NOT_RUN,
            f"≥ {CAPACITY_OGG_TARGET}",
            verdict(ogg_n, "≥", CAPACITY_OGG_TARGET, " speakers") if cap_ogg else "",
        )
    )

    latency = r.get("latency", {})
    for n, target in LATENCY_TARGETS_MS.items():
        what = f"latency, arrival to on_audio, {n} speakers"
        lat = latency.get(str(n))
        if lat is None:
            rows.append((what, NOT_RUN, f"p99 ≤ {target:g} ms", ""))
        elif not lat.get("held"):
            rows.append((what, not_held(lat), f"p99 ≤ {target:g} ms", "not held: no figure"))
        else:
            rows.append(
                (
                    what,
                    f"p50 {lat['latency_p50_ms']} ms, p99 {lat['latency_p99_ms']} ms",
                    f"p99 ≤ {target:g} ms",
                    verdict(lat["latency_p99_ms"], "≤", target, " ms"),
                )
            )

    idle = r.get("idle")
    what = "idle listening sessions: CPU per session, each alone in a silent call"
    if idle is None:
        rows.append((what, NOT_RUN, f"≤ {IDLE_TARGET_PCT} % of a core", ""))
    elif not idle.get("held"):
        rows.append((what, not_held(idle), f"≤ {IDLE_TARGET_PCT} % of a core", "not held: no figure"))
    else:
        rows.append(
            (
                f"idle listening sessions ({idle['sessions']}): CPU per session, each alone in a silent call",
                f"listening's own {_pct(idle['own_pct_per_session'])} % of a core "
                f"(listening {_pct(idle['listening_pct_per_session'])} %, "
                f"connected only {_pct(idle['connected_pct_per_session'])} %)",
                f"≤ {IDLE_TARGET_PCT} % of a core",
                verdict(idle["own_pct_per_session"], "≤", IDLE_TARGET_PCT, " %"),
            )
        )

    if "memory_per_speaker_bytes" in r:
        measured = _mib(r["memory_per_speaker_bytes"])
        value = r["memory_per_speaker_bytes"]
        rows.append(
            (
                "RSS per active speaker",
                measured,
                "≤ 1 MiB",
                verdict(value / 2**20, "≤", 1.0, " MiB") if value else "",
            )
        )
    else:
        rows.append(("RSS per active speaker", NOT_RUN, "≤ 1 MiB", ""))
    mot = r.get("memory_over_time")
    if mot is None:
        rows.append(("RSS late in a long run vs at 60 s, 100 speakers", NOT_RUN, "flat", ""))
    elif not mot.get("held") or "points" not in mot:
        rows.append(
            ("RSS late in a long run vs at 60 s, 100 speakers", not_held(mot), "flat", "not held: no figure")
        )
    else:
        rows.append(
            (
                f"RSS at {mot['points'][-1]['at']:.0f} s vs at {mot['points'][0]['at']:.0f} s, 100 speakers",
                f"{_mib(mot['points'][-1]['rss_bytes'])} vs {_mib(mot['points'][0]['rss_bytes'])} "
                f"(x{mot['growth_ratio']})",
                "flat",
                "",
            )
        )
    rows += _stream_rows(r.get("streams"))
    rows += _transcribe_rows(r.get("transcribe"))
    dc = r.get("dave_cost")
    if dc is None:
        rows.append(("DAVE's extra cost", NOT_RUN, "", ""))
    elif dc.get("extra_us_per_frame") is None:
        bad = dc["with"] if not dc["with"].get("held") else dc["without"]
        label = "with DAVE" if bad is dc["with"] else "without DAVE"
        rows.append(
            (f"DAVE's extra cost, {dc['speakers']} speakers", f"the run {label} {not_held(bad)}", "", "")
        )
    elif dc["extra_us_per_frame"] < 0:
        # two runs' noise is larger than what DAVE adds: no figure, the two runs instead
        rows.append(
            (
                f"DAVE's extra cost, {dc['speakers']} speakers",
                f"below the noise: {dc['with'].get('cpu_us_per_frame')} µs/frame with DAVE, "
                f"{dc['without'].get('cpu_us_per_frame')} without",
                "",
                "",
            )
        )
    else:
        rows.append(
            (f"DAVE's extra cost, {dc['speakers']} speakers", f"{dc['extra_us_per_frame']} µs/frame", "", "")
        )
    return rows


def _stream_rows(st: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    if st is None:
        return [("live stream: one async for loop", NOT_RUN, "", "")]
    tp = st["throughput"]
    rows = [
        (
            "live stream: frames one async for loop takes, fed by a thread as fast as it can",
            f"{tp['frames_per_second']:,} frames/s (the delivery thread's share: "
            f"{tp['delivery_cpu_us_per_frame']} µs/frame)",
            "",
            "",
        )
    ]
    for kind, label in (("frames", "every frame"), ("pcm16k", "16 kHz mono chunks")):
        for n, t in st.get(kind, {}).items():
            what = f"live stream, {n} speakers, one loop taking {label}"
            if not t.get("held"):
                rows.append((what, not_held(t), "", ""))
            elif kind == "frames":
                rows.append(
                    (
                        what,
                        f"{t['frames_per_second']:,} frames/s; arrival to the loop p50 "
                        f"{t['latency_p50_ms']} ms, p99 {t['latency_p99_ms']} ms",
                        "",
                        "",
                    )
                )
            else:
                rows.append((what, f"{t['frames_per_second']:,} frames/s, nothing dropped", "", ""))
    return rows


def _transcribe_rows(tr: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    if tr is None:
        return [("transcription (faster-whisper tiny.en int8)", NOT_RUN, "", "")]
    rows = []
    for run in tr["runs"]:
        what = (
            f"transcription, {run['members']} member{'s' if run['members'] > 1 else ''} speaking at once "
            f"(faster-whisper tiny.en int8, {tr.get('cpu_threads')} threads)"
        )
        if not run["held"]:
            why = run.get("error") or (
                f"{run['received']} of {run['sent']} frames received, {run['lost']} lost, "
                f"{run['dropped']} dropped, {sum(run['missed'].values())} utterances missed"
            )
            rows.append((what, f"not held ({why}; {run.get('tries', 1)} tries)", "", ""))
            continue
        rows.append(
            (
                what,
                f"real-time factor {run['rtf']}; end of speech to text p50 {run['latency_p50']} s, "
                f"p95 {run['latency_p95']} s; meanwhile reception lost nothing ({run['received']} frames), "
                f"arrival to the sink p99 {run.get('receive_latency_p99_ms')} ms "
                f"({run.get('receive_latency_p99_ms_idle_engine')} ms with an engine that does nothing)",
                "",
                "",
            )
        )
    return rows


def _pct(value: float) -> str:
    """A percentage to 3 decimals; a difference lost in the noise is 0.000, not -0.000."""
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(r: dict[str, Any]) -> str:
    """BENCHMARKS.md from the results."""
    parts = r.get("parts", list(PARTS))
    lines = [
        "# Benchmarks",
        "",
        f"Measured {r['date']} by `{r['command']}` in {r['duration_seconds']} s on {r['machine']['cpu']} "
        f"({r['machine']['cores']} cores, {r['machine']['memory_gib']} GiB, Python {r['machine']['python']}); "
        f"listening-core {r['versions'].get('listening-core')}, discord.py {r['versions'].get('discord.py')}, "
        f"{r['versions'].get('libopus')}, {peer_version_text(r)}. "
        f"Raw figures: {r.get('raw', '`bench/results.json`')}. "
        "Every ratio is against a baseline measured in the same run.",
    ]
    if set(parts) != set(PARTS):
        lines += ["", f"A partial run: only {', '.join(parts)}."]
    lines += [
        "",
        "| what | measured | target | met? |",
        "|---|---|---|---|",
        *(f"| {' | '.join(_cell(c) for c in row)} |" for row in _rows(r)),
    ]
    lines += _where_the_time_goes(r)
    lines += [
        "",
        "How: a loopback Discord hosts the call; the bot under test runs in its own process and joins it",
        "like any bot; a separate process replays pre-encrypted packets (XChaCha20, the one mode the peer",
        "supports; no DAVE, which the peer cannot open, so both take the same packets) at real-time pace,",
        "straight at the bot's socket. CPU is the bot process plus its decoding workers. A load is *held*",
        "when nothing is dropped by the kernel or the receiver, nothing is lost, every frame is delivered,",
        "latency stays bounded and the generator kept its pace; a figure from a run that was not held is",
        "never shown: the suite runs it again (`--retries`) and otherwise says why it was not held.",
        "The idle line: one bot process with that many voice clients, each alone in its own call (DAVE on)",
        "where nobody speaks; its CPU (and its decoding workers') over a window while they are only",
        "connected, then over a window while they all listen to per-user WAV; listening's own cost is the",
        "difference, per session, as a percentage of one core.",
        "",
        f"The seed's design: {r['seed']}",
        "",
    ]
    return "\n".join(lines)


#: Hand-written: what the profile says about each target not met, and what would close it.
ANALYSIS = HERE / "analysis.md"


def _where_the_time_goes(r: dict[str, Any]) -> list[str]:
    """The pipeline-cost runs' CPU per frame by thread (read from /proc in the bot process, and its
    decoding workers), then the hand-written analysis of the gaps."""
    runs = {
        int(n): c
        for n, c in r.get("pipeline_cost", {}).items()
        if c.get("held") and c.get("cpu_by_thread_seconds") and c.get("frames")
    }
    lines: list[str] = []
    if runs:
        roles = sorted(
            {role for c in runs.values() for role in c["cpu_by_thread_seconds"]},
            key=lambda role: (
                -max(c["cpu_by_thread_seconds"].get(role, 0) / c["frames"] for c in runs.values())
            ),
        )
        counts = sorted(runs)
        lines += [
            "",
            "## Where the time goes",
            "",
            "CPU µs per delivered frame in each held pipeline-cost run, by thread of the bot process "
            "(and its decoding worker processes), from `/proc` over the same window:",
            "",
            "| thread | " + " | ".join(f"{n} speakers" for n in counts) + " |",
            "|---|" + "---|" * len(counts),
        ]
        for role in roles:
            cells = [
                f"{runs[n]['cpu_by_thread_seconds'].get(role, 0.0) / runs[n]['frames'] * 1e6:.1f}"
                for n in counts
            ]
            lines.append(f"| {role} | " + " | ".join(cells) + " |")
        floor = r.get("floor", {}).get("xchacha", {}).get("both", {}).get("best_us")
        total = [f"{runs[n]['cpu_us_per_frame']}" for n in counts]
        lines.append("| **all** | " + " | ".join(total) + " |")
        if floor:
            lines.append(
                "| floor (decode + open, a tight loop) | " + " | ".join(f"{floor:.1f}" for _ in counts) + " |"
            )
    if ANALYSIS.exists():
        lines += ["", ANALYSIS.read_text().rstrip()]
    return lines


def _parts(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PARTS)}"
        )
    return names


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tox -e bench --", description="listening-core's benchmark suite")
    parser.add_argument(
        "--only",
        type=_parts,
        help=f"measure only these parts, comma-separated ({', '.join(PARTS)}); the table is printed, and "
        "written only where --output / --json are given",
    )
    parser.add_argument("--output", help="the table (default: BENCHMARKS.md for a full run)")
    parser.add_argument("--json", help="every figure (default: bench/results.json for a full run)")
    parser.add_argument(
        "--retries", type=int, default=2, help="runs again a measurement that was not held, this many times"
    )
    parser.add_argument("--search-seconds", type=float, default=10.0)
    parser.add_argument("--confirm-seconds", type=float, default=60.0)
    parser.add_argument("--cost-seconds", type=float, default=15.0)
    parser.add_argument(
        "--soak-seconds", type=float, default=180.0, help="the memory run (600 for the 10-minute figure)"
    )
    parser.add_argument("--dave-speakers", type=int, default=40)
    parser.add_argument("--stream-seconds", type=float, default=10.0, help="each live-stream trial")
    parser.add_argument("--resample-speakers", type=int, default=100, help="the 16 kHz vs 48 kHz WAV load")
    parser.add_argument(
        "--idle-sessions", type=int, default=20, help="listening sessions, each in a silent call"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=30.0, help="each idle window (connected, listening)"
    )
    parser.add_argument("--wav-candidates", type=_ints, default=[200, 250, 300, 350, 400, 500])
    parser.add_argument(
        "--ogg-candidates", type=_ints, default=[250, 300, 350, 400, 500, 600, 800, 1000, 1500, 2000]
    )
    parser.add_argument("--peer-candidates", type=_ints, default=[15, 30, 45, 60, 75, 90, 120, 150])
    args = parser.parse_args(argv)
    if args.only is None:
        args.output = args.output or str(ROOT / "BENCHMARKS.md")
        args.json = args.json or str(HERE / "results.json")
    results = run_suite(args)
    if args.json != str(HERE / "results.json"):
        results["raw"] = f"`{args.json}`" if args.json else "not written (a partial run without --json)"
    text = markdown(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
