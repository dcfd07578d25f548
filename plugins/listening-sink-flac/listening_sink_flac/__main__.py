"""``python -m listening_sink_flac FILE...``: recover FLAC files left by a killed recorder."""

from __future__ import annotations

import sys

from . import recover


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m listening_sink_flac FILE.flac...", file=sys.stderr)
        return 2
    for path in paths:
        samples = recover(path)
        print(f"{path}: {samples} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
