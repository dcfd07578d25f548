"""The ogg-opus sink: the container (unit tests) and recording through the loopback Discord (end to end)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given
from hypothesis import strategies as st
from listening_sink_ogg import (
    PRE_SKIP,
    OggOpusSink,
    OggOpusWriter,
    decode_to_pcm,
    ogg_crc,
    opus_packet_samples,
    read_packets,
    read_stream,
)

from listening_core import AudioFrame, FrameKind
from listening_core.plugins import OptionsError, default_registry, describe
from listening_core.sinks import SessionInfo, SinkError
from listening_core.testing import LocalDiscord, Schedule, record
from listening_core.testing.media import SILENCE_FRAME, OpusEncoder, load_pcm, reference_decode
from listening_core.testing.recording import fill_disk

FRAME = 960
HERE = Path(__file__).parent


def _speech(n: int, clip: str = "alice") -> list[bytes]:
    return OpusEncoder().encode_pcm(load_pcm(clip))[:n]


def _frame(
    user_id: int, position: int, opus: bytes | None, seq: int = 0, kind: FrameKind | None = None
) -> AudioFrame:
    if kind is None:
        kind = FrameKind.SILENCE if opus == SILENCE_FRAME else FrameKind.RECEIVED if opus else FrameKind.PLC
    return AudioFrame(user_id, 1000 + user_id, seq & 0xFFFF, position, position, kind, opus=opus)


# ------------------------------------------------------------------------------ the container


def test_crc_matches_the_ogg_polynomial() -> None:
    # the reference CRC-32/MPEG-2 without its initial value and final xor: check value of "123456789"
    assert ogg_crc(b"123456789") == 0x89A1897F
    assert ogg_crc(b"") == 0


@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1))
def test_ogg_crc_equals_the_bytewise_definition(data: bytes, start: int) -> None:
    from listening_sink_ogg.ogg import _ogg_crc_reference

    assert ogg_crc(data, start) == _ogg_crc_reference(data, start)
    assert ogg_crc(data[7:], ogg_crc(data[:7], start)) == ogg_crc(data, start)  # it chains


def test_packet_durations_from_the_toc() -> None:
    assert opus_packet_samples(SILENCE_FRAME) == 960
    assert all(opus_packet_samples(p) == 960 for p in _speech(20))
    assert opus_packet_samples(bytes([0x00])) == 480  # SILK NB 10 ms
    assert opus_packet_samples(bytes([(29 << 3) | 1])) == 2 * 240  # CELT 5 ms, two frames
    assert opus_packet_samples(bytes([(31 << 3) | 3, 6])) == 5760  # 6 x 20 ms
    with pytest.raises(ValueError):
        opus_packet_samples(b"")


def _write(path: Path, placed: list[tuple[int, bytes]], end: int, **kw: Any) -> None:
    with open(path, "wb", buffering=0) as f:
        writer = OggOpusWriter(f, serial=7, vendor="test", **kw)
        for position, packet in placed:
            writer.write(packet, position)
        writer.finish(end)


def test_headers_granules_gaps_and_end(tmp_path: Path) -> None:
    speech = _speech(40)
    placed = [(48_000 + i * FRAME, p) for i, p in enumerate(speech[:20])]
    placed += [(placed[-1][0] + FRAME * (i + 1), SILENCE_FRAME) for i in range(5)]
    resume = placed[-1][0] + FRAME + 30_000  # a 625 ms pause
    placed += [(resume + i * FRAME, p) for i, p in enumerate(speech[20:])]
    end = placed[-1][0] + FRAME + 100_000
    path = tmp_path / "t.opus"
    _write(path, placed, end)

    stream = read_stream(path)
    assert (stream.version, stream.channels, stream.pre_skip, stream.input_sample_rate) == (1, 2, 312, 48_000)
    assert (stream.output_gain, stream.mapping_family) == (0, 0)
    assert stream.vendor == "test" and stream.complete and stream.has_end_marker
    assert stream.granule == end  # the file ends at the session's end
    assert read_packets(path) == [(pos + FRAME, p) for pos, p in placed]  # positions and bytes exact

    # the gap is between pages: the resumed packet starts a page whose granule jumps
    data = path.read_bytes()
    granules = [int.from_bytes(data[i + 6 : i + 14], "little", signed=True) for i in _page_offsets(data)]
    assert granules == sorted(granules)  # never decreasing
    assert resume + FRAME * 20 in granules and placed[24][0] + FRAME in granules

    # decoding puts each packet at its position, silence in the gap, and runs to the end
    pcm = decode_to_pcm(path)
    assert len(pcm) == end * 4
    track = np.frombuffer(pcm, "<i2")
    reference = reference_decode([p for _, p in placed])
    for k, (position, _) in enumerate(placed):
        assert pcm[position * 4 : (position + FRAME) * 4] == reference[k * 3840 : (k + 1) * 3840]
    assert not track[: 48_000 * 2].any() and not track[(placed[24][0] + FRAME) * 2 : resume * 2].any()
    assert len(decode_to_pcm(path, apply_pre_skip=True)) == (end - PRE_SKIP) * 4


def _page_offsets(data: bytes) -> list[int]:
    offsets, pos = [], 0
    while pos < len(data):
        assert data[pos : pos + 4] == b"OggS"
        offsets.append(pos)
        segments = data[pos + 26]
        pos += 27 + segments + sum(data[pos + 27 : pos + 27 + segments])
    return offsets


@pytest.mark.parametrize("tail", [0, 500, 960, 5000])
def test_end_marker_extends_or_trims_to_the_session_end(tmp_path: Path, tail: int) -> None:
    speech = _speech(10)
    placed = [(FRAME * i, p) for i, p in enumerate(speech)]
    end = FRAME * 10 + tail
    path = tmp_path / "t.opus"
    _write(path, placed, end)
    stream = read_stream(path)
    assert stream.granule == end and stream.packets[-1].end_of_stream
    assert stream.packets[-1].start == max(FRAME * 10, end - FRAME)
    assert read_packets(path) == [(pos + FRAME, p) for pos, p in placed]
    assert len(decode_to_pcm(path)) == end * 4


def test_a_foreign_reader_accepts_the_stream(tmp_path: Path) -> None:
    """libsndfile (through soundfile) checks every page's CRC and the headers, and decodes.

    It concatenates the packets (it ignores granule jumps), so compare with that.
    """
    placed = [(FRAME * i, p) for i, p in enumerate(_speech(30))]
    path = tmp_path / "t.opus"
    _write(path, placed, FRAME * 30)
    info = sf.info(str(path))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("OGG", "OPUS", 48_000, 2)
    data, _ = sf.read(str(path), dtype="int16")
    reference = np.frombuffer(reference_decode([p for _, p in placed]), "<i2").reshape(-1, 2)[PRE_SKIP:]
    n = min(len(data), len(reference))
    assert n >= len(reference) - FRAME
    assert np.abs(data[:n].astype(int) - reference[:n]).max() <= 1


def test_truncation_anywhere_keeps_a_readable_prefix(tmp_path: Path) -> None:
    placed = [(FRAME * i, p) for i, p in enumerate(_speech(60))]
    path = tmp_path / "t.opus"
    with open(path, "wb", buffering=0) as f:
        writer = OggOpusWriter(f, serial=1, vendor="test")
        for i, (position, packet) in enumerate(placed):
            writer.write(packet, position)
            if i % 7 == 6:
                writer.flush()
        writer.finish(FRAME * 60)
    data = path.read_bytes()
    cut = tmp_path / "cut.opus"
    previous = 0
    for size in range(60, len(data), 37):
        cut.write_bytes(data[:size])
        packets = read_packets(cut)
        assert packets == [(pos + FRAME, p) for pos, p in placed[: len(packets)]]
        assert len(packets) >= previous
        previous = len(packets)
        assert not read_stream(cut).complete
    # a damaged page is skipped, the rest is still read
    offsets = _page_offsets(data)
    damaged = bytearray(data)
    damaged[offsets[3] + 40] ^= 0xFF
    cut.write_bytes(bytes(damaged))
    assert len(read_packets(cut)) == 60 - 7


# ---------------------------------------------------------------------------- the sink (offline)


def test_registered_by_entry_point_with_options() -> None:
    registry = default_registry()
    assert "ogg-opus" in registry.names()
    spec = registry.get("ogg-opus")
    assert spec.distribution == "listening-sink-ogg" and spec.version == "0.1.0.dev0"
    assert spec.wants_pcm is False and spec.factory is OggOpusSink
    options = {info.name: info for info in describe(spec)}
    assert list(options) == ["directory", "template", "flush_interval"]
    assert all(info.help for info in options.values())
    with pytest.raises(OptionsError, match="flush_interval"):
        registry.validate_options("ogg-opus", {"flush_interval": 0})
    with pytest.raises(OptionsError, match="template"):
        registry.validate_options("ogg-opus", {"template": "{nope}"})


def test_names_are_safe_and_unique(tmp_path: Path) -> None:
    sink = OggOpusSink(directory=tmp_path, template="../{guild_id}/x")
    sink.on_start(SessionInfo(guild_id=5, channel_id=6, started_at=time.time()))
    for user in (1, 2, 3):
        sink.on_audio(_frame(user, 0, SILENCE_FRAME))
    sink.on_stop(FRAME * 10)
    sink.cleanup()
    names = sorted(path.name for path in sink.files.values())
    assert names == ["_5_x-2.opus", "_5_x-3.opus", "_5_x.opus"]  # no "..", no "/"
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    for path in sink.files.values():
        assert read_stream(path).granule == FRAME * 10


def test_streams_to_disk_with_flat_memory_and_skips_lost_frames(tmp_path: Path) -> None:
    sink = OggOpusSink(directory=tmp_path)
    speech = _speech(100)
    sizes = []
    for i in range(3000):  # one minute
        opus = None if i % 50 == 25 else speech[i % 100]  # a lost frame each second
        sink.on_audio(_frame(1, i * FRAME, opus, seq=i))
        if i % 500 == 499:
            sizes.append(sink.files[1].stat().st_size)
            writer = sink.tracks[1].writer
            assert writer is not None and len(writer._pending) <= 255  # at most one page in memory
    assert sizes == sorted(sizes) and sizes[0] > 0 and len(set(sizes)) == len(sizes)
    sink.on_stop(3000 * FRAME)
    sink.cleanup()
    packets = read_packets(sink.files[1])
    assert len(packets) == 3000 - 60
    assert all(end % FRAME == 0 and (end // FRAME - 1) % 50 != 25 for end, _ in packets)


def test_flush_thread_writes_a_waiting_page(tmp_path: Path) -> None:
    sink = OggOpusSink(directory=tmp_path, flush_interval=0.2)
    for i, packet in enumerate(_speech(5)):
        sink.on_audio(_frame(1, i * FRAME, packet, seq=i))
    deadline = time.monotonic() + 3
    while len(read_packets(sink.files[1])) < 5:
        assert time.monotonic() < deadline, "the pending page was not written"
        time.sleep(0.05)
    sink.cleanup()


# --------------------------------------------------------------------------- end to end


def _wall(loop_time: float) -> float:
    """A loop (monotonic) time as time.time()."""
    return loop_time - asyncio.get_running_loop().time() + time.time()


async def test_recording_is_byte_exact_and_placed_on_the_timeline(
    local_discord: LocalDiscord, tmp_path: Path
) -> None:
    rec = await record(
        local_discord,
        "ogg-opus",
        options={"directory": str(tmp_path)},
        schedules={
            "alice": Schedule.from_clips([("alice", 0.0), ("carol", 4.2)]),
            "bob": Schedule.from_clips([("bob", 1.0), ("dave", 5.0)]),
        },
        settle=0.0,
        lead=0.5,
        tail=0.5,
        timeout=20,
    )
    sink, begin, schedules = rec.sink, rec.speak_at, rec.schedules
    assert isinstance(sink, OggOpusSink)
    assert rec.error is None
    assert rec.finished is not None and sink.session is not None
    started = sink.session.started_at
    session_end = round((_wall(rec.finished) - started) * 48_000)
    for name, member in rec.members.items():
        path = sink.files[member.user_id]
        assert path.name == f"{member.user.name}.opus"
        packets = read_packets(path)
        sent = member.sent
        # byte-identical to what the member sent, every frame (silence frames included)
        assert [p for _, p in packets] == [s.opus for s in sent]
        assert sum(s.opus == SILENCE_FRAME for s in sent) == 10
        # at the right positions: where the schedule put each frame (its RTP timestamp counts the
        # schedule's 20 ms slots from `begin`), within one frame
        origin = (_wall(begin) - started) * 48_000 + FRAME * schedules[name].spurts[0].first_slot
        for (end, _), s in zip(packets, sent, strict=True):
            expected = origin + ((s.timestamp - sent[0].timestamp) & 0xFFFFFFFF)
            assert abs(end - FRAME - expected) <= FRAME
        stream = read_stream(path)
        assert stream.complete and abs(stream.granule - session_end) <= 48_000 // 2
        # and decoded in place: each frame's decode at its position, silence in between
        pcm = decode_to_pcm(path)
        reference = reference_decode(s.opus for s in sent)
        for k, (end, _) in enumerate(packets):
            assert pcm[(end - FRAME) * 4 : end * 4] == reference[k * 3840 : (k + 1) * 3840]
        k = next(i for i in range(len(packets) - 1) if packets[i + 1][0] - packets[i][0] > FRAME)
        assert sent[k].opus == SILENCE_FRAME and packets[k + 1][0] - packets[k][0] > 48_000  # the pause
        assert not any(pcm[packets[k][0] * 4 : (packets[k + 1][0] - FRAME) * 4])
    assert sink.errors == {}


async def test_disk_full_surfaces_in_after_and_spares_the_others(
    local_discord: LocalDiscord, tmp_path: Path
) -> None:
    """Bob's file hits a full disk mid-session (its descriptor is pointed at /dev/full): ``after``
    gets the error, alice's file is whole, and bob's keeps the pages written before."""

    async def fill(rec: Any) -> None:
        await asyncio.sleep(2.0)
        fill_disk(rec.sink.tracks[rec.members["bob"].user_id].path)

    rec = await record(
        local_discord,
        "ogg-opus",
        options={"directory": str(tmp_path)},
        schedules={
            "alice": Schedule.from_clips([("alice", 0.0)]),
            "bob": Schedule.from_clips([("bob", 0.2)]),
        },
        settle=0.0,
        lead=0.0,
        timeout=20,
        during=fill,
    )
    sink, error, alice, bob = rec.sink, rec.error, rec.members["alice"], rec.members["bob"]
    assert isinstance(error, SinkError) and "bob.opus" in str(error)
    assert isinstance(error.__cause__, OSError)
    assert list(sink.errors) == [bob.user_id]
    kept = [p for _, p in read_packets(tmp_path / "bob.opus")]
    assert kept and kept == [s.opus for s in bob.sent if s.opus != SILENCE_FRAME][: len(kept)]
    packets = read_packets(tmp_path / "alice.opus")
    assert [p for _, p in packets] == [s.opus for s in alice.sent]
    assert read_stream(tmp_path / "alice.opus").complete


def test_sigkill_leaves_a_readable_file(tmp_path: Path) -> None:
    """A recording process killed with SIGKILL: the file holds everything delivered up to ~1 s before."""
    child = subprocess.Popen(
        [sys.executable, str(HERE / "_record_until_killed.py"), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    delivered: list[tuple[float, int, bytes]] = []
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 60
        for line in child.stdout:
            if line.startswith("frame "):
                _, t, position, opus = line.split()
                delivered.append((float(t), int(position), bytes.fromhex(opus)))
                if len(delivered) == 150:  # 3 s of speech delivered: kill it mid-recording
                    break
            assert time.monotonic() < deadline, "the child did not record"
        killed_at = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    stream = read_stream(tmp_path / "alice.opus")
    assert not stream.complete
    packets = [(p.end, p.data) for p in stream.audio_packets]
    expected = [(position + FRAME, opus) for _, position, opus in delivered]
    assert packets == expected[: len(packets)]  # a prefix of what was delivered, byte for byte
    must_have = [d for d in delivered if d[0] < killed_at - 1.0]
    assert must_have and len(packets) >= len(must_have)
    assert len(decode_to_pcm(tmp_path / "alice.opus")) == stream.granule * 4


async def test_an_existing_file_is_never_overwritten(local_discord: LocalDiscord, tmp_path: Path) -> None:
    """A second session into the same directory, and a link planted at the name, are left alone."""
    earlier = tmp_path / "alice.opus"
    earlier.write_bytes(b"an earlier session's recording")
    (tmp_path / "alice-2.opus").symlink_to(tmp_path / "elsewhere")
    rec = await record(
        local_discord,
        "ogg-opus",
        options={"directory": str(tmp_path)},
        schedules={"alice": Schedule.from_clips([("alice", 0.0)])},
        settle=0.0,
        lead=0.0,
        timeout=20,
    )
    assert rec.error is None
    assert earlier.read_bytes() == b"an earlier session's recording"
    assert not (tmp_path / "elsewhere").exists()
    alice = rec.members["alice"]
    assert [p for _, p in read_packets(tmp_path / "alice-3.opus")] == [s.opus for s in alice.sent]
