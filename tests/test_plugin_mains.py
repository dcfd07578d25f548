"""Every sink plugin's ``python -m`` command: ``--help`` works, and usage errors and bad files get a
message and an exit status, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from .test_recover import unfinished_flac, unfinished_wav

ROOT = Path(__file__).resolve().parent.parent
MAINS = sorted(ROOT.glob("plugins/*/listening_sink_*/__main__.py"))
PACKAGES = [path.parent.name for path in MAINS]


def python_m(package: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", package, *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_there_are_plugin_commands() -> None:
    assert "listening_sink_flac" in PACKAGES


@pytest.mark.parametrize("package", PACKAGES)
def test_help_and_usage_errors(package: str, tmp_path: Path) -> None:
    done = python_m(package, "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: python -m {package}"), done.stderr
    for args in ([], ["--no-such-option", "x"]):
        done = python_m(package, *args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert f"usage: python -m {package}" in done.stderr and "error:" in done.stderr
        assert "Traceback" not in done.stderr
    done = python_m(package, "missing.file", cwd=tmp_path)
    assert done.returncode == 1 and "missing.file: No such file or directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_flac_command_recovers_flac_only(tmp_path: Path) -> None:
    flac, wav = tmp_path / "alice.flac", tmp_path / "alice.wav"
    unfinished_flac(flac)
    unfinished_wav(wav)
    done = python_m("listening_sink_flac", str(flac), str(wav), cwd=tmp_path)
    assert done.returncode == 1
    assert f"{flac}: FLAC, re-encoded up to its first damaged frame" in done.stdout
    assert f"{wav}: a WAV file, not a FLAC file: use `listening recover`" in done.stderr
    assert sf.info(flac).frames < 2**62
    done = python_m("listening_sink_flac", str(tmp_path), cwd=tmp_path)  # a folder: its FLAC files
    assert done.returncode == 0 and "FLAC, already whole" in done.stdout and "alice.wav" not in done.stdout
