"""Tests for listening_core.rtp: wrap-around helpers, classification, header parse/serialize."""

from __future__ import annotations

import contextlib
import pickle
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listening_core.errors import ListeningError, PacketError
from listening_core.rtp import (
    ONE_BYTE_PROFILE,
    DiscoveryPacket,
    PacketKind,
    RtcpHeader,
    RtpHeader,
    build_extension_body,
    classify,
    parse_extension_elements,
    seq_add,
    seq_diff,
    seq_lt,
    ts_add,
    ts_diff,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


# -- wrap-around ------------------------------------------------------------------------------


def test_seq_add_wraps() -> None:
    assert seq_add(65535, 1) == 0
    assert seq_add(65535, 2) == 1
    assert seq_add(0, -1) == 65535
    assert seq_add(100, 5) == 105


def test_seq_diff_boundaries() -> None:
    assert seq_diff(0, 65535) == 1
    assert seq_diff(65535, 0) == -1
    assert seq_diff(5, 5) == 0
    assert seq_diff(32767, 0) == 32767
    assert seq_diff(32768, 0) == -32768
    assert seq_diff(1, 65534) == 3


def test_seq_lt_across_wrap() -> None:
    assert seq_lt(65535, 0)
    assert not seq_lt(0, 65535)
    assert not seq_lt(7, 7)
    assert seq_lt(1, 2)
    assert seq_lt(65000, 100)


def test_ts_helpers_boundaries() -> None:
    assert ts_add(0xFFFFFFFF, 1) == 0
    assert ts_add(0xFFFFFC40, 960) == 0
    assert ts_add(0, -960) == 0xFFFFFFFF - 959
    assert ts_diff(0, 0xFFFFFFFF) == 1
    assert ts_diff(0xFFFFFFFF, 0) == -1
    assert ts_diff(960, 0xFFFFFC40) == 1920
    assert ts_diff(0x7FFFFFFF, 0) == 0x7FFFFFFF
    assert ts_diff(0x80000000, 0) == -0x80000000


@given(u16, u16)
def test_seq_diff_inverts_seq_add(a: int, b: int) -> None:
    d = seq_diff(b, a)
    assert -32768 <= d <= 32767
    assert seq_add(a, d) == b
    assert seq_diff(a, b) == -d or d == -32768


@given(u32, u32)
def test_ts_diff_inverts_ts_add(a: int, b: int) -> None:
    d = ts_diff(b, a)
    assert -(1 << 31) <= d < (1 << 31)
    assert ts_add(a, d) == b


# -- classification ---------------------------------------------------------------------------


@pytest.mark.parametrize("pt", range(72, 77))
def test_rtcp_types_with_marker_are_rtcp(pt: int) -> None:
    # PT 72..76 with the marker bit set is the second byte 200..204 (RFC 5761)
    packet = bytes([0x80, 0x80 | pt]) + struct.pack(">HI", 6, 1234) + bytes(20)
    assert packet[1] == 128 + pt
    assert classify(packet) is PacketKind.RTCP


@pytest.mark.parametrize("pt", range(72, 77))
def test_rtcp_pt_without_marker_is_rtp(pt: int) -> None:
    packet = bytes([0x80, pt]) + bytes(30)
    assert classify(packet) is PacketKind.RTP


@pytest.mark.parametrize("b1", [0x78, 0xF8])
def test_opus_with_or_without_marker_is_rtp(b1: int) -> None:
    packet = bytes([0x80, b1]) + bytes(10) + b"\xf8\xff\xfe" + bytes(20)
    assert classify(packet) is PacketKind.RTP
    assert classify(bytes([0x90, b1]) + bytes(40)) is PacketKind.RTP


def test_rtcp_sr_rr_sdes_bye_app() -> None:
    for packet_type in (200, 201, 202, 203, 204):
        assert classify(RtcpHeader(packet_type, 42).serialize() + bytes(20)) is PacketKind.RTCP
    # 205/206 (feedback) are not in Discord's RTCP range
    assert classify(bytes([0x81, 205]) + bytes(26)) is PacketKind.RTP


def test_discovery_and_keepalive() -> None:
    assert classify(DiscoveryPacket.request(7).serialize()) is PacketKind.DISCOVERY
    assert classify(DiscoveryPacket.response(7, "1.2.3.4", 5).serialize()) is PacketKind.DISCOVERY
    assert classify(bytes(74)) is PacketKind.UNKNOWN  # type 0
    assert classify(struct.pack(">Q", 12345)) is PacketKind.KEEPALIVE
    assert classify(bytes([0x80, 0x78]) + bytes(6)) is PacketKind.KEEPALIVE  # 8 bytes is never RTP
    # a 74-byte RTP packet is RTP
    assert classify(bytes([0x80, 0x78]) + bytes(72)) is PacketKind.RTP


def test_classify_short_and_wrong_version() -> None:
    assert classify(b"") is PacketKind.UNKNOWN
    assert classify(b"\x80") is PacketKind.UNKNOWN
    assert classify(bytes([0x80, 0x78]) + bytes(9)) is PacketKind.UNKNOWN  # 11 bytes
    assert classify(bytes([0x80, 0xC8]) + bytes(4)) is PacketKind.UNKNOWN  # RTCP shorter than 8
    for b0 in (0x00, 0x40, 0xC0):
        assert classify(bytes([b0, 0x78]) + bytes(30)) is PacketKind.UNKNOWN


@given(st.binary(max_size=200))
def test_classify_never_raises(data: bytes) -> None:
    assert isinstance(classify(data), PacketKind)
    assert classify(bytearray(data)) is classify(memoryview(data)) is classify(data)


# -- RTP header -------------------------------------------------------------------------------


def test_parse_discord_py_header() -> None:
    # exactly what discord.py's _get_voice_packet builds
    header = bytearray(12)
    header[0], header[1] = 0x80, 0x78
    struct.pack_into(">H", header, 2, 65535)
    struct.pack_into(">I", header, 4, 0xFFFFFC40)
    struct.pack_into(">I", header, 8, 0xDEADBEEF)
    h = RtpHeader.parse(bytes(header) + b"payload")
    assert (h.marker, h.payload_type, h.sequence, h.timestamp, h.ssrc) == (
        False,
        120,
        65535,
        0xFFFFFC40,
        0xDEADBEEF,
    )
    assert h.csrc == () and h.extension_profile is None and h.extension_words == 0 and not h.padding
    assert h.header_size == 12
    assert h.serialize() == bytes(header)


def test_parse_padding_extension_csrc() -> None:
    raw = bytes([0xB2, 0xF8]) + struct.pack(">HII", 1, 2, 3) + struct.pack(">II", 10, 11)
    raw += struct.pack(">HH", ONE_BYTE_PROFILE, 3) + bytes(12)
    h = RtpHeader.parse(raw)
    assert h.marker and h.payload_type == 120 and h.padding
    assert h.csrc == (10, 11)
    assert h.extension_profile == ONE_BYTE_PROFILE and h.extension_words == 3
    assert h.header_size == 12 + 8 + 4
    assert h.serialize() == raw[: h.header_size]


def test_serialize_overrides() -> None:
    h = RtpHeader(sequence=1, timestamp=2, ssrc=3)
    assert h.serialize(extension_words=2)[0] == 0x90
    assert h.serialize(extension_words=2)[12:] == b"\xbe\xde\x00\x02"
    assert h.serialize(extension_words=2, padding=True)[0] == 0xB0
    assert h.serialize()[0] == 0x80 and len(h.serialize()) == 12
    # an explicit profile with zero words keeps X set and a zero-length preamble
    assert RtpHeader(extension_profile=0xBEDE).serialize()[12:] == b"\xbe\xde\x00\x00"
    with pytest.raises(ValueError):
        RtpHeader(csrc=tuple(range(16))).serialize()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "truncated"),
        (bytes([0x80, 0x78]) + bytes(9), "truncated"),
        (bytes([0x40, 0x78]) + bytes(20), "bad-version"),
        (bytes([0xC0, 0x78]) + bytes(20), "bad-version"),
        (bytes([0x83, 0x78]) + bytes(10 + 8), "truncated"),  # 3 CSRCs need 12 bytes
        (bytes([0x90, 0x78]) + bytes(10 + 2), "truncated"),  # extension preamble cut short
        (bytes([0x91, 0x78]) + bytes(10 + 4 + 3), "truncated"),
    ],
)
def test_parse_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as info:
        RtpHeader.parse(raw)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError) and isinstance(info.value, ListeningError)


def test_packet_error_pickles_with_reason() -> None:
    err = pickle.loads(pickle.dumps(PacketError("bad-version", "RTP version 1")))
    assert err.reason == "bad-version" and str(err) == "RTP version 1"


@given(
    marker=st.booleans(),
    payload_type=st.integers(0, 127),
    sequence=u16,
    timestamp=u32,
    ssrc=u32,
    csrc=st.lists(u32, max_size=15).map(tuple),
    extension=st.one_of(st.none(), st.tuples(u16, u16)),
    padding=st.booleans(),
)
def test_header_round_trip(
    marker: bool,
    payload_type: int,
    sequence: int,
    timestamp: int,
    ssrc: int,
    csrc: tuple[int, ...],
    extension: tuple[int, int] | None,
    padding: bool,
) -> None:
    profile, words = extension if extension is not None else (None, 0)
    h = RtpHeader(marker, payload_type, sequence, timestamp, ssrc, csrc, profile, words, padding)
    raw = h.serialize()
    assert len(raw) == h.header_size
    assert RtpHeader.parse(raw) == h
    assert RtpHeader.parse(memoryview(raw + b"trailing")) == h


@given(st.binary(max_size=120))
def test_parse_raises_only_packet_error(data: bytes) -> None:
    try:
        h = RtpHeader.parse(data)
    except PacketError:
        return
    assert h.header_size <= len(data)


def test_repr() -> None:
    assert "seq=5" in repr(RtpHeader(sequence=5, extension_profile=0xBEDE, extension_words=1))


# -- header-extension elements ----------------------------------------------------------------


def test_one_byte_extension_elements() -> None:
    body = build_extension_body([(1, b"\x30"), (3, b"abcd")])
    assert len(body) % 4 == 0
    assert parse_extension_elements(ONE_BYTE_PROFILE, body) == [(1, b"\x30"), (3, b"abcd")]
    # padding bytes between elements are skipped; id 15 stops parsing
    assert parse_extension_elements(ONE_BYTE_PROFILE, b"\x00\x10\x01\x00\xf0\x20\x00\x00") == [(1, b"\x01")]
    h = RtpHeader(extension_profile=ONE_BYTE_PROFILE, extension_words=len(body) // 4, extension_body=body)
    assert h.extensions() == [(1, b"\x30"), (3, b"abcd")]
    assert RtpHeader().extensions() == []


def test_two_byte_extension_elements() -> None:
    body = build_extension_body([(1, b""), (200, b"x" * 20)], two_byte=True)
    assert parse_extension_elements(0x1000, body) == [(1, b""), (200, b"x" * 20)]
    assert parse_extension_elements(0x100F, b"\x00\x05\x01\x07") == [(5, b"\x07")]


@pytest.mark.parametrize(
    ("profile", "body"),
    [
        (ONE_BYTE_PROFILE, b"\x13\x00\x00"),  # id 1 claims 4 bytes, 2 left
        (0x1000, b"\x05"),  # no length byte
        (0x1000, b"\x05\x09\x00"),
        (0x1234, b"\x00\x00\x00\x00"),  # unknown profile
    ],
)
def test_extension_errors(profile: int, body: bytes) -> None:
    with pytest.raises(PacketError) as info:
        parse_extension_elements(profile, body)
    assert info.value.reason == "bad-extension"


@given(st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_extension_parser_raises_only_packet_error(profile: int, body: bytes) -> None:
    with contextlib.suppress(PacketError):
        parse_extension_elements(profile, body)


@given(st.lists(st.tuples(st.integers(1, 14), st.binary(min_size=1, max_size=16)), max_size=12))
def test_one_byte_extension_elements_round_trip(elements: list[tuple[int, bytes]]) -> None:
    body = build_extension_body(elements)
    assert len(body) % 4 == 0
    assert parse_extension_elements(ONE_BYTE_PROFILE, body) == elements


@given(
    st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=255)), max_size=6),
    st.integers(0x1000, 0x100F),
)
def test_two_byte_extension_elements_round_trip(elements: list[tuple[int, bytes]], profile: int) -> None:
    body = build_extension_body(elements, two_byte=True)
    assert len(body) % 4 == 0
    assert parse_extension_elements(profile, body) == elements


# -- RTCP -------------------------------------------------------------------------------------


def test_rtcp_header() -> None:
    rr = RtcpHeader(201, 0xCAFEBABE, count=1, length=7)
    raw = rr.serialize()
    assert raw == bytes([0x81, 201, 0, 7]) + struct.pack(">I", 0xCAFEBABE)
    parsed = RtcpHeader.parse(raw + bytes(28))
    assert parsed == rr and parsed.packet_size == 32
    assert RtcpHeader.parse(bytes(4) + raw, offset=4) == rr
    with pytest.raises(PacketError, match="8 bytes") as info:
        RtcpHeader.parse(raw[:7])
    assert info.value.reason == "truncated"
    with pytest.raises(PacketError) as info:
        RtcpHeader.parse(b"\x41" + raw[1:])
    assert info.value.reason == "bad-version"
    assert "pt=201" in repr(rr)


# -- IP discovery -----------------------------------------------------------------------------


def test_discovery_request_matches_discord_py() -> None:
    # discord.py gateway.discover_ip
    packet = bytearray(74)
    struct.pack_into(">H", packet, 0, 1)
    struct.pack_into(">H", packet, 2, 70)
    struct.pack_into(">I", packet, 4, 0x01020304)
    assert DiscoveryPacket.request(0x01020304).serialize() == bytes(packet)
    assert DiscoveryPacket.parse(bytes(packet)) == DiscoveryPacket(1, 0x01020304)


def test_discovery_response_as_discord_py_reads_it() -> None:
    recv = DiscoveryPacket.response(99, "203.0.113.7", 50004).serialize()
    assert len(recv) == 74 and recv[1] == 2
    # discord.py's parsing
    ip_end = recv.index(0, 8)
    assert recv[8:ip_end].decode("ascii") == "203.0.113.7"
    assert struct.unpack_from(">H", recv, len(recv) - 2)[0] == 50004
    parsed = DiscoveryPacket.parse(recv)
    assert (parsed.type, parsed.ssrc, parsed.address, parsed.port) == (2, 99, "203.0.113.7", 50004)
    assert "203.0.113.7" in repr(parsed)


def test_discovery_errors() -> None:
    with pytest.raises(PacketError) as info:
        DiscoveryPacket.parse(bytes(73))
    assert info.value.reason == "bad-length"
    with pytest.raises(PacketError) as info:
        DiscoveryPacket.parse(struct.pack(">HHI", 3, 70, 1) + bytes(66))
    assert info.value.reason == "bad-type"
    with pytest.raises(PacketError) as info:
        DiscoveryPacket.parse(struct.pack(">HHI", 2, 70, 1) + b"\xff" + bytes(65))
    assert info.value.reason == "bad-address"
    with pytest.raises(ValueError):
        DiscoveryPacket.response(1, "a" * 64, 1).serialize()
    # 63 address bytes still leave the NUL discord.py looks for
    assert DiscoveryPacket.parse(DiscoveryPacket.response(1, "a" * 63, 1).serialize()).address == "a" * 63
