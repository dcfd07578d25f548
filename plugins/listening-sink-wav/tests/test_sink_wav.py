"""The ``wav`` sink: found by name, end to end through the loopback, crash and failure behaviour."""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from pathlib import Path
from typing import Any

import listening_sink_wav
import numpy as np
import pytest
import soundfile as sf

from listening_core.plugins import default_registry
from listening_core.sinks import AudioFrame, FrameKind, SinkError, convert_file, safe_filename
from listening_core.testing import LocalDiscord, Recording, Schedule, record
from listening_core.testing.recording import (
    assert_placed,
    fill_disk,
    first_audible,
    record_until_killed,
    reference_track,
)

CLIPS = {"alice": [("alice", 0.0)], "bob": [("bob", 0.4)], "carol": [("carol", 0.9)]}


# ------------------------------------------------------------------------------- helpers


def three_members() -> dict[str, Schedule]:
    return {name: Schedule.from_clips(clips) for name, clips in CLIPS.items()}


def snr_db(signal: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(signal**2) / max(np.sum((test - signal) ** 2), 1e-9)))


def ideal_resample(x: np.ndarray, n_out: int, n_in: int, lowpass_hz: float, rate_in: int) -> np.ndarray:
    """Band-limited resampling by FFT (brick wall), low-passed at ``lowpass_hz``: the yardstick."""
    spectrum = np.fft.rfft(x, n_in)
    spectrum[int(lowpass_hz * n_in / rate_in) + 1 :] = 0
    return np.fft.irfft(spectrum[: n_out // 2 + 1], n_out) * (n_out / n_in)


def lowpass(y: np.ndarray, hz: float, rate: int) -> np.ndarray:
    spectrum = np.fft.rfft(y)
    spectrum[int(hz * len(y) / rate) + 1 :] = 0
    return np.fft.irfft(spectrum, len(y))


# ------------------------------------------------------------------------------- plugin


def test_entry_point_finds_the_wav_sink(tmp_path: Path) -> None:
    registry = default_registry()
    spec = registry.get("wav")
    assert spec.distribution == "listening-sink-wav" and spec.options is listening_sink_wav.WavOptions
    sink = registry.create("wav", {"directory": str(tmp_path / "out"), "channels": 1, "sample_rate": 16000})
    assert isinstance(sink, listening_sink_wav.WavSink)
    assert sink.channels == 1 and sink.sample_rate == 16000 and (tmp_path / "out").is_dir()
    sink.cleanup()
    for bad in ({"channels": 3}, {"sample_rate": 100}, {"template": "{nope}"}, {"flush_interval": -1}):
        with pytest.raises(Exception, match=next(iter(bad))):
            registry.create("wav", {"directory": str(tmp_path), **bad})


# ------------------------------------------------------------------------------- end to end


async def test_three_members_bit_exact_and_aligned_with_a_late_joiner(
    local_discord: LocalDiscord, tmp_path: Path
) -> None:
    rec = await record(
        local_discord,
        "wav",
        options={"directory": tmp_path},
        schedules=three_members(),
        late={"dave": (0.8, Schedule.from_clips([("dave", 0.0)]))},  # a second after listen started
    )
    sink, calls, schedules, ids = rec.sink, rec.calls, rec.schedules, rec.user_ids
    assert calls == [(sink, None)]
    files = {name: tmp_path / f"{name}.wav" for name in schedules}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files.values())
    tracks = {name: sf.read(path, dtype="int16", always_2d=True) for name, path in files.items()}
    assert all(rate == 48000 and data.shape[1] == 2 for data, rate in tracks.values())
    lengths = {len(data) for data, _ in tracks.values()}
    assert max(lengths) - min(lengths) <= 960, lengths  # aligned: same length within one frame
    offsets = {name: assert_placed(tracks[name][0], reference_track(schedules[name])) for name in schedules}
    # the three started together, so their tracks' origins coincide (the receiver's placement of
    # each first frame is tested to the sample in the core's e2e tests; here: roughly, 0.2 s)
    assert max(offsets[n] for n in CLIPS) - min(offsets[n] for n in CLIPS) <= 0.2 * 48000, offsets
    # dave joined a second later: leading silence, then his clip
    assert offsets["dave"] > offsets["alice"] + 48000 // 2
    assert all(
        len(data) >= offsets[name] + len(reference_track(schedules[name]))
        for name, (data, _) in tracks.items()
    )
    assert sink.paths[ids["alice"]] == files["alice"]


async def test_mono_16k_is_resampled_properly(local_discord: LocalDiscord, tmp_path: Path) -> None:
    rec = await record(
        local_discord,
        "wav",
        options={"directory": tmp_path, "channels": 1, "sample_rate": 16000},
        schedules=three_members(),
    )
    sink, calls, schedules = rec.sink, rec.calls, rec.schedules
    assert calls == [(sink, None)]
    lengths = set()
    for name, schedule in schedules.items():
        data, rate = sf.read(tmp_path / f"{name}.wav", dtype="int16", always_2d=True)
        assert rate == 16000 and data.shape[1] == 1
        lengths.add(len(data))
        y = data[:, 0].astype(np.float64)
        ref = reference_track(schedule).astype(np.float64).mean(axis=1)
        # where the clip sits (in 48 kHz samples): correlation at 16 kHz, then the best exact offset
        coarse = ideal_resample(ref, len(ref) // 3, len(ref), 7900, 48000)
        corr = np.fft.irfft(np.fft.rfft(y, 2 * len(y)) * np.conj(np.fft.rfft(coarse, 2 * len(y))))
        lag = int(np.argmax(corr[: len(y)]))
        best = -np.inf
        for offset in range(max(0, 3 * lag - 6), 3 * lag + 7):
            track = np.zeros(3 * len(y))
            track[offset : offset + len(ref)] = ref[: 3 * len(y) - offset]
            ideal = ideal_resample(track, len(y), len(track), 7000, 48000)
            best = max(best, snr_db(ideal, lowpass(y, 7000, 16000)))
        # the resampler against a brick-wall FFT resampling, both band-limited to 7 kHz
        assert best >= 40.0, f"{name}: {best:.1f} dB"
    assert max(lengths) - min(lengths) <= 320


async def test_disk_full_mid_session(
    local_discord: LocalDiscord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bob's file hits a full disk ~1 s into his clip (his file descriptor is pointed at /dev/full):
    the error reaches ``after`` and the log, alice's and carol's files are whole, and bob's keeps
    what was written before (read after the documented header repair)."""
    failed_at: dict[str, int] = {}

    async def fill(rec: Recording) -> None:
        await asyncio.sleep(2.0)  # bob starts at 0.4 s: he is well into his clip
        sink: Any = rec.sink
        failed_at["size"] = fill_disk(sink.paths[rec.members["bob"].user_id])

    with caplog.at_level(logging.ERROR):
        rec = await record(
            local_discord, "wav", options={"directory": tmp_path}, schedules=three_members(), during=fill
        )
    sink, calls, schedules, ids = rec.sink, rec.calls, rec.schedules, rec.user_ids
    [(got_sink, error)] = calls
    assert got_sink is sink and isinstance(error, SinkError) and "bob.wav" in str(error)
    assert isinstance(sink.errors[ids["bob"]], SinkError)
    assert any("bob.wav" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    alice, _ = sf.read(tmp_path / "alice.wav", dtype="int16", always_2d=True)
    carol, _ = sf.read(tmp_path / "carol.wav", dtype="int16", always_2d=True)
    assert len(alice) == len(carol)
    assert_placed(alice, reference_track(schedules["alice"]))
    assert_placed(carol, reference_track(schedules["carol"]))
    # bob: everything written before the disk filled is there, sample for sample
    samples = listening_sink_wav.recover(tmp_path / "bob.wav")
    header = (tmp_path / "bob.wav").read_bytes()[:4096].index(b"data") + 8
    assert samples * 4 + header >= failed_at["size"]
    bob, _ = sf.read(tmp_path / "bob.wav", dtype="int16", always_2d=True)
    ref = reference_track(schedules["bob"])
    offset = first_audible(bob) - first_audible(ref)
    assert len(bob) > offset + 48000  # more than a second of his clip
    assert np.array_equal(bob[offset:], ref[: len(bob) - offset])


# ------------------------------------------------------------------------------- crash


def test_killed_recorder_leaves_a_readable_wav(tmp_path: Path) -> None:
    sent = record_until_killed("wav", tmp_path / "out")
    path = tmp_path / "out" / "alice.wav"
    ref = reference_track(Schedule.from_clips([("three-phrases", 0.0)]))
    # directly readable (libsndfile reads to the end of what was written) ...
    direct, _ = sf.read(path, dtype="int16", always_2d=True)
    # ... and after recover(), with a header every reader agrees with
    samples = listening_sink_wav.recover(path)
    data, _ = sf.read(path, dtype="int16", always_2d=True)
    assert len(data) == samples == len(direct)
    offset = first_audible(data) - first_audible(ref)
    held = len(data) - offset  # samples of her clip in the file
    print(f"wav: {held / 48000:.3f} s of the clip on disk, {sent * 0.02:.3f} s sent before the kill")
    assert held >= (sent - 50) * 960, f"{held / 48000:.2f} s on disk, {sent * 0.02:.2f} s sent"
    assert np.array_equal(data[offset:], ref[:held])


# ------------------------------------------------------------------------------- units


def _frame(user_id: int, position: int, value: int = 1000, seq: int = 0) -> AudioFrame:
    pcm = np.full((960, 2), value, dtype="<i2").tobytes()
    return AudioFrame(user_id, 1, seq, 0, position, FrameKind.RECEIVED, pcm=pcm)


def test_names_are_safe_unique_and_never_overwrite(tmp_path: Path) -> None:
    (tmp_path / "42.wav").write_bytes(b"an earlier recording")
    sink = listening_sink_wav.WavSink(tmp_path)
    names = [sink.file_name(_frame(uid, 0)) for uid in (42, 42)]
    assert names == ["42-2.wav", "42-3.wav"]
    assert (tmp_path / "42.wav").read_bytes() == b"an earlier recording"
    for evil in ("../../etc/passwd", "a/b\\c", "\x00\x1b[31mred\n", "..", "CON", "  .hidden", "x" * 500):
        name = safe_filename(evil)
        assert "/" not in name and "\\" not in name and not name.startswith(".")
        assert all(ch.isprintable() for ch in name) and 0 < len(name.encode()) <= 200
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    assert safe_filename("CON") == "_CON" and safe_filename("Zoë") == "Zoë"


def test_memory_does_not_grow_with_the_session(tmp_path: Path) -> None:
    sink = listening_sink_wav.WavSink(tmp_path, sample_rate=16000)
    tracemalloc.start()
    try:
        peaks = []
        for minute in range(3):
            for k in range(3000):  # one minute of frames for two users
                n = minute * 3000 + k
                sink.on_audio(_frame(1, n * 960, seq=n & 0xFFFF))
                sink.on_audio(_frame(2, n * 960, seq=n & 0xFFFF))
            peaks.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    sink.cleanup()
    # Keeping the frames would grow by ~23 MB a minute here; an interpreter table may resize once
    # (~2 MB) on the way, so 5 MB over two minutes is flat.
    assert peaks[2] - peaks[0] < 5_000_000, peaks
    assert sf.info(tmp_path / "1.wav").frames == sf.info(tmp_path / "2.wav").frames == 3 * 60 * 16000


def test_permission_error_is_isolated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Sink(listening_sink_wav.WavSink):
        def open_file(self, frame: AudioFrame) -> Any:
            if frame.user_id == 2:
                raise PermissionError(13, "Permission denied", str(self.directory / "2.wav"))
            return super().open_file(frame)

    sink = Sink(tmp_path)
    with caplog.at_level(logging.ERROR):
        for n in range(100):
            for uid in (1, 2, 3):
                sink.on_audio(_frame(uid, n * 960, seq=n))
        sink.on_stop(100 * 960 + 480)
        with pytest.raises(SinkError, match="Permission denied"):
            sink.cleanup()
    assert any("Permission denied" in r.getMessage() for r in caplog.records)
    assert sf.info(tmp_path / "1.wav").frames == sf.info(tmp_path / "3.wav").frames == 100 * 960 + 480
    assert not (tmp_path / "2.wav").exists()


def test_convert_in_blocks(tmp_path: Path) -> None:
    sink = listening_sink_wav.WavSink(tmp_path)
    for n in range(200):
        sink.on_audio(_frame(7, n * 960, value=(n * 97) % 20000 - 10000, seq=n))
    sink.cleanup()
    audio_file = sink.files[7]
    original, _ = sf.read(audio_file.path, dtype="int16")
    flac = audio_file.convert("flac")
    assert flac == tmp_path / "7.flac" and np.array_equal(sf.read(flac, dtype="int16")[0], original)
    mp3 = convert_file(flac, "mp3", tmp_path / "7.mp3", bitrate=192)
    assert sf.info(mp3).format == "MP3" and abs(sf.info(mp3).frames - len(original)) <= 1152
    with pytest.raises(ValueError, match="overwrite"):
        audio_file.convert("wav")
