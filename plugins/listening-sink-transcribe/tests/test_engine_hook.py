"""The ``listening_transcription_engines`` hook: how the registry finds engines, and what it refuses."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytest

from listening_core.hookspecs import EngineSpec, Transcription, hookimpl
from listening_core.plugins import PluginConflictError, PluginError, SinkRegistry


@dataclass(frozen=True)
class EchoOptions:
    """Options of the echo engine."""

    text: str = "hello"


class Echo:
    def __init__(self, options: EchoOptions) -> None:
        self.options = options

    def transcribe(self, pcm: bytes, *, language: str | None, timeout: float) -> Transcription:
        return Transcription(self.options.text)

    def close(self) -> None:
        pass


class Provides:
    """A plugin providing the engines it is given (or raising, or returning nonsense)."""

    def __init__(self, result: Any) -> None:
        self.result = result

    @hookimpl
    def listening_transcription_engines(self) -> Any:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def echo(name: str = "echo") -> EngineSpec:
    return EngineSpec(name, Echo, EchoOptions, "says what it is told")


def registry(*plugins: Provides) -> SinkRegistry:
    reg = SinkRegistry(entry_points=lambda: [])
    for i, plugin in enumerate(plugins):
        reg.register(plugin, f"plugin-{i}")
    return reg


def test_engines_by_name() -> None:
    reg = registry(Provides([echo("echo"), echo("parrot")]))
    assert [spec.name for spec in reg.engines()] == ["echo", "parrot"]
    spec = reg.engine("parrot")
    assert spec.factory(EchoOptions("hi")).transcribe(b"", language=None, timeout=1) == Transcription("hi")
    unknown = r"unknown transcription engine 'ecko'; did you mean 'echo'\?.*installed engines: echo, parrot"
    with pytest.raises(PluginError, match=unknown):
        reg.engine("ecko")


def test_a_name_two_plugins_provide_is_unusable() -> None:
    reg = registry(Provides([echo()]), Provides([echo(), echo("other")]))
    assert [spec.name for spec in reg.engines()] == ["other"]
    with pytest.raises(PluginConflictError, match=r"'echo' is provided by .* uninstall all but one"):
        reg.engine("echo")


def test_a_broken_hook_leaves_only_its_engines_out(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        reg = registry(Provides(RuntimeError("boom")), Provides("not a list"), Provides([echo()]))
        assert [spec.name for spec in reg.engines()] == ["echo"]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("boom" in m for m in messages) and any(
        "must return a list of EngineSpec" in m for m in messages
    )


def test_engine_spec_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="engine name 'Echo!' is invalid"):
        EngineSpec("Echo!", Echo, EchoOptions, "x")
    with pytest.raises(TypeError, match="factory must be callable"):
        EngineSpec("echo", None, EchoOptions, "x")  # type: ignore[arg-type]

    @dataclass
    class Loose:
        text: str = ""

    with pytest.raises(TypeError, match="frozen"):
        EngineSpec("echo", Echo, Loose, "x")


def test_a_misspelt_engine_hook_is_refused() -> None:
    class Misspelt:
        @hookimpl
        def listening_transcription_engine(self) -> list[EngineSpec]:
            return []

    with pytest.raises(PluginError, match="did you mean 'listening_transcription_engines'"):
        registry(Misspelt())  # type: ignore[arg-type]
