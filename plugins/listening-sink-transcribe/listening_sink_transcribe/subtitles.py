"""SubRip (``.srt``) and WebVTT (``.vtt``) renderings of a transcript, with speaker labels."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = ["srt", "timestamp", "vtt"]


class _Cue(Protocol):
    @property
    def user(self) -> str: ...
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    @property
    def text(self) -> str: ...


def timestamp(seconds: float, separator: str) -> str:
    """``HH:MM:SS<separator>mmm`` (``,`` for SubRip, ``.`` for WebVTT)."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def _cues(utterances: Iterable[_Cue]) -> list[_Cue]:
    return [u for u in utterances if u.text.strip()]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def srt(utterances: Sequence[_Cue]) -> str:
    """The utterances (in the order given) as SubRip cues: ``Name: text``."""
    blocks = [
        f"{i}\n{timestamp(u.start, ',')} --> {timestamp(u.end, ',')}\n{u.user}: {_one_line(u.text)}\n"
        for i, u in enumerate(_cues(utterances), 1)
    ]
    return "\n".join(blocks)


def _voice(name: str) -> str:
    return name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def vtt(utterances: Sequence[_Cue]) -> str:
    """The utterances (in the order given) as WebVTT cues with voice spans: ``<v Name>text``."""
    blocks = ["WEBVTT\n"]
    blocks.extend(
        f"{timestamp(u.start, '.')} --> {timestamp(u.end, '.')}\n<v {_voice(u.user)}>{_voice(_one_line(u.text))}\n"
        for u in _cues(utterances)
    )
    return "\n".join(blocks)
