"""``listening recover PATH...``: make the files a killed recorder left whole, every format in one place.

Each file's format is read from its first bytes (its extension only names what was expected):

- **WAV** (RIFF or RF64; the ``wav``, ``mixdown`` and ``vad-segments`` sinks): the sizes in the
  header are set from the file's length (:func:`~listening_core.sinks.recover_file`).
- **FLAC** (``flac``): decoded up to the first damaged frame and re-encoded, losslessly, into a
  complete file that replaces it (:func:`~listening_core.sinks.recover_file`).
- **MP3** (``mp3``): a stream of frames, readable as it is; checked, not changed.
- **Ogg Opus** (``ogg-opus``): every page is whole on disk or dropped by readers; checked (with
  ``listening-sink-ogg``'s reader), not changed.

A directory stands for every ``.wav``, ``.flac``, ``.mp3``, ``.opus`` and ``.ogg`` file under it
(a session folder of the example bot, say). One line per file says what was done; a file that
cannot be recovered gets a line on stderr saying why, and the exit status is then 1. Running it
again changes nothing: a file that is already whole is left as it is.

The sink plugins' own ``recover(path)`` functions (``listening_sink_wav.recover`` ...) and
``python -m listening_sink_flac FILE...`` do the same for their format.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import ListeningError

__all__ = ["AUDIO_SUFFIXES", "FORMATS", "Outcome", "main", "recover_path", "sniff"]

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".opus", ".ogg")
"""The files a directory given to ``listening recover`` stands for."""

FORMATS = ("WAV", "FLAC", "MP3", "Ogg Opus")
"""What ``listening recover`` knows, in the words of its messages."""

EXIT_OK = 0
EXIT_UNRECOVERABLE = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Outcome:
    """What :func:`recover_path` did to one file: ``ok``, and a line saying what (or why not)."""

    path: Path
    ok: bool
    message: str


def sniff(head: bytes) -> str | None:
    """The format (one of :data:`FORMATS`) that a file starting with ``head`` holds, if known."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "Ogg Opus"
    # an ID3v2 tag, or an MPEG audio frame header (11 sync bits, then a layer that is not 0)
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 6):
        return "MP3"
    return None


def _seconds(samples: int, path: Path) -> str:
    import soundfile

    rate = soundfile.info(str(path)).samplerate
    return f"{samples / rate:.2f} s ({samples} samples at {rate} Hz)"


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _recover_pcm(path: Path, kind: str) -> str:
    from .sinks import recover_file

    before = _stamp(path)
    samples = recover_file(path)
    if kind == "MP3":
        return f"MP3, readable as it is: {_seconds(samples, path)}"
    if _stamp(path) == before:
        return f"{kind}, already whole: {_seconds(samples, path)}"
    done = "header repaired" if kind == "WAV" else "re-encoded up to its first damaged frame"
    return f"{kind}, {done}: {_seconds(samples, path)}"


def _check_ogg(path: Path) -> str:
    try:
        from listening_sink_ogg import read_stream
    except ImportError as exc:
        raise ListeningError(
            "checking Ogg Opus files needs the ogg-opus sink's reader: pip install listening-sink-ogg"
        ) from exc
    stream = read_stream(path)  # ValueError: not Ogg Opus (Vorbis, say)
    seconds = max(0, stream.granule - stream.pre_skip) / 48000
    end = "complete" if stream.complete else "cut short before its end-of-stream page, which players accept"
    return f"Ogg Opus, readable as it is ({end}): {seconds:.2f} s, {len(stream.packets)} packets"


def recover_path(path: Path) -> Outcome:
    """Recover one file (see the module): what was done, or why it cannot be."""
    try:
        with path.open("rb") as fh:
            head = fh.read(12)
        kind = sniff(head)
        if kind is None:
            if not head:
                return Outcome(path, False, "empty: the recorder wrote nothing to it; nothing to recover")
            return Outcome(
                path,
                False,
                f"not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file (it starts with {head[:4]!r}); "
                "nothing listening recover can do",
            )
        message = _check_ogg(path) if kind == "Ogg Opus" else _recover_pcm(path, kind)
        return Outcome(path, True, message)
    except OSError as exc:
        return Outcome(path, False, exc.strerror or str(exc))
    except (ListeningError, ValueError, RuntimeError) as exc:  # soundfile's errors are RuntimeErrors
        return Outcome(path, False, f"cannot be recovered: {exc}")


def _expand(paths: Sequence[str]) -> Iterator[tuple[Path, bool] | Outcome]:
    """Each file to recover, and whether it was named (not found in a directory given)."""
    for name in paths:
        path = Path(name)
        if not path.is_dir():
            yield path, True  # a missing file is reported by recover_path
            continue
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES and not p.name.startswith(".")
        )
        if not found:
            yield Outcome(path, False, f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under this directory")
        yield from ((p, False) for p in found)


def run(
    paths: Sequence[str],
    *,
    out: IO[str],
    err: IO[str],
    accept: Callable[[str], bool] = lambda kind: True,
    expected: str = "",
) -> int:
    """Recover ``paths`` (files or directories), printing one line per file; the exit status.

    ``accept`` limits the formats (a plugin's ``python -m`` recovers its own format only; the
    others are refused, with ``expected`` naming what it takes).
    """
    failed = done = 0
    for item in _expand(paths):
        if isinstance(item, Outcome):
            outcome = item
        else:
            path, named = item
            try:
                with path.open("rb") as fh:
                    kind = sniff(fh.read(12))
            except OSError:
                kind = None
            if kind is not None and not accept(kind):
                if not named:
                    continue  # another format's file in a folder: not this command's
                outcome = Outcome(path, False, f"a {kind} file, not {expected}: use `listening recover`")
            else:
                outcome = recover_path(path)
        if outcome.ok:
            done += 1
            print(f"{outcome.path}: {outcome.message}", file=out, flush=True)
        else:
            failed += 1
            print(f"{outcome.path}: {outcome.message}", file=err, flush=True)
    if failed:
        print(f"{failed} file(s) could not be recovered; {done} recovered or already whole.", file=err)
        return EXIT_UNRECOVERABLE
    return EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``listening recover`` (and of the plugins' ``python -m``)."""
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="a file a killed recorder left, or a folder of them"
    )


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "listening recover",
    accept: Callable[[str], bool] = lambda kind: True,
    expected: str = "",
    description: str | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """``listening recover PATH...`` (or a plugin's ``python -m``): the exit status, never a traceback
    for a usage error (argparse's usage message and status 2)."""
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=description or (__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) and usage errors (2): a status, not an exception
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    return run(args.paths, out=out or sys.stdout, err=err or sys.stderr, accept=accept, expected=expected)
