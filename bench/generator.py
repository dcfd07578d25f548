"""The load: many speakers' RTP, pre-encrypted, replayed at real-time pace from its own process.

``python bench/generator.py SPEC.json`` reads the spec the orchestrator wrote (the receiver's UDP
address, the transport mode and key, one SSRC per speaker, the Opus frames to play, or per speaker
a file of already DAVE-encrypted frames, and how many seconds), seals every packet before it
starts (so sending costs one ``sendto`` each), prints ``READY``, waits for ``go`` on stdin, then
sends each speaker's packets every 20 ms, the speakers spread evenly over each 20 ms so they do
not arrive as one burst (real clients are not synchronised). At the end it prints one JSON line:
packets sent and how far behind schedule it ever fell.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from listening_core.crypto import transport_cipher
from listening_core.rtp import RtpHeader

SUBSLOTS = 20  # each 20 ms tick is sent in 1 ms slices


def read_dave_frames(path: Path) -> list[bytes]:
    """A speaker's DAVE-encrypted frames, as written by :func:`write_dave_frames`."""
    data = path.read_bytes()
    frames, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from(">H", data, offset)
        frames.append(data[offset + 2 : offset + 2 + size])
        offset += 2 + size
    return frames


def write_dave_frames(path: Path, frames: list[bytes]) -> None:
    """Store ``frames`` (length-prefixed) for :func:`read_dave_frames`."""
    path.write_bytes(b"".join(struct.pack(">H", len(f)) + f for f in frames))


def build(spec: dict[str, Any]) -> list[list[bytes]]:
    """Every packet, sealed: ``packets[tick]`` lists one datagram per speaker, in phase order."""
    cipher = transport_cipher(spec["mode"], bytes.fromhex(spec["key"]))
    ticks = int(spec["seconds"] * 50)
    shared = [base64.b64decode(f) for f in spec.get("frames", [])]
    rng = random.Random(spec.get("seed", 0))
    per_speaker = []
    counter = 0
    for index, speaker in enumerate(spec["speakers"]):
        own = read_dave_frames(Path(speaker["dave_frames"])) if speaker.get("dave_frames") else None
        seq0, ts0 = rng.randrange(1 << 16), rng.randrange(1 << 32)
        offset = (index * 37) % max(1, len(shared))
        packets = []
        for k in range(ticks):
            payload = own[k % len(own)] if own is not None else shared[(offset + k) % len(shared)]
            header = RtpHeader(
                sequence=(seq0 + k) & 0xFFFF, timestamp=(ts0 + 960 * k) & 0xFFFFFFFF, ssrc=speaker["ssrc"]
            )
            packets.append(cipher.seal_rtp(header, payload, counter=counter))
            counter += 1
        per_speaker.append(packets)
    return [[packets[k] for packets in per_speaker] for k in range(ticks)]


def play(spec: dict[str, Any], ticks: list[list[bytes]]) -> dict[str, Any]:
    """Send the packets at real-time pace; return what was sent and how late it ran."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    if spec.get("bind"):  # the voice server's address: the receiver's socket only takes datagrams from it
        sock.bind(tuple(spec["bind"]))
    address = (spec["host"], spec["port"])
    speakers = len(spec["speakers"])
    bounds = [round(j * speakers / SUBSLOTS) for j in range(SUBSLOTS + 1)]
    sendto = sock.sendto
    sent = 0
    behind = 0.0
    t0 = time.monotonic() + 0.05
    for k, tick in enumerate(ticks):
        for j in range(SUBSLOTS):
            target = t0 + k * 0.02 + j * 0.001
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                behind = max(behind, -delay)
            for datagram in tick[bounds[j] : bounds[j + 1]]:
                sendto(datagram, address)
                sent += 1
    return {
        "sent": sent,
        "seconds": round(time.monotonic() - t0, 3),
        "max_behind_ms": round(behind * 1000, 2),
    }


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    ticks = build(spec)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    print(json.dumps(play(spec, ticks)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
