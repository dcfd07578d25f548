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
    assert failing(demo.preflight(BOT, io.StringIO())) == {}


def test_missing_libopus_without_root_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_have_libopus", lambda: False)
    monkeypatch.setattr(demo, "_is_root", lambda: False)
    found = failing(demo.preflight(BOT, io.StringIO()))
    assert set(found) == {"libopus"}
    assert "libopus" in found["libopus"].fix or "opus" in found["libopus"].fix


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
    assert failing(demo.preflight(BOT, out)) == {}
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


def test_missing_bot_says_where_to_run_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert demo.find_bot() == Path("examples/record_bot.py").resolve()  # found from the checkout
    assert demo.find_bot(str(tmp_path / "mine.py")) == tmp_path / "mine.py"  # --bot wins
    found = failing(demo.preflight(tmp_path / "nope.py", io.StringIO()))
    assert set(found) == {"bot"} and "--bot" in found["bot"].fix


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
