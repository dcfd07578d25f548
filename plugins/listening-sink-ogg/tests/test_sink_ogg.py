"""The ogg-opus sink: the container (unit tests) and recording through the loopback Discord (end to end)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
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
    is_filler,
    ogg_crc,
    opus_packet_samples,
    read_packets,
    read_stream,
)

from listening_core import AudioFrame, FrameKind
from listening_core.plugins import OptionsError, default_registry, describe
from listening_core.sinks import SessionInfo, SinkError
from listening_core.testing import FaultConfig, LocalDiscord, Schedule, record
from listening_core.testing.media import SILENCE_FRAME, OpusEncoder, load_pcm, reference_decode
from listening_core.testing.recording import fill_disk

FRAME = 960
STEP = 120  # 2.5 ms: the grid of filled gaps
HERE = Path(__file__).parent


def _speech(n: int, clip: str = "alice") -> list[bytes]:
    return OpusEncoder().encode_pcm(load_pcm(clip))[:n]


def _opusdec(path: Path) -> np.ndarray:
    """``path`` decoded by opusfile, as players do: opus-tools' ``opusdec`` (float, so no dither)."""
    exe = shutil.which("opusdec")
    if exe is None:
        pytest.fail(
            "opusdec is missing: these tests decode the files with opusfile, as players do; "
            "install it with `apt-get install opus-tools` (scripts/bootstrap --test does)",
            pytrace=False,
        )
    out = path.with_name(path.name + ".opusdec.wav")
    done = subprocess.run(
        [exe, "--quiet", "--rate", "48000", "--float", str(path), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"opusdec failed on {path.name}: {done.stderr}"
    data, rate = sf.read(str(out), dtype="float32", always_2d=True)
    assert rate == 48_000
    return data


def _sndfile(path: Path) -> np.ndarray:
    """``path`` decoded by libsndfile (through soundfile)."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == 48_000
    return data


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


def test_granule_layout_headers_granules_gaps_and_end(tmp_path: Path) -> None:
    """``gaps='granule'``: every packet at its exact position, the gaps as granule jumps."""
    speech = _speech(40)
    placed = [(48_000 + i * FRAME, p) for i, p in enumerate(speech[:20])]
    placed += [(placed[-1][0] + FRAME * (i + 1), SILENCE_FRAME) for i in range(5)]
    resume = placed[-1][0] + FRAME + 30_000  # a 625 ms pause
    placed += [(resume + i * FRAME, p) for i, p in enumerate(speech[20:])]
    end = placed[-1][0] + FRAME + 100_000
    path = tmp_path / "t.opus"
    _write(path, placed, end, gaps="granule")

    stream = read_stream(path)
    assert stream.gaps == "granule" and not any(p.filler for p in stream.packets)
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


@pytest.mark.parametrize("gaps", ["fill", "granule"])
@pytest.mark.parametrize("tail", [0, 500, 960, 5000])
def test_end_marker_extends_or_trims_to_the_session_end(tmp_path: Path, tail: int, gaps: str) -> None:
    speech = _speech(10)
    placed = [(FRAME * i, p) for i, p in enumerate(speech)]
    end = FRAME * 10 + tail
    path = tmp_path / "t.opus"
    _write(path, placed, end, gaps=gaps)
    stream = read_stream(path)
    assert stream.granule == end and stream.packets[-1].end_of_stream
    if gaps == "granule":
        assert stream.packets[-1].start == max(FRAME * 10, end - FRAME)
    else:  # silence up to the marker, which starts on the 2.5 ms grid and is trimmed at the end
        assert stream.packets[-1].start == max(FRAME * 10, -(-(end - FRAME) // 120) * 120)
        assert all(a.end == b.start for a, b in zip(stream.packets, stream.packets[1:], strict=False))
    assert read_packets(path) == [(pos + FRAME, p) for pos, p in placed]
    assert len(decode_to_pcm(path)) == end * 4


def test_filled_gaps_decode_to_the_granule_length_in_players(tmp_path: Path) -> None:
    """``gaps='fill'`` (the default): a late start, lost frames, a pause and a minute of silence
    are packets, so libsndfile and opusfile, which count decoded samples, play the timeline; the
    received packets are byte-identical, in order, at their positions."""
    speech = _speech(55)
    received: list[tuple[int, bytes]] = []  # (position, packet)
    lost: list[int] = []
    path = tmp_path / "t.opus"
    with open(path, "wb", buffering=0) as f:
        writer = OggOpusWriter(f, serial=7, vendor="test")
        spurts = [(30_001, speech[:25]), (None, speech[25:45]), (None, speech[45:])]
        position = 0
        for i, (start, packets) in enumerate(spurts):
            position = start if start is not None else position + (59_261 if i == 1 else 61 * 48_000 + 77)
            for k, packet in enumerate([*packets, *[SILENCE_FRAME] * 5]):
                if i == 0 and k in (5, 6, 17):  # lost on the way
                    writer.lost(position)
                    lost.append(position)
                else:
                    writer.write(packet, position)
                    received.append((position, packet))
                position += FRAME
        end = position + 24_007  # the session ends in the speaker's silence
        writer.finish(end)

    stream = read_stream(path)
    assert stream.gaps == "fill" and stream.complete and stream.granule == end
    # received packets: byte-identical, in order, each within half a 2.5 ms step of its position
    assert [p.data for p in stream.audio_packets] == [p for _, p in received]
    assert all(
        abs(p.start - pos) <= STEP // 2 for p, (pos, _) in zip(stream.audio_packets, received, strict=True)
    )
    # no hole: every packet starts where the previous ended, from sample 0; the rest are fillers
    assert stream.packets[0].start == 0
    assert all(a.end == b.start for a, b in zip(stream.packets, stream.packets[1:], strict=False))
    fillers = [p for p in stream.packets if p.filler]
    assert len(fillers) + len(received) + 1 == len(stream.packets) and stream.has_end_marker
    concealed = [p for p in fillers if len(p.data) == 3]  # code 3, no frame bytes: conceal
    assert [p.start for p in concealed] == [stream.audio_packets[0].start + FRAME * k for k in (5, 6, 17)]
    assert all(p.data[0] & 0xFC == speech[0][0] & 0xFC for p in concealed)  # the previous packet's mode
    assert sum(len(p.data) for p in fillers) < 16_000  # a minute of silence is ~500 packets of 15 bytes

    # the players' decoded length is the granule length: the session's, less the pre-skip
    expected = end - PRE_SKIP
    for decoded in (_sndfile(path), _opusdec(path)):
        assert len(decoded) == expected
        # and the audio is where decode_to_pcm (every packet at its granule) puts it
        placed = np.frombuffer(decode_to_pcm(path, apply_pre_skip=True), "<i2").reshape(-1, 2) / 32768
        assert np.abs(decoded - placed).max() < 4 / 32768
    assert len(decode_to_pcm(path)) == end * 4


def test_fillers_are_told_from_received_packets() -> None:
    assert is_filler(bytes((0xFB, 0x46, 0)) + b"\xff\xfe" * 6)  # 120 ms of silence
    assert is_filler(bytes((0x7F, 0x41, 0)))  # conceal one 20 ms hybrid frame
    assert not is_filler(SILENCE_FRAME)  # what senders send: received
    assert not any(is_filler(p) for p in _speech(50))
    assert not is_filler(bytes((0xFB, 0x06)) + b"\xff\xfe" * 6)  # no padding flag: not ours
    assert not is_filler(bytes((0xFB, 0x42, 0)) + b"\xff\xfe\x00\x00")  # not all silent


def test_a_missing_opusdec_fails_the_tests_naming_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without opus-tools the player tests fail (never skip) and say what to install."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install opus-tools"):
        _opusdec(tmp_path / "t.opus")


def _golden_frames() -> tuple[list[AudioFrame], int]:
    """A late start, lost frames, two spurts and a pause, the end in silence; synthetic packets
    (not encoded, so the bytes do not depend on the libopus version)."""
    rng = random.Random(12)
    frames: list[AudioFrame] = []
    seq, position = 100, 12_345
    for _ in range(2):
        for i in range(30):
            if i in (7, 8, 15):
                opus, kind = None, FrameKind.PLC
            elif i >= 25:
                opus, kind = SILENCE_FRAME, FrameKind.SILENCE
            else:
                opus, kind = bytes([0x7C]) + rng.randbytes(rng.choice([40, 90, 130, 300])), FrameKind.RECEIVED
            frames.append(AudioFrame(42, 7, seq, position, position, kind, opus=opus))
            seq += 1
            position += FRAME
        position += 37_777
    return frames, position - 37_777 + 50_001


@pytest.mark.parametrize("gaps", ["granule", "fill"])
def test_the_granule_option_writes_the_layout_of_before(tmp_path: Path, gaps: str) -> None:
    """``gaps='granule'`` writes, byte for byte, what the sink wrote before gaps were filled
    (``tests/data/granule-layout-main-db582e8.opus``: these frames through main at db582e8)."""
    frames, end = _golden_frames()
    sink = OggOpusSink(directory=tmp_path, gaps=gaps)
    sink.on_start(SessionInfo(guild_id=5, channel_id=6, started_at=1_700_000_000.25))
    for frame in frames:
        sink.on_audio(frame)
    sink.on_stop(end)
    sink.cleanup()
    golden = (HERE / "data" / "granule-layout-main-db582e8.opus").read_bytes()
    data = sink.files[42].read_bytes()
    assert (data == golden) is (gaps == "granule")
    received = [frame.opus for frame in frames if frame.opus]
    assert [p for _, p in read_packets(sink.files[42])] == received  # both: the same packets
    assert sink.tracks[42].skipped == 6


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
    assert list(options) == ["directory", "template", "flush_interval", "gaps"]
    assert all(info.help for info in options.values())
    assert options["gaps"].default == "fill"
    assert registry.validate_options("ogg-opus", {"gaps": "granule"}).gaps == "granule"
    with pytest.raises(OptionsError, match="gaps"):
        registry.validate_options("ogg-opus", {"gaps": "jumps"})
    with pytest.raises(ValueError, match="gaps"):
        OggOpusSink(directory=HERE, gaps="jumps")
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
        # schedule's 20 ms slots from `begin`), within one frame (the 2.5 ms grid of filled gaps included)
        origin = (_wall(begin) - started) * 48_000 + FRAME * schedules[name].spurts[0].first_slot
        for (end, _), s in zip(packets, sent, strict=True):
            expected = origin + ((s.timestamp - sent[0].timestamp) & 0xFFFFFFFF)
            assert abs(end - FRAME - expected) <= FRAME
        stream = read_stream(path)
        assert stream.complete and abs(stream.granule - session_end) <= 48_000 // 2
        assert stream.gaps == "fill" and stream.packets[0].start == 0  # no hole from sample 0 on
        assert all(a.end == b.start for a, b in zip(stream.packets, stream.packets[1:], strict=False))
        # and decoded in place: the file's packets back to back (fillers included, as every player
        # decodes them, here by discord.py's decoder) give decode_to_pcm's track, silence in the pause
        pcm = decode_to_pcm(path)
        assert pcm == reference_decode(p.data for p in stream.packets)[: stream.granule * 4]
        k = next(i for i in range(len(packets) - 1) if packets[i + 1][0] - packets[i][0] > FRAME)
        assert sent[k].opus == SILENCE_FRAME and packets[k + 1][0] - packets[k][0] > 48_000  # the pause
        assert not any(pcm[packets[k][0] * 4 : (packets[k + 1][0] - FRAME) * 4])
    assert sink.errors == {}


def _mono(track: np.ndarray) -> np.ndarray:
    return track.astype(np.float64).mean(axis=1)


def _offset(reference: np.ndarray, track: np.ndarray, start: int, n: int, search: int) -> tuple[int, float]:
    """Where ``reference[start : start + n]`` is in ``track``, as an offset from ``start`` within
    ``search`` samples either way (normalized cross-correlation), and how well it matches (0..1)."""
    window = reference[start : start + n]
    span = np.pad(track, search)[start : start + n + 2 * search]  # silence beyond the track's ends
    size = 1 << (len(span) + n).bit_length()
    corr = np.fft.irfft(np.fft.rfft(span, size) * np.conj(np.fft.rfft(window, size)), size)[
        : len(span) - n + 1
    ]
    energy = np.concatenate(([0.0], np.cumsum(span**2)))
    norms = np.sqrt(np.maximum(energy[n:] - energy[:-n], 1e-12) * float(window @ window))
    score = corr / norms
    best = int(np.argmax(score))
    return best - search, float(score[best])


@pytest.mark.timeout(120)
@pytest.mark.local_discord(faults=FaultConfig(seed=12, loss=0.02))
async def test_players_decode_every_track_aligned_with_the_wav(
    local_discord: LocalDiscord, tmp_path: Path
) -> None:
    """wav and ogg-opus in one session with pauses, a late joiner and 2 % loss. Each ogg-opus
    file decoded by libsndfile (soundfile) and by opusfile (opusdec) is as long as the session
    (the WAV's length) within one frame, and its speech is where the member's WAV has it."""
    rec = await record(
        local_discord,
        ["wav", "ogg-opus"],  # type: ignore[arg-type]  # listen() takes a list of names too
        options={
            "wav": {"directory": str(tmp_path / "wav")},
            "ogg-opus": {"directory": str(tmp_path / "ogg")},
        },
        schedules={
            "alice": Schedule.from_clips([("alice", 0.0), ("carol", 4.5)]),  # a 1.6 s pause
            "bob": Schedule.from_clips([("bob", 1.5)]),  # starts late, ends early
        },
        late={"dave": (2.0, Schedule.from_clips([("dave", 0.5)]))},  # joins the session midway
        settle=0.0,
        lead=0.3,
        tail=1.0,
        timeout=60,
    )
    assert rec.error is None
    wav_sink, ogg_sink = rec.sink["wav"], rec.sink["ogg-opus"]  # type: ignore[index]
    assert isinstance(ogg_sink, OggOpusSink) and ogg_sink.errors == {}
    # the loss reached the sink: frames without Opus, each one a concealment packet in the file
    assert sum(track.skipped for track in ogg_sink.tracks.values()) > 0
    session = {len(sf.read(str(path), dtype="int16")[0]) for path in wav_sink.paths.values()}
    assert len(session) == 1, f"the WAVs should all hold the session: {session}"
    (length,) = session
    search = 3 * 48_000  # 3 s either way: more than any pause or late start here
    for name, member in rec.members.items():
        path = ogg_sink.files[member.user_id]
        stream = read_stream(path)
        assert stream.gaps == "fill"
        # what arrived, byte for byte and in order; each frame lost on the way is a concealment packet
        sent = iter(s.opus for s in member.sent)
        assert all(any(p.data == opus for opus in sent) for p in stream.audio_packets)
        concealed = [p for p in stream.packets if p.filler and len(p.data) == 3]
        assert len(concealed) == ogg_sink.tracks[member.user_id].skipped
        wav = _mono(sf.read(str(wav_sink.paths[member.user_id]), dtype="float32", always_2d=True)[0])
        for decoder, decoded in (("libsndfile", _sndfile(path)), ("opusfile", _opusdec(path))):
            track = _mono(decoded)
            assert abs(len(track) - length) <= FRAME, (
                f"{name} by {decoder}: {len(track)} samples, session {length}"
            )
            checked = 0
            for start in range(0, length - 24_000, 24_000):  # each half second of speech in the WAV
                if np.sqrt(np.mean(wav[start : start + 24_000] ** 2)) < 0.01:
                    continue
                offset, match = _offset(wav, track, start, 24_000, search)
                assert abs(offset) <= FRAME and match > 0.8, (
                    f"{name} by {decoder}: the speech at {start / 48_000:.2f} s of the WAV is "
                    f"{offset} samples away in the ogg-opus file (match {match:.2f})"
                )
                checked += 1
            assert checked >= 4, f"{name}: only {checked} half-seconds of speech"


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
    # a prefix of what was delivered, byte for byte, each at its position on the 2.5 ms grid
    assert [p for _, p in packets] == [opus for _, _, opus in delivered][: len(packets)]
    for (end, _), (_, position, _) in zip(packets, delivered, strict=False):
        assert abs(end - FRAME - position) <= 60
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
