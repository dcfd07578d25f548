"""One user's track on disk: :class:`AudioFile`, and converting finished files.

- :class:`AudioFile`: one user's track streamed to disk through soundfile as frames arrive,
  silence where the user was silent, so tracks drop into an editor side by side; mono or
  stereo, 48 kHz or resampled (:mod:`listening_core.resample`); :meth:`AudioFile.convert`. Any
  length: a WAV is RIFF under 4 GiB and RF64 past it (16-bit PCM WAV is written by
  ``_WavWriter`` here, every other format by libsndfile).
- :func:`convert_file`, :data:`FILE_FORMATS`; the MP3 helpers :data:`MP3_SAMPLE_RATES`,
  :func:`mp3_bitrates` and :func:`mp3_compression_level`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
from typing import Any

from ..errors import SinkError
from ..frames import CHANNELS, SAMPLE_RATE, AudioFrame

__all__ = [
    "FILE_FORMATS",
    "MP3_SAMPLE_RATES",
    "AudioFile",
    "convert_file",
    "mp3_bitrates",
    "mp3_compression_level",
]


# --------------------------------------------------------------------------------------- formats

FILE_FORMATS: dict[str, tuple[str, str | None, str]] = {
    "wav": ("WAV", "PCM_16", ".wav"),
    "flac": ("FLAC", "PCM_16", ".flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", ".mp3"),
    "ogg": ("OGG", "VORBIS", ".ogg"),
    "opus": ("OGG", "OPUS", ".opus"),
}
"""Format names accepted by :func:`convert_file` / :meth:`AudioFile.convert`: soundfile's
``(format, subtype, extension)`` for each."""

MP3_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
"""The sample rates MPEG Layer III can store (MPEG-1, -2 and -2.5)."""

_MP3_BITRATES = {
    1: (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),  # MPEG-1: 32-48 kHz
    2: (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),  # MPEG-2: 16-24 kHz
    3: (8, 16, 24, 32, 40, 48, 56, 64),  # MPEG-2.5: 8-12 kHz
}
_MP3_RANGE = {1: (32, 320), 2: (8, 160), 3: (8, 64)}


def _mp3_version(sample_rate: int) -> int:
    return 1 if sample_rate >= 32000 else 2 if sample_rate >= 16000 else 3


def mp3_bitrates(sample_rate: int) -> tuple[int, ...]:
    """The constant bitrates (kbit/s) an MP3 at ``sample_rate`` can use."""
    return _MP3_BITRATES[_mp3_version(sample_rate)]


def mp3_compression_level(bitrate: int, sample_rate: int) -> float:
    """soundfile's ``compression_level`` (0…1) that makes libsndfile's LAME encoder use ``bitrate``.

    libsndfile maps the level linearly onto the bitrates of the MPEG version the sample rate
    implies and truncates: ``kbps = int(high - level * (high - low))`` with ``(low, high)`` =
    (32, 320) for 32-48 kHz (MPEG-1), (8, 160) for 16-24 kHz (MPEG-2), (8, 64) below (MPEG-2.5).
    This is the inverse, nudged so the truncation lands on ``bitrate``.
    """
    version = _mp3_version(sample_rate)
    if bitrate not in _MP3_BITRATES[version]:
        raise ValueError(
            f"bitrate {bitrate} kbit/s is not an MP3 bitrate at {sample_rate} Hz; use one of "
            + ", ".join(map(str, _MP3_BITRATES[version]))
        )
    low, high = _MP3_RANGE[version]
    return min(1.0, max(0.0, (high - bitrate - 1e-6) / (high - low)))


# libsndfile's SFC_UPDATE_HEADER_NOW: rewrite the header of a file being written.
_SFC_UPDATE_HEADER_NOW = 0x1060
_SFC_RF64_AUTO_DOWNGRADE = 0x1210  # sndfile.h; sf_command returns the new setting
_HEADER_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "W64", "AIFF", "CAF", "AU"})


def _rf64_auto_downgrade(sf_file: Any) -> None:
    """Have libsndfile write an RF64 file as a RIFF WAVE while it holds under 4 GiB."""
    import soundfile

    if not soundfile._snd.sf_command(sf_file._file, _SFC_RF64_AUTO_DOWNGRADE, soundfile._ffi.NULL, 1):
        raise SinkError("libsndfile refused SFC_RF64_AUTO_DOWNGRADE")


def _update_header(sf_file: object) -> None:
    """Make the on-disk header of a PCM container describe what is written so far (best effort)."""
    try:
        import soundfile

        snd, ffi = soundfile._snd, soundfile._ffi
        snd.sf_command(sf_file._file, _SFC_UPDATE_HEADER_NOW, ffi.NULL, 0)  # type: ignore[attr-defined]
    except Exception:  # a soundfile without these internals: recover_file() fixes the header instead
        pass


_SFE_SYSTEM = 2  # libsndfile's "System error": the operating system refused (disk full, EFBIG...)


def _error_text(exc: BaseException, sf_file: Any = None) -> str:
    """``exc`` as text, with libsndfile's own account of a system error ("No space left on device").

    soundfile reports a failing write or open as "System error." only; libsndfile keeps the
    operating system's message (for ``sf_file``, or from the last failed open).
    """
    text = f"{type(exc).__name__}: {exc}"
    if getattr(exc, "code", None) != _SFE_SYSTEM:
        return text
    try:
        import soundfile

        handle = sf_file._file if sf_file is not None else soundfile._ffi.NULL
        detail = soundfile._ffi.string(soundfile._snd.sf_strerror(handle)).decode(errors="replace")
    except Exception:  # a soundfile without these internals: the short message it is
        return text
    return f"{text} ({detail})" if detail and detail != "No Error." and detail not in text else text


# --------------------------------------------------------------------------------------- WAV files
#
# A RIFF WAVE file cannot describe more than 4 GiB (its sizes are 32 bits): 6.2 hours of 48 kHz
# stereo. RF64 (EBU Tech 3306) lifts that: "RF64" instead of "RIFF", and a ``ds64`` chunk, first
# after "WAVE", with the sizes in 64 bits. A file that may grow past 4 GiB reserves the ds64's
# room with a ``JUNK`` chunk of the same size (36 bytes), which every WAV reader skips; as long
# as the file stays under 4 GiB it is an ordinary RIFF WAVE (PCM ``fmt``, 80-byte header); when
# it outgrows that, the header is rewritten in place as RF64 (RIFF→RF64, JUNK→ds64), nothing moves.
#
# libsndfile can do this itself (format RF64, SFC_RF64_AUTO_DOWNGRADE), but its short files are
# not the WAV they were: a WAVE_FORMAT_EXTENSIBLE ``fmt`` and a ``fact`` chunk (112-byte header),
# which Python 3.11's ``wave`` module refuses ("unknown format: 65534"). So 16-bit PCM WAV, what
# every WAV sink writes, is written by :class:`_WavWriter`; libsndfile's RF64 is kept for the
# other WAV subtypes AudioFile may be asked for.

_U32 = 0xFFFFFFFF
_JUNK_FOR_DS64 = 28  # a ds64 chunk's payload with no table: RIFF size, data size, sample count, table length
_WAV_HEADER_BYTES = 12 + 8 + _JUNK_FOR_DS64 + 8 + 16 + 8  # RIFF/RF64, JUNK/ds64, fmt, data chunk header


def _wav_header(channels: int, sample_rate: int, data_bytes: int) -> bytes:
    """The 80-byte header of a 16-bit PCM WAV holding ``data_bytes`` of samples: RIFF (with the
    JUNK chunk that keeps room for a ds64) while it fits in 32 bits, RF64 beyond."""
    import struct

    align = 2 * channels
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, sample_rate, sample_rate * align, align, 16)
    riff_size = _WAV_HEADER_BYTES - 8 + data_bytes + data_bytes % 2
    if riff_size <= _U32:
        return (
            struct.pack("<4sI4s4sI", b"RIFF", riff_size, b"WAVE", b"JUNK", _JUNK_FOR_DS64)
            + bytes(_JUNK_FOR_DS64)
            + fmt
            + struct.pack("<4sI", b"data", data_bytes)
        )
    ds64 = struct.pack("<4sIQQQI", b"ds64", _JUNK_FOR_DS64, riff_size, data_bytes, data_bytes // align, 0)
    return struct.pack("<4sI4s", b"RF64", _U32, b"WAVE") + ds64 + fmt + struct.pack("<4sI", b"data", _U32)


class _WavWriter:
    """A 16-bit PCM WAV (RF64 once it outgrows 4 GiB) that :class:`AudioFile` writes itself.

    The part of soundfile's ``SoundFile`` that AudioFile uses (``write``, ``buffer_write``,
    ``seek``, ``flush``, ``close``), plus :meth:`update_header` and :meth:`skip`, which leaves
    silence as a hole in the file (sparse where the file system allows: an hour of silence
    before a member speaks takes no disk). The header always describes every whole sample on
    disk, audio written ahead of the write position included (as libsndfile's does).
    """

    def __init__(self, path: pathlib.Path, channels: int, sample_rate: int) -> None:
        self.channels = channels
        self.samplerate = sample_rate
        self._align = 2 * channels
        self._pos = 0  # samples: where the next write goes
        self._end = 0  # bytes of sample data on disk (a partial sample after a failed write included)
        self._fh = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        try:
            self._put(0, _wav_header(channels, sample_rate, 0))
        except BaseException:
            self._fh.close()
            raise

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def _put(self, offset: int, data: Any) -> None:
        """Write all of ``data`` at byte ``offset`` of the file (a short write is resumed)."""
        view = memoryview(data).cast("B")
        self._fh.seek(offset)
        done = 0
        try:
            while done < len(view):
                n = self._fh.write(view[done:])
                if not n:
                    raise OSError(f"writing {self._fh.name} made no progress")
                done += n
        finally:
            if offset >= _WAV_HEADER_BYTES:
                self._end = max(self._end, offset - _WAV_HEADER_BYTES + done)

    def buffer_write(self, data: Any, dtype: str) -> None:
        if dtype != "int16":
            raise ValueError(f"a 16-bit WAV takes int16 samples, not {dtype}")
        self._put(_WAV_HEADER_BYTES + self._pos * self._align, data)
        self._pos += len(data) // self._align

    def write(self, data: Any) -> None:
        import numpy as np

        samples = np.ascontiguousarray(data, dtype="<i2")
        if samples.ndim != 2 or samples.shape[1] != self.channels:
            raise ValueError(f"expected int16 samples shaped (n, {self.channels}), got {samples.shape}")
        self._put(_WAV_HEADER_BYTES + self._pos * self._align, samples)
        self._pos += samples.shape[0]

    def seek(self, frames: int) -> int:
        self._pos = frames
        return frames

    def skip(self, frames: int) -> None:
        """``frames`` samples of silence at the end of the file, as a hole (never over audio)."""
        if self._pos * self._align < self._end:
            raise ValueError("skip() would leave audio on disk after the write position in place")
        self._pos += frames
        self._end = self._pos * self._align
        self._fh.truncate(_WAV_HEADER_BYTES + self._end)

    def update_header(self) -> None:
        """Rewrite the header to describe every whole sample on disk."""
        self._put(0, _wav_header(self.channels, self.samplerate, self._end // self._align * self._align))

    def flush(self) -> None:
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh.closed:
            return
        try:
            self.update_header()
        finally:
            self._fh.close()


# --------------------------------------------------------------------------------------- AudioFile


class AudioFile:
    """One user's track, written to disk as frames arrive (16-bit WAV by :class:`_WavWriter`,
    other formats through soundfile).

    Frames are written at their session position; the stretch between the end of the file and a
    frame's position is filled with silence, so the file always starts at session sample 0.
    :meth:`pad_to` extends it with silence to the session's end. A sink that makes its own audio
    (a mix, an utterance) appends it with :meth:`write_samples` instead. Memory does not grow
    with the session: nothing is kept but the open file (and, when resampling, the filter's
    history).

    ``channels`` is 2 (as received) or 1 (left and right averaged). ``sample_rate`` is the file's
    rate: 48000 writes the received samples unchanged; any other rate goes through the streaming
    anti-aliased :class:`~listening_core.resample.Resampler`, delay-compensated so the track stays
    on the session timeline (``ceil(session samples * rate / 48000)`` samples in the end).

    Length: a WAV has no limit. It is an ordinary RIFF WAVE while it holds under 4 GiB (6.2 hours
    of 48 kHz stereo) and becomes RF64 in place when it grows past that, the 64-bit form of WAV
    that libsndfile (soundfile), sox and ffmpeg read. Silence at the end of a 16-bit WAV (a
    member not there yet, or quiet for a while) is left as a hole in the file: on file systems
    with sparse files it takes no disk, and it reads as zeros.

    Crash safety: audio goes to the operating system as it is written (in blocks of a quarter of
    a second), and every ``flush_interval`` seconds of audio a WAV header is rewritten to cover
    it, so a killed process leaves a file readable to about a second before the kill. The
    periodic flush does not ``fsync``: with hundreds of speakers, one ``fsync`` per file per
    second would stall delivery on a real disk; :meth:`flush` does, when you ask. A sink that
    holds audio back until it is final (a mix waiting for late frames) puts it on disk ahead of
    the end with :meth:`write_ahead`, so a crash does not cost what it held. After a crash,
    :func:`recover_file` makes any of these files whole again.

    A failing write (disk full, permissions…) closes the file, keeps what was written, sets
    :attr:`error` and raises :class:`SinkError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        format: str = "WAV",
        subtype: str | None = "PCM_16",
        channels: int = CHANNELS,
        sample_rate: int = SAMPLE_RATE,
        compression_level: float | None = None,
        bitrate_mode: str | None = None,
        flush_interval: float = 1.0,
    ) -> None:
        import soundfile

        from ..resample import Resampler

        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 (mono) or 2 (stereo), got {channels}")
        self.path: pathlib.Path = pathlib.Path(path)
        self.format = format
        self.channels = channels
        self.sample_rate = sample_rate
        self.position: int = 0  # session samples (48 kHz) covered, silence included
        self.frames_written: int = 0  # samples per channel in the file (at sample_rate)
        self.done: bool = False
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._resampler = (
            Resampler(SAMPLE_RATE, sample_rate, channels) if sample_rate != SAMPLE_RATE else None
        )
        self._flush_every = max(1, round(flush_interval * sample_rate)) if flush_interval > 0 else 0
        self._since_flush = 0
        # libsndfile 1.2.2's MP3 encoder copies only half of each 16-bit stereo block it is
        # given (a memcpy counted in samples, not bytes); its 32-bit path is right
        self._wide = format.upper() == "MP3"
        # Received stereo at 48 kHz goes to the file as it is: frames are gathered into blocks
        # (written as raw bytes, no array conversion) instead of one library call per 20 ms.
        self._fast = self._resampler is None and channels == CHANNELS and not self._wide
        self._pending = bytearray()
        self._extent = 0  # samples on disk, those written ahead of the end included
        wav = format.upper() == "WAV"
        # 16-bit PCM WAV is written here (RIFF, RF64 past 4 GiB; see _WavWriter); other WAV
        # subtypes go to libsndfile's RF64, which stays a (WAVE_FORMAT_EXTENSIBLE) RIFF WAV under 4 GiB.
        self._own = wav and (subtype or "PCM_16").upper() == "PCM_16"
        self._file: Any
        try:
            if self._own:
                self._file = _WavWriter(self.path, channels, sample_rate)
            else:
                self._file = soundfile.SoundFile(
                    self.path,
                    "w",
                    samplerate=sample_rate,
                    channels=channels,
                    format="RF64" if wav else format,
                    subtype=subtype,
                    compression_level=compression_level,
                    bitrate_mode=bitrate_mode,
                )
                if wav:
                    try:
                        _rf64_auto_downgrade(self._file)
                    except BaseException:
                        self._file.close()
                        raise
        except Exception as exc:
            self.error = exc
            self.done = True
            raise SinkError(f"cannot create {self.path}: {_error_text(exc)}") from exc

    @property
    def duration(self) -> float:
        """Seconds of audio in the file so far."""
        return self.frames_written / self.sample_rate

    def write(self, frame: AudioFrame) -> None:
        """Write ``frame`` at its position (silence before it if needed; overlap is cut)."""
        if frame.pcm is None:
            raise SinkError(f"{type(self).__name__} needs PCM; the frame of user {frame.user_id} has none")
        with self._lock:
            self._check_open()
            gap = frame.position - self.position
            pcm = frame.pcm
            if gap < 0:
                pcm = pcm[-gap * CHANNELS * 2 :]  # overlaps what is written: keep only the new part
                if not pcm:
                    return
            elif gap > 0:
                self._write_silence(gap)
            self._write_pcm(pcm)

    def write_samples(self, samples: Any) -> None:
        """Append 48 kHz int16 samples at the end of the file; :attr:`position` advances by their count.

        ``samples`` is shaped ``(n, 2)`` (stereo, as received) or ``(n,)`` / ``(n, 1)`` (mono): it
        goes to the file's channels (stereo averaged to mono, mono doubled to stereo) and rate
        like a frame's PCM does. For sinks that write audio they made themselves (a mix, an
        utterance) rather than one user's frames at their session positions.
        """
        data = _samples_block(samples)
        with self._lock:
            self._check_open()
            if len(data):
                self._write_block(data)

    def write_ahead(self, samples: Any, offset: int = 0) -> None:
        """Put audio that may still change on disk after the end of the file, without moving the end.

        For a sink that holds audio back until it is final (a mix waiting for late frames): what
        it holds reaches the disk too, and the header covers it, so a killed process leaves it in
        the file. ``samples`` (48 kHz int16, shaped as for :meth:`write_samples`) are written
        ``offset`` samples past the end of the file; everything between the end and ``offset``
        must have been written ahead before (``offset`` is at most :attr:`ahead`). The next
        :meth:`write_samples`, :meth:`write` or :meth:`pad_to` overwrites it from the end on; a
        file closed with audio still ahead of its end keeps that audio. Only for files at 48 kHz
        in a format with a header that can be rewritten (WAV).
        """
        data = _samples_block(samples)
        if self._resampler is not None or self.format.upper() not in _HEADER_FORMATS:
            raise ValueError(f"write_ahead needs a 48 kHz WAV file; {self.path} is {self.format}")
        with self._lock:
            self._check_open()
            if not 0 <= offset <= self.ahead:
                raise ValueError(f"offset {offset} is not in 0…{self.ahead}, the samples written ahead")
            if not len(data):
                return
            self._drain()
            end = self.frames_written
            try:
                self._file.seek(end + offset)
                self._file.write(self._layout(data))
                self._extent = max(self._extent, end + offset + len(data))
                self._update_header()
                self._file.seek(end)
            except Exception as exc:
                self._fail(exc, "writing ahead in")

    @property
    def ahead(self) -> int:
        """Samples on disk past the end of the file, put there by :meth:`write_ahead`."""
        return max(0, self._extent - self.frames_written)

    def pad_to(self, samples: int) -> None:
        """Extend the file with silence up to session sample ``samples`` (no-op if it is that long)."""
        with self._lock:
            if samples > self.position and not self.done:
                self._write_silence(samples - self.position)

    def _check_open(self) -> None:
        if self.done:
            if self.error is not None:
                raise SinkError(f"{self.path} failed earlier: {self.error}") from self.error
            raise SinkError(f"{self.path} is already closed")

    def _write_silence(self, samples: int) -> None:
        if self._own and self._resampler is None and samples >= _BLOCK_SAMPLES:
            self._write_hole(samples)
            return
        if self._fast:
            while samples > 0:
                n = min(samples, _BLOCK_SAMPLES)
                self._append(bytes(n * CHANNELS * 2), n)
                samples -= n
            return
        import numpy as np

        chunk = np.zeros((min(samples, SAMPLE_RATE), CHANNELS), dtype=np.int16)
        while samples > 0:
            n = min(samples, len(chunk))
            self._write_block(chunk[:n])
            samples -= n

    def _write_hole(self, samples: int) -> None:
        """Silence at the end of a 16-bit WAV: zeros over what was written ahead, a hole after it."""
        import numpy as np

        over = min(samples, self.ahead)
        if over:
            self._write_block(np.zeros((over, self.channels), dtype=np.int16))
            samples -= over
            if not samples:
                return
        self._drain()
        try:
            self._file.skip(samples)
        except Exception as exc:
            self._fail(exc, "writing")
        self.position += samples
        self.frames_written += samples
        self._since_flush += samples
        if self._flush_every and self._since_flush >= self._flush_every:
            self._flush()

    def _write_pcm(self, pcm: bytes) -> None:
        if self._fast:
            self._append(pcm, len(pcm) // (CHANNELS * 2))
            return
        import numpy as np

        self._write_block(np.frombuffer(pcm, dtype="<i2").reshape(-1, CHANNELS))

    def _append(self, pcm: bytes, samples: int) -> None:
        """Queue ``samples`` of file-ready PCM; written when a block is full or at a flush."""
        self._pending += pcm
        self.position += samples
        self.frames_written += samples
        self._since_flush += samples
        if len(self._pending) >= _BLOCK_BYTES:
            self._drain()
        if self._flush_every and self._since_flush >= self._flush_every:
            self._flush()

    def _drain(self) -> None:
        """Write what :meth:`_append` queued."""
        if not self._pending:
            return
        data = bytes(self._pending)
        self._pending.clear()
        try:
            self._file.buffer_write(data, dtype="int16")
        except Exception as exc:
            self._fail(exc, "writing")

    def _write_block(self, data: Any) -> None:
        """Write 48 kHz int16 samples (shape ``(n, 2)`` or ``(n, 1)``), converted to the file's layout."""
        import numpy as np

        count = data.shape[0]
        if self._resampler is None:
            out = self._layout(data)
        else:
            x = data.astype(np.float64)
            if x.shape[1] > self.channels:
                # the mean of the two channels (x.mean(axis=1) gives the same, three times slower)
                x = ((x[:, 0] + x[:, 1]) * 0.5).reshape(-1, 1)
            elif x.shape[1] < self.channels:
                x = np.repeat(x, self.channels, axis=1)
            out = _to_int16(self._resampler.process(x))
        self._file_write(out)
        self.position += count

    def _layout(self, data: Any) -> Any:
        """48 kHz int16 samples ``(n, 1)`` or ``(n, 2)`` in the file's channels (no resampling)."""
        import numpy as np

        if data.shape[1] > self.channels:
            return ((data[:, 0].astype(np.int32) + data[:, 1]) // 2).astype(np.int16).reshape(-1, 1)
        return data if data.shape[1] == self.channels else np.repeat(data, self.channels, axis=1)

    def _file_write(self, out: Any) -> None:
        self._drain()
        if len(out):
            if self._wide:
                out = out.astype("<i4") << 16  # the same samples, as 32-bit
            try:
                self._file.write(out)
            except Exception as exc:
                self._fail(exc, "writing")
            self.frames_written += len(out)
            self._since_flush += len(out)
        if self._flush_every and self._since_flush >= self._flush_every:
            self._flush()

    def _fail(self, exc: BaseException, doing: str) -> None:
        self.error = exc
        self.done = True
        text = _error_text(exc, self._file)
        with contextlib.suppress(Exception):
            self._file.close()
        raise SinkError(f"{doing} {self.path} failed after {self.duration:.2f} s of audio: {text}") from exc

    def _flush(self, *, sync: bool = False) -> None:
        self._since_flush = 0
        self._drain()
        try:
            if self.format.upper() in _HEADER_FORMATS:
                self._update_header()
            if sync:
                self._file.flush()
        except Exception as exc:
            self._fail(exc, "flushing")

    def _update_header(self) -> None:
        if self._own:
            self._file.update_header()
        else:
            _update_header(self._file)

    def flush(self) -> None:
        """Push what is written to disk: a WAV header is brought up to date, then ``fsync``."""
        with self._lock:
            if not self.done:
                self._flush(sync=True)

    def cleanup(self) -> None:
        """Finish the file (the resampler's tail) and close it (idempotent).

        Raises :class:`SinkError` if the last writes or the close fail (the file is closed anyway).
        """
        with self._lock:
            if self.done:
                return
            self._drain()
            if self._resampler is not None:
                self._flush_every = 0
                self._file_write(_to_int16(self._resampler.flush()))
            self.done = True
            try:
                self._file.close()
            except Exception as exc:
                self.error = exc
                raise SinkError(f"closing {self.path} failed: {type(exc).__name__}: {exc}") from exc

    def convert(
        self,
        format: str,
        path: str | os.PathLike[str] | None = None,
        *,
        bitrate: int | None = None,
        compression_level: float | None = None,
    ) -> pathlib.Path:
        """Write this (finished) file in another format with soundfile, block by block; the new path.

        ``format`` is a key of :data:`FILE_FORMATS` (``"wav"``, ``"flac"``, ``"mp3"``, ``"ogg"``,
        ``"opus"``); ``path`` defaults to this file's path with the format's extension.
        """
        if not self.done:
            raise SinkError(f"{self.path} is still being written; convert it after the session")
        return convert_file(self.path, format, path, bitrate=bitrate, compression_level=compression_level)

    def __repr__(self) -> str:
        state = "failed" if self.error is not None else "done" if self.done else "open"
        return f"<{type(self).__name__} {self.path} samples={self.frames_written} {state}>"


_BLOCK_SAMPLES = 12_000  # 0.25 s: received PCM is written in blocks of this many samples
_BLOCK_BYTES = _BLOCK_SAMPLES * CHANNELS * 2


def _samples_block(samples: Any) -> Any:
    """``samples`` as an int16 array shaped ``(n, 1)`` or ``(n, 2)``; ValueError for anything else."""
    import numpy as np

    data = np.asarray(samples)
    if data.ndim == 1:
        data = data.reshape(-1, 1)
    if data.ndim != 2 or data.shape[1] not in (1, 2) or data.dtype != np.int16:
        raise ValueError(
            f"expected int16 samples shaped (n,), (n, 1) or (n, 2), got {data.dtype} {data.shape}"
        )
    return data


def _to_int16(x: Any) -> Any:
    import numpy as np

    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


# --------------------------------------------------------------------------------------- files


def convert_file(
    source: str | os.PathLike[str],
    format: str,
    destination: str | os.PathLike[str] | None = None,
    *,
    bitrate: int | None = None,
    compression_level: float | None = None,
    blocksize: int = 65536,
) -> pathlib.Path:
    """Re-encode ``source`` as ``format`` (a key of :data:`FILE_FORMATS`) through soundfile.

    Read and written in blocks of ``blocksize`` samples, so memory does not depend on the file's
    length. Same sample rate and channels. ``bitrate`` (kbit/s) applies to MP3 (constant
    bitrate, see :func:`mp3_compression_level`); ``compression_level`` (0…1) is soundfile's,
    for FLAC, Ogg and MP3. Returns the destination path (default: ``source`` with the format's
    extension); refuses to overwrite ``source``.
    """
    import soundfile

    key = format.lower().lstrip(".")
    if key not in FILE_FORMATS:
        raise ValueError(f"unknown format {format!r}; use one of {', '.join(FILE_FORMATS)}")
    sf_format, subtype, extension = FILE_FORMATS[key]
    source = pathlib.Path(source)
    dest = pathlib.Path(destination) if destination is not None else source.with_suffix(extension)
    if dest.resolve() == source.resolve():
        raise ValueError(f"converting {source} to {key} would overwrite it; give another path")
    info = soundfile.info(str(source))
    if key == "mp3":
        if info.samplerate not in MP3_SAMPLE_RATES:
            raise ValueError(f"MP3 cannot store {info.samplerate} Hz audio")
        if bitrate is not None:
            compression_level = mp3_compression_level(bitrate, info.samplerate)
    elif bitrate is not None:
        raise ValueError("bitrate applies to mp3 only")
    with soundfile.SoundFile(str(source)) as reader:
        writer: Any
        if key == "wav":  # written like AudioFile's WAV: no 4 GiB limit (RF64 past it)
            writer = _WavWriter(dest, reader.channels, reader.samplerate)
        else:
            writer = soundfile.SoundFile(
                str(dest),
                "w",
                samplerate=reader.samplerate,
                channels=reader.channels,
                format=sf_format,
                subtype=subtype,
                compression_level=compression_level,
                bitrate_mode="CONSTANT" if key == "mp3" and bitrate is not None else None,
            )
        try:
            while True:
                block = reader.read(blocksize, dtype="int16", always_2d=True)
                if not len(block):
                    break
                writer.write(block)
        finally:
            writer.close()
    return dest
