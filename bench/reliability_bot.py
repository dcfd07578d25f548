"""The bot under test of the reliability runs (``bench/reliability.py``), in its own process.

``python -m bench.reliability_bot --address FILE --channel ID --output DIR`` logs in to the
loopback Discord, joins the voice channel with ``listening_core.VoiceClient``, prints
``READY <udp port>`` and obeys stdin, one command a line, answering each with one JSON line:

``listen {json}``
    note what the process holds (threads, file descriptors, decoding processes), then listen
    with the named sink (``"sink"``, ``"options"``; per-user WAV by default) plus a
    :class:`Tally` of every frame delivered, and a :class:`Tap` on the socket that sees every
    datagram the process receives (``"keep_seqs"``: remember each one's sequence number). The
    session makes and owns its decoding pool, as ``vc.listen`` does without ``pool=``;
``report``
    memory (the bot and its decoding workers), threads, file descriptors, kernel socket drops,
    the receiver's per-user statistics and drops by reason, the tally;
``stop``
    stop listening and time it (to ``after`` being called, and to the session's threads and
    processes being gone), then everything ``report`` says plus what was left behind, whether
    every datagram the tap saw before the stop was delivered, and each WAV file's length;
``quit``
    disconnect and exit.

To find what grows (a soak that is not flat): ``trace`` starts :mod:`tracemalloc` and takes a
first snapshot, ``trace-diff`` answers with the 25 places whose memory grew most since.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import multiprocessing
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import discord

import listening_core
from bench.bot import cpu_seconds, rss_bytes, udp_drops
from listening_core import AudioFrame, AudioProcessPool, AudioSink, FrameKind
from listening_core.rtp import PacketKind, classify, seq_diff, ts_diff
from listening_core.testing import LoopbackAddress
from listening_core.unpacker import AudioUnpacker

KEPT = (FrameKind.RECEIVED, FrameKind.SILENCE)  # frames whose packet arrived


class UserTally:
    """What one user's frames looked like at the sink."""

    __slots__ = (
        "backwards",
        "ext",
        "first_position",
        "first_seq",
        "first_ts",
        "gaps",
        "kinds",
        "last_seq",
        "max_drift",
        "seqs",
        "seqs_arrived",
    )

    def __init__(self, frame: AudioFrame, keep_seqs: bool) -> None:
        self.first_seq = self.last_seq = frame.sequence
        self.first_ts = frame.timestamp
        self.first_position = frame.position
        self.ext = 0  # sequence numbers advanced since the first frame (unwrapped)
        self.gaps = 0  # a sequence number skipped: a frame neither delivered nor concealed
        self.backwards = 0  # a sequence number repeated or out of order
        self.max_drift = 0  # samples between a frame's position and its RTP timestamp's
        self.kinds: collections.Counter[str] = collections.Counter()
        self.seqs: set[int] | None = set() if keep_seqs else None  # every frame delivered
        self.seqs_arrived: set[int] | None = set() if keep_seqs else None  # those whose packet arrived

    def as_dict(self) -> dict[str, Any]:
        return {
            "first_seq": self.first_seq,
            "first_position": self.first_position,
            "frames": sum(self.kinds.values()),
            "span": self.ext + 1,
            "gaps": self.gaps,
            "backwards": self.backwards,
            "max_drift_ms": round(self.max_drift / 48, 2),
            "kinds": dict(self.kinds),
        }


class Tally(AudioSink):
    """Counts every frame delivered, per user and kind, and checks their order and alignment."""

    wants_pcm = False

    def __init__(self, keep_seqs: bool = False) -> None:
        self.keep_seqs = keep_seqs
        self.users: dict[int, UserTally] = {}

    def on_audio(self, frame: AudioFrame) -> None:
        tally = self.users.get(frame.user_id)
        if tally is None:
            tally = self.users[frame.user_id] = UserTally(frame, self.keep_seqs)
        else:
            step = seq_diff(frame.sequence, tally.last_seq)
            if step <= 0:
                tally.backwards += 1
            elif step > 1:
                tally.gaps += 1
            tally.ext += step
            tally.last_seq = frame.sequence
        drift = abs(frame.position - tally.first_position - ts_diff(frame.timestamp, tally.first_ts))
        if drift > tally.max_drift:
            tally.max_drift = drift
        tally.kinds[frame.kind.value] += 1
        if tally.seqs is not None and tally.seqs_arrived is not None:
            tally.seqs.add(frame.sequence)
            if frame.kind in KEPT:
                tally.seqs_arrived.add(frame.sequence)


class Tap:
    """A second listener on the voice socket, called after the session's for every datagram."""

    def __init__(self, vc: listening_core.VoiceClient, keep_seqs: bool) -> None:
        self.vc = vc
        self.keep_seqs = keep_seqs
        self.lock = threading.Lock()
        self.counts: collections.Counter[int] = collections.Counter()  # RTP datagrams per mapped SSRC
        self.seqs: dict[int, set[int]] = collections.defaultdict(set)
        self.unmapped = 0  # RTP datagrams from SSRCs nobody announced
        self.frozen: dict[int, set[int]] = {}

    def __call__(self, data: bytes) -> None:
        if classify(data) is not PacketKind.RTP:
            return
        ssrc = int.from_bytes(data[8:12], "big")
        with self.lock:
            if ssrc in self.vc.ssrc_map.users:
                self.counts[ssrc] += 1
                if self.keep_seqs:
                    self.seqs[ssrc].add(int.from_bytes(data[2:4], "big"))
            else:
                self.unmapped += 1

    def freeze(self) -> None:
        """Remember what was received so far (every datagram here already went to the session)."""
        with self.lock:
            self.frozen = {ssrc: set(seqs) for ssrc, seqs in self.seqs.items()}


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the one listdir itself used
            continue
    return out


def _threads() -> dict[int, str]:
    return {t.ident or 0: t.name for t in threading.enumerate() if t.is_alive()}


def _unpackers() -> list[int]:
    return [p.pid or 0 for p in multiprocessing.active_children() if isinstance(p, AudioUnpacker)]


def _listening_threads() -> list[str]:
    return [name for name in _threads().values() if name.startswith("listening-core")]


class Bot:
    def __init__(self, vc: listening_core.VoiceClient, output: Path) -> None:
        self.vc = vc
        self.output = output
        self.port = vc._connection.socket.getsockname()[1]
        self.sink: Any = None
        self.tally = Tally()
        self.tap: Tap | None = None
        self.before: dict[str, Any] = {}
        self.after_calls: list[tuple[float, str | None]] = []
        self.snapshot: tracemalloc.Snapshot | None = None

    def listen(self, request: dict[str, Any]) -> dict[str, Any]:
        keep = bool(request.get("keep_seqs"))
        name = request.get("sink", "wav")
        options = dict(request.get("options") or {})
        options.setdefault("directory", str(self.output))
        self.tally = Tally(keep)
        self.before = {
            "fds": _fds(),
            "threads": _threads(),
            "unpackers": _unpackers(),
            "kernel_drops": udp_drops(self.port),
            "time": time.monotonic(),
        }
        loop = asyncio.get_running_loop()

        def after(sink: AudioSink, error: BaseException | None) -> None:
            self.after_calls.append((time.monotonic(), None if error is None else repr(error)))

        self.sink = self.vc.listen(
            [name, self.tally],
            options={name: options},
            after=after,
            listen_options=listening_core.ListenOptions(**request.get("listen_options", {})),
        )
        self.tap = Tap(self.vc, keep)
        self.vc._connection.add_socket_listener(self.tap)  # after the session's own listener
        receiver = self.vc._receiver
        assert receiver is not None and receiver.loop is loop
        return {"listening": True, "clock_start": receiver.clock.start}

    def _receiver(self) -> Any:
        return self.vc._receiver or self.vc._last_receiver

    def usage(self) -> dict[str, Any]:
        receiver = self._receiver()
        workers = receiver.pool.processes if receiver is not None and receiver.pool is not None else []
        pids = [os.getpid(), *workers]
        drops_now = udp_drops(self.port)
        before = self.before.get("kernel_drops")
        dave = self.vc._connection.dave_session
        return {
            "dave": {"ready": bool(dave and dave.ready), "epoch": dave.epoch if dave else None},
            "time": time.monotonic(),
            "rss_bytes": sum(rss_bytes(pid) for pid in pids),
            "rss_main_bytes": rss_bytes(os.getpid()),
            "cpu_seconds": round(sum(cpu_seconds(pid) for pid in pids), 3),
            "workers": len(workers),
            "fds": len(_fds()),
            "threads": len(_threads()),
            "kernel_drops": None if drops_now is None or before is None else drops_now - before,
        }

    def accounting(self) -> dict[str, Any]:
        receiver = self._receiver()
        stats = {str(user): s.as_dict() for user, s in self.vc.listening_stats().items()}
        tap = self.tap
        return {
            "stats": stats,
            "unattributed": dict(receiver.unattributed) if receiver is not None else {},
            "tally": {str(user): t.as_dict() for user, t in self.tally.users.items()},
            "tap": {
                "unmapped": tap.unmapped if tap else 0,
                "per_user": {
                    str(self.vc.ssrc_map.users[ssrc]): n for ssrc, n in (tap.counts.items() if tap else [])
                },
            },
            "ssrc_to_user": {str(k): v for k, v in self.vc.ssrc_map.users.items()},
        }

    def report(self) -> dict[str, Any]:
        return self.usage() | self.accounting()

    async def stop(self) -> dict[str, Any]:
        receiver = self.vc._receiver
        assert receiver is not None and self.tap is not None
        self.tap.freeze()
        t0 = time.monotonic()
        self.vc.stop_listening()
        while not self.after_calls and time.monotonic() - t0 < 120:
            await asyncio.sleep(0.002)
        after_at = self.after_calls[0][0] if self.after_calls else None
        while (_listening_threads() or _unpackers()) and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.002)
        clean_at = time.monotonic()
        self.vc._connection.remove_socket_listener(self.tap)
        fds, threads = _fds(), _threads()
        before_fds, before_threads = self.before["fds"], self.before["threads"]
        out = self.usage() | self.accounting()
        out |= {
            "stopped_in_seconds": None if after_at is None else round(after_at - t0, 3),
            "clean_in_seconds": round(clean_at - t0, 3),
            "after_calls": [error for _, error in self.after_calls],
            "left_behind": {
                "threads": sorted(name for ident, name in threads.items() if ident not in before_threads),
                "listening_threads": _listening_threads(),
                "unpackers": _unpackers(),
                "fds": sorted(
                    f"{fd} -> {target}" for fd, target in fds.items() if before_fds.get(fd) != target
                ),
                "fds_gone": sorted(f"{fd} -> {t}" for fd, t in before_fds.items() if fds.get(fd) != t),
            },
            "session_end_samples": receiver.clock.sample_at(receiver._stopped_at or t0),
            "session_seconds": round((receiver._stopped_at or t0) - receiver.clock.start, 3),
        }
        if self.tally.keep_seqs:
            check: dict[str, Any] = {}
            for ssrc, seen in self.tap.frozen.items():
                user = self.vc.ssrc_map.users[ssrc]
                tally = self.tally.users.get(user)
                delivered = tally.seqs if tally is not None and tally.seqs is not None else set()
                arrived = (
                    tally.seqs_arrived if tally is not None and tally.seqs_arrived is not None else set()
                )
                everything = self.tap.seqs.get(ssrc, set())
                check[str(user)] = {
                    "received_before_stop": len(seen),
                    # neither delivered nor concealed: lost by the session
                    "not_delivered": sorted(seen - delivered)[:20],
                    "not_delivered_count": len(seen - delivered),
                    # received, yet concealed: only a packet that came after its frame was concealed
                    # (counted as late) may be
                    "concealed_count": len((seen & delivered) - arrived),
                    "invented_count": len(arrived - everything),
                }
            out["before_stop"] = check
        files = {}
        wav = self.sink[self.sink_name()] if self.sink is not None else None
        if wav is not None and hasattr(wav, "paths"):
            import soundfile

            for user, path in wav.paths.items():
                info = soundfile.info(str(path))
                files[str(user)] = {
                    "path": str(path),
                    "frames": info.frames,
                    "samplerate": info.samplerate,
                    "channels": info.channels,
                }
        out["files"] = files
        return out

    def sink_name(self) -> str:
        return next(name for name in self.sink.sinks if not isinstance(self.sink[name], Tally))


async def run(args: argparse.Namespace) -> int:
    address = LoopbackAddress.load(args.address)
    client = discord.Client(
        intents=discord.Intents.default(), connector=address.connector(), guild_ready_timeout=0.1
    )
    runner = asyncio.ensure_future(client.start(address.token))
    await asyncio.wait_for(asyncio.ensure_future(client.wait_until_ready()), 60)
    channel = client.get_channel(args.channel)
    assert isinstance(channel, discord.VoiceChannel)
    vc = await asyncio.wait_for(channel.connect(cls=listening_core.VoiceClient), 60)
    # multiprocessing's one-time helpers (the spawn machinery) are set up by a first pool, so that
    # they do not count against the session
    with AudioProcessPool(1) as warm:
        warm.start(1)
    bot = Bot(vc, args.output)
    print(f"READY {bot.port}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        command, _, rest = line.partition(" ")
        if command == "listen":
            answer = bot.listen(json.loads(rest or "{}"))
        elif command == "report":
            answer = bot.report()
        elif command == "stop":
            answer = await bot.stop()
        elif command == "trace":
            tracemalloc.start(8)
            bot.snapshot = tracemalloc.take_snapshot()
            answer = {"tracing": True}
        elif command == "trace-diff":
            stats = tracemalloc.take_snapshot().compare_to(bot.snapshot, "traceback")
            answer = {
                "growth": [
                    {"bytes": s.size_diff, "count": s.count_diff, "where": s.traceback.format()[-6:]}
                    for s in stats[:25]
                ]
            }
        elif command in ("quit", ""):
            break
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)
    if vc.is_listening():
        vc.stop_listening()
    await vc.disconnect(force=True)
    await client.close()
    runner.cancel()
    return 0


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
