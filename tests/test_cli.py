# The fake sink here is duck-typed (on_audio + cleanup), not an AudioSink subclass:
# mypy: disable-error-code="arg-type"
"""Tests for the ``listening`` command (listening_core.cli).

End-to-end runs go through ``python -m listening_core`` in a subprocess, against the sinks
installed in this environment; the rest call ``main([...])`` with an injected registry or
injected checks and read the output with capsys.

The problems ``listening doctor`` finds are also met at runtime, by a bot that never ran it:
libopus missing (in this process or in a decode worker), davey missing, ``vc.listen`` before
connecting or with a mistyped sink or option. Those errors are tested here too, to name the
same fixes.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import listening_core
from listening_core import cli, doctor, opus
from listening_core.cli import CheckResult, check_libopus, check_plugins, main
from listening_core.errors import _pip_install, _requirement
from listening_core.hookspecs import ENTRY_POINT_GROUP, SinkSpec, hookimpl
from listening_core.opus import LIBOPUS_ENV, LibopusNotFound, libopus_version
from listening_core.plugins import SinkRegistry, UnknownSinkError, default_registry, describe
from listening_core.pool import AudioProcessPool
from listening_core.unpacker import DECODE, decode_batch

from .test_plugins import FakeDist, FakeEntryPoint

WIDTH = 100
SILENCE_FRAME = b"\xf8\xff\xfe"


def _subprocess(
    command: list[str], env: dict[str, str] | None, cwd: Path | None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=full_env, cwd=cwd)


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m listening_core ARGS`` in a subprocess."""
    return _subprocess([sys.executable, "-m", "listening_core", *args], env, cwd)


def run_code(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -c CODE`` in a subprocess (``CODE`` ends by calling main)."""
    return _subprocess([sys.executable, "-c", code], env, None)


def _doctor_entry(output: str, name: str) -> tuple[str, str, str | None]:
    """Status, finding and fix (``None`` if none) of check ``name``, wrapped lines joined."""
    lines = output.splitlines()
    words = name.split()
    for index, line in enumerate(lines):
        parts = line.split()
        if parts[: len(words)] != words or len(parts) <= len(words) or line.startswith(" "):
            continue
        found, fix = [" ".join(parts[len(words) + 1 :])], None
        for follow in lines[index + 1 :]:
            if not follow.startswith(" "):
                break
            text = follow.strip()
            if text.startswith("fix: "):
                fix = [text.removeprefix("fix: ")]
            elif fix is not None:
                fix.append(text)
            else:
                found.append(text)
        return parts[len(words)], " ".join(found), None if fix is None else " ".join(fix)
    raise AssertionError(f"no doctor line for {name!r} in:\n{output}")


def status_of(output: str, name: str) -> tuple[str, str]:
    """The status and what was found, for check ``name``."""
    status, found, _fix = _doctor_entry(output, name)
    return status, found


def fix_of(output: str, name: str) -> str:
    """The fix printed under check ``name``."""
    fix = _doctor_entry(output, name)[2]
    assert fix is not None, f"no fix under {name!r}:\n{output}"
    return fix


def flat(text: str) -> str:
    """``text`` with its wrapping undone."""
    return " ".join(text.split())


def assert_fits(text: str) -> None:
    too_long = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not too_long, f"lines longer than {WIDTH} columns: {too_long}"


def sink_blocks(text: str) -> dict[str, str]:
    """``listening plugins`` output split into one block per sink, by sink name."""
    blocks = {}
    for block in text.split("\n\n")[1:]:
        head = block.splitlines()[0]
        if head.startswith(" ") or " (" not in head:
            continue
        blocks[head.split(" (")[0]] = block
    return blocks


# ------------------------------------------------------------------------------ fake plugins


@dataclass(frozen=True)
class FakeOptions:
    directory: Path = field(default=Path("fake-recordings"), metadata={"help": "where nothing goes"})
    level: int = field(default=3, metadata={"help": "how fake"})


class FakeSink:
    def __init__(self, options: Any) -> None:
        self.options = options

    def on_audio(self, frame: Any) -> None:
        pass

    def cleanup(self) -> None:
        pass


def plugin_module(name: str, *specs: SinkSpec) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def listening_sinks() -> list[SinkSpec]:
        return list(specs)

    module.listening_sinks = listening_sinks  # type: ignore[attr-defined]
    return module


FAKE = SinkSpec("fake", FakeSink, FakeOptions, "a fake sink for tests")


def registry_of(*eps: FakeEntryPoint) -> SinkRegistry:
    return SinkRegistry(entry_points=lambda: eps)


def good_ep() -> FakeEntryPoint:
    return FakeEntryPoint("fake", plugin_module("fake_plugin", FAKE), FakeDist("listening-sink-fake", "2.0"))


def broken_ep(error: Exception) -> FakeEntryPoint:
    return FakeEntryPoint("broken", dist=FakeDist("listening-sink-broken", "1.0"), error=error)


def ok_check() -> list[CheckResult]:
    return [CheckResult("always", "ok", "fine")]


# ------------------------------------------------------------------------------------ version


def test_version_end_to_end() -> None:
    done = run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"listening-core {listening_core.__version__}"


def test_console_script_is_installed() -> None:
    script = shutil.which("listening", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the `listening` console script is not installed next to this interpreter")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert listening_core.__version__ in done.stdout


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert listening_core.__version__ in capsys.readouterr().out


# ------------------------------------------------------------------------------------ plugins


def installed() -> SinkRegistry:
    """The sinks a fresh process sees: only installed entry points (other tests register more
    plugins in this process's default registry)."""
    registry = SinkRegistry()
    registry.load()
    return registry


def test_plugins_lists_every_installed_sink_end_to_end() -> None:
    specs = installed().specs()
    assert specs, "the sink plugins of this repository should be installed in the test environment"
    done = run("plugins")
    assert done.returncode == 0, done.stderr
    assert_fits(done.stdout)
    blocks = sink_blocks(done.stdout)
    assert sorted(blocks) == [spec.name for spec in specs]
    for spec in specs:
        block = blocks[spec.name]
        assert f"{spec.name} ({spec.distribution} {spec.version})" in block
        for info in describe(spec):
            assert info.name in block
            assert info.type_str in block
    # the options users reach for first, with type, default and help
    wav, mp3 = blocks["wav"], blocks["mp3"]
    assert "directory" in wav and "Path" in wav and "'recordings'" in wav
    assert "where the files go" in wav
    bitrate = next(line for line in mp3.splitlines() if line.split()[:1] == ["bitrate"])
    assert bitrate.split()[1:] == ["int", "=", "128"]
    assert "kbit/s" in mp3


def test_plugins_json_end_to_end() -> None:
    done = run("plugins", "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert [sink["name"] for sink in document["sinks"]] == installed().names()
    assert document["failures"] == [] and document["conflicts"] == []
    sinks = {sink["name"]: sink for sink in document["sinks"]}
    wav = sinks["wav"]
    assert wav["distribution"] == "listening-sink-wav"
    assert wav["version"] == importlib.metadata.version("listening-sink-wav")
    assert wav["wants_pcm"] is True
    directory = next(option for option in wav["options"] if option["name"] == "directory")
    assert directory["type"] == "Path" and directory["default"] == "recordings" and directory["help"]
    bitrate = next(option for option in sinks["mp3"]["options"] if option["name"] == "bitrate")
    assert bitrate == {
        "name": "bitrate",
        "type": "int",
        "default": 128,
        "default_repr": "128",
        "help": bitrate["help"],
    }
    assert sinks["ogg-opus"]["wants_pcm"] is False


def test_plugins_one_sink(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "mp3"]) == 0
    out = capsys.readouterr().out
    assert_fits(out)
    spec = default_registry().get("mp3")
    assert out.splitlines()[0] == f"mp3 ({spec.distribution} {spec.version})"
    assert spec.summary in out
    for info in describe(spec):
        assert info.name in out and info.type_str in out
    assert "'constant' | 'average'" in out
    assert 'usage: vc.listen("mp3", options={' in out
    assert "wav" not in sink_blocks(out)


def test_plugins_one_sink_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "mp3", "--json"]) == 0
    sink = json.loads(capsys.readouterr().out)
    assert sink["name"] == "mp3"
    assert "bitrate" in [option["name"] for option in sink["options"]]


def test_plugins_unknown_name_end_to_end() -> None:
    done = run("plugins", "mp4")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "unknown sink 'mp4'; did you mean 'mp3'?" in done.stderr
    assert "pip install listening-sink-mp4" in done.stderr
    assert_fits(done.stderr)


def test_plugins_unknown_name_is_the_registry_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "flca"]) == 2
    err = capsys.readouterr().err
    with pytest.raises(UnknownSinkError) as info:
        default_registry().get("flca")
    # the registry's message, only wrapped to 100 columns
    assert err.split() == str(info.value).split()
    assert "did you mean 'flac'?" in err


def test_plugins_unknown_name_of_a_sink_this_project_publishes(capsys: pytest.CaptureFixture[str]) -> None:
    registry = registry_of(good_ep())
    assert main(["plugins", "wav"], registry=registry) == 2
    err = capsys.readouterr().err
    assert "unknown sink 'wav'" in err
    assert "pip install listening-sink-wav" in err
    assert "fake" in err  # what is installed instead


def test_plugins_with_a_broken_and_a_conflicting_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    clash_a = FakeEntryPoint("a", plugin_module("a", FAKE), FakeDist("listening-sink-a", "1.0"), value="a")
    clash_b = FakeEntryPoint("b", plugin_module("b", FAKE), FakeDist("listening-sink-b", "1.0"), value="b")
    registry = registry_of(clash_a, clash_b, broken_ep(RuntimeError("boom")))
    assert main(["plugins"], registry=registry) == 0
    out = capsys.readouterr().out
    assert_fits(out)
    assert out.startswith("no usable sinks")
    out = flat(out)
    assert "plugins that failed to load" in out
    assert "broken: listening-sink-broken 1.0 could not be imported: RuntimeError: boom" in out
    assert "pip install --force-reinstall listening-sink-broken" in out
    assert "sink 'fake' is provided by both listening-sink-a 1.0 and listening-sink-b 1.0" in out

    assert main(["plugins", "--json"], registry=registry) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["sinks"] == []
    [failure] = document["failures"]
    assert failure["plugin"] == "broken" and failure["distribution"] == "listening-sink-broken"
    assert failure["error"] == "RuntimeError: boom"
    assert document["conflicts"][0]["sink"] == "fake"


def test_plugins_when_none_is_installed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"], registry=registry_of()) == 0
    out = capsys.readouterr().out
    assert "no sinks are installed" in out
    assert "pip install listening-sink-wav" in out and "pip install listening-sink-mp3" in out


# ------------------------------------------------------------------------------------- doctor


def test_doctor_all_ok_end_to_end() -> None:
    import cryptography
    import davey
    import discord
    import nacl

    done = run("doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert_fits(out)
    assert "missing" not in out and "broken" not in out and "fix:" not in out
    status, found = status_of(out, "libopus")
    assert status == "ok" and found.startswith(libopus_version())
    # which library, and where it comes from, as a process like the doctor's finds it (this one may
    # have had discord.py load libopus, which then comes first)
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "from listening_core import opus; s = opus.find_libopus(); print(s.name, s.origin, sep='|')",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    name, origin = where.split("|")
    assert found.endswith(f"({name}, {origin})")
    assert status_of(out, "davey") == ("ok", davey.__version__)
    assert status_of(out, "PyNaCl") == ("ok", nacl.__version__)
    assert status_of(out, "cryptography") == ("ok", cryptography.__version__)
    assert status_of(out, "discord.py") == ("ok", discord.__version__)
    assert status_of(out, "AES-256-GCM") == (
        "ok",
        "sealed and opened an RTP packet (aead_aes256_gcm_rtpsize)",
    )
    assert status_of(out, "XChaCha20")[0] == "ok"
    for spec in installed().specs():
        assert status_of(out, f"sink {spec.name}") == ("ok", f"{spec.distribution} {spec.version}, imported")
    assert out.rstrip().endswith("checks ok: this machine can receive voice.")


def test_doctor_libopus_missing_end_to_end() -> None:
    done = run("doctor", env={LIBOPUS_ENV: "/nonexistent"})
    assert done.returncode == 1
    out = done.stdout
    assert_fits(out)
    status, found = status_of(out, "libopus")
    assert status == "missing"
    assert "/nonexistent" in found
    fix = fix_of(out, "libopus")
    assert f"{LIBOPUS_ENV}=/nonexistent does not load" in fix
    if shutil.which("apt-get"):
        assert "apt-get install libopus0" in fix
    assert "1 problem:" in out  # nothing else is affected


def test_doctor_libopus_missing_injected(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(LIBOPUS_ENV, raising=False)

    def no_libopus() -> object:
        raise LibopusNotFound("could not load libopus from 'libopus.so.0' (not found); install libopus: ...")

    checks = [ok_check, functools.partial(check_libopus, load=no_libopus)]
    assert main(["doctor"], checks=checks) == 1
    out = capsys.readouterr().out
    assert status_of(out, "always")[0] == "ok"
    assert status_of(out, "libopus") == ("missing", "could not load libopus from 'libopus.so.0' (not found)")
    fix = fix_of(out, "libopus")
    assert fix == doctor._libopus_install_command()
    if shutil.which("apt-get"):
        assert fix.endswith("apt-get install libopus0")


def test_doctor_davey_missing_end_to_end() -> None:
    code = (
        "import sys; sys.modules['davey'] = None; "
        "from listening_core.cli import main; raise SystemExit(main(['doctor']))"
    )
    done = run_code(code)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert_fits(out)
    assert status_of(out, "davey")[0] == "missing"
    assert fix_of(out, "davey") == f'pip install "{_requirement("davey")}"'
    assert fix_of(out, "davey").startswith('pip install "davey')
    # the transport ciphers do not need davey: still checked, and fine
    assert status_of(out, "AES-256-GCM")[0] == "ok"
    assert status_of(out, "XChaCha20")[0] == "ok"
    assert "1 problem:" in out


def test_doctor_cryptography_missing_end_to_end() -> None:
    code = (
        "import sys; sys.modules['cryptography'] = None; "
        "from listening_core.cli import main; raise SystemExit(main(['doctor']))"
    )
    done = run_code(code)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert status_of(out, "cryptography")[0] == "missing"
    assert status_of(out, "AES-256-GCM")[0] == "missing"
    assert fix_of(out, "AES-256-GCM").startswith('pip install "cryptography')
    assert status_of(out, "XChaCha20")[0] == "ok"


def test_doctor_broken_plugin_end_to_end(tmp_path: Path) -> None:
    """A real distribution (a dist-info on PYTHONPATH) whose plugin module raises on import."""
    site = tmp_path / "site"
    info = site / "listening_sink_kaput-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: listening-sink-kaput\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nkaput = listening_sink_kaput\n")
    (site / "listening_sink_kaput.py").write_text("raise RuntimeError('kaput on import')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = run("doctor", env=env, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert_fits(out)
    status, found = status_of(out, "plugin kaput")
    assert status == "broken"
    assert "listening-sink-kaput 0.3 could not be imported: RuntimeError: kaput on import" in found
    assert fix_of(out, "plugin kaput") == (
        "importing it raised an error: reinstall it (pip install --force-reinstall listening-sink-kaput) "
        "or remove it (pip uninstall listening-sink-kaput)"
    )
    assert status_of(out, "sink wav")[0] == "ok"  # the others still load
    assert "1 problem:" in out
    assert done.stderr == ""  # the registry's warning is not repeated: the report says it all

    listing = run("plugins", env=env, cwd=tmp_path)
    assert listing.returncode == 0
    assert "kaput" in listing.stdout and "RuntimeError: kaput on import" in listing.stdout


def test_doctor_broken_plugin_injected(capsys: pytest.CaptureFixture[str]) -> None:
    registry = registry_of(good_ep(), broken_ep(RuntimeError("boom")))
    assert main(["doctor"], registry=registry) == 1
    out = capsys.readouterr().out
    assert_fits(out)
    assert status_of(out, "sink fake") == ("ok", "listening-sink-fake 2.0, imported")
    status, found = status_of(out, "plugin broken")
    assert status == "broken"
    assert found.startswith("listening-sink-broken 1.0 could not be imported: RuntimeError: boom (at")
    assert "pip install --force-reinstall listening-sink-broken" in fix_of(out, "plugin broken")
    assert status_of(out, "libopus")[0] == "ok"  # the real checks ran too


@pytest.mark.parametrize(
    ("error", "fix"),
    [
        (ModuleNotFoundError("No module named 'davey'", name="davey"), 'pip install "davey'),
        (
            ModuleNotFoundError("No module named 'lameenc'", name="lameenc"),
            "it needs the module 'lameenc', which is not installed; reinstall it with its dependencies: "
            "pip install --force-reinstall listening-sink-broken",
        ),
        (SyntaxError("invalid syntax"), "pip install --force-reinstall listening-sink-broken"),
        (  # a name missing from a module that is there: not a missing module
            ImportError("cannot import name 'thing' from 'json'", name="json"),
            "importing it raised an error: reinstall it (pip install --force-reinstall listening-sink-broken)",
        ),
    ],
)
def test_plugin_failure_fixes(error: Exception, fix: str) -> None:
    results = check_plugins(registry_of(broken_ep(error)))
    [result] = results
    assert result.name == "plugin broken" and result.status == "broken"
    assert fix in result.fix


def test_plugin_breaking_the_contract() -> None:
    no_hooks = FakeEntryPoint(
        "nohooks", types.ModuleType("nohooks"), FakeDist("listening-sink-nohooks", "1.0")
    )
    [result] = check_plugins(registry_of(no_hooks))
    assert result.status == "broken"
    assert "defines no hooks" in result.found
    assert "pip uninstall listening-sink-nohooks" in result.fix


def test_conflicting_plugins_are_broken() -> None:
    clash_a = FakeEntryPoint("a", plugin_module("a", FAKE), FakeDist("listening-sink-a", "1.0"), value="a")
    clash_b = FakeEntryPoint("b", plugin_module("b", FAKE), FakeDist("listening-sink-b", "1.0"), value="b")
    [result] = check_plugins(registry_of(clash_a, clash_b))
    assert (result.name, result.status) == ("sink fake", "broken")
    assert "pip uninstall listening-sink-b" in result.fix


def test_no_plugins_is_not_a_failure() -> None:
    [result] = check_plugins(registry_of())
    assert result.status == "ok"
    assert "pip install listening-sink-wav" in result.found


def test_a_check_that_raises_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    def exploding() -> list[CheckResult]:
        raise ZeroDivisionError("oops")

    assert cli.doctor([ok_check, exploding]) == 1
    out = capsys.readouterr().out
    status, found = status_of(out, "exploding")
    assert status == "broken" and "ZeroDivisionError: oops" in found


def test_doctor_exit_status_follows_the_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"], checks=[ok_check]) == 0
    assert "all 1 checks ok" in capsys.readouterr().out
    missing = [CheckResult("thing", "missing", "not here", "pip install thing")]
    checks: list[cli.Check] = [ok_check, lambda: missing]
    assert main(["doctor"], checks=checks) == 1
    out = capsys.readouterr().out
    assert status_of(out, "thing") == ("missing", "not here")
    assert fix_of(out, "thing") == "pip install thing"
    assert "1 problem: apply each fix above, then run `listening doctor` again." in out


def test_long_findings_are_wrapped() -> None:
    long = CheckResult("plugin x", "broken", "word " * 60, "fix " * 40)
    lines = cli.format_results([long])
    assert all(len(line) <= WIDTH for line in lines)
    assert " ".join(" ".join(lines).split()).count("word") == 60


@pytest.mark.parametrize("shift", range(0, 40, 3))
def test_commands_in_fixes_are_never_split(shift: int) -> None:
    command = 'pip install --force-reinstall "davey>=0.1.7,<0.2"'
    result = CheckResult("davey", "broken", "x", "y" * shift + " reinstall it: " + command + "; then retry")
    lines = cli.format_results([result])
    assert all(len(line) <= WIDTH for line in lines)
    assert any(command in line for line in lines), lines


# ------------------------------------------------- the same problems, met at runtime instead


LIBOPUS_FIX = "apt-get install libopus0"


@pytest.fixture
def no_libopus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A system without libopus: discord.py has none loaded, the loader finds nothing and the
    fallback soname is not there."""
    from discord import opus as discord_opus

    monkeypatch.delenv(LIBOPUS_ENV, raising=False)
    monkeypatch.setattr(discord_opus, "_lib", None)
    monkeypatch.setattr(
        opus, "_search", lambda: opus.LibopusSource("libopus-not-installed.so.0", "default soname")
    )


@pytest.mark.usefixtures("no_libopus")
def test_libopus_missing_at_runtime_names_the_fix() -> None:
    for call in (opus.load_libopus, opus.libopus_version, opus.OpusDecoder, AudioProcessPool):
        with pytest.raises(LibopusNotFound) as info:
            call()
        message = str(info.value)
        assert "libopus-not-installed.so.0" in message, call
        assert LIBOPUS_FIX in message and "brew install opus" in message, call
        assert LIBOPUS_ENV in message and "listening doctor" in message, call
    # doctor says the same, with this system's command
    [result] = check_libopus()
    assert result.status == "missing" and "libopus-not-installed.so.0" in result.found
    assert result.fix == doctor._libopus_install_command()


@pytest.mark.usefixtures("no_libopus")
def test_libopus_missing_in_the_worker_code_path() -> None:
    """What a decode worker runs: the error with the fix, not a worker that dies silently."""
    with pytest.raises(LibopusNotFound, match=LIBOPUS_FIX):
        decode_batch({}, [("stream", DECODE, SILENCE_FRAME, 960)])


def test_libopus_missing_in_a_worker_process_fails_the_batch_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """This process has libopus, the worker (spawned with the environment below) has not."""
    pool = AudioProcessPool(1)
    try:
        monkeypatch.setenv(LIBOPUS_ENV, "/nonexistent/libopus.so")
        worker = pool.worker_for("stream")
        for _ in range(2):
            error = pool.submit(worker, [("stream", DECODE, SILENCE_FRAME, 960)]).exception(timeout=60)
            assert isinstance(error, LibopusNotFound)
            assert "/nonexistent/libopus.so" in str(error) and LIBOPUS_FIX in str(error)
        assert pool.restarts == 0  # the worker answers; it does not die and respawn in a loop
        errors = [r.getMessage() for r in caplog.records if r.name == "listening_core.pool"]
        assert len(errors) == 1 and LIBOPUS_FIX in errors[0]  # logged once, not per batch
    finally:
        pool.shutdown()


def test_davey_missing_at_runtime_names_the_fix() -> None:
    code = (
        "import json, sys; sys.modules['davey'] = None\n"
        "import listening_core\n"
        "try:\n"
        "    listening_core.VoiceClient\n"
        "except ImportError as exc:\n"
        "    print(json.dumps([type(exc).__name__, exc.name, str(exc)]))\n"
    )
    done = run_code(code)
    assert done.returncode == 0, done.stderr
    kind, name, message = json.loads(done.stdout)
    assert (kind, name) == ("ModuleNotFoundError", "davey")
    assert "davey" in message and "not installed" in message
    assert _pip_install("davey") in message  # the command `listening doctor` prints
    assert _pip_install("davey").startswith('pip install "davey')


def test_davey_broken_at_runtime_names_the_fix() -> None:
    from listening_core import crypto

    error = crypto._davey_import_error(ImportError("libdavey.so: cannot open", name="davey._davey"))
    assert error.name == "davey"  # so doctor's cipher check still knows what is missing
    assert "libdavey.so: cannot open" in str(error)
    assert _pip_install("davey", reinstall=True) in str(error)


class _Disconnected:
    def is_connected(self) -> bool:
        return False


class _Connected:
    def is_connected(self) -> bool:
        return True

    def _current(self) -> None:
        return None


def test_listen_before_connecting_says_what_to_do() -> None:
    from listening_core.voice_client import ListeningStateError, VoiceClient

    with pytest.raises(
        ListeningStateError,
        match=r"connect to a voice channel before listening: .*connect\(cls=listening_core.VoiceClient\)",
    ):
        VoiceClient.listen(_Disconnected(), "wav")  # type: ignore[arg-type]
    with pytest.raises(ListeningStateError, match=r"not listening: start with vc.listen\(sink\) first"):
        VoiceClient.pause_listening(_Connected())  # type: ignore[arg-type]


def test_listen_without_libopus_raises_the_fix_and_cleans_up_the_sink(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import listening_core.voice_client as voice_client
    from listening_core.opus import LibopusNotFound
    from listening_core.sinks import AudioFrame, AudioSink

    class Sink(AudioSink):
        cleaned = 0

        def on_audio(self, frame: AudioFrame) -> None:
            pass

        def cleanup(self) -> None:
            self.cleaned += 1

    def no_libopus() -> None:
        raise LibopusNotFound("libopus was not found; install libopus: apt-get install libopus0")

    monkeypatch.setattr(voice_client, "AudioProcessPool", no_libopus)
    sink = Sink()
    with pytest.raises(LibopusNotFound, match="apt-get install libopus0"):
        voice_client.VoiceClient.listen(_Connected(), sink)  # type: ignore[arg-type]
    assert sink.cleaned == 1


def test_listen_with_a_mistyped_sink_or_option_says_what_to_do() -> None:
    from listening_core.plugins import OptionsError
    from listening_core.voice_client import VoiceClient

    with pytest.raises(UnknownSinkError) as info:
        VoiceClient.listen(_Connected(), "wavv")  # type: ignore[arg-type]
    message = str(info.value)
    assert message.splitlines()[0] == "unknown sink 'wavv'; did you mean 'wav'?"
    assert "installed sinks:" in message and "pip install listening-sink-wavv" in message
    with pytest.raises(UnknownSinkError, match="pip install listening-sink-karaoke"):
        VoiceClient.listen(_Connected(), "karaoke")  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match=r"has no option 'directry' \(did you mean 'directory'\?\)"):
        VoiceClient.listen(_Connected(), "wav", options={"directry": "x"})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- demo, usage


def test_demo_without_its_bot_says_where_to_run_it(tmp_path: Path) -> None:
    done = run("demo", "--bot", str(tmp_path / "nowhere.py"), cwd=tmp_path)
    assert done.returncode == 1
    assert "listening demo cannot start" in done.stderr
    assert "the bot script was not found" in done.stderr and "nowhere.py" in done.stderr
    assert "leave --bot out to run the bot that ships" in done.stderr
    assert not (tmp_path / "recordings").exists()


def test_mistyped_command_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctr"]) == 2
    assert "unknown command 'doctr'; did you mean 'doctor'?" in capsys.readouterr().err


def test_no_command_shows_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "plugins" in err and "doctor" in err and "demo" in err


def test_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--jsn"]) == 2
    assert "--jsn" in capsys.readouterr().err


def test_broken_pipe_is_quiet() -> None:
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "listening_core", "plugins"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == cli.EXIT_BROKEN_PIPE
    assert done.stderr == ""


# ---------------------------------------------------------------------------- terminal width


def test_output_fits_a_narrow_terminal() -> None:
    """The listing and the report wrap to the terminal's width (``COLUMNS``), not a fixed 100."""
    for command in (["plugins"], ["plugins", "wav"], ["doctor", "--help"]):
        done = run(*command, env={"COLUMNS": "60"})
        assert done.returncode == 0, done.stderr
        too_long = [line for line in done.stdout.splitlines() if len(line) > 60]
        assert not too_long, (command, too_long)
    done = run("doctor", env={"COLUMNS": "60", LIBOPUS_ENV: "/nonexistent/libopus.so"})
    assert done.returncode == 1
    assert not [line for line in done.stdout.splitlines() if len(line) > 60], done.stdout
    # a wide terminal still gets lines of at most 100 columns, for reading
    done = run("plugins", env={"COLUMNS": "300"})
    assert_fits(done.stdout) and any(len(line) > 60 for line in done.stdout.splitlines())
