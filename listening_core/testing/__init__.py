"""A loopback Discord for tests: real discord.py clients log in, join voice and exchange
DAVE-encrypted audio through it, offline.

``async with LocalDiscord() as discord_:`` starts it on 127.0.0.1; ``discord_.connector()`` is
the aiohttp connector that wires a ``discord.Client`` to it; ``discord_.add_bot()`` makes an
account to log in with; ``await discord_.add_member(...)`` adds a virtual member who speaks audio
into a voice channel. With pytest, the ``local_discord`` fixture hands you a started instance.
``await record(discord_, sink, schedules=...)`` (:mod:`listening_core.testing.recording`) runs a
whole listening session for a sink's end-to-end test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "FaultConfig",
    "FaultInjector",
    "LocalDiscord",
    "LoopbackAddress",
    "Recording",
    "Schedule",
    "VirtualMember",
    "close_client",
    "connect_client",
    "join_voice",
    "record",
]

if TYPE_CHECKING:
    from .clients import close_client, connect_client, join_voice
    from .faults import FaultConfig, FaultInjector
    from .media import Schedule
    from .members import VirtualMember
    from .recording import Recording, record
    from .remote import LoopbackAddress
    from .server import LocalDiscord

_LAZY = {
    "FaultConfig": ".faults",
    "FaultInjector": ".faults",
    "LocalDiscord": ".server",
    "LoopbackAddress": ".remote",
    "Recording": ".recording",
    "Schedule": ".media",
    "VirtualMember": ".members",
    "close_client": ".clients",
    "connect_client": ".clients",
    "join_voice": ".clients",
    "record": ".recording",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that the pytest plugin entry point stays cheap to import.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)
