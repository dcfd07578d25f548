"""A lean libopus decoder over ctypes: decode, in-band FEC, packet loss concealment, packet inspection.

Decoding is the real cost of the receive pipeline (see ``docs/voice-protocol.md`` section 5), so
:class:`OpusDecoder` stays as close to a raw libopus call as Python allows: the ctypes signatures
are declared once per loaded library, each decoder owns one preallocated output buffer, and a
decode costs one foreign call plus one :func:`ctypes.string_at` copy into the returned ``bytes``.

Which libopus: the one discord.py uses, so that a bot needs no set-up beyond discord.py's.
:func:`find_libopus` says which and why: the ``LISTENING_CORE_LIBOPUS`` environment variable if
set; else the library discord.py has loaded (``discord.opus.load_opus(path)``, as macOS users
call it, or discord.py's own loading); else the DLL discord.py ships in its wheel on Windows
(``discord/bin/libopus-0.x64.dll``); else the system's (``libopus0`` on Debian/Ubuntu), found
by :func:`ctypes.util.find_library`; else ``libopus.so.0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import logging
import os
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import LibopusNotFound, OpusError

__all__ = [
    "LIBOPUS_ENV",
    "LibopusNotFound",
    "LibopusSource",
    "OpusDecoder",
    "OpusError",
    "find_libopus",
    "libopus_version",
    "load_libopus",
    "packet_has_fec",
    "packet_samples",
]

_log = logging.getLogger(__name__)

LIBOPUS_ENV = "LISTENING_CORE_LIBOPUS"
"""Environment variable naming the libopus shared library to load (a path or a soname)."""

_INSTALL_HINT = (
    "install libopus: `apt-get install libopus0` (Debian/Ubuntu), `dnf install opus` (Fedora/RHEL), "
    f"`brew install opus` (macOS); or set {LIBOPUS_ENV} to the path of libopus "
    "(`listening doctor` checks it)"
)

# opus_defines.h
_OPUS_OK = 0
_OPUS_BAD_ARG = -1
_OPUS_INVALID_PACKET = -4
_OPUS_RESET_STATE = 4028

_SAMPLE_RATES = frozenset((8000, 12000, 16000, 24000, 48000))
_MAX_PACKET_MS = 120  # the longest duration one Opus packet can hold
_MAX_FRAMES = 48  # the most frames one Opus packet can hold (48 x 2.5 ms)


def _error(lib: ctypes.CDLL, code: int, what: str) -> OpusError:
    reason = lib.opus_strerror(code)
    text = reason.decode("ascii", "replace") if reason else "unknown error"
    return OpusError(code, f"{what}: {text} (libopus error {code})")


def _declare(lib: ctypes.CDLL) -> None:
    """Set argtypes/restype of every libopus function this module calls, once per loaded library."""
    c_int, c_int32, c_void_p, c_char_p = ctypes.c_int, ctypes.c_int32, ctypes.c_void_p, ctypes.c_char_p
    signatures: list[tuple[str, list[type[ctypes._CData]], type[ctypes._CData] | None]] = [
        ("opus_get_version_string", [], c_char_p),
        ("opus_strerror", [c_int], c_char_p),
        ("opus_decoder_create", [c_int32, c_int, ctypes.POINTER(c_int)], c_void_p),
        ("opus_decode", [c_void_p, c_char_p, c_int32, ctypes.POINTER(ctypes.c_int16), c_int, c_int], c_int),
        ("opus_decoder_ctl", [c_void_p, c_int], c_int),
        ("opus_decoder_destroy", [c_void_p], None),
        ("opus_packet_get_nb_samples", [c_char_p, c_int32, c_int32], c_int),
        (
            "opus_packet_parse",
            [c_char_p, c_int32, c_void_p, c_void_p, ctypes.POINTER(ctypes.c_int16), ctypes.POINTER(c_int)],
            c_int,
        ),
    ]
    for name, argtypes, restype in signatures:
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    if hasattr(lib, "opus_packet_has_lbrr"):  # libopus >= 1.5; only tests call it
        lib.opus_packet_has_lbrr.argtypes = [c_char_p, c_int32]
        lib.opus_packet_has_lbrr.restype = c_int


@functools.cache
def _open(name: str) -> ctypes.CDLL:
    try:
        # our own CDLL object: its argtypes never clash with discord.py's loading of the same library
        lib = ctypes.CDLL(name)
        _declare(lib)
    except (OSError, AttributeError) as exc:
        raise LibopusNotFound(f"could not load libopus from {name!r} ({exc}); {_INSTALL_HINT}") from exc
    _log.debug("loaded %s from %r", lib.opus_get_version_string().decode(), name)
    return lib


@dataclass(frozen=True)
class LibopusSource:
    """Which libopus :func:`load_libopus` loads, and why."""

    name: str
    """The path or soname handed to :class:`ctypes.CDLL`."""
    origin: str
    """Where it comes from, in words: ``"LISTENING_CORE_LIBOPUS"``, ``"loaded by discord.py"``,
    ``"shipped with discord.py"``, ``"found by ctypes.util.find_library"`` or ``"default soname"``."""


def _discord_loaded() -> str | None:
    """The library discord.py has loaded (``discord.opus._lib``), if discord.py is imported and has one."""
    module = sys.modules.get("discord.opus")  # never imported for this: decoding workers stay light
    name = getattr(getattr(module, "_lib", None), "_name", None)
    return name if isinstance(name, str) and name else None


def _discord_dir() -> Path | None:
    """Where discord.py is installed, found without importing it."""
    try:
        spec = importlib.util.find_spec("discord")
    except (ImportError, ValueError):
        return None
    locations = spec.submodule_search_locations if spec is not None else None
    return Path(next(iter(locations))) if locations else None


def _discord_shipped(platform: str, discord_dir: Path | None) -> str | None:
    """The libopus DLL in discord.py's wheel, which exists (and is what discord.py loads) on Windows."""
    if platform != "win32" or discord_dir is None:
        return None
    target = "x64" if struct.calcsize("P") * 8 > 32 else "x86"
    dll = discord_dir / "bin" / f"libopus-0.{target}.dll"
    return str(dll) if dll.is_file() else None


@functools.cache
def _search() -> LibopusSource:
    # find_library runs ldconfig (or a compiler) in a subprocess: search once per process
    found = ctypes.util.find_library("opus")
    if found:
        return LibopusSource(found, "found by ctypes.util.find_library")
    return LibopusSource("libopus.so.0", "default soname")


def find_libopus(
    *,
    environ: Mapping[str, str] | None = None,
    platform: str | None = None,
    discord_dir: Path | None = None,
    search: Callable[[], LibopusSource] | None = None,
) -> LibopusSource:
    """The libopus :func:`load_libopus` loads when given no path, and where it comes from.

    In order: ``LISTENING_CORE_LIBOPUS``; the library discord.py has loaded; on Windows, the DLL
    in discord.py's wheel (``discord/bin/libopus-0.x64.dll``, or ``x86``); what
    :func:`ctypes.util.find_library` finds for ``opus``; ``libopus.so.0``. The keywords stand in
    for this process's (``os.environ``, ``sys.platform``, discord.py's folder, the system search).
    """
    configured = (os.environ if environ is None else environ).get(LIBOPUS_ENV)
    if configured:
        return LibopusSource(configured, LIBOPUS_ENV)
    loaded = _discord_loaded()
    if loaded:
        return LibopusSource(loaded, "loaded by discord.py")
    shipped = _discord_shipped(
        sys.platform if platform is None else platform, _discord_dir() if discord_dir is None else discord_dir
    )
    if shipped:
        return LibopusSource(shipped, "shipped with discord.py")
    return (search or _search)()


def load_libopus(path: str | None = None) -> ctypes.CDLL:
    """The libopus shared library, loaded once per process and path, with its signatures declared.

    `path` is a file path or soname; without it, the library :func:`find_libopus` names (the one
    discord.py uses, unless ``LISTENING_CORE_LIBOPUS`` says otherwise). A library that discord.py
    loaded from a path the system search would not find is also put in ``LISTENING_CORE_LIBOPUS``
    for the decoding worker processes, which start without discord.py. Raises :class:`LibopusNotFound` (saying
    how to install libopus) if it cannot be loaded.
    """
    if path is not None:
        return _open(path)
    source = find_libopus()
    lib = _open(source.name)
    if source.origin == "loaded by discord.py" and source.name != _search().name:
        os.environ[LIBOPUS_ENV] = source.name
    return lib


def libopus_version() -> str:
    """Version string of the loaded libopus, e.g. ``"libopus 1.3.1"``."""
    version: bytes = load_libopus().opus_get_version_string()
    return version.decode("ascii", "replace")


def packet_samples(packet: bytes, sample_rate: int = 48000) -> int:
    """Samples per channel that `packet` decodes to at `sample_rate` (e.g. 960 for 20 ms at 48 kHz).

    Reads only the TOC byte and frame count; raises :class:`OpusError` if they are invalid (empty
    packet, zero frames, more than 120 ms). A full check of the framing is :class:`OpusDecoder`'s.
    """
    lib = load_libopus()
    if not packet:
        raise OpusError(_OPUS_BAD_ARG, "empty Opus packet")
    samples: int = lib.opus_packet_get_nb_samples(packet, len(packet), sample_rate)
    if samples <= 0:
        # libopus counts a code-3 packet announcing 0 frames as 0 samples: invalid too (RFC 6716 R5)
        raise _error(lib, samples if samples < 0 else _OPUS_INVALID_PACKET, "invalid Opus packet")
    return samples


def packet_has_fec(packet: bytes) -> bool:
    """Whether `packet` carries in-band FEC (SILK LBRR data) for the frame sent just before it.

    When that frame is lost, ``OpusDecoder.decode_fec(packet)`` rebuilds it from this data; with
    no FEC it can only conceal. CELT-only packets never carry FEC. Raises :class:`OpusError` if
    the packet's framing is invalid.
    """
    lib = load_libopus()
    if not packet:
        raise OpusError(_OPUS_BAD_ARG, "empty Opus packet")
    # not libopus's own opus_packet_has_lbrr (>= 1.5), which answers 0 for any CELT-only TOC without
    # checking the framing: the same answers, and the same errors, on every libopus version
    return _packet_has_lbrr(lib, packet)


def _packet_has_lbrr(lib: ctypes.CDLL, packet: bytes) -> bool:
    """`opus_packet_has_lbrr` of libopus >= 1.5, plus a check of the framing; `packet` is not empty.

    RFC 6716 section 4.2.3-4.2.4: a SILK-only or hybrid frame starts with, per channel (mid, then
    side in a stereo stream), one VAD flag per SILK frame (1 for 10 and 20 ms, 2 for 40 ms, 3 for
    60 ms) and then one LBRR flag, all range-coded with probability 1/2, which in the first byte of
    the frame read as plain bits from the top. Only the packet's first Opus frame matters: FEC
    rebuilds the frame before the packet from it.
    """
    toc = packet[0]
    frame = _first_frame(lib, packet)  # validates the framing, whatever the mode
    if toc & 0x80 or not frame:  # configs 16..31 are CELT-only; an empty frame (DTX) carries nothing
        return False
    config = toc >> 3
    # SILK-only configs 0..11 cycle through 10/20/40/60 ms frames; hybrid 12..15 are 10/20 ms
    silk_frames = (1, 1, 2, 3)[config & 3] if config < 12 else 1
    lbrr = (frame[0] >> (7 - silk_frames)) & 1
    if toc & 0x04:  # stereo: the side channel's VAD flags and LBRR flag follow the mid channel's
        lbrr |= (frame[0] >> (6 - 2 * silk_frames)) & 1
    return bool(lbrr)


def _first_frame(lib: ctypes.CDLL, packet: bytes) -> bytes:
    sizes = (ctypes.c_int16 * _MAX_FRAMES)()
    payload_offset = ctypes.c_int()
    count: int = lib.opus_packet_parse(packet, len(packet), None, None, sizes, ctypes.byref(payload_offset))
    if count <= 0:
        raise _error(lib, count if count < 0 else _OPUS_INVALID_PACKET, "invalid Opus packet")
    start = payload_offset.value
    return packet[start : start + sizes[0]]


class OpusDecoder:
    """One libopus decoder: one Opus stream (one SSRC) decoded in order into s16le interleaved PCM.

    Decoding is stateful: feed a decoder its own stream in sequence order, and on loss call
    :meth:`decode_fec` (if the next packet is at hand) or :meth:`conceal` once per lost frame. The
    output buffer is reused across calls, so one decoder must not be used by two threads at once.
    Every method raises :class:`OpusError` when libopus refuses the packet.
    """

    __slots__ = (
        "_buffer",
        "_bytes_per_sample",
        "_channels",
        "_decode",
        "_lib",
        "_max_samples",
        "_sample_rate",
        "_state",
    )

    def __init__(self, sample_rate: int = 48000, channels: int = 2) -> None:
        if sample_rate not in _SAMPLE_RATES:
            raise ValueError(f"libopus decodes at 8000, 12000, 16000, 24000 or 48000 Hz, not {sample_rate}")
        if channels not in (1, 2):
            raise ValueError(f"libopus decodes to 1 or 2 channels, not {channels}")
        self._state: int | None = None
        lib = load_libopus()
        error = ctypes.c_int(_OPUS_OK)
        state: int | None = lib.opus_decoder_create(sample_rate, channels, ctypes.byref(error))
        if error.value != _OPUS_OK or not state:
            raise _error(lib, error.value or _OPUS_BAD_ARG, "could not create an Opus decoder")
        self._state = state
        self._lib = lib
        self._decode = lib.opus_decode
        self._sample_rate = sample_rate
        self._channels = channels
        self._bytes_per_sample = 2 * channels
        self._max_samples = sample_rate * _MAX_PACKET_MS // 1000
        self._buffer = (ctypes.c_int16 * (self._max_samples * channels))()

    @property
    def sample_rate(self) -> int:
        """Output sample rate in Hz."""
        return self._sample_rate

    @property
    def channels(self) -> int:
        """Output channels (interleaved)."""
        return self._channels

    def decode(self, packet: bytes) -> bytes:
        """Decode one Opus packet: 3840 bytes for a 20 ms frame at 48 kHz stereo."""
        if not packet:
            # libopus would silently conceal an empty packet
            raise OpusError(_OPUS_BAD_ARG, "empty Opus packet; call conceal() for a lost frame")
        state = self._state
        if state is None:
            raise ValueError("decode on a closed OpusDecoder")
        samples: int = self._decode(state, packet, len(packet), self._buffer, self._max_samples, 0)
        if samples < 0:
            raise _error(self._lib, samples, "could not decode Opus packet")
        return ctypes.string_at(self._buffer, samples * self._bytes_per_sample)

    def decode_fec(self, next_packet: bytes, samples: int = 960) -> bytes:
        """Rebuild the lost frame just before `next_packet` from its in-band FEC; `samples` per channel.

        `samples` is the lost frame's duration (960 for 20 ms at 48 kHz). Without FEC data in
        `next_packet` (see :func:`packet_has_fec`) libopus conceals instead, as :meth:`conceal`. Then
        decode `next_packet` itself with :meth:`decode`.
        """
        if not next_packet:
            raise OpusError(_OPUS_BAD_ARG, "empty Opus packet; call conceal() for a lost frame")
        return self._run(next_packet, samples, 1)

    def conceal(self, samples: int = 960) -> bytes:
        """Packet loss concealment for one lost frame of `samples` per channel (a multiple of 2.5 ms)."""
        return self._run(None, samples, 0)

    def _run(self, packet: bytes | None, samples: int, fec: int) -> bytes:
        state = self._state
        if state is None:
            raise ValueError("decode on a closed OpusDecoder")
        if not 0 < samples <= self._max_samples:
            raise ValueError(
                f"samples must be in 1..{self._max_samples} at {self._sample_rate} Hz, not {samples}"
            )
        length = len(packet) if packet is not None else 0
        decoded: int = self._decode(state, packet, length, self._buffer, samples, fec)
        if decoded < 0:
            raise _error(self._lib, decoded, "could not recover lost Opus frame")
        return ctypes.string_at(self._buffer, decoded * self._bytes_per_sample)

    def reset(self) -> None:
        """Forget the stream's history (``OPUS_RESET_STATE``), e.g. when a new stream starts on this SSRC."""
        state = self._state
        if state is None:
            raise ValueError("reset on a closed OpusDecoder")
        result: int = self._lib.opus_decoder_ctl(state, _OPUS_RESET_STATE)
        if result != _OPUS_OK:
            raise _error(self._lib, result, "could not reset Opus decoder")

    def close(self) -> None:
        """Free the libopus decoder; safe to call more than once. The decoder is unusable afterwards."""
        state = getattr(self, "_state", None)
        if state is not None:
            self._state = None
            self._lib.opus_decoder_destroy(state)

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        status = " closed" if self._state is None else ""
        return f"<OpusDecoder {self._sample_rate} Hz {self._channels} ch{status}>"
