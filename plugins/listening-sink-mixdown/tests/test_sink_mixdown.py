"""The ``mixdown`` sink: unit tests on synthetic frames, and end to end through the loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import signal
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
from listening_core.sinks import AudioFile, SessionInfo, SinkError
from listening_core.testing import LocalDiscord, Schedule, record
from listening_core.testing.media import reference_decode
from listening_core.testing.recording import fill_disk

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


def _pcm(frame: AudioFrame) -> np.ndarray:
    assert frame.pcm is not None
    return np.frombuffer(frame.pcm, dtype="<i2").reshape(-1, 2)


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
    """What the sink holds back for late frames is on disk too: a crash costs at most a block."""
    sink = MixdownSink(
        MixdownOptions(directory=tmp_path, filename="live", horizon_ms=3000, flush_interval=0.5)
    )
    sink.on_start(_session())
    path = tmp_path / "live.wav"
    delivered: list[tuple[int, np.ndarray]] = []

    def send(user: int, k: int, value: int) -> None:
        pcm = np.full((FRAME, 2), value, dtype=np.int16)
        sink.on_audio(_frame(user, k, k * FRAME, pcm))
        delivered.append((k * FRAME, pcm))

    def crash_check(users: int) -> np.ndarray:
        """The file as a crash would leave it: a valid WAV (header up to date, recover() agrees)
        holding exactly the mix of every frame delivered up to at most one block (0.5 s of
        audio) before the last one."""
        frames = sf.info(str(path)).frames
        assert recover(path) == frames
        got = _read(path)
        for missing in range(0, users * 26):  # a block is 25 frames of each user
            upto = delivered[: len(delivered) - missing]
            if np.array_equal(got, _clipped_sum(upto, max(p + FRAME for p, _ in upto))[: len(got)]):
                assert len(got) >= max(p + FRAME for p, _ in upto) - FRAME
                return got
        raise AssertionError("the file is not the mix of the frames delivered up to one block before")

    for k in range(500):  # 10 s of user 1
        send(1, k, 7 + k % 5)
    got = crash_check(users=1)
    # only what is older than the 3 s horizon is final, yet nearly all of it is on disk
    assert sink.written <= 500 * FRAME - 3 * RATE < 500 * FRAME - RATE // 2 - FRAME <= len(got)
    # user 2, 2 s behind (within the horizon): the part of the file ahead of the end is
    # rewritten with the new mix as the blocks go by
    for k in range(500, 560):
        send(1, k, 7 + k % 5)
        send(2, k - 100, 1000)
    got = crash_check(users=2)
    assert got[400 * FRAME : 401 * FRAME].min() >= 1007  # user 2's first frame, mixed in
    sink.on_stop(560 * FRAME)
    sink.cleanup()
    assert np.array_equal(_read(path), _clipped_sum(delivered, 560 * FRAME))


def test_write_ahead_is_on_disk_until_overwritten(tmp_path: Path) -> None:
    """The core's AudioFile.write_ahead, which the sink's crash safety rests on."""
    path = tmp_path / "a.wav"
    f = AudioFile(path, channels=2)
    f.write_samples(np.full((100, 2), 1, dtype=np.int16))
    f.write_ahead(np.full((50, 2), 2, dtype=np.int16))
    assert f.ahead == 50 and f.frames_written == 100
    assert sf.info(str(path)).frames == 150  # the header covers it: a crash now keeps it
    f.write_ahead(np.full((30, 2), 3, dtype=np.int16), offset=40)  # rewrite part of it, extend it
    with pytest.raises(ValueError, match="offset"):
        f.write_ahead(np.zeros((1, 2), dtype=np.int16), offset=71)  # would leave a hole
    assert _read(path)[:, 0].tolist() == [1] * 100 + [2] * 40 + [3] * 30
    f.write_samples(np.full((60, 2), 4, dtype=np.int16))  # the final audio overwrites what is ahead
    assert f.ahead == 10 and _read(path)[:, 0].tolist() == [1] * 100 + [4] * 60 + [3] * 10
    f.cleanup()  # closed with audio still ahead: it is kept
    assert _read(path)[:, 0].tolist() == [1] * 100 + [4] * 60 + [3] * 10
    resampled = AudioFile(tmp_path / "b.wav", sample_rate=16000)
    with pytest.raises(ValueError, match="48 kHz WAV"):
        resampled.write_ahead(np.zeros((10, 2), dtype=np.int16))
    resampled.cleanup()


def test_disk_full_at_open(tmp_path: Path) -> None:
    """Not even the header can be written (the file-size limit stands in for a full disk)."""
    script = textwrap.dedent(
        f"""
        import resource, signal, time
        from listening_core.sinks import SessionInfo, SinkError
        from listening_sink_mixdown import MixdownOptions, MixdownSink
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        sink = MixdownSink(MixdownOptions(directory={str(tmp_path)!r}, filename="full"))
        try:
            sink.on_start(SessionInfo(1, 2, time.time()))
        except SinkError as exc:
            print("raised", exc)
        sink.cleanup()  # must not raise again
        print("cleaned up")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "raised mixdown: cannot create" in result.stdout and "File too large" in result.stdout
    assert result.stdout.endswith("cleaned up\n")


def test_existing_files_are_never_overwritten(tmp_path: Path) -> None:
    """Two sessions started in the same second into one directory (two guilds), or a file left
    from before: each session gets a file of its own."""
    (tmp_path / "mix.wav").write_bytes(b"an earlier recording")
    sinks = [MixdownSink(MixdownOptions(directory=tmp_path, filename="mix")) for _ in range(2)]
    one = np.full((FRAME, 2), 5, dtype=np.int16)
    for n, sink in enumerate(sinks):
        sink.on_start(_session())
        sink.on_audio(_frame(1, 0, 0, one * (n + 1)))
    for sink in sinks:
        sink.on_stop(FRAME)
        sink.cleanup()
    assert [sink.path for sink in sinks] == [tmp_path / "mix-2.wav", tmp_path / "mix-3.wav"]
    assert (tmp_path / "mix.wav").read_bytes() == b"an earlier recording"
    assert [int(_read(sink.path)[0, 0]) for sink in sinks] == [5, 10]


def test_disk_full_mid_session_keeps_what_was_written(tmp_path: Path) -> None:
    """The file-size limit makes writes fail with EFBIG part-way, like a disk filling up."""
    header = 80  # RIFF, the JUNK chunk that keeps room for RF64's ds64, fmt, the data chunk's header
    limit = header + 5 * RATE * 4 + 1234  # 5 s of stereo audio and a partial frame
    script = textwrap.dedent(
        f"""
        import resource, signal, sys, time
        import numpy as np
        from listening_core import AudioFrame, FrameKind
        from listening_core.sinks import AudioFile, SessionInfo, SinkError
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
    assert (tmp_path / "mix.wav").read_bytes()[: header - 4].endswith(b"data")
    accepted = (limit - header) // 4
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
    async def fill_once_open(rec: Any) -> None:
        while rec.sink.path is None or not rec.sink.path.exists():
            await asyncio.sleep(0.005)
        # its descriptor now points at /dev/full: the next write (or seek, which /dev/full does
        # not do) fails, as on a full disk
        fill_disk(rec.sink.path)

    with caplog.at_level(logging.ERROR):
        rec = await record(
            local_discord,
            "mixdown",
            options={"directory": str(tmp_path), "filename": "full"},
            schedules={"alice": Schedule.from_clips([("carol", 0.0)])},
            settle=0.0,
            lead=0.0,
            tail=0.0,
            during=fill_once_open,
        )
    done = rec.calls
    assert len(done) == 1
    error = done[0][1]
    path = str(tmp_path / "full.wav")
    assert isinstance(error, SinkError) and path in str(error)
    assert any(path in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


# ------------------------------------------------------------------------------------- crash


def _record_until_killed(directory: Path, kill_after: float) -> tuple[list[tuple[float, AudioFrame]], float]:
    """Run ``_record_until_killed.py``: the frames it delivered to the sink (with the time each was
    handled) and the time it killed itself."""
    child = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("_record_until_killed.py")),
            str(directory),
            str(kill_after),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = child.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # its decode workers, orphaned by the kill
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL, f"the recorder exited with {child.returncode}"
    delivered: list[tuple[float, AudioFrame]] = []
    killed_at = None
    for line in out.splitlines():
        fields = line.split()
        if fields[:1] == ["frame"] and len(fields) == 7:
            t, user_id, ssrc, seq, position = float(fields[1]), *map(int, fields[2:6])
            pcm = base64.b64decode(fields[6])
            delivered.append((t, AudioFrame(user_id, ssrc, seq, 0, position, FrameKind.RECEIVED, pcm)))
        elif fields[:1] == ["kill"]:
            killed_at = float(fields[1])
    assert killed_at is not None and delivered, out[-2000:]
    return delivered, killed_at


def test_killed_recorder_leaves_a_readable_mixdown(tmp_path: Path) -> None:
    """SIGKILL 3 s into a clip, with the default 4 s horizon: the mix is on disk up to ~1 s before."""
    delivered, killed_at = _record_until_killed(tmp_path / "out", 3.0)
    [path] = (tmp_path / "out").glob("mixdown-*.wav")
    direct = _read(path)  # readable as it is ...
    samples = recover(path)  # ... and after recover(), with a header every reader agrees with
    got = _read(path)
    assert len(got) == samples == len(direct)
    assert recover(path) == samples  # idempotent
    # what the sink was handed, mixed (one speaker: the sum is her frames at their positions)
    frames = [frame for _, frame in delivered]
    mix = _clipped_sum([(f.position, _pcm(f)) for f in frames], max(f.end for f in frames))
    assert np.array_equal(got, mix[: len(got)])  # nothing but the mix, sample for sample ...
    must_have = max(f.end for t, f in delivered if t < killed_at - 1.0)
    last = max(f.end for f in frames)
    print(f"mixdown: the file ends {(last - len(got)) / RATE:.3f} s before the last frame delivered")
    assert len(got) >= must_have  # ... and all of it that was delivered up to 1 s before the kill
