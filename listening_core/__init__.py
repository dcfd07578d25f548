"""listening-core: voice receive for discord.py bots on today's Discord.

What exists so far is the foundation: the pure wire modules (:mod:`listening_core.rtp`,
:mod:`listening_core.crypto`) and :mod:`listening_core.testing`, a loopback Discord that
unmodified discord.py clients log in to, join voice on and exchange DAVE-encrypted audio
through. The receive pipeline (``VoiceClient.listen`` and the sinks) is not written yet.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
