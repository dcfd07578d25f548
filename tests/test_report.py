"""Tests for listening_core.report: speech intervals, counts, session.json and the timeline PNG."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import soundfile
from PIL import Image

from listening_core import report as report_mod
from listening_core import report_png
from listening_core.receiver import UserStats
from listening_core.report import SessionReport, load_report, peak_level, render_timeline
from listening_core.sinks import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, FrameKind, SessionInfo

STARTED = 1795000000.123
ALICE, BOB = 10, 5
# Bob (the lower user id) speaks first, so the members' order shows the sort by first audio.
BURSTS = {
    ALICE: [(1.0, 3.4), (10.0, 12.2), (20.0, 24.0)],
    BOB: [(0.5, 0.9), (4.0, 8.0), (13.0, 14.5)],
}
END = 30.0
FRAME = FRAME_SAMPLES / SAMPLE_RATE  # 0.02 s


def member(name: str) -> Any:
    """A stand-in for discord.Member: the report only reads ``display_name``."""
    return cast(Any, SimpleNamespace(display_name=name))


def tone(position: int, amplitude: float = 0.5, freq: float = 440.0) -> bytes:
    """One frame (960 samples, stereo s16le) of a sine at session sample ``position``."""
    t = (np.arange(FRAME_SAMPLES) + position) / SAMPLE_RATE
    mono = np.rint(amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    return np.repeat(mono, 2).tobytes()


SILENT_PCM = bytes(FRAME_SAMPLES * 4)


class Feeder:
    """Sends one user's frames to a report, with increasing sequence numbers."""

    def __init__(self, report: SessionReport, user_id: int, who: Any = None) -> None:
        self.report = report
        self.user_id = user_id
        self.who = who
        self.sequence = 0

    def frame(self, position: int, kind: FrameKind = FrameKind.RECEIVED, pcm: bytes | None = None) -> None:
        if pcm is None:
            pcm = SILENT_PCM if kind is FrameKind.SILENCE else tone(position)
        self.report.on_audio(
            AudioFrame(
                self.user_id, 1000 + self.user_id, self.sequence, 0, position, kind, pcm, member=self.who
            )
        )
        self.sequence += 1

    def burst(
        self, start: float, end: float, *, silence_tail: int = 5, kinds: Iterator[FrameKind] | None = None
    ) -> int:
        """Frames from ``start`` to ``end`` seconds, then ``silence_tail`` silence frames; returns the next position."""
        position = round(start * SAMPLE_RATE)
        while position < round(end * SAMPLE_RATE):
            self.frame(position, next(kinds) if kinds is not None else FrameKind.RECEIVED)
            position += FRAME_SAMPLES
        for _ in range(silence_tail):
            self.frame(position, FrameKind.SILENCE)
            position += FRAME_SAMPLES
        return position


def two_speakers(*, stop: bool = True, **kwargs: Any) -> SessionReport:
    report = SessionReport(clock=None, **kwargs)
    report.on_start(SessionInfo(guild_id=1, channel_id=2, started_at=STARTED))
    for user_id, name in ((ALICE, "alice"), (BOB, "bob")):
        feeder = Feeder(report, user_id, member(name))
        for start, end in BURSTS[user_id]:
            feeder.burst(start, end)
    if stop:
        report.on_stop(round(END * SAMPLE_RATE))
    return report


def by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in data["members"]}


# -- levels ------------------------------------------------------------------------------------


def test_peak_level_is_a_db_scale() -> None:
    assert peak_level(0) == 0
    assert peak_level(32) == 0  # -60 dBFS
    assert peak_level(32767) == 255 and peak_level(32768) == 255
    assert peak_level(3277) == 170  # -20 dBFS: two thirds up
    levels = [peak_level(p) for p in (40, 100, 1000, 10000, 30000)]
    assert levels == sorted(levels) and len(set(levels)) == len(levels)
    peaks = np.array([0, 32, 100, 3277, 32767, 32768])
    assert report_mod._levels_of(peaks).tolist() == [peak_level(int(p)) for p in peaks]


# -- speech intervals and counts ----------------------------------------------------------------


def test_speech_intervals_match_the_bursts() -> None:
    data = two_speakers().snapshot()
    assert [m["name"] for m in data["members"]] == ["bob", "alice"]  # sorted by first audio
    members = by_name(data)
    for name, user_id in (("alice", ALICE), ("bob", BOB)):
        got = members[name]
        assert got["user_id"] == user_id
        assert len(got["speech"]) == len(BURSTS[user_id])
        for (start, end), (want_start, want_end) in zip(got["speech"], BURSTS[user_id], strict=True):
            assert abs(start - want_start) <= FRAME and abs(end - want_end) <= FRAME
        assert got["first_audio"] == got["speech"][0][0]
        assert got["last_audio"] == got["speech"][-1][1]
        total = sum(end - start for start, end in BURSTS[user_id])
        assert got["speech_seconds"] == pytest.approx(total, abs=FRAME * len(BURSTS[user_id]))


def test_gap_ms_merges_and_splits() -> None:
    def intervals(gap_ms: int, pause_ms: int) -> list[list[float]]:
        report = SessionReport(gap_ms=gap_ms, clock=None)
        feeder = Feeder(report, 1)
        end = feeder.burst(1.0, 2.0, silence_tail=0)
        feeder.burst((end / SAMPLE_RATE) + pause_ms / 1000, 3.5, silence_tail=0)
        return cast(list[list[float]], report.snapshot()["members"][0]["speech"])

    assert intervals(200, 200) == [[1.0, 3.5]]  # a pause of exactly gap_ms merges
    assert intervals(200, 100) == [[1.0, 3.5]]
    assert intervals(200, 220) == [[1.0, 2.0], [2.22, 3.5]]
    assert intervals(500, 400) == [[1.0, 3.5]]
    assert intervals(0, 0) == [[1.0, 3.5]]  # back-to-back frames always merge
    assert intervals(0, 20) == [[1.0, 2.0], [2.02, 3.5]]


def test_silence_frames_are_not_speech() -> None:
    report = SessionReport(gap_ms=200, clock=None)
    feeder = Feeder(report, 1)
    position = feeder.burst(1.0, 1.5, silence_tail=50)  # one second of Opus silence frames
    feeder.burst(position / SAMPLE_RATE, position / SAMPLE_RATE + 0.5, silence_tail=0)
    got = report.snapshot()["members"][0]
    assert got["speech"] == [[1.0, 1.5], [2.5, 3.0]]
    assert got["frames"]["silence"] == 50


def test_frame_counts_per_kind_and_names() -> None:
    report = SessionReport(clock=None)
    kinds = iter(
        [FrameKind.RECEIVED] * 10 + [FrameKind.FEC] * 3 + [FrameKind.PLC] * 7 + [FrameKind.RECEIVED] * 5
    )
    feeder = Feeder(report, 42)  # no member yet: named by id
    position = feeder.burst(0.0, 0.5, silence_tail=4, kinds=kinds)
    assert report.snapshot()["members"][0]["name"] == "42"
    feeder.who = member("carol")
    feeder.frame(position)
    feeder.who = None  # the name is remembered
    feeder.frame(position + FRAME_SAMPLES, FrameKind.PLC)
    got = report.snapshot()["members"][0]
    assert got["name"] == "carol"
    assert got["frames"] == {"received": 16, "silence": 4, "fec": 3, "plc": 8}
    # FEC and PLC frames are speech (lost audio, recovered or concealed)
    assert got["speech"] == [[0.0, 0.62]]  # 80 ms of silence frames: one interval


# -- speaking, now and duration -------------------------------------------------------------------


def test_speaking_follows_the_latest_frame_and_ends_with_the_session() -> None:
    report = SessionReport(clock=None)
    report.on_start(SessionInfo(1, 2, STARTED))
    alice, bob = Feeder(report, ALICE, member("alice")), Feeder(report, BOB, member("bob"))
    alice.burst(1.0, 5.0, silence_tail=0)
    bob.burst(4.0, 5.2, silence_tail=0)
    data = report.snapshot()
    assert data["now"] == 5.2 and not data["finished"]
    assert by_name(data)["alice"]["speaking"] and by_name(data)["bob"]["speaking"]  # 0.2 s <= 0.3 s
    bob.burst(5.2, 5.4, silence_tail=0)
    assert not by_name(report.snapshot())["alice"]["speaking"]  # 0.4 s ago
    # silence frames move "now" but are not speech
    bob.burst(5.4, 5.4, silence_tail=20)
    data = report.snapshot()
    assert data["now"] == 5.8 and not by_name(data)["bob"]["speaking"]
    assert by_name(report.snapshot(finished=False))["alice"]["last_audio"] == 5.0
    bob.burst(5.8, 6.0, silence_tail=0)
    assert by_name(report.snapshot())["bob"]["speaking"]
    report.on_stop(round(6.0 * SAMPLE_RATE))
    data = report.snapshot()
    assert data["finished"] and not any(m["speaking"] for m in data["members"])


def test_live_now_follows_the_wall_clock() -> None:
    wall = [STARTED + 3.1]
    report = SessionReport(clock=lambda: wall[0])
    report.on_start(SessionInfo(1, 2, STARTED))
    Feeder(report, ALICE, member("alice")).burst(1.0, 3.0, silence_tail=0)
    data = report.snapshot()
    assert data["now"] == 3.1 and data["duration"] == 3.0
    assert data["members"][0]["speaking"]
    wall[0] = STARTED + 10.0  # nobody sent anything since: alice stopped speaking long ago
    data = report.snapshot()
    assert data["now"] == 10.0 and not data["members"][0]["speaking"]
    report.on_stop(round(12.5 * SAMPLE_RATE))
    assert report.snapshot()["now"] == report.snapshot()["duration"] == 12.5


def test_duration_and_session_fields() -> None:
    report = two_speakers(stop=False)
    data = report.snapshot()
    assert data["duration"] == pytest.approx(24.0 + 5 * FRAME)  # alice's last silence frame
    assert not data["finished"]
    report.on_stop(round(END * SAMPLE_RATE))
    data = report.snapshot()
    assert data["duration"] == data["now"] == END and data["finished"]
    assert data["format"] == 1 and data["sample_rate"] == SAMPLE_RATE and data["gap_ms"] == 200
    assert data["guild_id"] == 1 and data["channel_id"] == 2
    assert data["started_unix"] == STARTED
    assert data["started_at"] == "2026-11-18T11:06:40.123Z"
    empty = SessionReport().snapshot()
    assert empty["started_at"] is None and empty["members"] == [] and empty["duration"] == 0


# -- session.json ------------------------------------------------------------------------------


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    report = two_speakers()
    out = tmp_path / "session"
    (out / "wav").mkdir(parents=True)
    (out / "wav" / "alice.wav").write_bytes(b"x" * 12345)
    elsewhere = tmp_path / "elsewhere.flac"
    elsewhere.write_bytes(b"y" * 7)
    stats = {ALICE: UserStats(packets=1200, lost=3), 99: UserStats(packets=4)}
    stats[ALICE].dropped["late"] = 2
    files = [("wav", out / "wav" / "alice.wav"), ("flac", elsewhere), ("mp3", out / "gone.mp3")]
    umask = os.umask(0o022)
    try:
        path = report.write(out, stats=stats, files=files, extra={"bot": "test", "format_note": "x"})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == (out / "timeline.png").stat().st_mode & 0o777 == 0o644
    assert path == out / "session.json"
    data = load_report(path)
    assert load_report(out) == data  # the directory works too
    expected = report.snapshot(stats=stats, files=files, directory=out)
    expected.update(timeline="timeline.png", mixdown=None, bot="test", format_note="x")
    assert data == json.loads(json.dumps(expected))
    assert data["files"] == [
        {"sink": "wav", "path": "wav/alice.wav", "bytes": 12345},
        {"sink": "flac", "path": str(elsewhere), "bytes": 7},
        {"sink": "mp3", "path": "gone.mp3", "bytes": None},
    ]
    members = by_name(data)
    assert members["alice"]["stats"]["packets"] == 1200 and members["alice"]["stats"]["dropped"] == {
        "late": 2
    }
    assert members["bob"]["stats"] is None
    assert members["99"]["stats"]["packets"] == 4 and members["99"]["first_audio"] is None
    assert data["members"][-1]["user_id"] == 99  # a member without audio comes last
    assert data["bot"] == "test" and data["finished"] is True and data["timeline"] == "timeline.png"
    assert (out / "timeline.png").is_file()
    # the speech intervals keep one line each
    assert "[1.0, 3.4]" in path.read_text()
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_a_live_write_has_no_timeline(tmp_path: Path) -> None:
    report = two_speakers(stop=False)
    data = load_report(report.write(tmp_path, finished=False))
    assert data["finished"] is False and data["timeline"] is None
    assert not (tmp_path / "timeline.png").exists()
    data = load_report(report.write(tmp_path, timeline=False))
    assert data["finished"] is True and data["timeline"] is None


def test_load_report_refuses_other_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.json").write_text('{"format": 2}')
    with pytest.raises(ValueError, match="not a session report"):
        load_report(tmp_path / "a.json")
    with pytest.raises(ValueError, match="format 2"):
        load_report(tmp_path / "b.json")


def test_write_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    report = two_speakers()
    (tmp_path / ".session.json.stale.tmp").write_text("{half")  # left by a killed process
    (tmp_path / "session.json.tmp").write_text("{half")
    report.write(tmp_path)
    first_json = (tmp_path / "session.json").read_bytes()
    first_png = (tmp_path / "timeline.png").read_bytes()
    assert load_report(tmp_path)["timeline"] == "timeline.png"

    # serialising fails: the previous session.json stays
    with pytest.raises(TypeError):
        report.write(tmp_path, extra={"bad": object()})
    assert (tmp_path / "session.json").read_bytes() == first_json

    # rendering fails half-way through the PNG: the previous PNG stays, session.json says null
    def broken_save(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        fp.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with caplog.at_level(logging.WARNING, logger="listening_core.report"):
        report.write(tmp_path, extra={"attempt": 2})
    assert "No space left on device" in caplog.text and "timeline.png not written" in caplog.text
    assert (tmp_path / "timeline.png").read_bytes() == first_png
    data = load_report(tmp_path)
    assert data["timeline"] is None and data["attempt"] == 2
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert leftovers == [".session.json.stale.tmp", "session.json.tmp"]  # only the stale ones


def test_missing_pillow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    report = two_speakers()
    for name in ("PIL", "PIL.Image", "PIL.ImageDraw", "PIL.ImageFont"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'listening-core\[report\]'"):
        render_timeline(report, tmp_path / "t.png")
    with caplog.at_level(logging.WARNING, logger="listening_core.report"):
        data = load_report(report.write(tmp_path))
    assert data["timeline"] is None and data["members"]
    assert "pip install 'listening-core[report]'" in caplog.text
    assert not (tmp_path / "timeline.png").exists()


# -- the timeline --------------------------------------------------------------------------------


def lane_columns(
    image: Image.Image, top: int, bottom: int, x0: int, x1: int, color: tuple[int, ...]
) -> np.ndarray:
    """How many pixels of each plot column in rows [top, bottom) have ``color``."""
    pixels = np.asarray(image.convert("RGB"))[top:bottom, x0:x1]
    return np.asarray((pixels == np.array(color, dtype=np.uint8)).all(axis=2).sum(axis=0))


def lane_is_background(image: Image.Image, top: int, bottom: int, x0: int, x1: int) -> np.ndarray:
    """Whether each plot column in rows [top, bottom) holds nothing but lane background, grid and baseline."""
    pixels = np.asarray(image.convert("RGB"))[top:bottom, x0:x1]
    allowed = np.zeros(pixels.shape[:2], dtype=bool)
    for color in (report_png._LANE_BG, report_png._GRID, report_png._BASELINE):
        allowed |= (pixels == np.array(color, dtype=np.uint8)).all(axis=2)
    return np.asarray(allowed.all(axis=0))


def check_lane(
    image: Image.Image,
    layout: Any,
    lane: int,
    color: tuple[int, int, int],
    bursts: list[tuple[float, float]],
    tolerance: int = 3,
) -> None:
    top, bottom = layout.lanes[lane]
    x0, x1 = layout.x0, layout.x1
    energy = lane_columns(image, top, bottom, x0, x1, color)
    background = lane_is_background(image, top, bottom, x0, x1)
    inside = np.zeros(x1 - x0, dtype=bool)
    near = np.zeros(x1 - x0, dtype=bool)
    for start, end in bursts:
        a, b = layout.x_at(start) - x0, layout.x_at(end) - x0
        inside[a + tolerance : b - tolerance] = True
        near[max(0, a - tolerance) : b + tolerance] = True
    assert inside.any()
    # a -6 dBFS tone: bars reach most of the way up and down
    assert (energy[inside] >= (bottom - top) // 2).all(), f"lane {lane}: missing audio inside the bursts"
    assert background[~near].all(), f"lane {lane}: something drawn where nobody spoke"
    assert (energy[~near] == 0).all()


def test_timeline_shows_each_member_where_they_spoke(tmp_path: Path) -> None:
    report = two_speakers()
    path = render_timeline(report, tmp_path / "timeline.png")
    image = Image.open(path)
    layout = report_png._layout(2, END, 1600)
    assert image.format == "PNG" and image.size == (1600, layout.height)
    assert (
        layout.height
        == report_png._TITLE_H + 3 * (report_png._LANE_H + report_png._LANE_GAP) + report_png._AXIS_H
    )
    palette = report_png._PALETTE
    check_lane(image, layout, 0, palette[0], BURSTS[BOB])  # bob spoke first: the first lane
    check_lane(image, layout, 1, palette[1], BURSTS[ALICE])
    # without a mixdown file, the last lane is the loudest member at each moment
    check_lane(image, layout, 2, report_png._MIX_COLOR, BURSTS[BOB] + BURSTS[ALICE])
    # the speech intervals are shaded in the lane (visible even where the bars leave room)
    top, bottom = layout.lanes[1]
    shade = report_png._tint(palette[1], 0.22)
    assert lane_columns(image, top, bottom, layout.x0, layout.x1, shade)[layout.x_at(11.0) - layout.x0] > 0


def test_timeline_mixdown_lane_comes_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = two_speakers()
    # a mixdown that differs from the members on purpose: only two bursts, one where nobody spoke
    mix_bursts = [(1.0, 3.4), (16.0, 18.0)]
    audio = np.zeros((round(END * SAMPLE_RATE), 2), dtype=np.int16)
    for start, end in mix_bursts:
        t = np.arange(round(start * SAMPLE_RATE), round(end * SAMPLE_RATE))
        audio[t, 0] = audio[t, 1] = np.rint(16000 * np.sin(2 * np.pi * 300 * t / SAMPLE_RATE))
    wav = tmp_path / "mix.wav"
    soundfile.write(str(wav), audio, SAMPLE_RATE, subtype="PCM_16")
    reads: list[int] = []
    real_read = soundfile.SoundFile.read

    def spy(self: soundfile.SoundFile, frames: int = -1, *args: Any, **kwargs: Any) -> Any:
        reads.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(soundfile.SoundFile, "read", spy)
    data = load_report(report.write(tmp_path / "out", mixdown=wav))
    assert data["timeline"] == "timeline.png"
    assert data["mixdown"] == str(wav)  # outside the report's directory: kept as given
    assert len(reads) > 1 and 0 < max(reads) < len(audio)  # in blocks, never the whole file
    image = Image.open(tmp_path / "out" / "timeline.png")
    layout = report_png._layout(2, END, 1600)
    check_lane(image, layout, 2, report_png._MIX_COLOR, mix_bursts)
    check_lane(image, layout, 1, report_png._PALETTE[1], BURSTS[ALICE])


def test_timeline_of_a_long_session_is_downsampled(tmp_path: Path) -> None:
    report = SessionReport(clock=None)
    report.on_start(SessionInfo(1, 2, STARTED))
    feeder = Feeder(report, ALICE, member("alice"))
    bursts = [(600.0, 660.0), (3600.0, 3700.0), (6500.0, 6600.0)]
    for start, end in bursts:
        feeder.burst(start, end)
    report.on_stop(round(7200 * SAMPLE_RATE))
    assert report._bin == 4  # two hours of frames halved twice to fit max_envelope
    assert len(report._tracks[ALICE].envelope) <= report.max_envelope
    image = Image.open(render_timeline(report, tmp_path / "t.png", width=1200))
    layout = report_png._layout(1, 7200.0, 1200)
    assert image.size == (1200, layout.height)
    check_lane(image, layout, 0, report_png._PALETTE[0], bursts, tolerance=2)


def test_envelope_memory_stays_small() -> None:
    report = SessionReport(clock=None)
    pcm = tone(0)
    for i in range(30 * 60 * 50):  # 30 minutes of frames
        report.on_audio(AudioFrame(ALICE, 1, i & 0xFFFF, 0, i * FRAME_SAMPLES, FrameKind.RECEIVED, pcm))
    track = report._tracks[ALICE]
    assert report._bin == 1 and len(track.envelope) == 90_000  # one level per frame
    assert sys.getsizeof(track.envelope) + sys.getsizeof(track.speech) < 100 * 1024
    # past max_envelope, resolution halves and the levels stay where they were
    small = SessionReport(clock=None)
    small.max_envelope = 1000
    feeder = Feeder(small, 1)
    feeder.burst(10.0, 11.0, silence_tail=0)
    feeder.burst(70.0, 71.0, silence_tail=0)
    envelope = small._tracks[1].envelope
    assert small._bin == 4 and len(envelope) <= 1000
    loud = [i * 4 * FRAME for i, level in enumerate(envelope) if level]
    assert loud[0] == pytest.approx(10.0, abs=4 * FRAME) and loud[-1] == pytest.approx(71.0, abs=4 * FRAME)
    assert not any(envelope[round(12.0 / (4 * FRAME)) : round(69.0 / (4 * FRAME))])


# -- threads -----------------------------------------------------------------------------------


def test_snapshot_while_another_thread_feeds_frames(tmp_path: Path) -> None:
    report = SessionReport(clock=None)
    report.on_start(SessionInfo(1, 2, STARTED))
    users = 300
    frames_each = 60
    silence = {i for i in range(frames_each) if i % 7 == 6}
    failures: list[BaseException] = []

    def deliver() -> None:
        try:
            pcm = tone(0)
            for user_id in range(users):  # new users keep appearing while snapshots are taken
                for i in range(frames_each):
                    kind = FrameKind.SILENCE if i in silence else FrameKind.RECEIVED
                    # a pause every 10 frames: intervals keep being appended
                    position = (i + 11 * (i // 10)) * FRAME_SAMPLES
                    report.on_audio(AudioFrame(user_id, user_id, i, 0, position, kind, pcm))
        except BaseException as exc:
            failures.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    thread = threading.Thread(target=deliver)
    snapshots = 0
    try:
        thread.start()
        while thread.is_alive() or snapshots < 3:
            data = report.snapshot()
            for m in data["members"]:
                assert all(len(i) == 2 and i[0] < i[1] for i in m["speech"])
                flat = [t for i in m["speech"] for t in i]
                assert flat == sorted(flat)
                assert sum(m["frames"].values()) <= frames_each
            if snapshots % 20 == 0:
                report.write(tmp_path, finished=False)
            snapshots += 1
    finally:
        thread.join()
        sys.setswitchinterval(interval)
    assert not failures
    assert snapshots > 3
    data = report.snapshot()
    assert len(data["members"]) == users
    for m in data["members"]:
        assert sum(m["frames"].values()) == frames_each
        assert m["frames"]["silence"] == len(silence)
        assert len(m["speech"]) == frames_each // 10


def test_names_the_font_cannot_draw_are_folded() -> None:
    from PIL import ImageFont

    glyphs = report_png._Glyphs(ImageFont.load_default(size=15))  # ASCII and little more
    assert glyphs.printable("Zoë Łukasz") == "Zoe ?ukasz"
    assert report_png._label(glyphs, {"name": "José", "user_id": 7}) == "Jose"
    assert report_png._label(glyphs, {"name": "中文", "user_id": 7}) == "user 7"
    assert report_png._label(glyphs, {"name": "?", "user_id": 7}) == "?"  # as given


def test_an_unreadable_mixdown_falls_back_to_the_members(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    report = two_speakers()
    bad = tmp_path / "mix.wav"
    bad.write_bytes(b"RIFF????WAVEnot really")
    with caplog.at_level(logging.WARNING, logger="listening_core.report"):
        path = render_timeline(report, tmp_path / "t.png", mixdown=bad)
    assert "cannot read the mixdown" in caplog.text
    layout = report_png._layout(2, END, 1600)
    check_lane(Image.open(path), layout, 2, report_png._MIX_COLOR, BURSTS[BOB] + BURSTS[ALICE])
