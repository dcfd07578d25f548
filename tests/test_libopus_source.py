"""Which libopus listening-core loads: the one discord.py uses, before its own search.

The stand-ins here are real files (a link to this system's libopus under the name discord.py's
Windows wheel gives its DLL) loaded through ctypes for real; only the platform is pretended.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest
from discord import opus as discord_opus

from listening_core import opus
from listening_core.opus import LIBOPUS_ENV, LibopusSource, find_libopus, load_libopus


def real_libopus_path() -> Path:
    """This system's libopus as a file path (ctypes names it by soname), read from the process's maps."""
    load_libopus()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "libopus.so" in path and path.startswith("/"):
            return Path(path)
    raise AssertionError("libopus is loaded but not mapped from a file")


@pytest.fixture
def discord_without_library(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """discord.py has loaded nothing yet, and LISTENING_CORE_LIBOPUS is not set."""
    monkeypatch.setenv(LIBOPUS_ENV, "")  # records its state, so what the loader sets is undone
    monkeypatch.delenv(LIBOPUS_ENV)
    monkeypatch.setattr(discord_opus, "_lib", None)
    yield


def nothing_found() -> LibopusSource:
    return LibopusSource("libopus-not-installed.so.0", "default soname")


def fake_discord(tmp_path: Path, dll: str) -> Path:
    """A discord.py folder laid out as its Windows wheel: ``discord/bin/<dll>`` (this system's libopus)."""
    folder = tmp_path / "discord"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / dll).symlink_to(real_libopus_path())
    return folder


@pytest.mark.usefixtures("discord_without_library")
def test_windows_uses_the_dll_discord_py_ships(tmp_path: Path) -> None:
    bits = ctypes.sizeof(ctypes.c_void_p) * 8
    dll = f"libopus-0.{'x64' if bits == 64 else 'x86'}.dll"
    folder = fake_discord(tmp_path, dll)
    source = find_libopus(environ={}, platform="win32", discord_dir=folder, search=nothing_found)
    assert source == LibopusSource(str(folder / "bin" / dll), "shipped with discord.py")
    lib = load_libopus(source.name)  # really loaded, from the DLL's path
    assert lib.opus_get_version_string().startswith(b"libopus ")
    # elsewhere the wheel's DLL is not for this system: the search decides
    assert (
        find_libopus(environ={}, platform="linux", discord_dir=folder, search=nothing_found)
        == nothing_found()
    )
    # a wheel without the DLL (or another bitness only): the search decides too
    other = fake_discord(tmp_path / "other", "libopus-0.arm64.dll")
    assert (
        find_libopus(environ={}, platform="win32", discord_dir=other, search=nothing_found) == nothing_found()
    )


@pytest.mark.usefixtures("discord_without_library")
def test_the_library_discord_py_loaded_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "opus-for-my-bot.so"  # as on macOS: discord.opus.load_opus(path) by the bot
    mine.symlink_to(real_libopus_path())
    folder = fake_discord(tmp_path, "libopus-0.x64.dll")
    discord_opus.load_opus(str(mine))
    assert discord_opus.is_loaded()
    source = find_libopus(environ={}, platform="win32", discord_dir=folder, search=nothing_found)
    assert source == LibopusSource(str(mine), "loaded by discord.py")
    # the environment variable still overrides everything
    assert find_libopus(environ={LIBOPUS_ENV: "/x/libopus.so"}).origin == LIBOPUS_ENV
    # and the default load uses discord.py's library, and passes it on to decoding workers
    monkeypatch.setattr(opus, "_search", nothing_found)
    lib = load_libopus()
    assert lib._name == str(mine)
    assert opus.os.environ[LIBOPUS_ENV] == str(mine)
    assert opus.OpusDecoder().decode(b"\xf8\xff\xfe")  # decodes through it


@pytest.mark.usefixtures("discord_without_library")
def test_without_discord_py_library_the_system_search_decides() -> None:
    assert find_libopus(environ={}, platform="linux", search=nothing_found) == nothing_found()
    found = find_libopus()
    assert found.origin in ("found by ctypes.util.find_library", "default soname")
    assert load_libopus(found.name).opus_get_version_string().startswith(b"libopus ")
