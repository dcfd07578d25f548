"""Making a file left behind by a killed process whole again: :func:`recover_file`.

WAV (RIFF or RF64: sizes set from the file's length), FLAC (re-encoded up to the first damaged
frame) and MP3 (readable as it is). Used by the file sinks' ``recover`` helpers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
from typing import Any

from ..errors import SinkError
from .audiofile import _JUNK_FOR_DS64, _U32

__all__ = ["recover_file"]


def recover_file(path: str | os.PathLike[str]) -> int:
    """Make a file left behind by a killed process readable; returns the samples it now holds.

    - **WAV**: the RIFF and ``data`` sizes are set from the file's length (a partial last sample
      is cut off), in 64 bits: a file past 4 GiB becomes (or stays) RF64, its ``ds64`` chunk
      written where the header kept room for it; a WAV written before there was such room (an
      older listening-core past 4 GiB) is copied into an RF64 file that replaces it. PCM goes
      to the operating system as it is written, so everything written before the kill is kept.
      (libsndfile reads a file under 4 GiB even unrepaired, to its last flush; other readers
      need the sizes.)
    - **FLAC**: libFLAC writes the stream's length into its header only when the file is
      closed. The file is decoded up to the first damaged frame and re-encoded, losslessly,
      into a complete FLAC that replaces it (through a temporary file next to it). Lost: the
      samples the encoder still held (at most about 0.1 s).
    - **MP3**: already readable (a stream of frames); nothing to change. Lost: the samples LAME
      still held (a few frames).

    A file that was closed properly is left as it is. Idempotent.
    """
    import soundfile

    path = pathlib.Path(path)
    with path.open("rb") as fh:
        magic = fh.read(12)
    if magic[:4] in (b"RIFF", b"RF64") and magic[8:12] == b"WAVE":
        return _recover_wav(path)
    if magic[:4] == b"fLaC":
        return _recover_flac(path)
    with soundfile.SoundFile(str(path)) as f:
        return _count_readable(f)


def _count_readable(f: Any, sink: Any = None, blocksize: int = 4096) -> int:
    total = 0
    while True:
        try:
            block = f.read(blocksize, dtype="int16", always_2d=True)
        except Exception:  # a damaged last frame: everything before it counts
            break
        if not len(block):
            break
        if sink is not None:
            sink.write(block)
        total += len(block)
    return total


def _recover_wav(path: pathlib.Path) -> int:
    """Set a WAV's sizes from its length (see :func:`recover_file`); 64-bit throughout."""
    import struct

    with path.open("r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(0)
        rf64 = fh.read(4) == b"RF64"
        chunks: list[tuple[bytes, int, int]] = []  # (id, offset, size) of the chunks before the data
        fmt = ds64 = b""
        pos = 12
        while True:
            fh.seek(pos)
            head = fh.read(8)
            if len(head) < 8:
                raise SinkError(f"{path}: no data chunk; nothing to recover")
            chunk_id = head[:4]
            chunk_size: int = struct.unpack("<I", head[4:])[0]
            if chunk_id == b"data":
                data_start = pos + 8
                break
            if chunk_id == b"fmt ":
                fmt = fh.read(min(chunk_size, 64))
            elif chunk_id == b"ds64":
                ds64 = fh.read(min(chunk_size, 64))
            chunks.append((chunk_id, pos, chunk_size))
            pos += 8 + chunk_size + chunk_size % 2
        if len(fmt) < 14 or not struct.unpack("<H", fmt[12:14])[0]:
            raise SinkError(f"{path}: no fmt chunk before the data; not a WAV file this can repair")
        block_align: int = struct.unpack("<H", fmt[12:14])[0]
        declared: int = chunk_size
        if rf64 and chunk_size == _U32:
            if len(ds64) < 24:
                raise SinkError(f"{path}: an RF64 file without a ds64 chunk; not a WAV file this can repair")
            declared = struct.unpack("<Q", ds64[8:16])[0]
        data_size = (size - data_start) // block_align * block_align
        end = data_start + declared + declared % 2
        if declared != data_size and declared not in (0, _U32) and end < size and _chunks_to(fh, end, size):
            # a complete data chunk followed by other chunks: the file was closed properly
            return declared // block_align
        frames = data_size // block_align
        riff_size = data_start + data_size - 8
        if rf64 or riff_size > _U32:
            header = _rf64_header(fh, chunks, data_start, riff_size, data_size, frames)
            if header is None:  # no room for a ds64 chunk: rewrite the file with one
                fh.close()
                _rewrite_as_rf64(path, chunks, data_start, data_size, frames)
                return frames
            fh.truncate(data_start + data_size)
            fh.seek(0)
            if fh.read(len(header)) != header:
                fh.seek(0)
                fh.write(header)
            return frames
        if declared != data_size or struct.unpack("<I", _read_at(fh, 4, 4))[0] != riff_size:
            fh.truncate(data_start + data_size)
            fh.seek(data_start - 4)
            fh.write(struct.pack("<I", data_size))
            fh.seek(4)
            fh.write(struct.pack("<I", riff_size))
        return frames


def _read_at(fh: Any, offset: int, n: int) -> bytes:
    fh.seek(offset)
    data: bytes = fh.read(n)
    return data


def _chunks_to(fh: Any, pos: int, size: int) -> bool:
    """Whether the bytes from ``pos`` on are RIFF chunks ending with the file (not more samples)."""
    import struct

    for _ in range(64):
        if pos >= size:
            return pos - size in (0, 1)  # the last chunk's pad byte may be missing
        head = _read_at(fh, pos, 8)
        if len(head) < 8 or not all(0x20 <= c <= 0x7E for c in head[:4]):
            return False
        chunk_size = struct.unpack("<I", head[4:])[0]
        pos += 8 + chunk_size + chunk_size % 2
    return False


# Chunks a header rewritten as RF64 leaves out: room kept for a ds64, padding, and the 32-bit
# sample count that the ds64 replaces.
_DROPPED_CHUNKS = frozenset({b"ds64", b"JUNK", b"junk", b"PAD ", b"FLLR", b"fact"})


def _rf64_prefix(
    fh: Any, chunks: list[tuple[bytes, int, int]], riff_size: int, data_size: int, frames: int
) -> bytes:
    """RF64 marker, ds64 and the chunks that stay (``fmt`` and any others), as they go before the data."""
    import struct

    kept = b"".join(
        _read_at(fh, offset, 8 + n + n % 2)
        for chunk_id, offset, n in chunks
        if chunk_id not in _DROPPED_CHUNKS
    )
    ds64 = struct.pack("<4sIQQQI", b"ds64", _JUNK_FOR_DS64, riff_size, data_size, frames, 0)
    return struct.pack("<4sI4s", b"RF64", _U32, b"WAVE") + ds64 + kept


def _rf64_header(
    fh: Any,
    chunks: list[tuple[bytes, int, int]],
    data_start: int,
    riff_size: int,
    data_size: int,
    frames: int,
) -> bytes | None:
    """The file's header as RF64, in the room its header has now (``data_start`` bytes), or None."""
    import struct

    prefix = _rf64_prefix(fh, chunks, riff_size, data_size, frames)
    room = data_start - 8 - len(prefix)
    if room == 0:
        filler = b""
    elif room >= 8:
        filler = struct.pack("<4sI", b"JUNK", room - 8) + bytes(room - 8)
    else:
        return None
    return prefix + filler + struct.pack("<4sI", b"data", _U32)


def _next_data(fh: Any, pos: int, end: int) -> int:
    """Where data starts at or after ``pos`` in ``fh`` (``end`` if only a hole is left); ``pos``
    where the file system cannot say (no SEEK_DATA)."""
    seek_data = getattr(os, "SEEK_DATA", None)
    if seek_data is None:
        return pos
    try:
        return min(end, os.lseek(fh.fileno(), pos, seek_data))
    except OSError as exc:
        return end if exc.errno == errno.ENXIO else pos


def _rewrite_as_rf64(
    path: pathlib.Path, chunks: list[tuple[bytes, int, int]], data_start: int, data_size: int, frames: int
) -> None:
    """Copy a WAV whose header has no room for a ds64 (one written before RF64) into an RF64 file."""
    import shutil
    import struct

    tmp = path.with_name(f".{path.name}.recovering")
    try:
        # unbuffered: _next_data moves the descriptor's offset, every read seeks first
        with path.open("rb", buffering=0) as src, tmp.open("wb") as dst:
            riff_size = len(_rf64_prefix(src, chunks, 0, data_size, frames)) + data_size
            dst.write(
                _rf64_prefix(src, chunks, riff_size, data_size, frames) + struct.pack("<4sI", b"data", _U32)
            )
            pos, end = data_start, data_start + data_size
            zeros = bytes(1 << 20)
            while pos < end:
                data = _next_data(src, pos, end)  # a hole (silence) stays a hole
                if data > pos:
                    dst.seek(data - pos, os.SEEK_CUR)
                    pos = data
                    continue
                src.seek(pos)
                block = src.read(min(end - pos, len(zeros)))
                if not block:
                    raise SinkError(f"{path} shrank while being recovered")
                if block == (zeros if len(block) == len(zeros) else bytes(len(block))):
                    dst.seek(len(block), os.SEEK_CUR)  # so do zeros written out
                else:
                    dst.write(block)
                pos += len(block)
            dst.truncate()
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copymode(path, tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)


def _recover_flac(path: pathlib.Path) -> int:
    import soundfile

    with soundfile.SoundFile(str(path)) as reader:
        if 0 <= reader.frames < 2**62:  # the header knows its length: closed properly
            return int(reader.frames)
        tmp = path.with_name(f".{path.name}.recovering")
        try:
            with soundfile.SoundFile(
                str(tmp),
                "w",
                samplerate=reader.samplerate,
                channels=reader.channels,
                format="FLAC",
                subtype=reader.subtype,
            ) as writer:
                total = _count_readable(reader, writer, blocksize=1024)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    os.replace(tmp, path)
    return total
