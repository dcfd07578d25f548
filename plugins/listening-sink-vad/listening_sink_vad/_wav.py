"""A streaming 16-bit PCM WAV writer that stays readable after a crash.

The RIFF and ``data`` sizes in the header are rewritten at every :meth:`WavWriter.flush`, so a
file left behind by a killed process is a valid WAV holding everything up to the last flush.
Writes go straight to the operating system (no user-space buffer), so :attr:`data_bytes` is
exactly what the OS accepted: after a failing write (disk full) the header can still be made
to describe what is on disk, and nothing already written is lost.

:func:`repair_wav` rewrites the header of a file that was not closed to cover every whole
sample frame on disk (the audio written after the last flush, if the OS kept it).
"""

from __future__ import annotations

import os
import pathlib
import struct

__all__ = ["MAX_DATA_BYTES", "WavWriter", "repair_wav"]

HEADER_BYTES = 44
MAX_DATA_BYTES = 0xFFFFFFFF - 36
"""The largest ``data`` chunk a RIFF size field can describe (about 6.2 h of 48 kHz stereo)."""


def _header(channels: int, sample_rate: int, data_bytes: int) -> bytes:
    block = channels * 2
    size = min(data_bytes, MAX_DATA_BYTES)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
        + b"data"
        + struct.pack("<I", size)
    )


class WavWriter:
    """16-bit PCM WAV at ``path`` (replaced if it exists; a symlink is followed)."""

    def __init__(self, path: str | os.PathLike[str], *, channels: int, sample_rate: int) -> None:
        self.path = pathlib.Path(path)
        self.channels = channels
        self.sample_rate = sample_rate
        self.data_bytes = 0
        self.closed = False
        self._flushed_bytes = -1
        self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        try:
            self._write_all(_header(channels, sample_rate, 0))
        except BaseException:
            self._file.close()
            self.closed = True
            raise

    @property
    def frames(self) -> int:
        """Sample frames (samples per channel) written."""
        return self.data_bytes // (self.channels * 2)

    def _write_all(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        done = 0
        while done < len(view):
            n = self._file.write(view[done:])
            if not n:
                raise OSError(f"could not write to {self.path}")
            done += n
        return done

    def write(self, pcm: bytes | memoryview) -> None:
        """Append interleaved s16le samples. On error, :attr:`data_bytes` counts what was written."""
        if self.closed:
            raise ValueError(f"{self.path} is closed")
        view = memoryview(pcm)
        try:
            while view:
                n = self._file.write(view)
                if not n:
                    raise OSError(f"could not write to {self.path}")
                self.data_bytes += n
                view = view[n:]
        except BaseException:
            self._trim_partial()
            raise

    def _trim_partial(self) -> None:
        # Keep the header on a whole sample frame, whatever part of a frame the OS took.
        self.data_bytes -= self.data_bytes % (self.channels * 2)

    def flush(self) -> None:
        """Make the header describe everything written so far (the file is readable up to here)."""
        if self.closed or self._flushed_bytes == self.data_bytes:
            return
        header = _header(self.channels, self.sample_rate, self.data_bytes)
        fd = self._file.fileno()
        os.pwrite(fd, header[4:8], 4)
        os.pwrite(fd, header[40:44], 40)
        self._flushed_bytes = self.data_bytes

    def close(self) -> None:
        """Flush the header and close (idempotent). The file is closed even if the flush fails."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            self._file.close()


def repair_wav(path: str | os.PathLike[str]) -> int:
    """Make the header of a 16-bit PCM WAV written by :class:`WavWriter` cover the whole file.

    For a file whose writer did not close it (the process was killed): the audio after the last
    flush is kept if the operating system wrote it. Returns the sample frames the file now holds.
    """
    path = pathlib.Path(path)
    with open(path, "r+b") as f:
        head = f.read(HEADER_BYTES)
        if (
            len(head) < HEADER_BYTES
            or head[:4] != b"RIFF"
            or head[8:16] != b"WAVEfmt "
            or head[36:40] != b"data"
        ):
            raise ValueError(f"{path} is not a WAV file written by this sink")
        channels = int(struct.unpack_from("<H", head, 22)[0])
        block = channels * 2
        size = f.seek(0, os.SEEK_END) - HEADER_BYTES
        size = min(size - size % block, MAX_DATA_BYTES - MAX_DATA_BYTES % block)
        f.seek(4)
        f.write(struct.pack("<I", 36 + size))
        f.seek(40)
        f.write(struct.pack("<I", size))
    return size // block
