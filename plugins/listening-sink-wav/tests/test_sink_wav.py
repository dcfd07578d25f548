"""The ``wav`` sink: found by name, end to end through the loopback, crash and failure behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import listening_sink_wav
import numpy as np
import pytest
import soundfile as sf

from listening_core.plugins import default_registry
from listening_core.sinks import AudioFrame, FrameKind, SinkError, convert_file, safe_filename
from listening_core.testing import LocalDiscord, Schedule, close_client, join_voice

CLIPS = {"alice": [("alice", 0.0)], "bob": [("bob", 0.4)], "carol": [("carol", 0.9)]}


# ------------------------------------------------------------------------------- helpers


async def record(
    local: LocalDiscord, options: dict[str, Any], *, during: Any = None, late: str | None = None
) -> tuple[Any, list[tuple[Any, Any]], dict[str, Schedule], dict[str, int]]:
    """Three members speak their clips into ``vc.listen("wav", options)``; returns the sink,
    ``after``'s calls, the schedules and the user ids by name. ``late`` joins after listen starts."""
    members = [local.add_member(name) for name in CLIPS]
    for member in members:
        await member.join()
    client, vc = await join_voice(local)
    try:
        await asyncio.sleep(0.3)
        done = asyncio.Event()
        calls: list[tuple[Any, Any]] = []

        def after(sink: Any, error: Any) -> None:
            calls.append((sink, error))
            done.set()

        sink = vc.listen("wav", options=options, after=after)
        loop = asyncio.get_running_loop()
        schedules = {name: Schedule.from_clips(clips) for name, clips in CLIPS.items()}
        start = loop.time() + 0.2
        tasks = [m.speak(schedules[m.user.name], start_at=start) for m in members]
        if late is not None:
            await asyncio.sleep(1.0)
            newcomer = local.add_member(late)
            await newcomer.join()
            members.append(newcomer)
            schedules[late] = Schedule.from_clips([(late, 0.0)])
            tasks.append(newcomer.speak(schedules[late]))
        if during is not None:
            await during(sink, {m.user.name: m for m in members})
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.3)
        vc.stop_listening()
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await close_client(client)
    return sink, calls, schedules, {m.user.name: m.user_id for m in members}


def reference(schedule: Schedule) -> np.ndarray:
    """The member's track as a perfect receiver writes it, (n, 2) int16, from its first slot."""
    return np.frombuffer(schedule.reference_pcm(), dtype="<i2").reshape(-1, 2)


def first_nonzero(x: np.ndarray) -> int:
    return int(np.flatnonzero(np.any(x != 0, axis=1))[0])


def assert_exact(track: np.ndarray, ref: np.ndarray) -> int:
    """``ref`` sits in ``track`` sample for sample, with only silence around it; returns its offset."""
    offset = first_nonzero(track) - first_nonzero(ref)
    assert offset >= 0
    assert np.array_equal(track[offset : offset + len(ref)], ref)
    assert not track[:offset].any() and not track[offset + len(ref) :].any()
    return offset


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
    sink, calls, schedules, ids = await record(local_discord, {"directory": tmp_path}, late="dave")
    assert calls == [(sink, None)]
    files = {name: tmp_path / f"{name}.wav" for name in schedules}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files.values())
    tracks = {name: sf.read(path, dtype="int16", always_2d=True) for name, path in files.items()}
    assert all(rate == 48000 and data.shape[1] == 2 for data, rate in tracks.values())
    lengths = {len(data) for data, _ in tracks.values()}
    assert max(lengths) - min(lengths) <= 960, lengths  # aligned: same length within one frame
    offsets = {name: assert_exact(tracks[name][0], reference(schedules[name])) for name in schedules}
    # the three started together, so their tracks' origins coincide (the receiver's placement of
    # each first frame is tested to the sample in the core's e2e tests; here: roughly, 0.2 s)
    assert max(offsets[n] for n in CLIPS) - min(offsets[n] for n in CLIPS) <= 0.2 * 48000, offsets
    # dave joined a second later: leading silence, then his clip
    assert offsets["dave"] > offsets["alice"] + 48000 // 2
    assert all(
        len(data) >= offsets[name] + len(reference(schedules[name])) for name, (data, _) in tracks.items()
    )
    assert sink.paths[ids["alice"]] == files["alice"]


async def test_mono_16k_is_resampled_properly(local_discord: LocalDiscord, tmp_path: Path) -> None:
    sink, calls, schedules, _ = await record(
        local_discord, {"directory": tmp_path, "channels": 1, "sample_rate": 16000}
    )
    assert calls == [(sink, None)]
    lengths = set()
    for name, schedule in schedules.items():
        data, rate = sf.read(tmp_path / f"{name}.wav", dtype="int16", always_2d=True)
        assert rate == 16000 and data.shape[1] == 1
        lengths.add(len(data))
        y = data[:, 0].astype(np.float64)
        ref = reference(schedule).astype(np.float64).mean(axis=1)
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

    async def fill_disk(sink: Any, members: dict[str, Any]) -> None:
        await asyncio.sleep(2.0)  # bob starts at 0.4 s: he is well into his clip
        path = str(sink.paths[members["bob"].user_id].resolve())
        fd = next(
            int(n) for n in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{n}") == path
        )
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        failed_at["size"] = os.path.getsize(path)

    with caplog.at_level(logging.ERROR):
        sink, calls, schedules, ids = await record(local_discord, {"directory": tmp_path}, during=fill_disk)
    [(got_sink, error)] = calls
    assert got_sink is sink and isinstance(error, SinkError) and "bob.wav" in str(error)
    assert isinstance(sink.errors[ids["bob"]], SinkError)
    assert any("bob.wav" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    alice, _ = sf.read(tmp_path / "alice.wav", dtype="int16", always_2d=True)
    carol, _ = sf.read(tmp_path / "carol.wav", dtype="int16", always_2d=True)
    assert len(alice) == len(carol)
    assert_exact(alice, reference(schedules["alice"]))
    assert_exact(carol, reference(schedules["carol"]))
    # bob: everything written before the disk filled is there, sample for sample
    samples = listening_sink_wav.recover(tmp_path / "bob.wav")
    assert samples * 4 + 44 >= failed_at["size"]
    bob, _ = sf.read(tmp_path / "bob.wav", dtype="int16", always_2d=True)
    ref = reference(schedules["bob"])
    offset = first_nonzero(bob) - first_nonzero(ref)
    assert len(bob) > offset + 48000  # more than a second of his clip
    assert np.array_equal(bob[offset:], ref[: len(bob) - offset])


# ------------------------------------------------------------------------------- crash

CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys

    from listening_core.testing import LocalDiscord, Schedule, join_voice

    async def main(sink, directory, side, kill_after):
        async with LocalDiscord() as local:
            alice = local.add_member("alice")
            await alice.join()
            client, vc = await join_voice(local)
            await asyncio.sleep(0.3)
            vc.listen(sink, options={"directory": directory})
            alice.speak(Schedule.from_clips([("three-phrases", 0.0)]))
            await asyncio.sleep(float(kill_after))
            with open(side, "w") as f:
                json.dump({"sent": len(alice.sent)}, f)
            os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":  # the decode workers are spawned: they import this module
        asyncio.run(main(*sys.argv[1:]))
    """
)


def run_and_kill(tmp_path: Path, sink: str, kill_after: float = 3.0) -> int:
    """Record in a subprocess that SIGKILLs itself mid-clip; returns the frames sent by then."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    side = tmp_path / "side.json"
    proc = subprocess.Popen(
        [sys.executable, str(script), sink, str(tmp_path / "out"), str(side), str(kill_after)],
        start_new_session=True,
    )
    try:
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):  # its decode workers, orphaned by the kill
            os.killpg(proc.pid, signal.SIGKILL)
    return int(json.loads(side.read_text())["sent"])


def test_killed_recorder_leaves_a_readable_wav(tmp_path: Path) -> None:
    sent = run_and_kill(tmp_path, "wav")
    path = tmp_path / "out" / "alice.wav"
    ref = reference(Schedule.from_clips([("three-phrases", 0.0)]))
    # directly readable (libsndfile reads to the end of what was written) ...
    direct, _ = sf.read(path, dtype="int16", always_2d=True)
    # ... and after recover(), with a header every reader agrees with
    samples = listening_sink_wav.recover(path)
    data, _ = sf.read(path, dtype="int16", always_2d=True)
    assert len(data) == samples == len(direct)
    offset = first_nonzero(data) - first_nonzero(ref)
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
    assert peaks[2] - peaks[0] < 256 * 1024, peaks
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
