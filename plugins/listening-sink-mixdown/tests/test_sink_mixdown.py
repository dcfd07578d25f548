"""The ``mixdown`` sink: unit tests on synthetic frames, and end to end through the loopback."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from listening_sink_mixdown import MixdownOptions, MixdownSink, recover

from listening_core import AudioFrame, FrameKind
from listening_core.plugins import OptionsError, default_registry
from listening_core.sinks import SessionInfo, SinkError
from listening_core.testing import LocalDiscord, Schedule, record
from listening_core.testing.media import reference_decode

RATE = 48_000
FRAME = 960


# ----------------------------------------------------------------------------------- helpers


def _frame(user_id: int, seq: int, position: int, pcm: np.ndarray) -> AudioFrame:
    return AudioFrame(
        user_id=user_id,
        ssrc=user_id,
        sequence=seq & 0xFFFF,
        timestamp=(position) & 0xFFFFFFFF,
        position=position,
        kind=FrameKind.RECEIVED,
        pcm=np.ascontiguousarray(pcm, dtype="<i2").tobytes(),
    )


def _read(path: Path) -> np.ndarray:
    data, rate = sf.read(path, dtype="int16", always_2d=True)
    assert rate == RATE
    return data


def _clipped_sum(tracks: list[tuple[int, np.ndarray]], length: int, channels: int = 2) -> np.ndarray:
    acc = np.zeros((length, 2), dtype=np.int32)
    for pos, pcm in tracks:
        acc[pos : pos + len(pcm)] += pcm
    if channels == 1:
        return np.clip((acc[:, 0].astype(np.int64) + acc[:, 1]) // 2, -32768, 32767).astype(np.int16)[:, None]
    return np.clip(acc, -32768, 32767).astype(np.int16)


def _session() -> SessionInfo:
    return SessionInfo(guild_id=1, channel_id=2, started_at=time.time())


# ----------------------------------------------------------------------------- the plugin


def test_entry_point_and_options(tmp_path: Path) -> None:
    registry = default_registry()
    spec = registry.get("mixdown")
    assert spec.distribution == "listening-sink-mixdown"
    assert spec.options is MixdownOptions and spec.wants_pcm
    sink = registry.create("mixdown", {"directory": str(tmp_path), "channels": 1})
    assert isinstance(sink, MixdownSink)
    assert sink.options.directory == tmp_path and sink.channels == 1
    sink.cleanup()
    for bad in ({"channels": 3}, {"horizon_ms": 10}, {"flush_interval": 0}, {"filename": "{nope}"}):
        with pytest.raises(OptionsError):
            registry.create("mixdown", bad)
    with pytest.raises(Exception):  # noqa: B017 - frozen
        MixdownOptions().channels = 1  # type: ignore[misc]


# ------------------------------------------------------------------------- synthetic frames


@pytest.mark.parametrize("channels", [2, 1])
def test_mix_is_the_saturated_sum_with_late_user(tmp_path: Path, channels: int) -> None:
    """Three users, loud enough to clip, one delivered 2 s behind the others, with gaps."""
    rng = np.random.default_rng(1)
    sink = MixdownSink(MixdownOptions(directory=tmp_path, filename="mix", channels=channels))
    sink.on_start(_session())
    streams: dict[int, list[AudioFrame]] = {}
    placed: list[tuple[int, np.ndarray]] = []
    for user, (first, n_frames) in {1: (0, 600), 2: (12_345, 500), 3: (5 * RATE + 7, 300)}.items():
        frames, pos = [], first
        for k in range(n_frames):
            if k % 97 == 50:
                pos += 3 * FRAME + 11  # the user was silent a moment
            pcm = rng.integers(-25_000, 25_000, size=(FRAME, 2)).astype(np.int16)
            frames.append(_frame(user, k, pos, pcm))
            placed.append((pos, pcm))
            pos += FRAME
        streams[user] = frames
    # delivery order: by position, but user 2 lags 2 s (as with a late DAVE key)
    lag = {1: 0, 2: 2 * RATE, 3: 0}
    order = sorted((f.position + lag[u], u, i) for u, fs in streams.items() for i, f in enumerate(fs))
    for _, user, i in order:
        sink.on_audio(streams[user][i])
        assert sink.buffered <= sink.capacity
    end = max(f.end for fs in streams.values() for f in fs) + RATE
    sink.on_stop(end)
    sink.cleanup()
    assert sink.late == {}
    got = _read(tmp_path / "mix.wav")
    expected = _clipped_sum(placed, end, channels)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)
    assert (np.abs(got.astype(np.int32)) == 32767).any()  # it did saturate somewhere


def test_frame_later_than_the_horizon_is_counted_and_logged(tmp_path: Path, caplog: Any) -> None:
    sink = MixdownSink(
        MixdownOptions(directory=tmp_path, filename="late", horizon_ms=500, flush_interval=0.1)
    )
    sink.on_start(_session())
    one = np.full((FRAME, 2), 1000, dtype=np.int16)
    for k in range(200):  # 4 s of user 1
        sink.on_audio(_frame(1, k, k * FRAME, one))
    with caplog.at_level(logging.WARNING):
        sink.on_audio(_frame(2, 0, RATE, one))  # 1 s into the session, 3 s late
    assert sink.late[2] == 1 and sink.late_samples == FRAME
    assert "arrived" in caplog.text
    sink.on_stop(200 * FRAME)
    sink.cleanup()
    got = _read(tmp_path / "late.wav")
    assert got.shape[0] == 200 * FRAME and (got == 1000).all()  # the late frame was not mixed in


def test_memory_stays_bounded_over_a_long_session(tmp_path: Path) -> None:
    """Two hours of a virtual session (sparse speech, long silences): the window never grows."""
    sink = MixdownSink(MixdownOptions(directory=tmp_path, filename="long", channels=1))
    sink.on_start(_session())
    pcm = (np.sin(np.arange(FRAME) / 7.0)[:, None] * np.array([[8000, -8000]])).astype(np.int16)
    tracemalloc.start()
    try:
        base_mem = 0
        peak_buffered = 0
        seq = 0
        for minute in range(120):
            if minute == 10:  # measure from a warmed-up state: interpreter tables settle by then
                base_mem = tracemalloc.get_traced_memory()[0]
            start = minute * 60 * RATE + (minute % 7) * 1000
            for k in range(250):  # 5 s of speech per minute for each of two users
                for user, offset in ((1, 0), (2, 3 * FRAME + 17)):
                    sink.on_audio(_frame(user, seq, start + offset + k * FRAME, pcm))
                seq += 1
                peak_buffered = max(peak_buffered, sink.buffered)
        grown = tracemalloc.get_traced_memory()[0] - base_mem
    finally:
        tracemalloc.stop()
    end = 120 * 60 * RATE
    sink.on_stop(end)
    sink.cleanup()
    assert peak_buffered <= sink.capacity < 7 * RATE
    assert sink.written == end
    # Keeping the frames would grow by ~2 MB a minute here (110 minutes measured): 5 MB is flat.
    assert grown < 5_000_000, f"memory grew by {grown} bytes from minute 10 to minute 120"
    assert sf.info(str(tmp_path / "long.wav")).frames == end


def test_file_is_readable_while_recording_and_repairable(tmp_path: Path) -> None:
    sink = MixdownSink(MixdownOptions(directory=tmp_path, filename="live", horizon_ms=1000))
    sink.on_start(_session())
    one = np.full((FRAME, 2), 7, dtype=np.int16)
    for k in range(500):  # 10 s
        sink.on_audio(_frame(1, k, k * FRAME, one))
    path = tmp_path / "live.wav"
    # as a crash would leave it: a valid WAV up to the last write, at most horizon + 1 s behind
    on_disk = sf.info(str(path)).frames
    assert on_disk == sink.written and on_disk >= 500 * FRAME - 2 * RATE - FRAME
    assert recover(path) == on_disk
    sink.on_stop(500 * FRAME)
    sink.cleanup()
    assert sf.info(str(path)).frames == 500 * FRAME


def test_disk_full_at_open(tmp_path: Path) -> None:
    (tmp_path / "full.wav").symlink_to("/dev/full")
    sink = MixdownSink(MixdownOptions(directory=tmp_path, filename="full"))
    with pytest.raises(SinkError, match="No space left"):
        sink.on_start(_session())
    sink.cleanup()  # must not raise again


def test_disk_full_mid_session_keeps_what_was_written(tmp_path: Path) -> None:
    """The file-size limit makes writes fail with EFBIG part-way, like a disk filling up."""
    limit = 44 + 5 * RATE * 4 + 1234  # 5 s of stereo audio and a partial frame
    script = textwrap.dedent(
        f"""
        import resource, signal, sys, time
        import numpy as np
        from listening_core import AudioFrame, FrameKind
        from listening_core.sinks import SessionInfo, SinkError
        from listening_sink_mixdown import MixdownOptions, MixdownSink
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
        sink = MixdownSink(MixdownOptions(directory={str(tmp_path)!r}, filename="mix", horizon_ms=1000))
        sink.on_start(SessionInfo(1, 2, time.time()))
        error = None
        for k in range(1000):
            pcm = np.full((960, 2), k, dtype="<i2").tobytes()
            try:
                sink.on_audio(AudioFrame(1, 1, k, k * 960, k * 960, FrameKind.RECEIVED, pcm))
            except SinkError as exc:
                error = exc
                break
        sink.cleanup()
        print(k, repr(error))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "File too large" in result.stdout
    got = _read(tmp_path / "mix.wav")
    accepted = (limit - 44) // 4
    assert got.shape[0] == accepted  # every whole sample the OS accepted, described by the header
    expected = np.repeat(np.arange(accepted // FRAME + 1, dtype=np.int16), FRAME)[:accepted]
    assert np.array_equal(got[:, 0], expected) and np.array_equal(got[:, 1], expected)


# ------------------------------------------------------------------------ end to end


class PositionsMixdown(MixdownSink):
    """The mixdown sink, also noting where each user's frames were placed (for the test's truth)."""

    def __init__(self, options: MixdownOptions) -> None:
        super().__init__(options)
        self.positions: dict[int, list[int]] = {}
        self.stop_end: int | None = None

    def on_valid_audio(self, frame: AudioFrame) -> None:
        self.positions.setdefault(frame.user_id, []).append(frame.position)
        super().on_valid_audio(frame)

    def on_stop(self, end: int) -> None:
        self.stop_end = end
        super().on_stop(end)


def _reference_frames(member: Any) -> list[np.ndarray]:
    pcm = np.frombuffer(reference_decode(s.opus for s in member.sent), dtype="<i2").reshape(-1, 2)
    return [pcm[i : i + FRAME] for i in range(0, len(pcm), FRAME)]


async def test_two_members_at_once_equal_the_clipped_sum(local_discord: LocalDiscord, tmp_path: Path) -> None:
    sink = PositionsMixdown(MixdownOptions(directory=tmp_path, filename="{channel_id}/../both"))
    rec = await record(
        local_discord,
        sink,
        schedules={
            "alice": Schedule.from_clips([("alice", 0.0), ("carol", 3.2)]),
            "bob": Schedule.from_clips([("bob", 0.5), ("dave", 3.4)]),
        },
        lead=0.3,
    )
    alice, bob, done = rec.members["alice"], rec.members["bob"], rec.calls
    assert done == [(sink, None)]

    assert sink.path is not None and sink.path.parent == tmp_path  # the template could not escape
    got = _read(sink.path)
    assert sink.stop_end is not None and got.shape[0] == sink.stop_end
    placed: list[tuple[int, np.ndarray]] = []
    for member in (alice, bob):
        frames = _reference_frames(member)
        positions = sink.positions[member.user_id]
        assert len(positions) == len(frames) == len(member.sent)
        placed.extend(zip(positions, frames, strict=True))
    # the two really overlapped
    spans = {m: (sink.positions[m.user_id][0], sink.positions[m.user_id][-1]) for m in (alice, bob)}
    assert spans[bob][0] < spans[alice][1] and spans[alice][0] < spans[bob][1]
    expected = _clipped_sum(placed, got.shape[0])
    assert np.array_equal(got, expected)


async def test_member_joining_late_lands_in_place(local_discord: LocalDiscord, tmp_path: Path) -> None:
    rec = await record(
        local_discord,
        "mixdown",
        options={"directory": str(tmp_path), "filename": "late"},
        schedules={"alice": Schedule.from_clips([("carol", 0.0)])},
        # bob joins 2 s into the session and speaks after alice's clip and its silence tail
        late={"bob": (1.9, Schedule.from_clips([("bob", 0.9)]))},
        lead=0.1,
        tail=0.5,
    )
    bob, done = rec.members["bob"], rec.calls
    t0 = rec.start  # session sample 0 is taken inside listen(), just before it returns
    assert len(done) == 1 and done[0][1] is None
    path = done[0][0].path

    got = _read(path)
    bob_ref = np.concatenate(_reference_frames(bob))
    expected_at = round((bob.sent[0].time - t0) * RATE)
    window = got[max(0, expected_at - 4 * FRAME) : expected_at + 4 * FRAME + len(bob_ref)]
    hits = [
        i
        for i in range(len(window) - len(bob_ref) + 1)
        if window[i, 0] == bob_ref[0, 0] and np.array_equal(window[i : i + len(bob_ref)], bob_ref)
    ]
    assert hits, "bob's audio is not in the mix, bit for bit, near where he spoke"
    found = max(0, expected_at - 4 * FRAME) + hits[0]
    assert abs(found - expected_at) <= FRAME, (found, expected_at)
    assert not got[found - 10 * FRAME : found].any()  # silence just before him
    assert got.shape[0] >= found + len(bob_ref)


async def test_disk_full_reaches_after_and_the_log(
    local_discord: LocalDiscord, tmp_path: Path, caplog: Any
) -> None:
    (tmp_path / "full.wav").symlink_to("/dev/full")
    with caplog.at_level(logging.ERROR):
        rec = await record(
            local_discord,
            "mixdown",
            options={"directory": str(tmp_path), "filename": "full"},
            schedules={"alice": Schedule.from_clips([("carol", 0.0)])},
            settle=0.0,
            lead=0.0,
            tail=0.0,
        )
    done = rec.calls
    assert len(done) == 1
    error = done[0][1]
    assert isinstance(error, SinkError) and "No space left" in str(error)
    assert any("No space left" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
