"""``python -m listening_core``: the ``listening`` command (see :mod:`listening_core.cli`)."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
