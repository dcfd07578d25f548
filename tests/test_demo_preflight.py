"""``listening demo``'s set-up checks: each missing piece is named with the command that fixes it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from listening_core import demo
from listening_core.plugins import SinkRegistry

ROOT = Path(__file__).resolve().parent.parent
BOT = ROOT / "examples" / "record_bot.py"


def failing(checks: list[demo.Check]) -> dict[str, demo.Check]:
    return {c.name: c for c in checks if not c.ok}


def test_everything_present_passes() -> None:
    assert failing(demo.preflight(None, io.StringIO())) == {}  # the bot that ships
    assert failing(demo.preflight(BOT, io.StringIO())) == {}  # --bot examples/record_bot.py


def test_missing_libopus_without_root_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_have_libopus", lambda: False)
    monkeypatch.setattr(demo, "_is_root", lambda: False)
    found = failing(demo.preflight(BOT, io.StringIO(), install=True))
    assert set(found) == {"libopus"}
    assert "libopus" in found["libopus"].fix or "opus" in found["libopus"].fix


def test_without_the_flag_apt_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even as root with apt-get at hand: installing system packages is asked for, never assumed."""
    monkeypatch.setattr(demo, "_have_libopus", lambda: False)
    monkeypatch.setattr(demo, "_is_root", lambda: True)
    monkeypatch.setattr(demo.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    ran: list[object] = []
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: ran.append(a))
    out = io.StringIO()
    found = failing(demo.preflight(None, out))
    assert ran == [] and "apt-get" not in out.getvalue()
    assert set(found) == {"libopus"}
    assert "listening demo --install-system-deps" in found["libopus"].detail


def test_missing_libopus_as_root_is_installed_with_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    present = iter([False, True])
    monkeypatch.setattr(demo, "_have_libopus", lambda: next(present))
    monkeypatch.setattr(demo, "_is_root", lambda: True)
    monkeypatch.setattr(demo.shutil, "which", lambda tool: f"/usr/bin/{tool}")

    class Done:
        returncode = 0

    def fake_run(command: list[str], **kwargs: object) -> Done:
        calls.append(command)
        return Done()

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    out = io.StringIO()
    assert failing(demo.preflight(BOT, out, install=True)) == {}
    assert calls == [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "libopus0"]]
    assert "installing libopus0 with apt-get" in out.getvalue()


def test_missing_sinks_name_the_distributions(monkeypatch: pytest.MonkeyPatch) -> None:
    import listening_core.plugins

    monkeypatch.setattr(
        listening_core.plugins, "default_registry", lambda: SinkRegistry(entry_points=lambda: ())
    )
    found = failing(demo.preflight(BOT, io.StringIO()))
    assert set(found) == {"sinks"}
    assert "wav, flac, mp3, vad-segments, mixdown, ogg-opus" in found["sinks"].detail
    fix = found["sinks"].fix
    for dist in ("listening-sink-wav", "listening-sink-vad", "listening-sink-ogg"):
        assert dist in fix
    assert fix.startswith("pip install ") and "make demo" in fix


def test_the_bot_ships_with_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing of the checkout here
    assert failing(demo.preflight(None, io.StringIO())) == {}
    found = failing(demo.preflight(tmp_path / "nope.py", io.StringIO()))  # --bot a missing script
    assert set(found) == {"bot"} and "--bot" in found["bot"].fix and "nope.py" in found["bot"].detail


def test_verify_names_each_missing_file(tmp_path: Path) -> None:
    (tmp_path / "session.json").write_text('{"finished": false, "members": [{"name": "alice"}]}')
    problems = demo.verify(tmp_path, ["alice", "bob"])
    text = "\n".join(problems)
    assert "session.json does not say the session finished" in text
    assert "no member 'bob'" in text
    assert "timeline.png was not written" in text
    assert "wav:" in text and "bob.wav is missing" in text
    assert "ogg-opus:" in text and "alice.opus is missing" in text
    assert "no mixdown WAV" in text and "segments.jsonl is missing" in text


# ------------------------------------------------------------------------------- live display


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


REPORT = {
    "members": [
        {"name": "a-member-with-a-rather-long-display-name", "speaking": True, "stats": {"packets": 123456}},
        {"name": "bob", "stats": {"packets": 7}},
    ]
}


def test_progress_redraws_in_place_on_a_terminal_cut_to_its_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "40")
    out = _Terminal()
    progress = demo.Progress(out)
    progress.show(1.0, REPORT, "recording, with a note long enough to need cutting at forty columns")
    progress.show(2.0, REPORT, "recording")
    lines = out.getvalue().split("\n")
    assert "\x1b[5F\x1b[J" in out.getvalue()  # up over the 5 lines drawn, each one terminal line
    assert all(len(line.split("\x1b[J")[-1]) < 40 for line in lines), lines


@pytest.mark.parametrize("term", ["dumb", "pipe"])
def test_progress_without_cursor_control_prints_plain_lines(
    monkeypatch: pytest.MonkeyPatch, term: str
) -> None:
    monkeypatch.setenv("TERM", "dumb" if term == "dumb" else "xterm")
    monkeypatch.setenv("COLUMNS", "30")
    out = _Terminal() if term == "dumb" else io.StringIO()
    progress = demo.Progress(out)
    for second in range(3):
        progress.show(float(second), REPORT, "recording")
    text = out.getvalue()
    assert "\x1b" not in text
    assert text.count("recording") == 1  # every few seconds, not on every tick
    assert all(len(line) < 30 for line in text.splitlines())
