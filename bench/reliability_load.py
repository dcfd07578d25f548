"""The load of the reliability runs, from its own process: speakers, network faults and floods.

``python bench/reliability_load.py SPEC.json`` reads the spec written by ``bench/reliability.py``:
the bot's UDP address (and the voice server's address to send from: discord.py's socket is
connected to it), the transport mode and key, one SSRC per speaker (optionally a file of its
already DAVE-encrypted frames, see :func:`bench.generator.write_dave_frames`), the Opus frames to
play, how long, and:

``pattern``
    ``"continuous"`` (every speaker sends a frame every 20 ms) or ``"spurts"`` (talk spurts of
    3 to 12 s, each ended by five Opus silence frames, then 0.5 to 4 s of nothing, RTP
    timestamps following the wall clock as Discord's clients do), decided by ``seed``;
``faults``
    a :class:`listening_core.testing.faults.FaultConfig` (as a dict) applied to every speaker's
    stream: loss, bursts, jitter, reordering, duplicates, forged datagrams;
``flood``
    ``{"rate": N, "start": s, "seconds": s}``: N datagrams a second, each from a new SSRC nobody
    announced, otherwise well-formed and sealed with the right key;
``prebuild``
    seal every speaker packet before starting (for hundreds of speakers; otherwise each is
    sealed when due, so a 30-minute run needs no memory for it).

It prints ``READY``, waits for ``go`` on stdin, sends everything at real-time pace (the speakers
spread evenly over each 20 ms, in 1 ms slices), and prints one JSON line: what it sent, per
speaker which packets (by index from 0) never arrived intact, and how far behind it ever fell.
The plan of who speaks when is :func:`plan`, so the orchestrator knows how many DAVE frames
each speaker needs before the run.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import random
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from listening_core.crypto import TransportCipher, transport_cipher
from listening_core.rtp import RtpHeader
from listening_core.testing.faults import FaultConfig, FaultInjector

SUBSLOTS = 20  # each 20 ms tick is sent in 1 ms slices
SILENCE_FRAME = b"\xf8\xff\xfe"
SILENCE_TAIL = 5  # Opus silence frames after each talk spurt, as Discord's clients send

# plan() values per tick
NOTHING, SPEECH, SILENCE = 0, 1, 2


def plan(pattern: str, seed: int, index: int, ticks: int) -> bytearray:
    """What speaker ``index`` sends at each 20 ms tick: :data:`NOTHING`, :data:`SPEECH` or :data:`SILENCE`."""
    if pattern == "continuous":
        return bytearray([SPEECH]) * ticks
    if pattern != "spurts":
        raise ValueError(f"unknown pattern {pattern!r}")
    rng = random.Random(f"{seed}/spurts/{index}")
    out = bytearray(ticks)
    k = rng.randrange(0, 50)  # the first spurt starts within a second
    while k < ticks:
        talk = rng.randrange(150, 600)
        out[k : k + talk] = bytes([SPEECH]) * len(out[k : k + talk])
        k += talk
        out[k : k + SILENCE_TAIL] = bytes([SILENCE]) * len(out[k : k + SILENCE_TAIL])
        k += SILENCE_TAIL + rng.randrange(25, 200)
    return out[:ticks]


class _DaveFrames:
    """A speaker's DAVE-encrypted frames, read from their file one by one (no memory for a long run)."""

    def __init__(self, path: str) -> None:
        self._file: BinaryIO = Path(path).open("rb")  # noqa: SIM115 - read through the run

    def next(self) -> bytes:
        head = self._file.read(2)
        if len(head) < 2:
            raise RuntimeError("the speaker's DAVE frames ran out: the orchestrator made too few")
        (size,) = struct.unpack(">H", head)
        return self._file.read(size)


class Speaker:
    """One speaker's packets, sealed when asked for, and what its network did to them."""

    def __init__(
        self,
        index: int,
        entry: dict[str, Any],
        spec: dict[str, Any],
        shared: list[bytes],
        cipher: TransportCipher,
        counter: Iterator[int],
        ticks: int,
    ) -> None:
        rng = random.Random(f"{spec.get('seed', 0)}/rtp/{index}")
        self.ssrc: int = entry["ssrc"]
        self.seq0 = rng.randrange(1 << 16)
        self.ts0 = rng.randrange(1 << 32)
        self.plan = plan(spec.get("pattern", "continuous"), spec.get("seed", 0), index, ticks)
        self.phase = (index * SUBSLOTS) // max(1, len(spec["speakers"]))  # its 1 ms slice in each tick
        self._offset = (index * 37) % max(1, len(shared))
        self._shared = shared
        self._dave = _DaveFrames(entry["dave_frames"]) if entry.get("dave_frames") else None
        self._cipher = cipher
        self._counter = counter
        self.sent = 0  # RTP packets made (before the network's faults)
        self.speech = 0
        self.silence = 0
        self.undelivered: list[int] = []  # packet indices never delivered intact (lost)
        faults = spec.get("faults")
        self.injector = (
            FaultInjector(FaultConfig(**faults), stream=self.ssrc)
            if faults and not FaultConfig(**faults).is_perfect
            else None
        )
        self.delayed = 0  # delivered later than sent (jitter, reordering)
        self.max_delay = 0.0

    def packet(self, k: int) -> bytes | None:
        """The datagram of tick ``k``, or None when the speaker is silent then."""
        what = self.plan[k]
        if what == NOTHING:
            return None
        if what == SPEECH:
            payload = (
                self._dave.next()
                if self._dave is not None
                else self._shared[(self._offset + self.speech) % len(self._shared)]
            )
            self.speech += 1
        else:
            payload = SILENCE_FRAME
            self.silence += 1
        header = RtpHeader(
            sequence=(self.seq0 + self.sent) & 0xFFFF,
            timestamp=(self.ts0 + 960 * k) & 0xFFFFFFFF,
            ssrc=self.ssrc,
        )
        self.sent += 1
        return self._cipher.seal_rtp(header, payload, counter=next(self._counter))

    def network(self, datagram: bytes, now: float) -> list[tuple[float, bytes]]:
        """What the network delivers of ``datagram`` sent at ``now`` (and notes what it lost)."""
        index = self.sent - 1
        if self.injector is None:
            return [(now, datagram)]
        out = self.injector.apply(datagram, now)
        intact = [when for when, data in out if data == datagram]
        if not intact:
            self.undelivered.append(index)
        else:
            delay = intact[0] - now
            if delay > 0:
                self.delayed += 1
                self.max_delay = max(self.max_delay, delay)
        return out

    def report(self) -> dict[str, Any]:
        stats = self.injector.stats if self.injector is not None else None
        return {
            "ssrc": self.ssrc,
            "seq0": self.seq0,
            "ts0": self.ts0,
            "packets": self.sent,
            "speech": self.speech,
            "silence": self.silence,
            "undelivered": self.undelivered,
            "lost": stats.lost if stats else 0,
            "lost_in_bursts": stats.lost_in_bursts if stats else 0,
            "duplicated": stats.duplicated if stats else 0,
            "reordered": stats.reordered if stats else 0,
            "truncated": stats.truncated if stats else 0,
            "garbage": stats.garbage if stats else 0,
            "delayed": self.delayed,
            "max_delay_ms": round(self.max_delay * 1000, 2),
        }


def flood_packets(spec: dict[str, Any], cipher: TransportCipher, shared: list[bytes]) -> list[bytes]:
    """The flood, sealed: one datagram per new SSRC, none of them announced."""
    flood = spec.get("flood")
    if not flood:
        return []
    avoid = {s["ssrc"] for s in spec["speakers"]} | set(spec.get("avoid_ssrcs", []))
    rng = random.Random(f"{spec.get('seed', 0)}/flood")
    count = int(flood["rate"] * flood["seconds"])
    out = []
    used: set[int] = set()
    for n in range(count):
        ssrc = rng.randrange(1, 1 << 32)
        while ssrc in avoid or ssrc in used:
            ssrc = rng.randrange(1, 1 << 32)
        used.add(ssrc)
        header = RtpHeader(sequence=rng.randrange(1 << 16), timestamp=rng.randrange(1 << 32), ssrc=ssrc)
        out.append(cipher.seal_rtp(header, shared[n % len(shared)], counter=(1 << 31) + n))
    return out


def play(spec: dict[str, Any]) -> dict[str, Any]:
    cipher = transport_cipher(spec["mode"], bytes.fromhex(spec["key"]))
    shared = [base64.b64decode(f) for f in spec.get("frames", [])]
    ticks = int(spec["seconds"] * 50)
    counter = itertools.count()
    speakers = [
        Speaker(i, entry, spec, shared, cipher, counter, ticks) for i, entry in enumerate(spec["speakers"])
    ]
    by_slot: list[list[Speaker]] = [[] for _ in range(SUBSLOTS)]
    for speaker in speakers:
        by_slot[speaker.phase].append(speaker)
    built: list[list[bytes | None]] | None = None
    if spec.get("prebuild"):
        built = [[s.packet(k) for k in range(ticks)] for s in speakers]
        for s in speakers:
            s.sent = 0  # counted again as they are sent
    flood = flood_packets(spec, cipher, shared)
    flood_rate = spec["flood"]["rate"] if flood else 0
    flood_start_ms = int(spec["flood"]["start"] * 1000) if flood else 0

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    if spec.get("bind"):  # the voice server's address: the bot's socket only takes datagrams from it
        sock.bind(tuple(spec["bind"]))
    address = (spec["host"], spec["port"])
    sendto = sock.sendto
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit(1)

    index_of = {id(s): i for i, s in enumerate(speakers)}
    delayed: list[tuple[float, int, bytes]] = []  # (when, order, datagram) held back by the network
    order = itertools.count()
    sent = flood_sent = 0
    behind = 0.0
    t0 = time.monotonic() + 0.05
    for k in range(ticks):
        for j in range(SUBSLOTS):
            target = t0 + k * 0.02 + j * 0.001
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                behind = max(behind, -delay)
            for speaker in by_slot[j]:
                if built is not None:
                    datagram = built[index_of[id(speaker)]][k]
                    if datagram is not None:
                        speaker.sent += 1
                else:
                    datagram = speaker.packet(k)
                if datagram is None:
                    continue
                for when, data in speaker.network(datagram, target):
                    if when <= target:
                        sendto(data, address)
                        sent += 1
                    else:
                        heapq.heappush(delayed, (when, next(order), data))
            while delayed and delayed[0][0] <= target:
                sendto(heapq.heappop(delayed)[2], address)
                sent += 1
            if flood:
                ms = k * SUBSLOTS + j - flood_start_ms
                if ms >= 0:
                    lo, hi = ms * flood_rate // 1000, (ms + 1) * flood_rate // 1000
                    for datagram in flood[lo:hi]:
                        sendto(datagram, address)
                        flood_sent += 1
    while delayed:
        when, _, data = heapq.heappop(delayed)
        time.sleep(max(0.0, when - time.monotonic()))
        sendto(data, address)
        sent += 1
    return {
        "sent": sent,
        "flood_sent": flood_sent,
        "t0": t0,
        "seconds": round(time.monotonic() - t0, 3),
        "max_behind_ms": round(behind * 1000, 2),
        "speakers": [s.report() for s in speakers],
    }


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(play(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
