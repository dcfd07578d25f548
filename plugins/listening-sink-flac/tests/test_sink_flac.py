"""The ``flac`` sink: found by name, end to end through the loopback, crash and failure behaviour."""

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

import listening_sink_flac
import numpy as np
import pytest
import soundfile as sf

from listening_core.plugins import default_registry
from listening_core.sinks import SinkError
from listening_core.testing import LocalDiscord, Schedule, close_client, join_voice

CLIPS = {"alice": [("alice", 0.0)], "bob": [("bob", 0.4)], "carol": [("carol", 0.9)]}


# ------------------------------------------------------------------------------- helpers


async def record(
    local: LocalDiscord, options: dict[str, Any], *, during: Any = None, late: str | None = None
) -> tuple[Any, list[tuple[Any, Any]], dict[str, Schedule], dict[str, int]]:
    """Three members speak their clips into ``vc.listen("flac", options)``; returns the sink,
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

        sink = vc.listen("flac", options=options, after=after)
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


# ------------------------------------------------------------------------------- plugin


def test_entry_point_finds_the_flac_sink(tmp_path: Path) -> None:
    registry = default_registry()
    spec = registry.get("flac")
    assert spec.distribution == "listening-sink-flac" and spec.options is listening_sink_flac.FlacOptions
    sink = registry.create("flac", {"directory": str(tmp_path), "compression_level": 8})
    assert isinstance(sink, listening_sink_flac.FlacSink)
    assert sink.file_options() == {"compression_level": 1.0}
    sink.cleanup()
    with pytest.raises(Exception, match="compression_level"):
        registry.create("flac", {"directory": str(tmp_path), "compression_level": 9})


# ------------------------------------------------------------------------------- end to end


async def test_three_members_bit_exact_and_aligned(local_discord: LocalDiscord, tmp_path: Path) -> None:
    sink, calls, schedules, _ids = await record(
        local_discord, {"directory": tmp_path, "compression_level": 0}
    )
    assert calls == [(sink, None)]
    tracks = {name: sf.read(tmp_path / f"{name}.flac", dtype="int16", always_2d=True) for name in schedules}
    assert all(rate == 48000 and data.shape[1] == 2 for data, rate in tracks.values())
    lengths = {len(data) for data, _ in tracks.values()}
    assert max(lengths) - min(lengths) <= 960, lengths
    offsets = {name: assert_exact(tracks[name][0], reference(schedules[name])) for name in schedules}
    assert max(offsets.values()) - min(offsets.values()) <= 0.2 * 48000, offsets
    # a closed file needs no recovery, and recover() leaves it alone
    before = (tmp_path / "alice.flac").read_bytes()
    assert listening_sink_flac.recover(tmp_path / "alice.flac") == len(tracks["alice"][0])
    assert (tmp_path / "alice.flac").read_bytes() == before


async def test_disk_full_mid_session(
    local_discord: LocalDiscord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bob's file hits a full disk ~1.6 s into the session (his file descriptor is pointed at
    /dev/full): ``after`` and the log get the error, the others' files are whole, and bob's holds,
    after recover(), what reached the disk before."""

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
    assert got_sink is sink and isinstance(error, SinkError) and "bob.flac" in str(error)
    assert any("bob.flac" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    alice, _ = sf.read(tmp_path / "alice.flac", dtype="int16", always_2d=True)
    carol, _ = sf.read(tmp_path / "carol.flac", dtype="int16", always_2d=True)
    assert len(alice) == len(carol)
    assert_exact(alice, reference(schedules["alice"]))
    assert_exact(carol, reference(schedules["carol"]))
    listening_sink_flac.recover(tmp_path / "bob.flac")
    bob, _ = sf.read(tmp_path / "bob.flac", dtype="int16", always_2d=True)
    ref = reference(schedules["bob"])
    offset = first_nonzero(bob) - first_nonzero(ref)
    assert len(bob) > offset + 48000  # more than a second of his clip survived
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


def test_killed_recorder_leaves_a_recoverable_flac(tmp_path: Path) -> None:
    sent = run_and_kill(tmp_path, "flac")
    path = tmp_path / "out" / "alice.flac"
    assert sf.info(path).frames >= 2**62  # libFLAC had no chance to write the length
    samples = listening_sink_flac.recover(path)
    data, _ = sf.read(path, dtype="int16", always_2d=True)
    assert len(data) == samples == sf.info(path).frames
    ref = reference(Schedule.from_clips([("three-phrases", 0.0)]))
    offset = first_nonzero(data) - first_nonzero(ref)
    held = len(data) - offset
    print(f"flac: {held / 48000:.3f} s of the clip recovered, {sent * 0.02:.3f} s sent before the kill")
    assert held >= (sent - 50) * 960, f"{held / 48000:.2f} s recovered, {sent * 0.02:.2f} s sent"
    assert np.array_equal(data[offset:], ref[:held])
    assert listening_sink_flac.recover(path) == samples  # idempotent
