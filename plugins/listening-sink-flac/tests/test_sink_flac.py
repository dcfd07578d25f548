"""The ``flac`` sink: found by name, end to end through the loopback, crash and failure behaviour."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import listening_sink_flac
import numpy as np
import pytest
import soundfile as sf

from listening_core.plugins import default_registry
from listening_core.sinks import SinkError
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
    rec = await record(
        local_discord,
        "flac",
        options={"directory": tmp_path, "compression_level": 0},
        schedules=three_members(),
    )
    sink, calls, schedules = rec.sink, rec.calls, rec.schedules
    assert calls == [(sink, None)]
    tracks = {name: sf.read(tmp_path / f"{name}.flac", dtype="int16", always_2d=True) for name in schedules}
    assert all(rate == 48000 and data.shape[1] == 2 for data, rate in tracks.values())
    lengths = {len(data) for data, _ in tracks.values()}
    assert max(lengths) - min(lengths) <= 960, lengths
    offsets = {name: assert_placed(tracks[name][0], reference_track(schedules[name])) for name in schedules}
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

    async def fill(rec: Recording) -> None:
        await asyncio.sleep(2.0)
        sink: Any = rec.sink
        fill_disk(sink.paths[rec.members["bob"].user_id])

    with caplog.at_level(logging.ERROR):
        rec = await record(
            local_discord, "flac", options={"directory": tmp_path}, schedules=three_members(), during=fill
        )
    sink, calls, schedules = rec.sink, rec.calls, rec.schedules
    [(got_sink, error)] = calls
    assert got_sink is sink and isinstance(error, SinkError) and "bob.flac" in str(error)
    assert any("bob.flac" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    alice, _ = sf.read(tmp_path / "alice.flac", dtype="int16", always_2d=True)
    carol, _ = sf.read(tmp_path / "carol.flac", dtype="int16", always_2d=True)
    assert len(alice) == len(carol)
    assert_placed(alice, reference_track(schedules["alice"]))
    assert_placed(carol, reference_track(schedules["carol"]))
    listening_sink_flac.recover(tmp_path / "bob.flac")
    bob, _ = sf.read(tmp_path / "bob.flac", dtype="int16", always_2d=True)
    ref = reference_track(schedules["bob"])
    offset = first_audible(bob) - first_audible(ref)
    assert len(bob) > offset + 48000  # more than a second of his clip survived
    assert np.array_equal(bob[offset:], ref[: len(bob) - offset])


# ------------------------------------------------------------------------------- crash


def test_killed_recorder_leaves_a_recoverable_flac(tmp_path: Path) -> None:
    sent = record_until_killed("flac", tmp_path / "out")
    path = tmp_path / "out" / "alice.flac"
    assert sf.info(path).frames >= 2**62  # libFLAC had no chance to write the length
    samples = listening_sink_flac.recover(path)
    data, _ = sf.read(path, dtype="int16", always_2d=True)
    assert len(data) == samples == sf.info(path).frames
    ref = reference_track(Schedule.from_clips([("three-phrases", 0.0)]))
    offset = first_audible(data) - first_audible(ref)
    held = len(data) - offset
    print(f"flac: {held / 48000:.3f} s of the clip recovered, {sent * 0.02:.3f} s sent before the kill")
    assert held >= (sent - 50) * 960, f"{held / 48000:.2f} s recovered, {sent * 0.02:.2f} s sent"
    assert np.array_equal(data[offset:], ref[:held])
    assert listening_sink_flac.recover(path) == samples  # idempotent
