#!/usr/bin/env python3
"""The distributions this repository publishes, found on disk, and what tox does with each.

The core is the repository root; every ``plugins/*/`` holding a ``pyproject.toml`` is a sink
plugin, and ``examples/sink-plugin-template`` is the template. A new plugin folder is picked up
by tox (install, type check, deptry, the wheelhouse test) without editing a list.

    python scripts/dists.py paths       # the plugin and template folders, one a line
    python scripts/dists.py packages    # their import packages' folders (what mypy checks)
    python scripts/dists.py install     # pip install them and what they need (the core first)
    python scripts/dists.py deptry      # deptry on the core and on each of them
    python scripts/dists.py wheels DIR  # build the core's and their wheels into DIR
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plugin_dirs() -> list[Path]:
    """The plugin folders (sorted) and then the template: every distribution but the core."""
    found = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))
    return [*found, ROOT / "examples" / "sink-plugin-template"]


def all_dirs() -> list[Path]:
    """The core (the repository root) and every other distribution."""
    return [ROOT, *plugin_dirs()]


def wheel_packages(directory: Path) -> list[str]:
    """The import packages a distribution's wheel holds (hatch's ``packages``)."""
    config = tomllib.loads((directory / "pyproject.toml").read_text())
    packages: list[str] = config["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    return packages


def project_name(directory: Path) -> str:
    """The distribution's name in its ``pyproject.toml``."""
    name: str = tomllib.loads((directory / "pyproject.toml").read_text())["project"]["name"]
    return name


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path != ROOT else "."


def _run(*args: str, cwd: Path = ROOT) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=cwd, check=True)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    if command == "paths":
        print("\n".join(_rel(d) for d in plugin_dirs()))
    elif command == "packages":
        print("\n".join(_rel(d / p) for d in plugin_dirs() for p in wheel_packages(d)))
    elif command == "install":
        # their own dependencies too (webrtcvad-wheels for the vad plugin...); the installed core
        # already meets their listening-core range
        _run(*pip, "install", "--no-build-isolation", *(_rel(d) for d in plugin_dirs()))
    elif command == "deptry":
        for directory in all_dirs():
            _run(sys.executable, "-m", "deptry", *wheel_packages(directory), cwd=directory)
    elif command == "wheels" and len(argv) == 2:
        out = str(Path(argv[1]).resolve())
        dirs = [_rel(d) for d in all_dirs()]
        _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", out, *dirs)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
