"""RTP/RTCP framing for Discord voice, with no I/O.

What arrives on a Discord voice UDP socket (see ``docs/voice-protocol.md`` section 2 and 3):
RTP carrying Opus (payload type 120), RTCP (second byte 200..204), 74-byte IP discovery
datagrams and 8-byte keep-alives. This module tells them apart (:func:`classify`), parses and
builds the clear parts (:class:`RtpHeader`, :class:`RtcpHeader`, :class:`DiscoveryPacket`) and
parses RFC 8285 header-extension elements once :mod:`listening_core.crypto` has decrypted them.
Sequence numbers and timestamps wrap; compare them only through the ``seq_*``/``ts_*`` helpers.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Sequence
from typing import ClassVar

from .errors import PacketError

__all__ = [
    "DISCOVERY_SIZE",
    "KEEPALIVE_SIZE",
    "ONE_BYTE_PROFILE",
    "OPUS_PAYLOAD_TYPE",
    "RTCP_TYPES",
    "RTP_HEADER_SIZE",
    "DiscoveryPacket",
    "PacketError",
    "PacketKind",
    "RtcpHeader",
    "RtpHeader",
    "build_extension_body",
    "classify",
    "parse_extension_elements",
    "seq_add",
    "seq_diff",
    "seq_lt",
    "ts_add",
    "ts_diff",
]

_log = logging.getLogger(__name__)

RTP_VERSION = 2
RTP_HEADER_SIZE = 12
OPUS_PAYLOAD_TYPE = 120
ONE_BYTE_PROFILE = 0xBEDE
"""RFC 8285 one-byte header-extension profile, the one Discord uses."""
TWO_BYTE_PROFILE_MASK = 0xFFF0
TWO_BYTE_PROFILE = 0x1000
RTCP_TYPES = range(200, 205)
"""RTCP packet types Discord may send: SR, RR, SDES, BYE, APP."""
RTCP_HEADER_SIZE = 8
DISCOVERY_SIZE = 74
DISCOVERY_REQUEST = 1
DISCOVERY_RESPONSE = 2
_DISCOVERY_BODY_LENGTH = 70
_DISCOVERY_ADDRESS_SIZE = 64  # bytes 8..71, NUL padded
KEEPALIVE_SIZE = 8

_SEQ_MOD = 1 << 16
_TS_MOD = 1 << 32

_HEADER = struct.Struct(">BBHII")
_EXT_PREAMBLE = struct.Struct(">HH")
_RTCP = struct.Struct(">BBHI")
_DISCOVERY_HEAD = struct.Struct(">HHI")
_U16 = struct.Struct(">H")


# -- wrap-around arithmetic -------------------------------------------------------------------


def seq_add(a: int, delta: int) -> int:
    """Return the 16-bit sequence number ``a + delta`` (mod 2**16)."""
    return (a + delta) & 0xFFFF


def seq_diff(a: int, b: int) -> int:
    """Signed shortest distance from ``b`` to ``a`` mod 2**16, in ``[-32768, 32767]``.

    ``seq_diff(1, 65535) == 2``; positive means ``a`` is newer than ``b``.
    """
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000


def seq_lt(a: int, b: int) -> bool:
    """True when sequence number ``a`` comes before ``b`` (RFC 1982 serial arithmetic)."""
    return seq_diff(a, b) < 0


def ts_add(a: int, delta: int) -> int:
    """Return the 32-bit RTP timestamp ``a + delta`` (mod 2**32)."""
    return (a + delta) & 0xFFFFFFFF


def ts_diff(a: int, b: int) -> int:
    """Signed shortest distance from timestamp ``b`` to ``a`` mod 2**32, in ``[-2**31, 2**31 - 1]``."""
    return ((a - b + 0x80000000) & 0xFFFFFFFF) - 0x80000000


# -- classification ---------------------------------------------------------------------------


class PacketKind(enum.Enum):
    """What a datagram on the voice UDP socket is."""

    RTP = "rtp"
    RTCP = "rtcp"
    DISCOVERY = "discovery"
    KEEPALIVE = "keepalive"
    UNKNOWN = "unknown"


def classify(datagram: bytes | bytearray | memoryview) -> PacketKind:
    """Tell what ``datagram`` is from its length and first two bytes. Never raises."""
    n = len(datagram)
    if n == KEEPALIVE_SIZE:
        return PacketKind.KEEPALIVE
    if n < 2:
        return PacketKind.UNKNOWN
    b0 = datagram[0]
    b1 = datagram[1]
    if b0 >> 6 == RTP_VERSION:
        # RFC 5761: 200..204 in the second byte is RTCP; Opus (PT 120, 0x78/0xF8) never lands there
        if 200 <= b1 <= 204:
            return PacketKind.RTCP if n >= RTCP_HEADER_SIZE else PacketKind.UNKNOWN
        return PacketKind.RTP if n >= RTP_HEADER_SIZE else PacketKind.UNKNOWN
    if n == DISCOVERY_SIZE and b0 == 0 and b1 in (DISCOVERY_REQUEST, DISCOVERY_RESPONSE):
        return PacketKind.DISCOVERY
    return PacketKind.UNKNOWN


# -- RTP --------------------------------------------------------------------------------------


class RtpHeader:
    """The clear part of an RTP packet: fixed header, CSRCs and the extension preamble.

    :attr:`header_size` is the AAD length of the ``_rtpsize`` modes. The extension *body* is
    encrypted on Discord; :meth:`listening_core.crypto.TransportCipher.open_rtp` stores it,
    decrypted, in :attr:`extension_body`.
    """

    __slots__ = (
        "csrc",
        "extension_body",
        "extension_profile",
        "extension_words",
        "marker",
        "padding",
        "payload_type",
        "sequence",
        "ssrc",
        "timestamp",
    )

    def __init__(
        self,
        marker: bool = False,
        payload_type: int = OPUS_PAYLOAD_TYPE,
        sequence: int = 0,
        timestamp: int = 0,
        ssrc: int = 0,
        csrc: tuple[int, ...] = (),
        extension_profile: int | None = None,
        extension_words: int = 0,
        padding: bool = False,
        extension_body: bytes = b"",
    ) -> None:
        self.marker: bool = marker
        self.payload_type: int = payload_type
        self.sequence: int = sequence
        self.timestamp: int = timestamp
        self.ssrc: int = ssrc
        self.csrc: tuple[int, ...] = csrc
        self.extension_profile: int | None = extension_profile
        self.extension_words: int = extension_words
        self.padding: bool = padding
        self.extension_body: bytes = extension_body

    @property
    def header_size(self) -> int:
        """Length of the clear header: ``12 + 4·CC + 4·X`` (the AAD of the ``_rtpsize`` modes)."""
        return RTP_HEADER_SIZE + 4 * len(self.csrc) + (4 if self.extension_profile is not None else 0)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> RtpHeader:
        """Parse the clear header at the start of ``data``; raise :class:`PacketError` if malformed."""
        n = len(data)
        if n < RTP_HEADER_SIZE:
            raise PacketError("truncated", f"RTP packet of {n} bytes is shorter than its fixed header")
        b0, b1, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
        if b0 >> 6 != RTP_VERSION:
            raise PacketError("bad-version", f"RTP version {b0 >> 6}, expected 2")
        cc = b0 & 0x0F
        offset = RTP_HEADER_SIZE
        csrc: tuple[int, ...] = ()
        if cc:
            offset += 4 * cc
            if n < offset:
                raise PacketError("truncated", f"RTP packet of {n} bytes cannot hold {cc} CSRCs")
            csrc = struct.unpack_from(f">{cc}I", data, RTP_HEADER_SIZE)
        profile: int | None = None
        words = 0
        if b0 & 0x10:
            if n < offset + 4:
                raise PacketError("truncated", f"RTP packet of {n} bytes cannot hold its extension header")
            profile, words = _EXT_PREAMBLE.unpack_from(data, offset)
        return cls(
            bool(b1 & 0x80), b1 & 0x7F, sequence, timestamp, ssrc, csrc, profile, words, bool(b0 & 0x20)
        )

    def serialize(self, *, extension_words: int | None = None, padding: bool | None = None) -> bytes:
        """Build the clear header bytes (the AAD).

        ``extension_words`` overrides :attr:`extension_words`; a non-zero value with no
        :attr:`extension_profile` uses the one-byte profile ``0xBEDE``. ``padding`` overrides the
        P bit.
        """
        words = self.extension_words if extension_words is None else extension_words
        profile = self.extension_profile
        if profile is None and words:
            profile = ONE_BYTE_PROFILE
        pad = self.padding if padding is None else padding
        cc = len(self.csrc)
        if cc > 15:
            raise ValueError(f"an RTP header holds at most 15 CSRCs, got {cc}")
        b0 = (RTP_VERSION << 6) | (0x20 if pad else 0) | (0x10 if profile is not None else 0) | cc
        b1 = (0x80 if self.marker else 0) | (self.payload_type & 0x7F)
        out = _HEADER.pack(
            b0, b1, self.sequence & 0xFFFF, self.timestamp & 0xFFFFFFFF, self.ssrc & 0xFFFFFFFF
        )
        if cc:
            out += struct.pack(f">{cc}I", *self.csrc)
        if profile is not None:
            out += _EXT_PREAMBLE.pack(profile, words)
        return out

    def extensions(self) -> list[tuple[int, bytes]]:
        """Parse :attr:`extension_body` into RFC 8285 ``(id, data)`` elements (empty if none)."""
        if self.extension_profile is None or not self.extension_body:
            return []
        return parse_extension_elements(self.extension_profile, self.extension_body)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RtpHeader):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in RtpHeader.__slots__)

    __hash__: ClassVar[None] = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        ext = (
            ""
            if self.extension_profile is None
            else f" ext=0x{self.extension_profile:04x}/{self.extension_words}w"
        )
        return (
            f"<RtpHeader pt={self.payload_type} seq={self.sequence} ts={self.timestamp} ssrc={self.ssrc}"
            f"{' M' if self.marker else ''}{' P' if self.padding else ''} csrc={list(self.csrc)}{ext}>"
        )


def parse_extension_elements(profile: int, body: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
    """Split a decrypted RFC 8285 header-extension body into ``(id, data)`` elements.

    Handles the one-byte (``0xBEDE``) and two-byte (``0x100X``) forms; padding bytes (id 0) are
    skipped and a one-byte id of 15 stops parsing. Raises :class:`PacketError` (``"bad-extension"``)
    on an unknown profile or an element running past the body.
    """
    out: list[tuple[int, bytes]] = []
    n = len(body)
    i = 0
    if profile == ONE_BYTE_PROFILE:
        while i < n:
            b = body[i]
            ident = b >> 4
            if ident == 0:  # padding byte
                i += 1
                continue
            if ident == 15:  # reserved: stop parsing (RFC 8285 section 4.2)
                break
            size = (b & 0x0F) + 1
            if i + 1 + size > n:
                raise PacketError("bad-extension", f"extension element {ident} runs past the body")
            out.append((ident, bytes(body[i + 1 : i + 1 + size])))
            i += 1 + size
    elif profile & TWO_BYTE_PROFILE_MASK == TWO_BYTE_PROFILE:
        while i < n:
            ident = body[i]
            if ident == 0:
                i += 1
                continue
            if i + 2 > n:
                raise PacketError("bad-extension", f"extension element {ident} has no length byte")
            size = body[i + 1]
            if i + 2 + size > n:
                raise PacketError("bad-extension", f"extension element {ident} runs past the body")
            out.append((ident, bytes(body[i + 2 : i + 2 + size])))
            i += 2 + size
    else:
        raise PacketError("bad-extension", f"unknown RTP header-extension profile 0x{profile:04x}")
    return out


def build_extension_body(elements: Sequence[tuple[int, bytes]], *, two_byte: bool = False) -> bytes:
    """Serialize RFC 8285 elements, zero-padded to a multiple of 4 bytes (inverse of the parser)."""
    out = bytearray()
    for ident, data in elements:
        if two_byte:
            if not 1 <= ident <= 255 or len(data) > 255:
                raise ValueError(f"two-byte extension element {ident} with {len(data)} bytes")
            out += bytes((ident, len(data))) + data
        else:
            if not 1 <= ident <= 14 or not 1 <= len(data) <= 16:
                raise ValueError(f"one-byte extension element {ident} with {len(data)} bytes")
            out.append((ident << 4) | (len(data) - 1))
            out += data
    out += bytes(-len(out) % 4)
    return bytes(out)


# -- RTCP -------------------------------------------------------------------------------------


class RtcpHeader:
    """The common 8-byte head of an RTCP packet: type, count, length and sender SSRC."""

    __slots__ = ("count", "length", "packet_type", "padding", "ssrc")

    def __init__(
        self, packet_type: int, ssrc: int, count: int = 0, length: int = 1, padding: bool = False
    ) -> None:
        self.packet_type: int = packet_type
        self.ssrc: int = ssrc
        self.count: int = count
        self.length: int = length
        self.padding: bool = padding

    @property
    def packet_size(self) -> int:
        """Size in bytes of this RTCP packet inside a compound packet (``4·(length + 1)``)."""
        return 4 * (self.length + 1)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> RtcpHeader:
        """Parse the 8-byte RTCP head at ``offset``; raise :class:`PacketError` if malformed."""
        if len(data) - offset < RTCP_HEADER_SIZE:
            raise PacketError("truncated", "RTCP packet shorter than 8 bytes")
        b0, packet_type, length, ssrc = _RTCP.unpack_from(data, offset)
        if b0 >> 6 != RTP_VERSION:
            raise PacketError("bad-version", f"RTCP version {b0 >> 6}, expected 2")
        return cls(packet_type, ssrc, b0 & 0x1F, length, bool(b0 & 0x20))

    def serialize(self) -> bytes:
        """Build the 8 header bytes."""
        b0 = (RTP_VERSION << 6) | (0x20 if self.padding else 0) | (self.count & 0x1F)
        return _RTCP.pack(b0, self.packet_type, self.length, self.ssrc)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RtcpHeader):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in RtcpHeader.__slots__)

    __hash__: ClassVar[None] = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"<RtcpHeader pt={self.packet_type} ssrc={self.ssrc} count={self.count} length={self.length}>"


# -- IP discovery -----------------------------------------------------------------------------


class DiscoveryPacket:
    """A 74-byte IP discovery datagram: request (type 1) or response (type 2, with address/port)."""

    __slots__ = ("address", "port", "ssrc", "type")

    def __init__(self, type: int, ssrc: int, address: str = "", port: int = 0) -> None:
        self.type: int = type
        self.ssrc: int = ssrc
        self.address: str = address
        self.port: int = port

    @classmethod
    def request(cls, ssrc: int) -> DiscoveryPacket:
        """The request a client sends (type 1, no address, port 0)."""
        return cls(DISCOVERY_REQUEST, ssrc)

    @classmethod
    def response(cls, ssrc: int, address: str, port: int) -> DiscoveryPacket:
        """The response a server sends back with the client's external address and port."""
        return cls(DISCOVERY_RESPONSE, ssrc, address, port)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> DiscoveryPacket:
        """Parse a discovery datagram; raise :class:`PacketError` if it is not one."""
        if len(data) != DISCOVERY_SIZE:
            raise PacketError("bad-length", f"IP discovery datagram of {len(data)} bytes, expected 74")
        kind, _length, ssrc = _DISCOVERY_HEAD.unpack_from(data)
        if kind not in (DISCOVERY_REQUEST, DISCOVERY_RESPONSE):
            raise PacketError("bad-type", f"IP discovery type {kind}, expected 1 or 2")
        raw = bytes(data[8 : 8 + _DISCOVERY_ADDRESS_SIZE])
        end = raw.find(0)
        try:
            address = (raw if end < 0 else raw[:end]).decode("ascii")
        except UnicodeDecodeError:
            raise PacketError("bad-address", "IP discovery address is not ASCII") from None
        (port,) = _U16.unpack_from(data, DISCOVERY_SIZE - 2)
        return cls(kind, ssrc, address, port)

    def serialize(self) -> bytes:
        """Build the 74-byte datagram."""
        raw = self.address.encode("ascii")
        if len(raw) >= _DISCOVERY_ADDRESS_SIZE:
            # discord.py looks for a terminating NUL, so at most 63 address bytes fit
            raise ValueError(f"address {self.address!r} is longer than 63 bytes")
        return (
            _DISCOVERY_HEAD.pack(self.type, _DISCOVERY_BODY_LENGTH, self.ssrc)
            + raw.ljust(_DISCOVERY_ADDRESS_SIZE, b"\0")
            + _U16.pack(self.port)
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DiscoveryPacket):
            return NotImplemented
        return (self.type, self.ssrc, self.address, self.port) == (
            other.type,
            other.ssrc,
            other.address,
            other.port,
        )

    __hash__: ClassVar[None] = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"<DiscoveryPacket type={self.type} ssrc={self.ssrc} address={self.address!r} port={self.port}>"
        )
