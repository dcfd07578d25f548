"""Sphinx configuration: the API reference of listening-core (``tox -e docs``)."""

from __future__ import annotations

import sys
import types

import listening_core

# `python -m listening_core` runs the command line when imported; the API pages skip it, but
# autosummary imports every module it lists: give it an empty one.
sys.modules["listening_core.__main__"] = types.ModuleType("listening_core.__main__")

project = "listening-core"
author = "listening-core developers"
copyright = "2026, listening-core developers"
release = listening_core.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.viewcode"]

# Every module of the package gets a page (docs/api/, generated at each build, not committed).
autosummary_generate = True
autosummary_ignore_module_all = True
templates_path = ["_templates"]
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_mock_imports = ["dave"]  # libdave's bindings (dave-py): only the loopback's libdave members need them

exclude_patterns = ["_build", "voice-protocol.md"]
html_theme = "alabaster"
html_theme_options = {"description": "Voice receive for discord.py bots", "github_user": "listening-core"}
