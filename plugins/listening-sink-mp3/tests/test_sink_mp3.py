"""The ``mp3`` sink: found by name, end to end through the loopback, crash and failure behaviour."""

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
from pathlib import Path
from typing import Any

import listening_sink_mp3
import numpy as np
import pytest
import soundfile as sf

from listening_core.plugins import default_registry
from listening_core.sinks import AudioFrame, FrameKind, SinkError
from listening_core.testing import LocalDiscord, Schedule, close_client, join_voice

MP3_SNR_DB = 20.0
"""The bound asserted: 128 kbit/s LAME against the reference decode, best alignment (measured: ~25.8 dB)."""

CLIPS = {"alice": [("alice", 0.0)], "bob": [("bob", 0.4)], "carol": [("carol", 0.9)]}


# ------------------------------------------------------------------------------- helpers


async def record(
    local: LocalDiscord, options: dict[str, Any], *, during: Any = None, late: str | None = None
) -> tuple[Any, list[tuple[Any, Any]], dict[str, Schedule], dict[str, int]]:
    """Three members speak their clips into ``vc.listen("mp3", options)``; returns the sink,
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

        sink = vc.listen("mp3", options=options, after=after)
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


def assert_exact(track: np.ndarray, ref: np.ndarray) -> int:
    """``ref`` sits in ``track`` sample for sample, with only silence around it; returns its offset."""
    offset = first_nonzero(track) - first_nonzero(ref)
    assert offset >= 0
    assert np.array_equal(track[offset : offset + len(ref)], ref)
    assert not track[:offset].any() and not track[offset + len(ref) :].any()
    return offset


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
    sink, calls, schedules, _ids = await record(local_discord, {"directory": tmp_path, "bitrate": 128})
    assert calls == [(sink, None)]
    tracks = {name: sf.read(tmp_path / f"{name}.mp3", dtype="int16", always_2d=True) for name in schedules}
    assert all(rate == 48000 and data.shape[1] == 2 for data, rate in tracks.values())
    lengths = {len(data) for data, _ in tracks.values()}
    assert max(lengths) - min(lengths) <= 960, lengths  # gapless: LAME's info tag trims delay and padding
    offsets = {}
    for name, schedule in schedules.items():
        offsets[name], snr = locate(tracks[name][0], reference(schedule))
        print(f"mp3 128 kbit/s, {name}: SNR {snr:.1f} dB against the reference decode")
        assert snr >= MP3_SNR_DB, f"{name}: {snr:.1f} dB"
    assert max(offsets.values()) - min(offsets.values()) <= 0.2 * 48000, offsets


async def test_disk_full_mid_session(
    local_discord: LocalDiscord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def fill_disk(sink: Any, members: dict[str, Any]) -> None:
        await asyncio.sleep(2.0)
        path = str(sink.paths[members["bob"].user_id].resolve())
        fd = next(
            int(n) for n in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{n}") == path
        )
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)

    with caplog.at_level(logging.ERROR):
        sink, calls, schedules, _ids = await record(local_discord, {"directory": tmp_path}, during=fill_disk)
    [(got_sink, error)] = calls
    assert got_sink is sink and isinstance(error, SinkError) and "bob.mp3" in str(error)
    assert any("bob.mp3" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    alice, _ = sf.read(tmp_path / "alice.mp3", dtype="int16", always_2d=True)
    carol, _ = sf.read(tmp_path / "carol.mp3", dtype="int16", always_2d=True)
    assert len(alice) == len(carol)
    assert locate(alice, reference(schedules["alice"]))[1] >= MP3_SNR_DB
    assert locate(carol, reference(schedules["carol"]))[1] >= MP3_SNR_DB
    bob, _ = sf.read(tmp_path / "bob.mp3", dtype="int16", always_2d=True)
    ref = reference(schedules["bob"])
    offset, _ = locate(bob, ref)
    held = len(bob) - offset
    assert held > 48000  # more than a second of his clip survived
    assert snr_db(ref[:held].mean(axis=1), bob[offset:].mean(axis=1)) >= MP3_SNR_DB - 3


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


def test_killed_recorder_leaves_a_playable_mp3(tmp_path: Path) -> None:
    sent = run_and_kill(tmp_path, "mp3")
    path = tmp_path / "out" / "alice.mp3"
    samples = listening_sink_mp3.recover(path)  # nothing to fix: counts what decodes
    data, _ = sf.read(path, dtype="int16", always_2d=True)
    assert abs(len(data) - samples) <= 1152
    ref = reference(Schedule.from_clips([("three-phrases", 0.0)]))
    offset, _ = locate(data, ref)
    held = len(data) - offset
    snr = snr_db(ref[:held].mean(axis=1), data[offset:].mean(axis=1))
    print(
        f"mp3: {held / 48000:.3f} s of the clip readable, {sent * 0.02:.3f} s sent before the kill, {snr:.1f} dB"
    )
    assert held >= (sent - 50) * 960, f"{held / 48000:.2f} s readable, {sent * 0.02:.2f} s sent"
    assert snr >= MP3_SNR_DB - 3
