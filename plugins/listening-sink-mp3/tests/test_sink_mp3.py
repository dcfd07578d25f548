"""The ``mp3`` sink: found by name, end to end through the loopback, crash and failure behaviour."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import listening_sink_mp3
import numpy as np
import pytest
import soundfile as sf

from listening_core.plugins import default_registry
from listening_core.sinks import AudioFrame, FrameKind, SinkError
from listening_core.testing import LocalDiscord, Recording, Schedule, record
from listening_core.testing.recording import (
    fill_disk,
    record_until_killed,
    reference_track,
)

MP3_SNR_DB = 20.0
"""The bound asserted: 128 kbit/s LAME against the reference decode, best alignment (measured: ~25.8 dB)."""

CLIPS = {"alice": [("alice", 0.0)], "bob": [("bob", 0.4)], "carol": [("carol", 0.9)]}


# ------------------------------------------------------------------------------- helpers


def three_members() -> dict[str, Schedule]:
    return {name: Schedule.from_clips(clips) for name, clips in CLIPS.items()}


def snr_db(signal: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(signal**2) / max(np.sum((test - signal) ** 2), 1e-9)))


def locate(
    track: np.ndarray, ref: np.ndarray, near: int | None = None, span: int = 3000
) -> tuple[int, float]:
    """The offset of ``ref`` in ``track`` that matches best, and the SNR (dB) of that match.

    Coarse: the first audible sample; then every offset within ``span`` samples, for the best SNR.
    """
    x = track.astype(np.float64).mean(axis=1)
    r = ref.astype(np.float64).mean(axis=1)
    if near is None:
        near = int(np.flatnonzero(np.abs(x) > 300)[0]) - int(np.flatnonzero(np.abs(r) > 300)[0])
    best = (0, -np.inf)
    for offset in range(max(0, near - span), near + span + 1, 1):
        n = min(len(r), len(x) - offset)
        value = snr_db(r[:n], x[offset : offset + n])
        if value > best[1]:
            best = (offset, value)
    return best


# ------------------------------------------------------------------------------- plugin


def test_entry_point_finds_the_mp3_sink(tmp_path: Path) -> None:
    registry = default_registry()
    spec = registry.get("mp3")
    assert spec.distribution == "listening-sink-mp3" and spec.options is listening_sink_mp3.Mp3Options
    sink = registry.create("mp3", {"directory": str(tmp_path), "bitrate": 64, "sample_rate": 16000})
    assert isinstance(sink, listening_sink_mp3.Mp3Sink)
    assert sink.file_options()["bitrate_mode"] == "CONSTANT"
    sink.cleanup()
    for bad, match in (
        ({"bitrate": 100}, "bitrate"),
        ({"bitrate": 320, "sample_rate": 16000}, "bitrate"),
        ({"sample_rate": 96000}, "sample_rate"),
        ({"bitrate_mode": "vbr"}, "bitrate_mode"),
    ):
        with pytest.raises(Exception, match=match):
            registry.create("mp3", {"directory": str(tmp_path), **bad})


@pytest.mark.parametrize(
    ("rate", "bitrate"), [(48000, 64), (48000, 128), (48000, 320), (16000, 32), (8000, 24)]
)
def test_bitrate_reaches_the_encoder(tmp_path: Path, rate: int, bitrate: int) -> None:
    """Constant bitrate: the file's size is the bitrate times the duration (within 3 %)."""
    options = listening_sink_mp3.Mp3Options(directory=tmp_path, bitrate=bitrate, sample_rate=rate, channels=1)
    sink = listening_sink_mp3.Mp3Sink.from_options(options)
    noise = np.random.default_rng(0).integers(-8000, 8000, (960 * 500, 2), dtype=np.int16)
    for n in range(500):  # 10 s
        pcm = noise[n * 960 : (n + 1) * 960].tobytes()
        sink.on_audio(AudioFrame(1, 1, n, 0, n * 960, FrameKind.RECEIVED, pcm=pcm))
    sink.cleanup()
    size = (tmp_path / "1.mp3").stat().st_size
    assert abs(size * 8 / 10 / 1000 - bitrate) <= 0.03 * bitrate, size
    # gapless: exactly the samples written (at 16 kHz and 32 kbit/s LAME's info tag is off by
    # two frames; within that)
    assert 0 <= sf.info(tmp_path / "1.mp3").frames - 10 * rate <= 2 * 1152


# ------------------------------------------------------------------------------- end to end


async def test_three_members_match_the_reference(local_discord: LocalDiscord, tmp_path: Path) -> None:
    rec = await record(
        local_discord, "mp3", options={"directory": tmp_path, "bitrate": 128}, schedules=three_members()
    )
    sink, calls, schedules = rec.sink, rec.calls, rec.schedules
    assert calls == [(sink, None)]
    tracks = {name: sf.read(tmp_path / f"{name}.mp3", dtype="int16", always_2d=True) for name in schedules}
    assert all(rate == 48000 and data.shape[1] == 2 for data, rate in tracks.values())
    lengths = {len(data) for data, _ in tracks.values()}
    assert max(lengths) - min(lengths) <= 960, lengths  # gapless: LAME's info tag trims delay and padding
    offsets = {}
    for name, schedule in schedules.items():
        offsets[name], snr = locate(tracks[name][0], reference_track(schedule))
        print(f"mp3 128 kbit/s, {name}: SNR {snr:.1f} dB against the reference decode")
        assert snr >= MP3_SNR_DB, f"{name}: {snr:.1f} dB"
    assert max(offsets.values()) - min(offsets.values()) <= 0.2 * 48000, offsets


async def test_disk_full_mid_session(
    local_discord: LocalDiscord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def fill(rec: Recording) -> None:
        await asyncio.sleep(2.0)
        sink: Any = rec.sink
        fill_disk(sink.paths[rec.members["bob"].user_id])

    with caplog.at_level(logging.ERROR):
        rec = await record(
            local_discord, "mp3", options={"directory": tmp_path}, schedules=three_members(), during=fill
        )
    sink, calls, schedules = rec.sink, rec.calls, rec.schedules
    [(got_sink, error)] = calls
    assert got_sink is sink and isinstance(error, SinkError) and "bob.mp3" in str(error)
    assert any("bob.mp3" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    alice, _ = sf.read(tmp_path / "alice.mp3", dtype="int16", always_2d=True)
    carol, _ = sf.read(tmp_path / "carol.mp3", dtype="int16", always_2d=True)
    assert len(alice) == len(carol)
    assert locate(alice, reference_track(schedules["alice"]))[1] >= MP3_SNR_DB
    assert locate(carol, reference_track(schedules["carol"]))[1] >= MP3_SNR_DB
    bob, _ = sf.read(tmp_path / "bob.mp3", dtype="int16", always_2d=True)
    ref = reference_track(schedules["bob"])
    offset, _ = locate(bob, ref)
    held = len(bob) - offset
    assert held > 48000  # more than a second of his clip survived
    assert snr_db(ref[:held].mean(axis=1), bob[offset:].mean(axis=1)) >= MP3_SNR_DB - 3


# ------------------------------------------------------------------------------- crash


def test_killed_recorder_leaves_a_playable_mp3(tmp_path: Path) -> None:
    sent = record_until_killed("mp3", tmp_path / "out")
    path = tmp_path / "out" / "alice.mp3"
    samples = listening_sink_mp3.recover(path)  # nothing to fix: counts what decodes
    data, _ = sf.read(path, dtype="int16", always_2d=True)
    assert abs(len(data) - samples) <= 1152
    ref = reference_track(Schedule.from_clips([("three-phrases", 0.0)]))
    offset, _ = locate(data, ref)
    held = len(data) - offset
    snr = snr_db(ref[:held].mean(axis=1), data[offset:].mean(axis=1))
    print(
        f"mp3: {held / 48000:.3f} s of the clip readable, {sent * 0.02:.3f} s sent before the kill, {snr:.1f} dB"
    )
    assert held >= (sent - 50) * 960, f"{held / 48000:.2f} s readable, {sent * 0.02:.2f} s sent"
    assert snr >= MP3_SNR_DB - 3
