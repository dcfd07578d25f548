"""``python -m listening_sink_flac FILE...``: recover FLAC files left by a killed recorder.

The FLAC part of ``listening recover`` (which takes every format): each file is decoded up to
its first damaged frame and re-encoded into a complete FLAC that replaces it. One line per file
says what was done; the exit status is 1 if a file could not be recovered, 2 for a usage error.
"""

from __future__ import annotations

import sys

from listening_core.recover import main as recover


def main(argv: list[str] | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    return recover(
        argv,
        prog="python -m listening_sink_flac",
        accept=lambda kind: kind == "FLAC",
        expected="a FLAC file",
        description="Recover FLAC files left by a killed recorder (listening recover takes every format).",
    )


if __name__ == "__main__":
    sys.exit(main())
