"""Ogg (RFC 3533) and Ogg Opus (RFC 7845), written and read here with no codec and no library.

Writing: :class:`OggOpusWriter` stores Opus packets exactly as given, one packet per Ogg packet,
each placed at a sample position on a 48 kHz timeline. Reading: :func:`read_stream` returns the
headers and every packet with its position; :func:`read_packets` and :func:`decode_to_pcm` are
the short forms.

The timeline convention (granule positions)
-------------------------------------------

* Granule position ``g`` is sample ``g`` of the session timeline at 48 kHz: granule 0 is the moment
  ``listen`` started (session sample 0), for every speaker's file. An audio page's granule is the
  session sample at the *end* of the last packet completed on it (RFC 7845 section 4).
* Pre-skip is 312 samples, the encoder lookahead of the Opus encoder Discord clients use: a
  player drops the first 312 decoded samples, so what it plays at time ``t`` is what the speaker
  said at session time ``t`` (the decoded frame of the packet at position ``p`` holds audio from
  ``p - 312``). Positions in this module are raw granules (decoder-output samples from granule 0),
  which is also where a PCM sink such as WAV puts each decoded frame.
* The last page (end of stream) holds one extra packet, the Opus silence frame ``F8 FF FE``,
  placed so that the page's granule is the session's last sample: it ends where the session
  ended; when the session ended less than a frame after the speaker's last packet, the marker
  follows that packet and the granule trims it (RFC 7845 end trimming, allowed on the last page
  only). The OpusTags comment ``LISTENING_CORE_END_MARKER=silence`` says the stream ends this
  way; :func:`read_packets` leaves that packet out.

Gaps (a pause, a late start, a lost frame) are written one of two ways, the writer's ``gaps``:

``"fill"`` (the default; OpusTags comment ``LISTENING_CORE_GAPS=fill``)
  What RFC 7845 section 4.1 asks of a muxer that captures a real-time stream: the stream has no
  holes, every sample from granule 0 to the end is covered by a packet, so the decoded length
  equals the granule length in every player (libsndfile and opusfile count decoded samples and
  ignore granule jumps). Filler packets, never received, cover the gaps:

  - a pause, the time before a speaker's first packet and the time after the last one: Opus
    silence frames (``FF FE``, what Discord clients send at the end of each talk spurt), six
    20 ms frames per packet (120 ms, the most one packet holds) and 2.5 ms frames for the rest;
  - a frame the receiver lost (FEC or PLC, no Opus): a packet of zero-length frames with the
    previous packet's mode, bandwidth and channels, which makes the decoder conceal it (RFC 6716
    section 3.2.1), as the RFC recommends.

  Fillers are code 3 packets whose padding flag is set with a padding length of 0 (one byte
  that changes nothing for a decoder), then only ``FF FE`` frames or only empty frames: that is
  how :func:`read_stream` tells them from received packets (:attr:`Packet.filler`). Opus
  durations are multiples of 2.5 ms (120 samples), so a talk spurt's first packet sits at its
  session position rounded to the nearest 120 samples (1.25 ms at most); the packets after it in
  the spurt follow contiguously, and the rounding never accumulates.

``"granule"`` (OpusTags comment absent: the layout of files written before ``fill`` existed)
  Packets on one page are contiguous in time; when a packet does not start where the previous
  one ended, the page is ended first; the next page's granule minus the durations of its
  packets is then larger than the previous page's granule, and that difference is the gap.
  Granule positions never decrease. The first audio page's granule minus its packets'
  durations is the session sample of the speaker's first packet (RFC 7845 section 4.5's
  "starting offset"). Packets sit at their exact session positions, but not every player
  honours the jumps: ffmpeg (libavformat 62, checked) takes the starting offset and the jumps
  from the granules, except that it stamps the first packet of the page after a gap with the
  previous page's granule (``-af aresample=async=1`` fills gaps with silence when converting);
  libsndfile and opusfile-based players count decoded samples and play the spurts back to back.

In both, the start of each packet is, per page, ``max(previous page's granule, granule -
durations of the page's packets)``, which is what RFC 7845 players compute, and
:func:`decode_to_pcm` places every packet at its position (silence in granule gaps).
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

__all__ = [
    "END_MARKER",
    "END_MARKER_TAG",
    "FILL_STEP",
    "GAPS",
    "GAPS_TAG",
    "PRE_SKIP",
    "OggOpusStream",
    "OggOpusWriter",
    "OggPage",
    "Packet",
    "build_page",
    "concealment_packets",
    "decode_to_pcm",
    "is_filler",
    "iter_pages",
    "ogg_crc",
    "opus_packet_samples",
    "read_packets",
    "read_stream",
    "silence_packets",
]

PRE_SKIP = 312
"""Samples a player drops at the start: the lookahead of libopus's encoder at 48 kHz."""
SAMPLE_RATE = 48_000
CHANNELS = 2
END_MARKER = b"\xf8\xff\xfe"
"""The packet on the last page that carries the session's end (the Opus silence frame)."""
END_MARKER_TAG = "LISTENING_CORE_END_MARKER=silence"
"""OpusTags comment saying that the last packet of the stream is :data:`END_MARKER`."""
GAPS = ("fill", "granule")
"""How a writer writes gaps: filler packets (the default) or granule jumps (see the module)."""
GAPS_TAG = "LISTENING_CORE_GAPS=fill"
"""OpusTags comment saying that gaps are filled with filler packets (:func:`is_filler`)."""
FILL_STEP = 120
"""The shortest Opus frame (2.5 ms at 48 kHz): filled gaps are multiples of it."""

FLAG_CONTINUED = 0x01
FLAG_BOS = 0x02
FLAG_EOS = 0x04
MAX_SEGMENTS = 255
_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, sequence, crc, segments


# ----------------------------------------------------------------------------------- CRC-32


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        reg = byte << 24
        for _ in range(8):
            reg = ((reg << 1) ^ 0x04C11DB7) if reg & 0x80000000 else reg << 1
        table.append(reg & 0xFFFFFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


_REVERSED_BITS = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def _reverse32(value: int) -> int:
    return int(f"{value:032b}"[::-1], 2)


def ogg_crc(data: bytes | bytearray, crc: int = 0) -> int:
    """Ogg's CRC-32 (RFC 3533): polynomial 0x04C11DB7, not reflected, initial value 0, no final xor.

    Computed by zlib's (reflected) CRC-32 over the bit-reversed bytes, in C: the same polynomial
    mirrored, so mirroring input and output gives Ogg's. (A loop in Python cost a quarter of the
    receiver's time at a few hundred speakers.)
    """
    raw = zlib.crc32(bytes(data).translate(_REVERSED_BITS), _reverse32(crc) ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    return _reverse32(raw)


def _ogg_crc_reference(data: bytes | bytearray, crc: int = 0) -> int:
    """The table-driven definition, byte by byte (what :func:`ogg_crc` is tested against)."""
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
    return crc


# ------------------------------------------------------------------------------------ pages


def _lacing(packet: bytes) -> bytes:
    return b"\xff" * (len(packet) // 255) + bytes((len(packet) % 255,))


def build_page(
    packets: Sequence[bytes], *, granule: int, serial: int, sequence: int, flags: int = 0
) -> bytes:
    """One Ogg page holding ``packets`` whole (each one ends on this page), checksum included."""
    lacing = b"".join(_lacing(packet) for packet in packets)
    if len(lacing) > MAX_SEGMENTS:
        raise ValueError(
            f"{len(packets)} packets need {len(lacing)} lacing values; a page holds {MAX_SEGMENTS}"
        )
    header = bytearray(_HEADER.pack(b"OggS", 0, flags, granule, serial, sequence, 0, len(lacing)))
    header += lacing
    body = b"".join(packets)
    struct.pack_into("<I", header, 22, ogg_crc(body, ogg_crc(header)))
    return bytes(header) + body


@dataclass(frozen=True, slots=True)
class OggPage:
    """One Ogg page as read: its header fields, lacing values and body."""

    flags: int
    granule: int
    serial: int
    sequence: int
    lacing: bytes
    body: bytes
    offset: int
    """Byte offset of the page in the file."""


def iter_pages(data: bytes) -> Iterator[OggPage]:
    """Every intact page of ``data``, in order.

    A page whose checksum does not match, and a page cut short by the end of the data (what a
    crash leaves), are skipped, as every Ogg reader does: the next capture pattern is searched for.
    """
    pos = 0
    size = len(data)
    while True:
        start = data.find(b"OggS", pos)
        if start < 0 or start + _HEADER.size > size:
            return
        _, version, flags, granule, serial, sequence, crc, segments = _HEADER.unpack_from(data, start)
        lacing = data[start + _HEADER.size : start + _HEADER.size + segments]
        end = start + _HEADER.size + segments + sum(lacing)
        if version != 0 or len(lacing) < segments or end > size:
            pos = start + 1
            continue
        page = bytearray(data[start:end])
        page[22:26] = bytes(4)
        if ogg_crc(page) != crc:
            pos = start + 1
            continue
        yield OggPage(flags, granule, serial, sequence, lacing, data[end - sum(lacing) : end], start)
        pos = end


# ------------------------------------------------------------------------------ Opus packets


def opus_packet_samples(packet: bytes) -> int:
    """Samples (at 48 kHz) that an Opus packet decodes to, from its TOC byte (RFC 6716 section 3.1)."""
    if not packet:
        raise ValueError("an empty packet is not an Opus packet")
    toc = packet[0]
    config = toc >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        frame = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:  # hybrid: 10, 20 ms
        frame = (480, 960)[config & 1]
    else:  # CELT: 2.5, 5, 10, 20 ms
        frame = (120, 240, 480, 960)[config & 3]
    code = toc & 3
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    else:
        if len(packet) < 2:
            raise ValueError("an Opus code 3 packet needs a frame count byte")
        count = packet[1] & 0x3F
    samples = frame * count
    if not 0 < samples <= 5760:
        raise ValueError(f"an Opus packet holds 2.5 to 120 ms, this one claims {samples} samples")
    return samples


def _duration(packet: bytes) -> int:
    try:
        return opus_packet_samples(packet)
    except ValueError:
        return 960  # not valid Opus (stored untouched anyway): a 20 ms frame, as the receiver assumes


# ------------------------------------------------------------------------------ filler packets

_SILENT_FRAME = b"\xff\xfe"  # a CELT frame whose first symbol is the silence flag
_CELT_FB_20MS = 31 << 3  # TOC config 31: CELT, fullband, 20 ms
_CELT_FB_2_5MS = 28 << 3  # TOC config 28: CELT, fullband, 2.5 ms
_MAX_FRAMES = 48  # the most frames one Opus packet holds (48 x 2.5 ms)
_MAX_SAMPLES = 5760  # the most samples one Opus packet holds (120 ms)


def _filler(config_toc: int, frames: int, frame: bytes) -> bytes:
    """A code 3 CBR packet of ``frames`` copies of ``frame``, padding flag set with no padding.

    The padding flag with a padding length of 0 adds one byte a decoder skips (RFC 6716 section
    3.2.5) and marks the packet as written by this module, not received (:func:`is_filler`).
    """
    return bytes((config_toc & 0xFC | 3, 0x40 | frames, 0)) + frame * frames


def is_filler(packet: bytes) -> bool:
    """Whether ``packet`` is a gap filler of this module: silence or concealment, never received."""
    if len(packet) < 3 or packet[0] & 3 != 3 or packet[1] & 0xC0 != 0x40 or packet[2] != 0:
        return False
    frames = packet[1] & 0x3F
    body = packet[3:]
    return frames > 0 and (body == b"" or body == _SILENT_FRAME * frames)


def silence_packets(samples: int) -> list[bytes]:
    """Filler packets of Opus silence lasting ``samples`` (a multiple of :data:`FILL_STEP`).

    120 ms packets (six 20 ms frames), then one packet of the remaining 20 ms frames, then one of
    2.5 ms frames for the rest.
    """
    if samples < 0 or samples % FILL_STEP:
        raise ValueError(f"a filled gap is a multiple of {FILL_STEP} samples (2.5 ms), not {samples}")
    full, rest = divmod(samples, _MAX_SAMPLES)
    packets = [_filler(_CELT_FB_20MS, 6, _SILENT_FRAME)] * full
    frames20, rest = divmod(rest, 960)
    if frames20:
        packets.append(_filler(_CELT_FB_20MS, frames20, _SILENT_FRAME))
    if rest:
        packets.append(_filler(_CELT_FB_2_5MS, rest // FILL_STEP, _SILENT_FRAME))
    return packets


def concealment_packets(samples: int, previous: bytes | None = None) -> list[bytes]:
    """Filler packets asking the decoder to conceal ``samples`` (a multiple of :data:`FILL_STEP`).

    Zero-length frames (RFC 6716 section 3.2.1), with the mode, bandwidth and channels of
    ``previous`` (the packet before the loss) when its frame size fits, as RFC 7845 section 4.1
    recommends; else CELT fullband 20 ms or 2.5 ms frames.
    """
    if samples <= 0 or samples % FILL_STEP:
        raise ValueError(f"a concealed loss is a multiple of {FILL_STEP} samples (2.5 ms), not {samples}")
    toc = None
    if previous:
        frame = opus_packet_samples(bytes((previous[0] & 0xFC,)))
        if samples % frame == 0:
            toc = previous[0]
    if toc is None:
        toc = _CELT_FB_20MS if samples % 960 == 0 else _CELT_FB_2_5MS
    frame = opus_packet_samples(bytes((toc & 0xFC,)))
    per_packet = min(_MAX_SAMPLES // frame, _MAX_FRAMES)
    frames = samples // frame
    packets = []
    while frames:
        n = min(frames, per_packet)
        packets.append(_filler(toc, n, b""))
        frames -= n
    return packets


# ---------------------------------------------------------------------------------- writing


def opus_head(*, channels: int = CHANNELS, pre_skip: int = PRE_SKIP, input_rate: int = SAMPLE_RATE) -> bytes:
    """The identification header (RFC 7845 section 5.1), channel mapping family 0."""
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, pre_skip, input_rate, 0, 0)


def opus_tags(vendor: str, comments: Sequence[str]) -> bytes:
    """The comment header (RFC 7845 section 5.2)."""
    out = bytearray(b"OpusTags")
    raw = vendor.encode()
    out += struct.pack("<I", len(raw)) + raw + struct.pack("<I", len(comments))
    for comment in comments:
        raw = comment.encode()
        out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


class OggOpusWriter:
    """Writes one Ogg Opus stream to ``file`` (opened for binary writing) page by page.

    The two header pages are written at once. :meth:`write` adds a packet at a position and
    :meth:`lost` a lost frame; ``gaps`` says how what lies between is written (see the module):
    ``"fill"`` with filler packets, ``"granule"`` as a granule jump. Packets collect in a pending
    page that is written when it is full, whenever :meth:`flush` is called (the sink calls it at
    least every ``flush_interval``), and, with ``"granule"``, when a gap comes (so the gap shows
    between pages). Each page goes out in one ``write`` call on an unbuffered file, so a crash
    leaves at worst a truncated last page, which readers drop. :meth:`finish` fills up to the
    session's end, writes the end marker on the end-of-stream page and closes the file. Not
    thread-safe: the sink locks.
    """

    def __init__(
        self,
        file: BinaryIO,
        *,
        serial: int,
        vendor: str,
        comments: Sequence[str] = (),
        channels: int = CHANNELS,
        pre_skip: int = PRE_SKIP,
        gaps: str = "fill",
    ) -> None:
        if gaps not in GAPS:
            raise ValueError(f"gaps must be one of {', '.join(map(repr, GAPS))}, not {gaps!r}")
        self._file = file
        self.serial = serial & 0xFFFFFFFF
        self.gaps = gaps
        self.end = 0
        """Session sample just after the last packet written (the next contiguous position)."""
        self.packets = 0
        """Packets written, fillers and the end marker left out."""
        self.fillers = 0
        """Filler packets written (``"fill"``): silence and concealment."""
        self.filled = 0
        """Samples covered by filler packets (``"fill"``)."""
        self.pages = 0
        self.closed = False
        self._pending: list[bytes] = []
        self._pending_segments = 0
        self._previous: bytes | None = None  # the last packet written: concealment copies its mode
        self.pending_since: float | None = None
        """``time.monotonic()`` when the first packet of the pending page arrived (None: empty)."""
        tags = [*comments, END_MARKER_TAG] + ([GAPS_TAG] if gaps == "fill" else [])
        self._write_page([opus_head(channels=channels, pre_skip=pre_skip)], 0, FLAG_BOS)
        self._write_page([opus_tags(vendor, tags)], 0, 0)

    def write(self, packet: bytes, position: int, now: float | None = None) -> None:
        """Add ``packet`` (stored as is) starting at session sample ``position``.

        A position before the end of the previous packet (which a validated frame never has) is
        moved to that end: granule positions only increase. With ``"fill"`` a later position is
        reached with silence, rounded to the nearest :data:`FILL_STEP`.
        """
        if self.closed:
            raise ValueError("write to a finished OggOpusWriter")
        if self.gaps == "fill":
            self._fill_to(position, now)
            self._append(packet, _duration(packet), now)
            self._previous = packet
            self.packets += 1
            return
        position = max(position, self.end)
        segments = len(packet) // 255 + 1
        if self._pending and (position != self.end or self._pending_segments + segments > MAX_SEGMENTS):
            self.flush()
        self._pending.append(packet)
        self._pending_segments += segments
        if self.pending_since is None:
            self.pending_since = time.monotonic() if now is None else now
        self.end = position + _duration(packet)
        self.packets += 1

    def lost(self, position: int, samples: int = 960, now: float | None = None) -> None:
        """A frame of ``samples`` starting at ``position`` was lost (the receiver has no Opus for it).

        With ``"fill"`` it is written as a packet that makes the decoder conceal it; with
        ``"granule"`` nothing is written (the next packet's page shows the gap).
        """
        if self.closed:
            raise ValueError("write to a finished OggOpusWriter")
        if self.gaps != "fill":
            return
        self._fill_to(position, now)
        samples = max(FILL_STEP, round(samples / FILL_STEP) * FILL_STEP)
        for packet in concealment_packets(samples, self._previous):
            self._append(packet, opus_packet_samples(packet), now)
            self.fillers += 1
            self.filled += opus_packet_samples(packet)

    def _fill_to(self, position: int, now: float | None) -> None:
        """Silence from :attr:`end` to ``position`` rounded to the nearest :data:`FILL_STEP`."""
        target = (position + FILL_STEP // 2) // FILL_STEP * FILL_STEP
        if target > self.end:
            self._fill_silence(target - self.end, now)

    def _fill_silence(self, samples: int, now: float | None) -> None:
        for packet in silence_packets(samples):
            self._append(packet, opus_packet_samples(packet), now)
            self.fillers += 1
            self.filled += opus_packet_samples(packet)

    def _append(self, packet: bytes, duration: int, now: float | None) -> None:
        """Add ``packet`` to the pending page right after the previous one (a full page is written)."""
        segments = len(packet) // 255 + 1
        if self._pending and self._pending_segments + segments > MAX_SEGMENTS:
            self.flush()
        self._pending.append(packet)
        self._pending_segments += segments
        if self.pending_since is None:
            self.pending_since = time.monotonic() if now is None else now
        self.end += duration

    def flush(self) -> None:
        """Write the pending page now (no-op when nothing is pending)."""
        if self._pending:
            packets = self._pending
            self._pending = []
            self._pending_segments = 0
            self.pending_since = None
            self._write_page(packets, self.end, 0)

    def finish(self, end: int) -> None:
        """Write what is pending, then the end-of-stream page whose granule is ``end``; close the file.

        With ``"fill"``, silence first covers the time up to the end marker. The file is closed
        even when a write fails (the error propagates).
        """
        if self.closed:
            return
        try:
            if self.gaps == "fill":
                # the marker starts on the 2.5 ms grid less than 2.5 ms after end - 960 (trimmed there)
                marker = -(-(end - _duration(END_MARKER)) // FILL_STEP) * FILL_STEP
                if marker > self.end:
                    self._fill_silence(marker - self.end, None)
            self.flush()
            last = self.end
            start = max(last, end - _duration(END_MARKER))
            granule = max(end, last)
            # alone on its page: a gap before it (start > last) or end trimming (granule < start + 960),
            # never both on one page, so a reader can tell them apart
            assert start + _duration(END_MARKER) >= granule or start == end - _duration(END_MARKER)
            self._write_page([END_MARKER], granule, FLAG_EOS)
            self.end = granule
        finally:
            self.closed = True
            self._file.close()

    def close(self) -> None:
        """Close the file without an end-of-stream page (after a failed write)."""
        if not self.closed:
            self.closed = True
            self._pending = []
            self._file.close()

    def _write_page(self, packets: Sequence[bytes], granule: int, flags: int) -> None:
        page = build_page(packets, granule=granule, serial=self.serial, sequence=self.pages, flags=flags)
        self.pages += 1
        written = self._file.write(page)
        if written is not None and written != len(page):  # a raw file may write part of it
            view = memoryview(page)[written:]
            while view:
                n = self._file.write(view)
                if not n:
                    raise OSError(f"could not write an Ogg page to {getattr(self._file, 'name', self._file)}")
                view = view[n:]


# ---------------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class Packet:
    """One audio packet as read: its bytes and where it sits on the timeline (raw granules)."""

    start: int
    end: int
    data: bytes
    page_granule: int
    end_of_stream: bool = False
    filler: bool = False
    """Written to fill a gap (silence or concealment, see :func:`is_filler`), not received."""


@dataclass(slots=True)
class OggOpusStream:
    """An Ogg Opus stream as read by :func:`read_stream`."""

    serial: int
    version: int
    channels: int
    pre_skip: int
    input_sample_rate: int
    output_gain: int
    mapping_family: int
    vendor: str = ""
    comments: list[str] = field(default_factory=list)
    packets: list[Packet] = field(default_factory=list)
    """Every audio packet, the end marker included (see :attr:`has_end_marker`)."""
    granule: int = 0
    """The granule of the last page read: the session's end for a finished file."""
    complete: bool = False
    """Whether the end-of-stream page was read (False for a file cut short by a crash)."""

    @property
    def has_end_marker(self) -> bool:
        """Whether the last packet is the writer's end marker rather than received audio."""
        return (
            self.complete
            and END_MARKER_TAG in self.comments
            and bool(self.packets)
            and self.packets[-1].end_of_stream
            and self.packets[-1].data == END_MARKER
        )

    @property
    def gaps(self) -> str:
        """How the writer wrote gaps: ``"fill"`` (filler packets) or ``"granule"`` (granule jumps)."""
        return "fill" if GAPS_TAG in self.comments else "granule"

    @property
    def audio_packets(self) -> list[Packet]:
        """The packets that were received (the end marker and the fillers left out)."""
        packets = self.packets[:-1] if self.has_end_marker else self.packets
        return [packet for packet in packets if not packet.filler]


def read_stream(path: str | os.PathLike[str]) -> OggOpusStream:
    """Read the (first) Ogg Opus stream in ``path``: headers, tags, packets with their positions.

    Damaged or truncated pages are skipped; a packet whose pages are not all intact is dropped.
    Raises :class:`ValueError` if the file holds no Ogg Opus identification header.
    """
    with open(path, "rb") as f:
        data = f.read()
    stream: OggOpusStream | None = None
    partial = bytearray()
    partial_ok = False
    headers_seen = 0
    prev_granule = 0
    expected_sequence: int | None = None
    for page in iter_pages(data):
        if stream is None:
            if not page.flags & FLAG_BOS or not page.body.startswith(b"OpusHead"):
                continue
            head = page.body
            if len(head) < 19:
                raise ValueError(f"{path}: the OpusHead packet is too short")
            version, channels, pre_skip, rate, gain, family = struct.unpack_from("<BBHIhB", head, 8)
            stream = OggOpusStream(page.serial, version, channels, pre_skip, rate, gain, family)
            headers_seen = 1
            expected_sequence = page.sequence + 1
            continue
        if page.serial != stream.serial:
            continue
        if page.sequence != expected_sequence:
            partial.clear()  # a page went missing: a packet continued from it is incomplete
            partial_ok = False
        expected_sequence = page.sequence + 1
        if not page.flags & FLAG_CONTINUED:
            partial.clear()
            partial_ok = True
        completed: list[bytes] = []
        offset = 0
        for value in page.lacing:
            partial += page.body[offset : offset + value]
            offset += value
            if value < 255:
                if partial_ok:
                    completed.append(bytes(partial))
                partial.clear()
                partial_ok = True
        eos = bool(page.flags & FLAG_EOS)
        if headers_seen == 1 and completed:
            tags = completed.pop(0)
            headers_seen = 2
            stream.vendor, stream.comments = _parse_tags(tags)
        if completed:
            durations = [_duration(p) for p in completed]
            start = max(prev_granule, page.granule - sum(durations))
            fill = GAPS_TAG in stream.comments
            for packet, duration in zip(completed, durations, strict=True):
                filler = fill and is_filler(packet)
                stream.packets.append(Packet(start, start + duration, packet, page.granule, eos, filler))
                start += duration
            prev_granule = max(prev_granule, page.granule)
        stream.granule = max(stream.granule, page.granule if page.granule >= 0 else 0)
        if eos:
            stream.complete = True
            break
    if stream is None:
        raise ValueError(f"{path}: not an Ogg Opus file (no OpusHead page found)")
    return stream


def _parse_tags(packet: bytes) -> tuple[str, list[str]]:
    if not packet.startswith(b"OpusTags"):
        return "", []
    try:
        pos = 8
        (length,) = struct.unpack_from("<I", packet, pos)
        vendor = packet[pos + 4 : pos + 4 + length].decode("utf-8", "replace")
        pos += 4 + length
        (count,) = struct.unpack_from("<I", packet, pos)
        pos += 4
        comments = []
        for _ in range(count):
            (length,) = struct.unpack_from("<I", packet, pos)
            comments.append(packet[pos + 4 : pos + 4 + length].decode("utf-8", "replace"))
            pos += 4 + length
    except struct.error:
        return "", []
    return vendor, comments


def read_packets(path: str | os.PathLike[str]) -> list[tuple[int, bytes]]:
    """``(granule_end_sample, packet)`` for every received packet in ``path``, in order.

    ``granule_end_sample`` is the session sample (48 kHz) just after the packet, so the packet
    starts ``opus_packet_samples(packet)`` (960 for 20 ms) earlier. The end marker and the gap
    fillers are left out.
    """
    return [(p.end, p.data) for p in read_stream(path).audio_packets]


def decode_to_pcm(path: str | os.PathLike[str], *, apply_pre_skip: bool = False) -> bytes:
    """The file's track as 48 kHz s16le PCM from session sample 0 to its last granule.

    Every packet (fillers included) is decoded in order by one
    :class:`listening_core.opus.OpusDecoder` and placed at its position, silence in granule gaps:
    the layout of a WAV track of the same session. With
    ``apply_pre_skip`` the first ``pre_skip`` samples are dropped, as a player does (then sample
    ``t`` is the speaker's audio at session time ``t``, the encoder's delay removed).
    """
    from listening_core.opus import OpusDecoder

    stream = read_stream(path)
    channels = stream.channels if stream.channels in (1, 2) else CHANNELS
    width = 2 * channels
    track = bytearray(stream.granule * width)
    decoder = OpusDecoder(SAMPLE_RATE, channels)
    try:
        for packet in stream.packets:
            try:
                pcm = decoder.decode(packet.data)
            except Exception:
                pcm = bytes((packet.end - packet.start) * width)  # undecodable: silence, as a player would
            start = packet.start * width
            pcm = pcm[: max(0, len(track) - start)]  # end trimming
            track[start : start + len(pcm)] = pcm
    finally:
        decoder.close()
    if apply_pre_skip:
        del track[: stream.pre_skip * width]
    return bytes(track)
