"""MultiSink and ``listen([...])``'s list handling: one session feeding several sinks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytest

from listening_core.hookspecs import SinkSpec, hookimpl
from listening_core.plugins import OptionsError, SinkRegistry, UnknownSinkError
from listening_core.sinks import (
    AudioFrame,
    AudioSink,
    FrameKind,
    MultiSink,
    RtcpPacket,
    SessionInfo,
    SinkError,
)
from listening_core.voice_client import _build_multi


class Recorder(AudioSink):
    def __init__(self, fail_on: int | None = None, wants: bool = True) -> None:
        self.frames: list[int] = []
        self.events: list[str] = []
        self.fail_on = fail_on
        self.cleaned = 0
        setattr(self, "wants_pcm", wants)  # noqa: B010

    def on_start(self, session: SessionInfo) -> None:
        self.events.append("start")

    def on_audio(self, frame: AudioFrame) -> None:
        if frame.sequence == self.fail_on:
            raise OSError(28, "No space left on device")
        self.frames.append(frame.sequence)

    def on_rtcp(self, packet: RtcpPacket) -> None:
        self.events.append("rtcp")

    def on_stop(self, end: int) -> None:
        self.events.append(f"stop {end}")

    def cleanup(self) -> None:
        self.cleaned += 1


def frame(seq: int) -> AudioFrame:
    return AudioFrame(1, 100, seq, seq * 960, seq * 960, FrameKind.RECEIVED, pcm=bytes(3840))


def run(sink: MultiSink, frames: int = 5) -> None:
    sink.on_start(SessionInfo(guild_id=1, channel_id=2, started_at=0.0))
    for seq in range(frames):
        sink.on_audio(frame(seq))
    sink.on_rtcp(RtcpPacket(100, 1, 200, b""))
    sink.on_stop(frames * 960)


def test_every_sink_gets_everything() -> None:
    a, b = Recorder(), Recorder()
    multi = MultiSink({"a": a, "b": b})
    run(multi)
    multi.cleanup()
    for sink in (a, b):
        assert sink.frames == [0, 1, 2, 3, 4]
        assert sink.events == ["start", "rtcp", "stop 4800"]
        assert sink.cleaned == 1
    assert multi["a"] is a and multi.errors == {}


def test_decodes_when_any_sink_wants_pcm() -> None:
    assert MultiSink([Recorder(wants=False), Recorder(wants=True)]).wants_pcm is True
    assert MultiSink([Recorder(wants=False), Recorder(wants=False)]).wants_pcm is False


def test_unnamed_sinks_get_distinct_names() -> None:
    assert list(MultiSink([Recorder(), Recorder()]).sinks) == ["Recorder", "Recorder-2"]


def test_a_failing_sink_is_stopped_alone_and_reported_at_cleanup(caplog: pytest.LogCaptureFixture) -> None:
    good, bad = Recorder(), Recorder(fail_on=2)
    multi = MultiSink({"good": good, "bad": bad})
    with caplog.at_level(logging.ERROR):
        run(multi)
    assert good.frames == [0, 1, 2, 3, 4]
    assert bad.frames == [0, 1]  # kept what it had; nothing more reached it
    assert bad.cleaned == 1  # cleaned up at once, so its files hold what was written
    assert "stop" not in " ".join(bad.events)
    assert "'bad' failed" in caplog.text
    with pytest.raises(SinkError, match=r"1 of 2 sinks failed: bad: OSError") as info:
        multi.cleanup()
    assert isinstance(info.value.__cause__, OSError)
    assert good.cleaned == 1 and bad.cleaned == 1


def test_when_every_sink_failed_the_session_ends() -> None:
    multi = MultiSink({"x": Recorder(fail_on=1), "y": Recorder(fail_on=3)})
    multi.on_audio(frame(1))
    with pytest.raises(SinkError, match="every sink failed"):
        multi.on_audio(frame(3))


def test_rejects_non_sinks_and_empty() -> None:
    with pytest.raises(ValueError, match="at least one"):
        MultiSink([])
    with pytest.raises(TypeError, match="not an AudioSink"):
        MultiSink({"x": object()})  # type: ignore[dict-item]


# -- listen([...]) ---------------------------------------------------------------------------

built: list[Recorder] = []


@dataclass(frozen=True)
class LevelOptions:
    level: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 9:
            raise ValueError(f"level must be 0-9, got {self.level}")


def make(options: Any) -> Recorder:
    sink = Recorder()
    built.append(sink)
    return sink


class Plugin:
    @hookimpl
    def listening_sinks(self) -> list[SinkSpec]:
        return [SinkSpec("alpha", make, LevelOptions, "a"), SinkSpec("beta", make, LevelOptions, "b")]


@pytest.fixture
def registry() -> SinkRegistry:
    built.clear()
    registry = SinkRegistry(entry_points=lambda: ())
    registry.register(Plugin(), "test")
    return registry


def test_build_multi_names_and_options(registry: SinkRegistry) -> None:
    extra = Recorder()
    multi, specs = _build_multi(registry, ["alpha", "beta", extra], {"beta": {"level": 3}})
    assert list(multi.sinks) == ["alpha", "beta", "Recorder"]
    assert list(specs) == ["alpha", "beta"]
    assert multi["Recorder"] is extra


@pytest.mark.parametrize(
    ("sinks", "options", "error", "match"),
    [
        ([], None, ValueError, "empty list"),
        (["alpha", "alpha"], None, ValueError, "'alpha' twice"),
        (["alpha"], {"gamma": {}}, ValueError, "'gamma', which is not among the sinks listed"),
        (["alpha"], [("alpha", {})], ValueError, "maps sink names"),
        (["alpha", "gamma"], None, UnknownSinkError, "gamma"),
        (["alpha", "beta"], {"beta": {"levl": 3}}, OptionsError, "level"),
        (["alpha", "beta"], {"beta": {"level": 12}}, OptionsError, "0-9"),
    ],
)
def test_build_multi_checks_everything_before_building_anything(
    registry: SinkRegistry, sinks: list[Any], options: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _build_multi(registry, sinks, options)
    assert built == []  # nothing was started


def test_build_multi_cleans_up_what_it_built_when_a_later_one_fails(registry: SinkRegistry) -> None:
    with pytest.raises(TypeError, match="not int"):
        _build_multi(registry, ["alpha", 5], None)  # type: ignore[list-item]
    assert len(built) == 1 and built[0].cleaned == 1
