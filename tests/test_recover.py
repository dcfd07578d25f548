"""``listening recover``: each format's recovery in one place, on files damaged as a killed
recorder leaves them, with one line per file and a non-zero exit for what cannot be recovered."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from listening_core import recover

RATE = 48_000


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    mono = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    return np.stack([mono, mono], axis=1)


def unfinished_wav(path: Path, seconds: float = 1.0) -> np.ndarray:
    """A WAV whose header was never finalised: the RIFF and data sizes still say 0."""
    audio = _tone(seconds)
    sf.write(path, audio, RATE, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[4:8] = bytes(4)
    at = data.index(b"data")
    data[at + 4 : at + 8] = bytes(4)
    path.write_bytes(bytes(data))
    return audio


def unfinished_flac(path: Path, seconds: float = 1.0, cut: int = 3000) -> None:
    """A FLAC as libFLAC leaves it when killed: no length (or MD5) in STREAMINFO, the last frame cut."""
    sf.write(path, _tone(seconds), RATE, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    info = 8  # "fLaC", then the STREAMINFO block's 4-byte header
    fields = int.from_bytes(data[info + 10 : info + 18], "big") & ~((1 << 36) - 1)  # total samples: 0
    data[info + 10 : info + 18] = fields.to_bytes(8, "big")
    data[info + 18 : info + 34] = bytes(16)
    path.write_bytes(bytes(data[:-cut]))


def cut_short_ogg(path: Path, packets: int = 50) -> None:
    """An Ogg Opus file of the ogg-opus sink's writer, never finished (no end-of-stream page)."""
    from listening_sink_ogg import OggOpusWriter

    with path.open("wb", buffering=0) as fh:
        writer = OggOpusWriter(fh, serial=7, vendor="test")
        for n in range(packets):
            writer.write(b"\xf8\xff\xfe", n * 960)
        writer.flush()


def run(*paths: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = recover.main([str(p) for p in paths], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def line_for(text: str, path: Path) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(f"{path}: ")]
    return line


def test_each_format_is_recovered_and_reported(tmp_path: Path) -> None:
    session = tmp_path / "session"
    (session / "wav").mkdir(parents=True)
    (session / "flac").mkdir()
    (session / "mp3").mkdir()
    (session / "ogg-opus").mkdir()
    wav = session / "wav" / "alice.wav"
    audio = unfinished_wav(wav)
    flac = session / "flac" / "alice.flac"
    unfinished_flac(flac)
    assert sf.info(flac).frames >= 2**62  # no length: what a kill leaves
    mp3 = session / "mp3" / "alice.mp3"
    sf.write(mp3, _tone(1.0), RATE, format="MP3")
    ogg = session / "ogg-opus" / "alice.opus"
    cut_short_ogg(ogg)
    (session / "session.json").write_text("{}")  # not audio: a folder's other files are left alone

    code, out, err = run(session)  # a folder stands for its audio files
    assert code == 0, err
    assert err == ""
    assert line_for(out, wav) == f"{wav}: WAV, header repaired: 1.00 s (48000 samples at 48000 Hz)"
    assert "FLAC, re-encoded up to its first damaged frame" in line_for(out, flac)
    assert "MP3, readable as it is" in line_for(out, mp3)
    assert "Ogg Opus, readable as it is (cut short before its end-of-stream page" in line_for(out, ogg)
    from listening_sink_ogg import PRE_SKIP

    assert f"{(50 * 960 - PRE_SKIP) / RATE:.2f} s, 50 packets" in line_for(out, ogg)  # what a player plays
    assert "session.json" not in out
    # the files now say what they hold
    data, _ = sf.read(wav, dtype="int16")
    assert np.array_equal(data, audio)
    frames = sf.info(flac).frames
    assert 0 < frames < RATE and len(sf.read(flac, dtype="int16")[0]) == frames

    code, out, _ = run(wav, flac)  # again: nothing left to do
    assert code == 0
    assert line_for(out, wav) == f"{wav}: WAV, already whole: 1.00 s (48000 samples at 48000 Hz)"
    assert (
        line_for(out, flac)
        == f"{flac}: FLAC, already whole: {frames / RATE:.2f} s ({frames} samples at 48000 Hz)"
    )


def test_what_cannot_be_recovered_is_named_and_fails_the_command(tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    unfinished_wav(good)
    text = tmp_path / "notes.wav"
    text.write_text("hello, not audio")
    empty = tmp_path / "empty.flac"
    empty.touch()
    headless = tmp_path / "headless.wav"  # a RIFF header and nothing else
    headless.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    missing = tmp_path / "missing.wav"
    nothing = tmp_path / "no-audio-here"
    nothing.mkdir()
    code, out, err = run(text, good, empty, headless, missing, nothing)
    assert code == 1
    assert "WAV, header repaired" in line_for(out, good)  # the others do not stop it
    assert "not a WAV, FLAC, MP3 or Ogg Opus file (it starts with b'hell')" in line_for(err, text)
    assert "empty: the recorder wrote nothing to it" in line_for(err, empty)
    assert "cannot be recovered:" in line_for(err, headless)
    assert "No such file or directory" in line_for(err, missing)
    assert "no audio files" in line_for(err, nothing)
    assert err.rstrip().endswith("5 file(s) could not be recovered; 1 recovered or already whole.")
    assert "Traceback" not in out + err


def test_the_listening_command_runs_it(tmp_path: Path) -> None:
    wav = tmp_path / "bob.wav"
    unfinished_wav(wav, 0.5)
    env = dict(os.environ, COLUMNS="60")
    done = subprocess.run(
        [sys.executable, "-m", "listening_core", "recover", str(wav), str(tmp_path / "gone.flac")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    assert f"{wav}: WAV, header repaired: 0.50 s" in done.stdout
    assert "gone.flac: No such file or directory" in done.stderr and "Traceback" not in done.stderr
    assert sf.info(wav).frames == RATE // 2


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"RIFF\x10\x00\x00\x00WAVE", "WAV"),
        (b"RF64\xff\xff\xff\xffWAVE", "WAV"),
        (b"fLaC\x00\x00\x00\x22", "FLAC"),
        (b"OggS\x00\x02", "Ogg Opus"),
        (b"ID3\x04\x00", "MP3"),
        (b"\xff\xfb\x90\x64", "MP3"),
        (b"\xff\xe0\x00\x00", None),  # sync bits but layer 0: not MPEG audio
        (b"RIFF\x10\x00\x00\x00AVI ", None),
        (b"{}", None),
    ],
)
def test_the_format_is_read_from_the_content(head: bytes, kind: str | None) -> None:
    assert recover.sniff(head) == kind
