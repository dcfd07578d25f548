"""``listening demo`` end to end: the recording bot that ships, in its own process, records a
realistic channel through the loopback Discord, and what it wrote matches what was played.

It runs as a user of the installed package would: from an empty directory elsewhere than the
checkout, with nothing passed but ``--output``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from listening_core.demo import DEMO_SINKS, verify

ROOT = Path(__file__).resolve().parents[2]

START_TOLERANCE = 0.1  # s: a spurt's first frame vs when the loopback sent it
END_TOLERANCE = 0.15  # s: its last frame


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    where = tmp_path_factory.mktemp("demo")
    assert not any(where.iterdir()) and ROOT not in where.parents
    proc = subprocess.run(
        [sys.executable, "-m", "listening_core", "demo", "--output", str(where / "recordings")],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, PYTHONFAULTHANDLER="1"),
    )
    return proc, where / "recordings"


@pytest.mark.timeout(300)
def test_demo_exits_0_with_every_file(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, recordings = demo
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (folder,) = [p for p in recordings.iterdir() if p.is_dir()]
    members = ["alice", "bob", "carol", "dave"]
    assert verify(folder, members) == []
    for sink in DEMO_SINKS:
        assert (folder / sink).is_dir(), sink
    assert "every expected file was written" in proc.stdout
    # The live progress and the summary table name every member.
    for name in members:
        assert f"\n  {name}" in proc.stdout
    assert "The bot replied in the text channel" in proc.stdout
    # the test extra installs faster-whisper and tiny.en: the captions are printed as they come
    assert "demo: captions: on" in proc.stdout and "  caption [" in proc.stdout
    assert (folder / "transcribe" / "transcript.srt").is_file()
    assert "Task exception was never retrieved" not in proc.stderr
    assert "starting listening_core.ext.recorder" in proc.stdout  # the bot that ships
    assert "\x1b[" not in proc.stdout  # output to a pipe: plain lines, no cursor moves
    # nothing but what was asked for: the session folder under --output
    assert sorted(p.name for p in recordings.parent.iterdir()) == ["recordings"]


@pytest.mark.timeout(300)
def test_session_json_timings_match_what_the_loopback_played(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, recordings = demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    (folder,) = [p for p in recordings.iterdir() if p.is_dir()]
    report = json.loads((folder / "session.json").read_text())
    planned = json.loads((folder / "demo.json").read_text())["planned"]
    by_name = {m["name"]: m for m in report["members"]}
    assert set(by_name) == set(planned) == {"alice", "bob", "carol", "dave"}
    t0 = report["started_unix"]
    for name, spurts in planned.items():
        speech = by_name[name]["speech"]
        assert len(speech) == len(spurts), (name, speech, spurts)
        for (p_start, p_end), (start, end) in zip(spurts, speech, strict=True):
            assert abs(t0 + start - p_start) <= START_TOLERANCE, (name, start, p_start - t0)
            assert abs(t0 + end - p_end) <= END_TOLERANCE, (name, end, p_end - t0)
    # 2 % loss was on: every lost frame was recovered or concealed, and counted; nothing failed DAVE.
    stats = [m["stats"] for m in report["members"]]
    assert sum(s["lost"] for s in stats) > 0
    for s in stats:
        assert s["lost"] == s["recovered_fec"] + s["concealed"] - s["corrupt"]
        assert s["dave_failures"] == 0
    assert report["finished"] is True and report["timeline"] == "timeline.png"


@pytest.mark.timeout(300)
def test_timeline_png_is_a_picture_of_the_session(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, recordings = demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    (folder,) = [p for p in recordings.iterdir() if p.is_dir()]
    with Image.open(folder / "timeline.png") as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 800
        assert height >= 5 * 40  # a lane for each of four members and the mixdown
