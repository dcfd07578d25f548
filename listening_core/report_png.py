"""The session report's ``timeline.png``: :func:`render_timeline` draws a :class:`SessionReport`.

Needs Pillow (``pip install 'listening-core[report]'``), imported only when a timeline is drawn, so
:mod:`listening_core.report` works without it. ``listening_core.report.render_timeline`` is this
function too.
"""

from __future__ import annotations

import datetime
import logging
import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .report import _PILLOW_HINT, SessionReport, _atomic_write, _levels_of
from .sinks import FRAME_SAMPLES, SAMPLE_RATE

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

__all__ = ["render_timeline"]

# the timeline's warnings are the report's: a bot's logging set up for the report keeps them
_log = logging.getLogger("listening_core.report")

_TITLE_H = 44
_LANE_H = 68
_LANE_GAP = 8
_AXIS_H = 40
_LABEL_W = 180
_RIGHT = 24
_BG = (255, 255, 255)
_LANE_BG = (242, 243, 246)
_GRID = (222, 225, 231)
_BASELINE = (200, 203, 210)
_TEXT = (33, 37, 41)
_MUTED = (110, 116, 124)
_MIX_COLOR = (55, 60, 68)
_PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
    (188, 189, 34),
)
_TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600)


def _tint(color: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """``color`` mixed with white (``amount`` of the colour kept)."""
    r, g, b = (round(255 - (255 - c) * amount) for c in color)
    return (r, g, b)


@dataclass(frozen=True)
class _Layout:
    """Where everything goes in the timeline image."""

    width: int
    height: int
    x0: int  # the plot's first column (time 0)
    x1: int  # just after the plot's last column (time ``seconds``)
    seconds: float
    lanes: tuple[tuple[int, int], ...]  # (top, bottom) of each member's lane, then the mixdown's
    axis: int  # the time axis's line

    def x_at(self, t: float) -> int:
        """The column of session time ``t`` (seconds)."""
        return self.x0 + math.floor(t / self.seconds * (self.x1 - self.x0))


def _layout(members: int, seconds: float, width: int) -> _Layout:
    lanes = []
    top = _TITLE_H
    for _ in range(members + 1):
        lanes.append((top, top + _LANE_H))
        top += _LANE_H + _LANE_GAP
    return _Layout(width, top + _AXIS_H, _LABEL_W, width - _RIGHT, seconds, tuple(lanes), top)


def _columns(levels: np.ndarray, step: float, seconds: float, pixels: int) -> np.ndarray:
    """The maximum level in each of ``pixels`` columns spanning ``seconds``; ``levels`` are ``step`` s each."""
    count = max(1, math.ceil(seconds / step - 1e-9))
    padded = np.zeros(count, dtype=np.uint8)
    padded[: min(count, len(levels))] = levels[:count]
    starts = np.floor(np.arange(pixels) * (seconds / step) / pixels).astype(np.int64)
    starts = np.minimum(starts, count - 1)
    return np.asarray(np.maximum.reduceat(padded, starts), dtype=np.uint8)


def _file_levels(path: Path, blocksize_frames: int = 250) -> tuple[np.ndarray, float]:
    """One level per 20 ms of the audio file ``path``, read in blocks; and the seconds per level."""
    import soundfile

    levels = bytearray()
    with soundfile.SoundFile(str(path)) as f:
        frame = max(1, round(f.samplerate / 50))
        for block in f.blocks(blocksize=frame * blocksize_frames, dtype="int16", always_2d=True):
            wide = np.asarray(block, dtype=np.int32)
            peaks = np.abs(wide).max(axis=1)
            if len(peaks) % frame:
                peaks = np.concatenate([peaks, np.zeros(frame - len(peaks) % frame, dtype=peaks.dtype)])
            levels.extend(_levels_of(peaks.reshape(-1, frame).max(axis=1)).tobytes())
        step = frame / f.samplerate
    return np.frombuffer(bytes(levels), dtype=np.uint8), step


def _clock_text(t: float, total: float) -> str:
    if total < 60:
        return f"{t:g} s"
    seconds = round(t)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if total >= 3600 else f"{rest // 60}:{rest % 60:02d}"


def _duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    if hours:
        return f"{hours} h {rest // 60:02d} min"
    return f"{rest // 60} min {rest % 60:02d} s"


def _load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans when the system has it (accents, Greek, Cyrillic), else Pillow's default font."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


class _Glyphs:
    """Which characters a font can draw (a missing one is drawn as the same box as U+F0001)."""

    def __init__(self, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> None:
        self.font = font
        self.known: dict[str, bool] = {}
        self.box = self._draw("\U000f0001")

    def _draw(self, char: str) -> bytes:
        from PIL import Image, ImageDraw

        image = Image.new("L", (64, 64))
        ImageDraw.Draw(image).text((8, 8), char, font=self.font, fill=255)
        return image.tobytes()

    def has(self, char: str) -> bool:
        """Whether the font draws ``char``."""
        if char.isascii():
            return True
        if char not in self.known:
            self.known[char] = self._draw(char) != self.box
        return self.known[char]

    def printable(self, text: str) -> str:
        """``text`` with what the font cannot draw folded to ASCII ("é" → "e") or replaced with "?"."""
        out = []
        for char in text:
            if self.has(char):
                out.append(char)
                continue
            base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
            out.append(base if base and all(self.has(c) for c in base) else "?")
        return "".join(out)


def _fit(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, room: int
) -> str:
    if draw.textlength(text, font=font) <= room:
        return text
    while text and draw.textlength(text + "...", font=font) > room:
        text = text[:-1]
    return text + "..."


def _label(glyphs: _Glyphs, member: Mapping[str, Any]) -> str:
    """A member's name as the font can draw it; their user id when little of it is left."""
    name = glyphs.printable(str(member["name"]))
    return (
        name if sum(c.isalnum() for c in name) >= 2 or name == member["name"] else f"user {member['user_id']}"
    )


def render_timeline(
    report: SessionReport,
    path: Path,
    *,
    mixdown: Path | None = None,
    width: int = 1600,
    place: str | None = None,
) -> Path:
    """Draw ``report``'s session as a PNG at ``path`` (written atomically); returns ``path``.

    Layout, top to bottom: a title line (start time in UTC, duration, member count, guild and
    channel); one lane per member (in order of first audio) labelled with the name, the seconds
    of speech and the share of lost frames, showing the speech intervals as shaded spans and the
    level envelope as mirrored bars in the member's colour; a last "mixdown" lane with the
    envelope of the ``mixdown`` audio file (read in blocks) or, without one, the loudest member
    at each moment; and a time axis with ticks every 1, 2, 5, 10, 15, 30 s, 1, 2, 5... min, chosen
    so labels do not crowd (faint vertical lines continue them across the lanes). Long sessions
    are downsampled to the image's width (the maximum level in each column).

    ``place`` (say ``"My Guild / General"``) replaces the guild and channel ids in the title.
    Needs Pillow (``pip install 'listening-core[report]'``).
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        raise ImportError(f"render_timeline needs Pillow: {_PILLOW_HINT}") from exc
    if width < 400:
        raise ValueError(f"width must be at least 400 pixels, got {width}")
    path = Path(path)
    state = report._copy()
    data = report._describe(state, finished=True)
    session = state.session
    by_id = {t.user_id: t for t in state.tracks}
    members = data["members"]
    step = state.frames_per_level * FRAME_SAMPLES / SAMPLE_RATE

    mix_levels: np.ndarray | None = None
    mix_step = step
    mix_label = "max of members"
    if mixdown is not None:
        try:
            mix_levels, mix_step = _file_levels(Path(mixdown))
            mix_label = Path(mixdown).name
        except Exception as exc:
            _log.warning(
                "session report: cannot read the mixdown %s (%s: %s); the timeline's mixdown lane "
                "shows the loudest member instead",
                mixdown,
                type(exc).__name__,
                exc,
            )
    seconds = float(data["duration"])
    if seconds <= 0 and mix_levels is not None:
        seconds = len(mix_levels) * mix_step
    seconds = max(seconds, 1.0)

    layout = _layout(len(members), seconds, width)
    pixels = layout.x1 - layout.x0
    title_font, label_font, small_font = _load_font(18), _load_font(15), _load_font(12)
    glyphs = _Glyphs(label_font)

    image = Image.new("RGB", (layout.width, layout.height), _BG)
    draw = ImageDraw.Draw(image)

    tick = next((s for s in _TICK_STEPS if s * pixels / seconds >= 80), _TICK_STEPS[-1])
    ticks = [i * tick for i in range(int(seconds // tick) + 1)]
    lanes_top, lanes_bottom = layout.lanes[0][0], layout.lanes[-1][1]

    envelopes: list[np.ndarray] = []
    colors: list[tuple[int, int, int]] = []
    for index, member in enumerate(members):
        color = _PALETTE[index % len(_PALETTE)]
        colors.append(color)
        levels = np.frombuffer(by_id[member["user_id"]].envelope, dtype=np.uint8)
        envelopes.append(levels)
        top, bottom = layout.lanes[index]
        draw.rectangle((layout.x0, top, layout.x1 - 1, bottom - 1), fill=_LANE_BG)
        for start, stop in member["speech"]:
            left = layout.x_at(start)
            right = max(left, layout.x_at(stop) - 1)
            draw.rectangle((left, top, min(right, layout.x1 - 1), bottom - 1), fill=_tint(color, 0.22))
    mix_top, mix_bottom = layout.lanes[-1]
    draw.rectangle((layout.x0, mix_top, layout.x1 - 1, mix_bottom - 1), fill=_LANE_BG)
    for t in ticks:
        x = layout.x_at(t)
        draw.line((x, lanes_top, x, lanes_bottom - 1), fill=_GRID)
    for top, bottom in layout.lanes:
        middle = (top + bottom) // 2
        draw.line((layout.x0, middle, layout.x1 - 1, middle), fill=_BASELINE)

    if mix_levels is None:
        count = max((len(e) for e in envelopes), default=0)
        mix_levels = np.zeros(count, dtype=np.uint8)
        for levels in envelopes:
            np.maximum(mix_levels[: len(levels)], levels, out=mix_levels[: len(levels)])
        mix_step = step

    pixels_rgb = np.array(image)
    half = _LANE_H // 2 - 4
    lane_data = [
        *zip(envelopes, [step] * len(envelopes), colors, strict=True),
        (mix_levels, mix_step, _MIX_COLOR),
    ]
    for (levels, level_step, color), (top, bottom) in zip(lane_data, layout.lanes, strict=True):
        heights = np.rint(_columns(levels, level_step, seconds, pixels).astype(np.float64) * half / 255)
        heights[heights > 0] = np.maximum(heights[heights > 0], 1)
        middle = (top + bottom) // 2
        rows = np.arange(top, bottom)[:, None]
        mask = (np.abs(rows - middle) <= heights[None, :]) & (heights[None, :] > 0)
        region = pixels_rgb[top:bottom, layout.x0 : layout.x1]
        region[mask] = color
    image = Image.fromarray(pixels_rgb)
    draw = ImageDraw.Draw(image)

    # the labels
    for index, member in enumerate(members):
        top, _ = layout.lanes[index]
        draw.rectangle((12, top + 10, 24, top + 22), fill=colors[index])
        draw.text(
            (32, top + 8),
            _fit(draw, _label(glyphs, member), label_font, _LABEL_W - 44),
            font=label_font,
            fill=_TEXT,
        )
        counts = member["frames"]
        voiced = counts["received"] + counts["fec"] + counts["plc"]
        details = [f"{_duration_text(member['speech_seconds'])} speech"]
        if voiced and counts["fec"] + counts["plc"]:
            details.append(f"{100 * (counts['fec'] + counts['plc']) / voiced:.1f}% lost (FEC/PLC)")
        for line, text in enumerate(details):
            draw.text(
                (32, top + 29 + 15 * line),
                _fit(draw, text, small_font, _LABEL_W - 44),
                font=small_font,
                fill=_MUTED,
            )
    draw.rectangle((12, mix_top + 10, 24, mix_top + 22), fill=_MIX_COLOR)
    draw.text((32, mix_top + 8), "mixdown", font=label_font, fill=_TEXT)
    draw.text(
        (32, mix_top + 30), _fit(draw, mix_label, small_font, _LABEL_W - 44), font=small_font, fill=_MUTED
    )

    # the time axis
    axis = layout.axis
    draw.line((layout.x0, axis, layout.x1 - 1, axis), fill=_TEXT)
    for t in ticks:
        x = layout.x_at(t)
        draw.line((x, axis, x, axis + 5), fill=_TEXT)
        label = _clock_text(t, seconds)
        text_width = draw.textlength(label, font=small_font)
        label_x = min(max(x - text_width / 2, layout.x0 - 8), layout.width - text_width - 2)
        draw.text((label_x, axis + 9), label, font=small_font, fill=_MUTED)

    # the title
    if session is not None:
        start = datetime.datetime.fromtimestamp(session.started_at, datetime.UTC).strftime(
            "%Y-%m-%d %H:%M:%S UTC"
        )
    else:
        start = "start unknown"
    parts = [
        f"Session {start}",
        _duration_text(float(data["duration"])),
        f"{len(members)} member{'s' if len(members) != 1 else ''}",
    ]
    if place:
        parts.append(place)
    else:
        if session is not None and session.guild_id is not None:
            parts.append(f"guild {session.guild_id}")
        if session is not None and session.channel_id is not None:
            parts.append(f"channel {session.channel_id}")
    if not report.finished:
        parts.append("still listening")
    draw.text(
        (12, 12),
        _fit(draw, "   |   ".join(parts), title_font, layout.width - 24),
        font=title_font,
        fill=_TEXT,
    )

    _atomic_write(path, lambda fh: image.save(fh, format="PNG"), sync=True)
    return path
