"""The floor: what receiving a frame costs at the very least.

Raw libopus (``opus_decode`` through ctypes into one preallocated buffer) plus the transport AEAD
open (``cryptography``'s AES-256-GCM, or PyNaCl's XChaCha20-Poly1305) of the same frames, in a
tight loop with nothing else: no parsing beyond slicing, no DAVE, no ordering, no copies. The
pipeline's cost per frame is reported as a ratio to this.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from typing import Any

from listening_core.crypto import transport_cipher
from listening_core.opus import load_libopus
from listening_core.rtp import RtpHeader

FRAME_SAMPLES = 960


def speech_frames(clips: tuple[str, ...] = ("three-phrases", "alice", "bob", "carol", "dave")) -> list[bytes]:
    """The bundled clips encoded the way discord.py sends them: one Opus frame per 20 ms."""
    from listening_core.testing.media import OpusEncoder, load_pcm

    frames: list[bytes] = []
    for clip in clips:
        frames += OpusEncoder().encode_pcm(load_pcm(clip))
    return frames


def sealed_packets(frames: list[bytes], mode: str, key: bytes, ssrc: int = 0x1234) -> list[bytes]:
    """``frames`` as transport-encrypted RTP datagrams, in order."""
    cipher = transport_cipher(mode, key)
    return [
        cipher.seal_rtp(
            RtpHeader(sequence=i & 0xFFFF, timestamp=(i * 960) & 0xFFFFFFFF, ssrc=ssrc), f, counter=i
        )
        for i, f in enumerate(frames)
    ]


def _opener(mode: str, key: bytes) -> Any:
    """The rawest AEAD open for ``mode``: (datagram) -> plaintext, for a 12-byte RTP header."""
    if mode == "aead_aes256_gcm_rtpsize":
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aead = AESGCM(key)
        pad = bytes(8)

        def open_aes(data: bytes) -> bytes:
            return aead.decrypt(data[-4:] + pad, data[12:-4], data[:12])

        return open_aes
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt

    pad24 = bytes(20)

    def open_xchacha(data: bytes) -> bytes:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(data[12:-4], data[:12], data[-4:] + pad24, key)

    return open_xchacha


def measure_floor(
    mode: str = "aead_aes256_gcm_rtpsize", repeats: int = 7, frames: int = 1500
) -> dict[str, Any]:
    """µs per frame of AEAD open + libopus decode (best and median of ``repeats`` passes)."""
    key = bytes(range(32))
    opus = (speech_frames() * (frames // 100 + 1))[:frames]
    packets = sealed_packets(opus, mode, key)
    lib = load_libopus()
    error = ctypes.c_int()
    decoder = lib.opus_decoder_create(48000, 2, ctypes.byref(error))
    pcm = (ctypes.c_int16 * (FRAME_SAMPLES * 2))()
    open_ = _opener(mode, key)
    decode = lib.opus_decode
    assert open_(packets[0]) == opus[0]

    def one_pass(what: str) -> float:
        t0 = time.perf_counter()
        if what == "both":
            for data in packets:
                plain = open_(data)
                decode(decoder, plain, len(plain), pcm, FRAME_SAMPLES, 0)
        elif what == "aead":
            for data in packets:
                open_(data)
        else:
            for frame in opus:
                decode(decoder, frame, len(frame), pcm, FRAME_SAMPLES, 0)
        return (time.perf_counter() - t0) / len(packets) * 1e6

    results: dict[str, Any] = {"mode": mode, "frames": len(packets)}
    try:
        for what in ("both", "aead", "decode"):
            one_pass(what)  # warm up
            runs = [one_pass(what) for _ in range(repeats)]
            results[what] = {"best_us": round(min(runs), 2), "median_us": round(statistics.median(runs), 2)}
    finally:
        lib.opus_decoder_destroy(decoder)
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(measure_floor(), indent=1))
    print(json.dumps(measure_floor("aead_xchacha20_poly1305_rtpsize"), indent=1))
