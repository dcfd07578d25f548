# The fake sinks here are duck-typed (on_audio + cleanup), not AudioSink subclasses:
# mypy: disable-error-code="arg-type, return-value"
"""Tests for listening_core.plugins and the contract in listening_core.hookspecs.

Plugins are registered in code (module objects made here) and through entry points: the
sample distribution in ``tests/fixtures/sample_plugin`` is imported from its source directory
and offered to the registry by a fake entry point, so nothing has to be installed.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import logging
import pickle
import sys
import tomllib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

from listening_core import hookspecs, plugins
from listening_core.errors import ListeningError
from listening_core.hookspecs import ENTRY_POINT_GROUP, SinkSpec, hookimpl
from listening_core.plugins import (
    InvalidPluginError,
    OptionInfo,
    OptionsError,
    PluginConflictError,
    SinkRegistry,
    UnknownSinkError,
    default_registry,
    describe,
    validate_options,
)

if TYPE_CHECKING:
    from decimal import Decimal  # only for type checkers: BrokenOptions cannot be resolved at runtime

SAMPLE_DIR = Path(__file__).parent / "fixtures" / "sample_plugin"


# ------------------------------------------------------------------------ sinks, options, plugins


class FakeSink:
    """Any object with on_audio and cleanup will do as a sink."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.cleaned_up = False

    def on_audio(self, frame: Any) -> None:
        pass

    def cleanup(self) -> None:
        self.cleaned_up = True


class FakeOpusSink(FakeSink):
    """A sink that takes Opus packets as received."""

    wants_pcm = False


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass(frozen=True)
class VadOptions:
    silence_ms: int = field(default=500, metadata={"help": "silence that ends a segment"})
    threshold: float = 0.5
    directory: Path = field(default=Path("segments"), metadata={"help": "where segments go"})
    aggressiveness: Literal[0, 1, 2, 3] = 2
    label: str | None = None
    mode: Mode = Mode.FAST
    keep_silence: bool = False
    channels: tuple[int, ...] = (0, 1)
    names: list[str] = field(default_factory=list)
    on_segment: Callable[[Path], None] | None = None

    def __post_init__(self) -> None:
        if self.silence_ms <= 0:
            raise ValueError(f"silence_ms must be positive, got {self.silence_ms}")
        if self.keep_silence and self.silence_ms > 10_000:
            raise ValueError("keep_silence cannot be combined with silence_ms over 10000")


@dataclass(frozen=True)
class WavOptions:
    directory: Path = Path("recordings")


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class BrokenOptions:
    amount: Decimal = 0  # type: ignore[assignment]


@dataclass
class MutableOptions:
    level: int = 1


@dataclass(frozen=True)
class RequiredOptions:
    level: int


@dataclass(frozen=True)
class BadDefaultOptions:
    level: int = "high"  # type: ignore[assignment]


def _no_config() -> int:
    raise RuntimeError("no config")


@dataclass(frozen=True)
class CrashingOptions:
    level: int = field(default_factory=_no_config)


VAD = SinkSpec("vad-segments", FakeSink, VadOptions, "one file per spoken phrase")
WAV = SinkSpec("wav", FakeSink, WavOptions, "one WAV file per speaker")
OPUS = SinkSpec("ogg-opus", FakeOpusSink, NoOptions, "raw Opus in Ogg, losslessly", wants_pcm=False)


def plugin_module(name: str, *specs: SinkSpec) -> types.ModuleType:
    """A plugin module whose listening_sinks returns ``specs``."""
    module = types.ModuleType(name)

    @hookimpl
    def listening_sinks() -> list[SinkSpec]:
        return list(specs)

    module.listening_sinks = listening_sinks  # type: ignore[attr-defined]
    return module


@dataclass(frozen=True)
class FakeDist:
    name: str
    version: str


@dataclass
class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: name, value, dist, load()."""

    name: str
    target: object = None
    dist: FakeDist | None = None
    error: Exception | None = None
    value: str = "some_module"
    group: str = ENTRY_POINT_GROUP

    def load(self) -> object:
        if self.error is not None:
            raise self.error
        return self.target


def registry_with(*eps: FakeEntryPoint) -> SinkRegistry:
    registry = SinkRegistry(entry_points=lambda: eps)
    registry.load()
    return registry


@pytest.fixture
def sample_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """The fixture distribution's module, imported from its source directory."""
    monkeypatch.syspath_prepend(str(SAMPLE_DIR))
    sys.modules.pop("listening_sink_sample", None)
    import listening_sink_sample  # type: ignore[import-not-found]

    yield listening_sink_sample
    sys.modules.pop("listening_sink_sample", None)


@pytest.fixture
def registry() -> SinkRegistry:
    registry = SinkRegistry(entry_points=lambda: ())
    registry.register(plugin_module("vad_plugin", VAD), name="vad")
    registry.register(plugin_module("wav_plugin", WAV, OPUS), name="wav")
    return registry


# -------------------------------------------------------------------------------------- lookup


def test_lookup_by_name(registry: SinkRegistry) -> None:
    assert registry.names() == ["ogg-opus", "vad-segments", "wav"]
    assert [spec.name for spec in registry.specs()] == registry.names()
    spec = registry.get("vad-segments")
    assert spec.factory is FakeSink
    assert spec.options is VadOptions
    assert spec.distribution is None and spec.version is None  # registered in code
    assert "wav" in registry and "mp3" not in registry


def test_wants_pcm_flag_visible(registry: SinkRegistry) -> None:
    assert registry.get("vad-segments").wants_pcm is True
    assert registry.get("ogg-opus").wants_pcm is False
    assert registry.create("ogg-opus").wants_pcm is False  # what the receiver reads


def test_wants_pcm_must_agree_with_the_sink() -> None:
    made: list[FakeSink] = []

    def factory(options: Any) -> FakeSink:
        made.append(FakeSink(options))
        return made[-1]

    registry = SinkRegistry(entry_points=lambda: ())
    registry.register(plugin_module("p", SinkSpec("opus", factory, NoOptions, "x", wants_pcm=False)))
    with pytest.raises(
        InvalidPluginError, match="says wants_pcm=False, but the FakeSink it built has wants_pcm=True"
    ):
        registry.create("opus")
    assert made[0].cleaned_up


def test_create_builds_sink_with_options(registry: SinkRegistry) -> None:
    sink = registry.create("vad-segments", {"silence_ms": 800})
    assert isinstance(sink, FakeSink)
    assert sink.options == VadOptions(silence_ms=800)


def test_sink_spec_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="lower-case letters"):
        SinkSpec("Vad Segments", FakeSink, VadOptions, "x")
    with pytest.raises(TypeError, match="factory must be callable"):
        SinkSpec("x", 3, VadOptions, "x")
    with pytest.raises(TypeError, match="must be a dataclass"):
        SinkSpec("x", FakeSink, dict, "x")
    with pytest.raises(TypeError, match=r"must be @dataclass\(frozen=True\)"):
        SinkSpec("x", FakeSink, MutableOptions, "x")
    with pytest.raises(TypeError, match="must give every field a default; missing for level"):
        SinkSpec("x", FakeSink, RequiredOptions, "x")


# ------------------------------------------------------------------------------- unknown names


def test_unknown_sink_lists_installed_and_suggests(registry: SinkRegistry) -> None:
    with pytest.raises(UnknownSinkError) as info:
        registry.get("wave")
    message = str(info.value)
    assert message.splitlines()[0] == "unknown sink 'wave'; did you mean 'wav'?"
    assert "installed sinks:\n" in message
    assert "  vad-segments — one file per spoken phrase" in message
    assert "  wav          — one WAV file per speaker" in message
    assert "  ogg-opus     — raw Opus in Ogg, losslessly" in message
    assert "pip install listening-sink-wave" in message
    err = info.value
    assert isinstance(err, LookupError) and isinstance(err, ListeningError)
    assert err.sink == "wave" and err.suggestions[0] == "wav"
    assert err.installed == ("ogg-opus", "vad-segments", "wav")


def test_unknown_known_sink_names_its_distribution(registry: SinkRegistry) -> None:
    with pytest.raises(UnknownSinkError) as info:
        registry.get("mp3")
    assert "the 'mp3' sink comes with listening-sink-mp3: pip install listening-sink-mp3" in str(info.value)
    assert info.value.install == "listening-sink-mp3"


def test_unknown_near_a_known_name_suggests_its_distribution() -> None:
    registry = SinkRegistry(entry_points=lambda: ())
    with pytest.raises(UnknownSinkError) as info:
        registry.get("vad")
    message = str(info.value)
    assert "did you mean 'vad-segments'?" in message
    assert "no sinks are installed" in message
    assert "pip install listening-sink-vad" in message
    assert info.value.install == "listening-sink-vad"


def test_unknown_sink_normalises_spelling(registry: SinkRegistry) -> None:
    with pytest.raises(UnknownSinkError, match="did you mean 'vad-segments'"):
        registry.get("VAD_Segments")


def test_unknown_other_sink_names_generic_distribution(registry: SinkRegistry) -> None:
    with pytest.raises(UnknownSinkError) as info:
        registry.create("karaoke")
    assert "did you mean" not in str(info.value)
    assert "if 'karaoke' comes from a plugin, install it: pip install listening-sink-karaoke" in str(
        info.value
    )


# ------------------------------------------------------------------------------------- options


def test_options_defaults() -> None:
    assert validate_options(VAD, None) == VadOptions()
    assert validate_options(VAD, {}) == VadOptions()


def test_options_from_dict() -> None:
    opts = validate_options(VAD, {"silence_ms": 300, "mode": Mode.SLOW, "keep_silence": True})
    assert isinstance(opts, VadOptions)
    assert (opts.silence_ms, opts.mode, opts.keep_silence) == (300, Mode.SLOW, True)


def test_options_instance_returned_as_is() -> None:
    given = VadOptions(silence_ms=250)
    assert validate_options(VAD, given) is given


def test_options_instance_is_checked_and_converted() -> None:
    converted = validate_options(VAD, VadOptions(directory="out", threshold=1))
    assert converted.directory == Path("out") and isinstance(converted.directory, Path)
    assert converted.threshold == 1.0 and type(converted.threshold) is float
    with pytest.raises(OptionsError, match="option 'keep_silence' must be bool, got 'yes' \\(str\\)"):
        validate_options(VAD, VadOptions(keep_silence="yes"))
    given = VadOptions(channels=[0])
    assert validate_options(VAD, given).channels == (0,)


def test_options_of_another_class_rejected() -> None:
    with pytest.raises(OptionsError, match="options must be None, a dict or a VadOptions, got WavOptions"):
        validate_options(VAD, WavOptions())


def test_unknown_option_lists_valid_ones_with_defaults() -> None:
    with pytest.raises(OptionsError) as info:
        validate_options(VAD, {"silense_ms": 300})
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0] == "sink 'vad-segments' has no option 'silense_ms' (did you mean 'silence_ms'?)"
    assert lines[1] == "valid options:"
    assert "  silence_ms: int = 500 — silence that ends a segment" in lines
    assert "  threshold: float = 0.5" in lines
    assert "  directory: Path = 'segments' — where segments go" in lines
    assert "  aggressiveness: 0 | 1 | 2 | 3 = 2" in lines
    assert "  label: str | None = None" in lines
    assert "  mode: Mode = Mode.FAST" in lines
    assert "  channels: tuple[int, ...] = (0, 1)" in lines
    assert "  names: list[str] = []" in lines
    assert "  on_segment: Callable[[Path], None] | None = None" in lines
    assert info.value.sink == "vad-segments" and info.value.option == "silense_ms"
    assert isinstance(info.value, ValueError) and isinstance(info.value, ListeningError)


def test_several_unknown_options() -> None:
    with pytest.raises(
        OptionsError, match=r"has no options 'foo', 'treshold' \(did you mean 'threshold'\?\)"
    ):
        validate_options(VAD, {"foo": 1, "treshold": 0.2})


def test_unknown_option_of_sink_without_options() -> None:
    with pytest.raises(OptionsError, match="has no option 'level'\nsink 'ogg-opus' takes no options"):
        validate_options(OPUS, {"level": 1})


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"silence_ms": "500"}, "option 'silence_ms' must be int, got '500' (str)"),
        ({"silence_ms": True}, "option 'silence_ms' must be int, got True (bool)"),
        ({"silence_ms": 1.5}, "option 'silence_ms' must be int, got 1.5 (float)"),
        ({"threshold": "x"}, "option 'threshold' must be float, got 'x' (str)"),
        ({"keep_silence": 1}, "option 'keep_silence' must be bool, got 1 (int)"),
        ({"directory": 3}, "option 'directory' must be Path or str, got 3 (int)"),
        ({"aggressiveness": 5}, "option 'aggressiveness' must be one of 0, 1, 2, 3, got 5 (int)"),
        ({"aggressiveness": "2"}, "option 'aggressiveness' must be one of 0, 1, 2, 3, got '2' (str)"),
        ({"label": 7}, "option 'label' must be str or None, got 7 (int)"),
        (
            {"mode": "medium"},
            "option 'mode' must be one of Mode.FAST, Mode.SLOW (or their values 'fast', 'slow'), "
            "got 'medium' (str)",
        ),
        (
            {"channels": [0, "1"]},
            "option 'channels' must be tuple[int, ...], got [0, '1'] (list): item 1 must be int, got '1' (str)",
        ),
        ({"channels": 0}, "option 'channels' must be tuple[int, ...], got 0 (int)"),
        ({"names": ("a", 2)}, "option 'names' must be list[str], got ('a', 2) (tuple): item 1 must be str"),
        ({"on_segment": "print"}, "option 'on_segment' must be Callable[[Path], None] or None, got 'print'"),
    ],
)
def test_bad_type_names_option_expected_type_and_value(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(OptionsError) as info:
        validate_options(VAD, options)
    assert str(info.value).startswith(f"sink 'vad-segments': {expected}")
    assert info.value.option == next(iter(options))


def test_str_converted_to_path() -> None:
    opts = validate_options(VAD, {"directory": "/tmp/out"})
    assert opts.directory == Path("/tmp/out") and isinstance(opts.directory, Path)


def test_int_converted_to_float() -> None:
    opts = validate_options(VAD, {"threshold": 1})
    assert opts.threshold == 1.0 and type(opts.threshold) is float


def test_literal_accepted() -> None:
    assert validate_options(VAD, {"aggressiveness": 3}).aggressiveness == 3


def test_optional_accepts_none_and_value() -> None:
    assert validate_options(VAD, {"label": None}).label is None
    assert validate_options(VAD, {"label": "standup"}).label == "standup"


def test_sequences_enums_and_callables() -> None:
    opts = validate_options(VAD, {"channels": [1], "names": ("a", "b"), "mode": "slow", "on_segment": print})
    assert opts.channels == (1,) and opts.names == ["a", "b"]
    assert opts.mode is Mode.SLOW and opts.on_segment is print
    assert validate_options(VAD, {"mode": "FAST"}).mode is Mode.FAST  # by member name


def test_post_init_error_names_the_option() -> None:
    with pytest.raises(OptionsError) as info:
        validate_options(VAD, {"silence_ms": -5})
    assert str(info.value) == (
        "sink 'vad-segments': option 'silence_ms' = -5 rejected: silence_ms must be positive, got -5"
    )
    assert info.value.option == "silence_ms"
    assert isinstance(info.value.__cause__, ValueError)


def test_post_init_error_without_option_name() -> None:
    with pytest.raises(OptionsError) as info:
        validate_options(VAD, {"keep_silence": True, "silence_ms": 20_000})
    assert str(info.value) == (
        "sink 'vad-segments': options keep_silence=True, silence_ms=20000 rejected: "
        "keep_silence cannot be combined with silence_ms over 10000"
    )
    assert info.value.option is None


def test_options_object_pickles() -> None:
    opts = validate_options(VAD, {"directory": "out", "mode": "slow", "channels": [0], "names": ["x"]})
    assert pickle.loads(pickle.dumps(opts)) == opts


def test_callable_option_may_make_options_unpicklable() -> None:
    opts = validate_options(VAD, {"on_segment": lambda path: None})  # accepted
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(opts)


def test_describe_reports_type_default_and_help() -> None:
    infos = describe(VAD)
    assert infos[0] == OptionInfo("silence_ms", "int", 500, "silence that ends a segment")
    assert [info.name for info in infos] == [f.name for f in dataclasses.fields(VadOptions)]
    assert infos[2] == OptionInfo("directory", "Path", Path("segments"), "where segments go")
    assert str(infos[2]) == "directory: Path = 'segments' — where segments go"
    assert infos[8].default == []  # default_factory called
    assert describe(OPUS) == []


def test_registry_validate_options_by_name(registry: SinkRegistry) -> None:
    assert registry.validate_options("wav", {"directory": "x"}) == WavOptions(Path("x"))


# ------------------------------------------------------------------ entry points and the fixture


def test_entry_point_from_fixture_distribution(sample_module: types.ModuleType) -> None:
    ep = FakeEntryPoint(
        "sample", sample_module, FakeDist("listening-sink-sample", "0.1.0"), value="listening_sink_sample"
    )
    registry = registry_with(ep)
    assert registry.names() == ["sample", "sample-opus"]
    spec = registry.get("sample")
    assert (spec.distribution, spec.version) == ("listening-sink-sample", "0.1.0")
    assert registry.get("sample-opus").wants_pcm is False
    assert registry.create("sample-opus").wants_pcm is False
    # postponed annotations naming the plugin module's own types (Path, Quality, Literal)
    opts = registry.validate_options("sample", {"directory": "d", "quality": "low", "gain": 2})
    assert opts.directory == Path("d") and opts.quality is sample_module.Quality.LOW and opts.gain == 2.0
    assert pickle.loads(pickle.dumps(opts)) == opts
    with pytest.raises(OptionsError, match="option 'layout' must be one of 'per-user', 'mixed', got 'solo'"):
        registry.validate_options("sample", {"layout": "solo"})
    with pytest.raises(OptionsError, match="option 'channels' = 3 rejected: channels must be 1 or 2"):
        registry.create("sample", {"channels": 3})
    with pytest.raises(
        UnknownSinkError, match=r"  sample      — keeps PCM frames in memory \(listening-sink-sample 0.1.0\)"
    ):
        registry.get("sampel")
    assert registry.failures == {}


def test_loading_through_importlib_metadata(
    monkeypatch: pytest.MonkeyPatch, sample_module: types.ModuleType
) -> None:
    real = importlib.metadata.EntryPoint(
        name="sample", value="listening_sink_sample", group=ENTRY_POINT_GROUP
    )
    groups: list[str] = []

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        groups.append(group)
        return [real]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    registry = SinkRegistry()
    registry.load()
    assert groups == [ENTRY_POINT_GROUP]
    assert registry.names() == ["sample", "sample-opus"]
    assert registry.get("sample").distribution is None  # this EntryPoint has no distribution
    registry.load()  # idempotent
    assert registry.names() == ["sample", "sample-opus"] and registry.failures == {}


def test_default_registry_is_cached_per_process(
    monkeypatch: pytest.MonkeyPatch, sample_module: types.ModuleType
) -> None:
    ep = FakeEntryPoint("sample", sample_module, FakeDist("listening-sink-sample", "0.1.0"))
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda *, group: [ep])
    default_registry.cache_clear()
    try:
        first = default_registry()
        assert first is default_registry()
        assert first.names() == ["sample", "sample-opus"]
    finally:
        default_registry.cache_clear()


def test_fixture_distribution_declares_the_entry_point() -> None:
    project = tomllib.loads((SAMPLE_DIR / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][ENTRY_POINT_GROUP] == {"sample": "listening_sink_sample"}
    assert (SAMPLE_DIR / "listening_sink_sample.py").is_file()


# ------------------------------------------------------------------------------------ conflicts


def test_conflict_in_code_is_refused(registry: SinkRegistry) -> None:
    other = SinkSpec("wav", FakeSink, WavOptions, "another WAV writer")
    with pytest.raises(PluginConflictError) as info:
        registry.register(
            plugin_module("fancy", other, SinkSpec("fancy", FakeSink, NoOptions, "x")), name="fancy"
        )
    assert str(info.value) == (
        "sink 'wav' is provided by both plugin 'wav' (registered in code) and "
        "plugin 'fancy' (registered in code); uninstall one of them"
    )
    assert registry.names() == ["ogg-opus", "vad-segments", "wav"]  # nothing of 'fancy' was added
    assert not registry.plugin_manager.has_plugin("fancy")


def test_conflict_between_distributions(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="listening_core.plugins")
    registry = registry_with(
        FakeEntryPoint("wav", plugin_module("a", WAV, VAD), FakeDist("listening-sink-wav", "1.0.0")),
        FakeEntryPoint("fancy", plugin_module("b", WAV), FakeDist("fancy-wav", "0.3.0")),
    )
    expected = (
        "sink 'wav' is provided by both listening-sink-wav 1.0.0 and fancy-wav 0.3.0; "
        "uninstall one of them (e.g. pip uninstall fancy-wav)"
    )
    with pytest.raises(PluginConflictError) as info:
        registry.create("wav")
    assert str(info.value) == expected
    assert info.value.providers == ("listening-sink-wav 1.0.0", "fancy-wav 0.3.0")
    assert registry.names() == ["vad-segments"]  # the rest of listening-sink-wav still works
    assert set(registry.conflicts) == {"wav"}
    with pytest.raises(UnknownSinkError) as unknown:
        registry.get("wave")
    assert f"did you mean 'wav'?\n'wav' is unavailable: {expected}\n" in str(unknown.value)
    assert expected in caplog.text


# ------------------------------------------------------------------------------ broken plugins


def test_failing_plugin_recorded_logged_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="listening_core.plugins")
    error = ModuleNotFoundError("No module named 'lameenc'")
    registry = registry_with(
        FakeEntryPoint("mp3", dist=FakeDist("listening-sink-mp3", "1.2.0"), error=error),
        FakeEntryPoint("wav", plugin_module("wav", WAV), FakeDist("listening-sink-wav", "1.0.0")),
    )
    assert registry.names() == ["wav"]
    assert registry.failures == {"mp3": error}
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage() == (
        "sink plugin 'mp3' from listening-sink-mp3 1.2.0 could not be imported, its sinks are unavailable: "
        "ModuleNotFoundError: No module named 'lameenc'"
    )
    with pytest.raises(UnknownSinkError) as info:
        registry.create("mp3")
    message = str(info.value)
    assert message.splitlines()[1] == (
        "'mp3' is probably provided by a plugin that is installed but failed to load: "
        "listening-sink-mp3 1.2.0 (entry point 'mp3'): ModuleNotFoundError: No module named 'lameenc'; "
        "fix or reinstall it"
    )
    assert "pip install" not in message  # it is installed already
    # asking for another name still mentions the broken plugin
    with pytest.raises(UnknownSinkError, match=r"plugins that failed to load:\n  listening-sink-mp3 1\.2\.0"):
        registry.get("flac")


def test_plugin_breaking_the_contract_is_recorded(caplog: pytest.LogCaptureFixture) -> None:
    def raising() -> list[SinkSpec]:
        raise RuntimeError("boom")

    module = types.ModuleType("raising")
    module.listening_sinks = hookimpl(raising)  # type: ignore[attr-defined]
    bad_name = types.ModuleType("bad_name")
    bad_name.listening_sinks = hookimpl(  # type: ignore[attr-defined]
        lambda: [SinkSpec("Bad Name", FakeSink, NoOptions, "x")]
    )
    registry = registry_with(
        FakeEntryPoint("raising", module, FakeDist("listening-sink-raising", "1")),
        FakeEntryPoint("bad-name", bad_name, FakeDist("listening-sink-bad", "1")),
        FakeEntryPoint("wav", plugin_module("wav", WAV), FakeDist("listening-sink-wav", "1.0.0")),
    )
    assert registry.names() == ["wav"]
    assert set(registry.failures) == {"raising", "bad-name"}
    assert "listening_sinks() raised RuntimeError: boom" in str(registry.failures["raising"])
    assert "sink name 'Bad Name' is invalid" in str(registry.failures["bad-name"])
    assert not registry.plugin_manager.has_plugin("raising")  # unregistered again
    assert "listening-sink-raising 1 is broken" in caplog.text


class MisspelledHook:
    @hookimpl
    def listening_sink(self) -> list[SinkSpec]:
        return []


class ForgotReturn:
    @hookimpl
    def listening_sinks(self) -> None:
        pass


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        (
            types.ModuleType("empty"),
            "defines no hooks; decorate its functions with listening_core.hookspecs.hookimpl",
        ),
        (MisspelledHook(), "'listening_sink' is not a listening_core hook (did you mean 'listening_sinks'?)"),
        (ForgotReturn(), "must return a list of SinkSpec, got None"),
        (plugin_module("twice", WAV, WAV), "provides sink 'wav' twice"),
        (
            plugin_module("broken", SinkSpec("broken", FakeSink, BrokenOptions, "x")),
            "cannot resolve the annotations of its options class BrokenOptions: NameError",
        ),
        (
            plugin_module("crashing", SinkSpec("crashing", FakeSink, CrashingOptions, "x")),
            "building its default options raised RuntimeError: no config",
        ),
        (
            plugin_module("bad-default", SinkSpec("bad-default", FakeSink, BadDefaultOptions, "x")),
            "its default options are invalid: sink 'bad-default': option 'level' must be int, got 'high'",
        ),
    ],
)
def test_register_rejects_contract_violations(plugin: object, expected: str) -> None:
    registry = SinkRegistry(entry_points=lambda: ())
    with pytest.raises(InvalidPluginError) as info:
        registry.register(plugin, name="p")
    assert expected in str(info.value)
    assert registry.names() == [] and not registry.plugin_manager.has_plugin("p")


def test_registering_twice_is_refused(registry: SinkRegistry) -> None:
    with pytest.raises(
        InvalidPluginError, match="a plugin named 'wav' or this very plugin is already registered"
    ):
        registry.register(plugin_module("other", SinkSpec("other", FakeSink, NoOptions, "x")), name="wav")
    assert "other" not in registry


def test_options_class_defined_in_a_function_is_refused() -> None:
    @dataclass(frozen=True)
    class LocalOptions:
        level: int = 1

    registry = SinkRegistry(entry_points=lambda: ())
    with pytest.raises(InvalidPluginError, match="defined inside a function; define it at module level"):
        registry.register(plugin_module("local", SinkSpec("local", FakeSink, LocalOptions, "x")))


def test_factory_must_return_a_sink() -> None:
    registry = SinkRegistry(entry_points=lambda: ())
    registry.register(plugin_module("p", SinkSpec("nothing", lambda options: object(), NoOptions, "x")))
    with pytest.raises(InvalidPluginError, match="which is not an AudioSink"):
        registry.create("nothing")


def test_factory_error_propagates_with_a_note() -> None:
    def factory(options: Any) -> FakeSink:
        raise PermissionError("recordings/ is read-only")

    registry = SinkRegistry(entry_points=lambda: ())
    registry.register(plugin_module("p", SinkSpec("ro", factory, WavOptions, "x")))
    with pytest.raises(PermissionError) as info:
        registry.create("ro")
    assert "raised by the factory of sink 'ro'" in info.value.__notes__[0]


# ----------------------------------------------------------------------------------- other hooks


class Recorder:
    """A metrics plugin: implements the observer hooks, provides no sinks."""

    def __init__(self) -> None:
        self.created: list[tuple[Any, SinkSpec, Any]] = []
        self.finished: list[tuple[Any, BaseException | None]] = []

    @hookimpl
    def listening_sink_created(self, sink: Any, spec: SinkSpec, options: Any) -> None:
        self.created.append((sink, spec, options))

    @hookimpl
    def listening_session_finished(self, sink: Any, error: BaseException | None) -> None:
        self.finished.append((sink, error))


def test_listening_sink_created_called(registry: SinkRegistry) -> None:
    recorder = Recorder()
    registry.register(recorder, name="recorder")
    sink = registry.create("wav", {"directory": "out"})
    assert recorder.created == [(sink, registry.get("wav"), WavOptions(Path("out")))]


def test_listening_sink_created_error_cleans_up_and_propagates(registry: SinkRegistry) -> None:
    made: list[Any] = []

    class Failing:
        @hookimpl
        def listening_sink_created(self, sink: Any) -> None:
            made.append(sink)
            raise RuntimeError("metrics backend down")

    registry.register(Failing(), name="failing")
    with pytest.raises(RuntimeError, match="metrics backend down"):
        registry.create("wav")
    assert made[0].cleaned_up


def test_session_finished_called_and_errors_logged(
    registry: SinkRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    registry.register(recorder, name="recorder")
    sink = registry.create("wav")
    error = ConnectionError("voice websocket closed")
    registry.session_finished(sink, registry.get("wav"), error)
    assert recorder.finished == [(sink, error)]

    class Raising:
        @hookimpl
        def listening_session_finished(self) -> None:
            raise RuntimeError("upload failed")

    registry.register(Raising(), name="raising")
    registry.session_finished(sink)  # does not raise
    assert "a listening_session_finished hook raised" in caplog.text


def test_errors_pickle() -> None:
    err = OptionsError("bad", sink="wav", option="directory")
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.sink, copy.option) == ("bad", "wav", "directory")
    unknown = UnknownSinkError("nope", sink="x", installed=("wav",))
    assert pickle.loads(pickle.dumps(unknown)).installed == ("wav",)


def test_no_module_level_state() -> None:
    first = SinkRegistry(entry_points=lambda: ())
    first.register(plugin_module("wav", WAV))
    assert SinkRegistry(entry_points=lambda: ()).names() == []
    assert plugins.KNOWN_DISTRIBUTIONS["vad-segments"] == "listening-sink-vad"
    with pytest.raises(TypeError):
        plugins.KNOWN_DISTRIBUTIONS["x"] = "y"  # type: ignore[index]


# ------------------------------------------------------------ the contract, as hookspecs documents it


def _literal_blocks(doc: str) -> list[str]:
    """The reST literal blocks (after a line ending in ``::``) of a docstring, dedented."""
    import textwrap

    blocks: list[str] = []
    lines = doc.splitlines()
    for index, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        body: list[str] = []
        for follow in lines[index + 1 :]:
            if follow.strip() and not follow.startswith(" "):
                break
            body.append(follow)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n") + "\n")
    return blocks


def _documented_example() -> str:
    [example] = [block for block in _literal_blocks(hookspecs.__doc__ or "") if "@hookimpl" in block]
    return example


@pytest.fixture
def documented_plugin() -> Iterator[types.ModuleType]:
    """The minimal plugin of hookspecs' docstring, as the module it says it is."""
    name = "listening_sink_frame_count"
    module = types.ModuleType(name)
    sys.modules[name] = module  # get_type_hints resolves the annotations through it
    try:
        exec(compile(_documented_example(), f"<{name}>", "exec"), module.__dict__)
        yield module
    finally:
        sys.modules.pop(name, None)


def test_documented_example_is_a_working_plugin(documented_plugin: types.ModuleType, tmp_path: Path) -> None:
    from listening_core.sinks import AudioFrame, AudioSink, FrameKind, SessionInfo

    registry = SinkRegistry(entry_points=lambda: ())
    registry.register(documented_plugin, name="frame-count")
    spec = registry.get("frame-count")
    assert spec.wants_pcm is False
    assert [(info.name, info.type_str) for info in describe(spec)] == [
        ("path", "Path"),
        ("min_frames", "int"),
    ]

    target = tmp_path / "counts.json"
    sink = registry.create("frame-count", {"path": str(target)})  # str converted to Path, as it says
    assert isinstance(sink, AudioSink) and sink.wants_pcm is False
    sink.on_start(SessionInfo(guild_id=1, channel_id=2, started_at=0.0))
    for sequence in range(3):
        sink.on_audio(
            AudioFrame(7, 1, sequence, 960 * sequence, 960 * sequence, FrameKind.RECEIVED, opus=b"x")
        )
    sink.on_stop(3 * 960)
    sink.cleanup()
    assert target.read_text() == '{"7": 3}'


def test_documented_example_errors_are_as_documented(documented_plugin: types.ModuleType) -> None:
    registry = SinkRegistry(entry_points=lambda: ())
    registry.register(documented_plugin, name="frame-count")
    with pytest.raises(OptionsError) as info:
        registry.create("frame-count", {"min_frame": 2})
    first = str(info.value).splitlines()[0]
    assert first == "sink 'frame-count' has no option 'min_frame' (did you mean 'min_frames'?)"
    assert f"``{first}``" in " ".join((hookspecs.__doc__ or "").split())  # the message it quotes
    with pytest.raises(OptionsError, match="min_frames must be at least 0") as bad:
        registry.create("frame-count", {"min_frames": -1})
    assert bad.value.option == "min_frames"


def test_documented_entry_point_group_is_the_registry_s() -> None:
    [declaration] = [block for block in _literal_blocks(hookspecs.__doc__ or "") if "[project." in block]
    table = tomllib.loads(declaration)
    assert list(table["project"]["entry-points"]) == [ENTRY_POINT_GROUP]
    assert SinkRegistry()._group == ENTRY_POINT_GROUP


def test_contract_documents_every_hook_and_spec_field() -> None:
    doc = " ".join((hookspecs.__doc__ or "").split())
    hooks = [name for name in plugins._HOOK_NAMES]
    specs = [
        name
        for name, obj in vars(hookspecs).items()
        if callable(obj) and hasattr(obj, f"{hookspecs.PROJECT_NAME}_spec")
    ]
    assert sorted(specs) == sorted(hooks)
    for hook in hooks:
        assert f":func:`{hook}`" in doc, hook
        assert (getattr(hookspecs, hook).__doc__ or "").strip(), hook
    for spec_field in dataclasses.fields(SinkSpec):
        assert f"``{spec_field.name}``" in doc, spec_field.name
    for method in ("on_start", "on_audio", "on_rtcp", "on_stop", "cleanup"):
        assert f"``{method}(" in doc, method
    for topic in ("wants_pcm", "thread", "after", "ENTRY_POINT_GROUP", "PluginConflictError", "OptionsError"):
        assert topic in doc, topic
