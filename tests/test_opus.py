"""Tests for listening_core.opus: bit-exactness with discord.py, FEC detection, packet inspection, errors."""

from __future__ import annotations

import contextlib
import functools
import pickle

import numpy as np
import pytest
from discord import opus as discord_opus
from hypothesis import given, settings
from hypothesis import strategies as st

from listening_core.errors import ListeningError
from listening_core.opus import (
    LIBOPUS_ENV,
    LibopusNotFound,
    OpusDecoder,
    OpusError,
    libopus_version,
    load_libopus,
    packet_has_fec,
    packet_samples,
)
from listening_core.testing.media import FRAME_BYTES, SILENCE_FRAME, OpusEncoder, load_pcm

OPUS_INVALID_PACKET = -4


@functools.cache
def clip_frames(name: str) -> tuple[bytes, ...]:
    """What a discord.py client sends for the clip: 20 ms frames, 128 kbps, FEC on, 15 % loss."""
    return tuple(OpusEncoder().encode_pcm(load_pcm(name)))


class _MonoEncoder(discord_opus.Encoder):
    CHANNELS = 1


@functools.cache
def encoded(kbps: int, ms: int, channels: int = 2) -> tuple[bytes, ...]:
    """A clip encoded by discord.py's encoder (FEC on, 15 % loss) at another bitrate, frame size or channel count."""
    encoder = discord_opus.Encoder() if channels == 2 else _MonoEncoder()
    encoder.set_bitrate(kbps)
    pcm = load_pcm("alice")
    if channels == 1:
        pcm = np.frombuffer(pcm, "<i2")[::2].tobytes()
    samples = 48 * ms
    step = samples * 2 * channels
    return tuple(encoder.encode(pcm[at : at + step], samples) for at in range(0, len(pcm) - step + 1, step))


def toc(config: int, stereo: bool = False, code: int = 0) -> int:
    return config << 3 | int(stereo) << 2 | code


# -- loading ----------------------------------------------------------------------------------


def test_version_is_reported() -> None:
    assert libopus_version().startswith("libopus ")


def test_load_is_cached_per_path() -> None:
    assert load_libopus() is load_libopus()
    assert load_libopus("libopus.so.0") is load_libopus("libopus.so.0")


def test_nonexistent_path_raises_with_install_hint() -> None:
    for _ in range(2):  # a failure is not cached, and does not poison the default library
        with pytest.raises(LibopusNotFound) as info:
            load_libopus("/nonexistent/libopus.so")
        message = str(info.value)
        assert "/nonexistent/libopus.so" in message
        assert "apt-get install libopus0" in message
        assert "dnf install opus" in message
        assert "brew install opus" in message
        assert isinstance(info.value, ListeningError)
    assert OpusDecoder().decode(SILENCE_FRAME)


def test_environment_variable_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIBOPUS_ENV, "/nonexistent/from-env/libopus.so")
    with pytest.raises(LibopusNotFound, match="from-env"):
        load_libopus()
    with pytest.raises(LibopusNotFound):
        OpusDecoder()
    monkeypatch.setenv(LIBOPUS_ENV, "libopus.so.0")
    assert load_libopus() is load_libopus("libopus.so.0")
    monkeypatch.delenv(LIBOPUS_ENV)
    assert OpusDecoder().decode(SILENCE_FRAME)


# -- bit-exact with discord.py ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "three-phrases"])
def test_decode_is_bit_exact_with_discord(name: str) -> None:
    frames = clip_frames(name)
    ours, theirs = OpusDecoder(), discord_opus.Decoder()
    for frame in frames:
        assert ours.decode(frame) == theirs.decode(frame, fec=False)


def test_fec_and_plc_are_bit_exact_with_discord() -> None:
    """A lossy stream: every 5th frame rebuilt from the next one's FEC, every 7th concealed."""
    frames = clip_frames("bob")
    ours, theirs = OpusDecoder(), discord_opus.Decoder()
    fec_used = plc_used = 0
    for index, frame in enumerate(frames):
        if index % 5 == 4 and index + 1 < len(frames):
            recovered = ours.decode_fec(frames[index + 1])
            assert recovered == theirs.decode(frames[index + 1], fec=True)
            assert len(recovered) == FRAME_BYTES
            fec_used += 1
        elif index % 7 == 6:
            concealed = ours.conceal()
            assert concealed == theirs.decode(None, fec=False)
            assert len(concealed) == FRAME_BYTES
            plc_used += 1
        else:
            assert ours.decode(frame) == theirs.decode(frame, fec=False)
    assert fec_used > 10 and plc_used > 10


def test_silence_frame() -> None:
    decoder = OpusDecoder()
    assert decoder.decode(SILENCE_FRAME) == bytes(FRAME_BYTES)
    assert packet_samples(SILENCE_FRAME) == 960
    assert not packet_has_fec(SILENCE_FRAME)
    # after speech too: the silence frame (mono TOC) still decodes to 20 ms of stereo
    for frame in clip_frames("carol")[:20]:
        decoder.decode(frame)
    assert len(decoder.decode(SILENCE_FRAME)) == FRAME_BYTES


# -- packet inspection ------------------------------------------------------------------------


@pytest.mark.parametrize("ms", [10, 20, 40, 60])
@pytest.mark.parametrize("kbps", [24, 128])
def test_packet_samples_of_encoded_frames(kbps: int, ms: int) -> None:
    frames = encoded(kbps, ms)
    assert frames
    decoder = OpusDecoder()
    for frame in frames:
        assert packet_samples(frame) == 48 * ms
        assert packet_samples(frame, 16000) == 16 * ms
        assert len(decoder.decode(frame)) == 48 * ms * 4


@pytest.mark.parametrize(
    ("packet", "samples"),
    [
        (bytes([toc(0), 0]), 480),  # SILK NB 10 ms
        (bytes([toc(1), 0]), 960),  # SILK NB 20 ms
        (bytes([toc(2), 0]), 1920),  # SILK NB 40 ms
        (bytes([toc(3), 0]), 2880),  # SILK NB 60 ms
        (bytes([toc(12), 0]), 480),  # hybrid SWB 10 ms
        (bytes([toc(16), 0]), 120),  # CELT NB 2.5 ms
        (bytes([toc(31, stereo=True), 0]), 960),  # CELT FB 20 ms
        (bytes([toc(15, code=1), 0, 0]), 1920),  # two CBR frames
        (bytes([toc(15, code=2), 1, 0, 0]), 1920),  # two VBR frames
        (bytes([toc(1, code=3), 3, 0, 0, 0]), 2880),  # three CBR frames
        (bytes([toc(3, code=3), 2]), 5760),  # 2 x 60 ms = 120 ms, the most a packet holds
    ],
)
def test_packet_samples_from_toc(packet: bytes, samples: int) -> None:
    assert packet_samples(packet) == samples
    assert packet_samples(packet, 8000) == samples // 6


# -- FEC detection ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "three-phrases"])
def test_fec_flag_predicts_whether_fec_differs_from_plc(name: str) -> None:
    """On what a Discord client sends: decode_fec(next) != conceal() exactly when packet_has_fec(next).

    Both sides start from identical decoder states: two fresh decoders fed the same three frames.
    (A decoder that has decoded nothing conceals with zeros while its FEC path does not.)
    """
    frames = clip_frames(name)
    pcm = np.frombuffer(load_pcm(name), "<i2").astype(np.float64)
    history = 3
    speech = speech_with_fec = 0
    for lost in range(history, len(frames) - 1):
        fec_side, plc_side = OpusDecoder(), OpusDecoder()
        for frame in frames[lost - history : lost]:
            fec_side.decode(frame)
            plc_side.decode(frame)
        next_packet = frames[lost + 1]
        has_fec = packet_has_fec(next_packet)
        assert (fec_side.decode_fec(next_packet) != plc_side.conceal()) == has_fec, lost
        lost_pcm = pcm[lost * 1920 : (lost + 1) * 1920]
        if np.sqrt(np.mean(lost_pcm**2)) > 300:  # speech, not the clip's silences (about -40 dBFS)
            speech += 1
            speech_with_fec += has_fec
    # Discord's default encoder puts FEC in most speech frames
    assert speech > 50
    assert speech_with_fec > 0.8 * speech


def _error_ratio(output: bytes, truth: np.ndarray) -> float:
    """Energy of the error of (the end of) `output` against `truth`, relative to `truth`'s energy."""
    tail = np.frombuffer(output, "<i2")[-len(truth) :]
    return float(np.sum((tail - truth) ** 2) / (np.sum(truth**2) + 1.0))


@pytest.mark.parametrize(
    ("kbps", "ms", "channels"),
    [
        (24, 10, 2),  # SILK, stereo stream
        (24, 20, 2),
        (24, 40, 2),  # 2 SILK frames in one Opus frame
        (24, 60, 2),  # 3 SILK frames
        (24, 20, 1),  # SILK, mono stream
        (24, 60, 1),
        (128, 40, 2),  # hybrid, two 20 ms Opus frames per packet (TOC code 1/2)
        (128, 60, 2),  # hybrid, code 3
        (16, 20, 2),  # too low a bitrate for LBRR
    ],
)
def test_fec_flag_says_whether_fec_recovers_the_frame(kbps: int, ms: int, channels: int) -> None:
    """With FEC data, decode_fec is much closer to the lost frame than concealment; without, it is not.

    (Without LBRR data libopus 1.3.1's FEC path conceals, but not always bit-identically to conceal():
    for stereo streams it reads the mid-only flag from the regular frame, and 40/60 ms frames are
    concealed in one piece rather than per 20 ms. So this compares against the real frame.)
    """
    frames = encoded(kbps, ms, channels)
    samples = 48 * ms
    # FEC rebuilds the last Opus frame of the lost packet (a 40 ms hybrid packet holds two of 20 ms:
    # the first is concealed); 40 and 60 ms SILK frames are one Opus frame
    covered = packet_samples(bytes([frames[0][0] & 0xFC])) * channels
    reference = OpusDecoder()
    reference.decode(frames[0])
    with_fec = recovered = 0
    for lost in range(1, len(frames) - 1):
        next_packet = frames[lost + 1]
        fec_side, plc_side, truth_side = OpusDecoder(), OpusDecoder(), OpusDecoder()
        for decoder in (fec_side, plc_side, truth_side):
            decoder.decode(frames[lost - 1])
        truth = np.frombuffer(truth_side.decode(frames[lost]), "<i2")[-covered:].astype(np.float64)
        fec_error = _error_ratio(fec_side.decode_fec(next_packet, samples), truth)
        plc_error = _error_ratio(plc_side.conceal(samples), truth)
        if packet_has_fec(next_packet):
            with_fec += 1
            recovered += fec_error < 0.5 * plc_error
        elif np.sum(truth**2) > 1e6:
            assert fec_error > 0.5 * plc_error, lost
    if kbps < 20:
        assert with_fec == 0
    else:
        assert with_fec > 0.6 * (len(frames) - 2)
        assert recovered > 0.5 * with_fec


@pytest.mark.parametrize(
    "packet",
    [
        SILENCE_FRAME,
        bytes([toc(16), 0xFF, 0xFF]),
        bytes([toc(31, stereo=True), 0xFF, 0xFF]),
        bytes([toc(28, code=3), 2, 0xFF, 0xFF]),
    ],
)
def test_celt_only_packets_never_have_fec(packet: bytes) -> None:
    assert not packet_has_fec(packet)


@pytest.mark.parametrize(
    ("first_byte", "config", "stereo", "expected"),
    [
        # N SILK frames per channel: N VAD bits, then the LBRR bit; stereo: the side channel's follow
        (0b0100_0000, 1, False, True),  # 20 ms: VAD=0, LBRR=1
        (0b1000_0000, 1, False, False),  # 20 ms: VAD=1, LBRR=0
        (0b0010_0000, 2, False, True),  # 40 ms: VAD VAD LBRR
        (0b1100_0000, 2, False, False),
        (0b0001_0000, 3, False, True),  # 60 ms: VAD VAD VAD LBRR
        (0b1110_1111, 3, False, False),
        (0b0001_0000, 1, True, True),  # 20 ms stereo: mid VAD, mid LBRR, side VAD, side LBRR=1
        (0b1010_0000, 1, True, False),  # side VAD only
        (0b0000_0100, 2, True, True),  # 40 ms stereo: side LBRR is bit 2
        (0b0000_0001, 3, True, True),  # 60 ms stereo: side LBRR is bit 0
        (0b0100_0000, 13, False, True),  # hybrid SWB 20 ms: one SILK frame
        (0b0100_0000, 14, True, True),  # hybrid FB 10 ms
    ],
)
def test_fec_flag_bit_positions(first_byte: int, config: int, stereo: bool, expected: bool) -> None:
    assert packet_has_fec(bytes([toc(config, stereo), first_byte, 0x55])) is expected
    # only the first Opus frame of the packet counts: it is the one just after the lost frame
    two_frames = bytes([toc(config, stereo, code=2), 2, first_byte, 0x55, 0xFF ^ first_byte, 0x55])
    assert packet_has_fec(two_frames) is expected


def test_empty_silk_frame_has_no_fec() -> None:
    assert not packet_has_fec(bytes([toc(1)]))
    assert not packet_has_fec(bytes([toc(1, code=1)]))


def test_fec_flag_agrees_with_libopus_when_it_has_one() -> None:
    lib = load_libopus()
    if not hasattr(lib, "opus_packet_has_lbrr"):
        pytest.skip(f"{libopus_version()} has no opus_packet_has_lbrr (added in 1.5)")
    from listening_core.opus import _packet_has_lbrr

    for packet in (*clip_frames("dave"), *encoded(24, 60), *encoded(128, 40), *encoded(24, 20, 1)):
        assert _packet_has_lbrr(lib, packet) == bool(lib.opus_packet_has_lbrr(packet, len(packet)))


# -- malformed packets ------------------------------------------------------------------------

MALFORMED = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff", id="code3-without-count"),
    pytest.param(bytes([toc(1, code=3), 0]), id="code3-zero-frames"),
    pytest.param(bytes([toc(3, code=3), 3, 0, 0, 0]), id="code3-over-120ms"),
    pytest.param(bytes([toc(1, code=1), 0]), id="code1-odd-length"),
    pytest.param(bytes([toc(1, code=2), 200, 0]), id="code2-size-overflows"),
    pytest.param(bytes([toc(1, code=2), 253]), id="code2-two-byte-size-truncated"),
    pytest.param(bytes([toc(1, code=3), 0x80 | 3, 100, 100, 0]), id="code3-vbr-sizes-overflow"),
    pytest.param(bytes([toc(1, code=3), 0x40 | 1, 255]), id="code3-padding-overflows"),
    pytest.param(bytes([toc(1)]) + bytes(1276), id="frame-over-1275-bytes"),
]


@pytest.mark.parametrize("packet", MALFORMED)
def test_malformed_packets_raise(packet: bytes) -> None:
    decoder = OpusDecoder()
    decoder.decode(clip_frames("alice")[10])
    with pytest.raises(OpusError) as info:
        decoder.decode(packet)
    assert info.value.code < 0
    with pytest.raises(OpusError):
        decoder.decode_fec(packet)
    with pytest.raises(OpusError):
        packet_has_fec(packet)
    # the decoder is still usable
    assert len(decoder.decode(clip_frames("alice")[11])) == FRAME_BYTES


def test_packet_samples_rejects_bad_headers() -> None:
    for packet in (b"", b"\xff", bytes([toc(1, code=3), 0]), bytes([toc(3, code=3), 3])):
        with pytest.raises(OpusError):
            packet_samples(packet)


def test_opus_error_carries_code_and_libopus_message() -> None:
    with pytest.raises(OpusError) as info:
        OpusDecoder().decode(bytes([toc(1, code=3), 0]))
    assert info.value.code == OPUS_INVALID_PACKET
    assert "corrupted stream" in str(info.value)  # opus_strerror(OPUS_INVALID_PACKET)
    assert isinstance(info.value, ListeningError)
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.code == OPUS_INVALID_PACKET and str(copy) == str(info.value)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1500))
def test_random_bytes_never_crash_nor_return_garbage(packet: bytes) -> None:
    decoder = OpusDecoder()
    try:
        pcm = decoder.decode(packet)
    except OpusError:
        pass
    else:
        # libopus accepts it: then it decodes to exactly the duration the header says
        assert len(pcm) == packet_samples(packet) * 4
    with contextlib.suppress(OpusError):
        packet_has_fec(packet)


# -- decoder lifecycle and arguments ----------------------------------------------------------


def test_reset_forgets_history() -> None:
    frames = clip_frames("dave")
    decoder = OpusDecoder()
    first = [decoder.decode(frame) for frame in frames[:10]]
    decoder.reset()
    assert [decoder.decode(frame) for frame in frames[:10]] == first


def test_close_is_idempotent_and_final() -> None:
    decoder = OpusDecoder()
    decoder.close()
    decoder.close()
    with pytest.raises(ValueError, match="closed"):
        decoder.decode(SILENCE_FRAME)
    with pytest.raises(ValueError, match="closed"):
        decoder.conceal()
    with pytest.raises(ValueError, match="closed"):
        decoder.reset()
    assert "closed" in repr(decoder)
    del decoder  # __del__ after close() does nothing


def test_other_rates_and_mono() -> None:
    frame = clip_frames("alice")[30]
    mono = OpusDecoder(16000, 1)
    assert (mono.sample_rate, mono.channels) == (16000, 1)
    assert len(mono.decode(frame)) == 320 * 2
    assert len(mono.conceal(320)) == 320 * 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        OpusDecoder(44100)
    with pytest.raises(ValueError):
        OpusDecoder(48000, 3)
    decoder = OpusDecoder()
    with pytest.raises(ValueError):
        decoder.conceal(0)
    with pytest.raises(ValueError):
        decoder.conceal(5761)  # more than 120 ms: would overflow the buffer
    with pytest.raises(OpusError):
        decoder.conceal(100)  # not a multiple of 2.5 ms
    assert len(decoder.conceal(5760)) == 5760 * 4
