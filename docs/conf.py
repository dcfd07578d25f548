"""Sphinx configuration: the API reference of listening-core (``tox -e docs``)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import listening_core

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import dists  # scripts/dists.py: the distributions of the repository

# `python -m listening_core` runs the command line when imported; the API pages skip it, but
# autosummary imports every module it lists: give it an empty one.
sys.modules["listening_core.__main__"] = types.ModuleType("listening_core.__main__")

project = "listening-core"
author = "listening-core developers"
copyright = "2026, listening-core developers"
release = listening_core.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.coverage", "sphinx.ext.viewcode"]

# `sphinx-build -b coverage -W` (tox -e docs) fails on any public object without a docstring.
coverage_show_missing_items = True
coverage_statistics_to_stdout = False

# Every module of the package gets a page (docs/api/, generated at each build, not committed).
autosummary_generate = True
autosummary_ignore_module_all = True
templates_path = ["_templates"]
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_mock_imports = [
    "dave",  # libdave's bindings (dave-py): only the loopback's libdave members need them
    "faster_whisper",  # the transcribe plugin's optional local engine
]

# One API page per sink plugin (and the template), whatever plugins/ holds: the list is written
# here, before autosummary reads the pages.
_plugins = [p for d in dists.plugin_dirs() for p in dists.wheel_packages(d)]
_api = Path(__file__).resolve().parent / "api"
_api.mkdir(exist_ok=True)
(_api / "plugins.rst").write_text(
    "Sink plugins\n============\n\nEach is its own distribution under ``plugins/`` "
    "(the last, ``listening_sink_speech_log``, is the template to copy).\n\n"
    ".. autosummary::\n   :toctree: .\n   :recursive:\n\n" + "".join(f"   {p}\n" for p in _plugins)
)

exclude_patterns = ["_build", "voice-protocol.md"]
html_theme = "alabaster"
html_theme_options = {"description": "Voice receive for discord.py bots", "github_user": "listening-core"}
