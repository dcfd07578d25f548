"""The one file namer every sink uses: template -> safe name -> unique on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from listening_core.sinks import (
    PLACEHOLDERS,
    SESSION_PLACEHOLDERS,
    SPEAKER_PLACEHOLDERS,
    AudioFrame,
    FileNamer,
    FrameKind,
    SessionInfo,
    check_template,
)

SESSION = SessionInfo(111, 222, 1_772_366_400.0)  # 2026-03-01 12:00:00 UTC


class _Member:
    display_name = "../Zoë/../CON"


def _frame(user_id: int, member: object = None) -> AudioFrame:
    frame = AudioFrame(user_id, 1, 0, 0, 0, FrameKind.RECEIVED)
    frame.member = member  # type: ignore[assignment]
    return frame


def test_every_sinks_placeholders_are_documented_once() -> None:
    assert set(SPEAKER_PLACEHOLDERS) | set(SESSION_PLACEHOLDERS) | {"index", "start_ms"} == set(PLACEHOLDERS)
    assert all(PLACEHOLDERS.values())


def test_placeholders_are_filled_from_the_frame_and_the_session(tmp_path: Path) -> None:
    namer = FileNamer(tmp_path, "{guild_id}-{channel_id}-{started}-{user_id}-{user}", ".wav")
    assert namer.for_speaker(_frame(7), SESSION) == "111-222-20260301-120000-7-7.wav"
    unknown = FileNamer(tmp_path, "x{guild_id}x{channel_id}x", ".wav")
    assert unknown.take(SessionInfo(None, None, 0.0), fallback="f") == "xxx.wav"


def test_names_are_safe_and_unique_and_never_overwrite(tmp_path: Path) -> None:
    (tmp_path / "7.opus").write_bytes(b"earlier")
    (tmp_path / "7-2.opus").symlink_to(tmp_path / "nowhere")  # dangling: still taken
    (tmp_path / "7-3.opus").mkdir()
    namer = FileNamer(tmp_path, "{user}", ".opus")
    names = [namer.for_speaker(_frame(7), SESSION) for _ in range(2)]
    assert names == ["7-4.opus", "7-5.opus"]
    assert (tmp_path / "7.opus").read_bytes() == b"earlier" and not (tmp_path / "nowhere").exists()
    hostile = namer.for_speaker(_frame(8, _Member()), SESSION)
    assert "/" not in hostile and not hostile.startswith(".")
    assert (tmp_path / hostile).resolve().parent == tmp_path.resolve()


def test_case_reserved_names_and_the_extension_in_the_template(tmp_path: Path) -> None:
    namer = FileNamer(tmp_path, "Segments", ".wav", reserved=("segments",))
    assert namer.take(SESSION, fallback="f") == "Segments-2.wav"
    assert FileNamer(tmp_path, "mix.WAV", ".wav").take(SESSION, fallback="f") == "mix.wav"
    assert FileNamer(tmp_path, "..", ".wav").take(SESSION, fallback="mixdown") == "mixdown.wav"


def test_a_sink_can_keep_its_own_started_form(tmp_path: Path) -> None:
    namer = FileNamer(
        tmp_path,
        "mixdown-{started}",
        ".wav",
        placeholders=SESSION_PLACEHOLDERS,
        started_format="%Y%m%dT%H%M%SZ",
        option="filename",
    )
    assert namer.take(SESSION, fallback="mixdown") == "mixdown-20260301T120000Z.wav"


def test_templates_are_checked_against_the_sinks_placeholders(tmp_path: Path) -> None:
    check_template("{user}-{started}")
    with pytest.raises(ValueError, match=r"filename '\{user\}' is invalid.*\{guild_id\}"):
        check_template("{user}", SESSION_PLACEHOLDERS, option="filename")
    with pytest.raises(ValueError, match="nope"):
        FileNamer(tmp_path, "{nope}", ".wav")
    with pytest.raises(TypeError):
        FileNamer(tmp_path, "{user}", ".wav").take(SESSION, fallback="f", index=1)
