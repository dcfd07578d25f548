"""Reaching a :class:`~listening_core.testing.LocalDiscord` from another process.

The loopback serves on an ephemeral port of 127.0.0.1 with a throwaway CA, so a bot running in its
own process needs three facts to reach it: the port, the CA certificate and its token. The
process that runs the loopback writes them to a small JSON file with
:meth:`LoopbackAddress.save` (:meth:`LocalDiscord.address` builds one); the bot reads it with
:meth:`LoopbackAddress.load` and passes :meth:`LoopbackAddress.connector` to discord.py::

    address = LoopbackAddress.load("loopback.json")
    bot = commands.Bot(command_prefix="!", intents=intents, connector=address.connector())
    await bot.start(address.token)

This is how ``examples/record_bot.py --local FILE`` runs against the demo's loopback. The file
holds a token: it is written readable by its owner only.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

__all__ = ["LoopbackAddress"]

_API_HOST = "discord.com"
_GATEWAY_HOST = "gateway.discord.gg"
_CDN_HOST = "cdn.discordapp.com"
_VOICE_DOMAIN = "loopback.discord.media"


@dataclass(frozen=True)
class LoopbackAddress:
    """Where a loopback Discord listens, the CA to trust and the bot token to log in with."""

    port: int
    """The loopback's TCP port on 127.0.0.1 (HTTPS and WSS)."""
    ca_pem: str
    """The loopback's throwaway CA certificate (PEM)."""
    token: str
    """The bot account's token."""
    bot_name: str = "bot"
    """The bot account's user name (for messages)."""

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write this address to ``path`` (JSON, mode 0600) and return the path."""
        target = Path(path)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(asdict(self), out)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LoopbackAddress:
        """Read an address written by :meth:`save`; a clear :class:`ValueError` if it is not one."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(
                port=int(data["port"]),
                ca_pem=str(data["ca_pem"]),
                token=str(data["token"]),
                bot_name=str(data.get("bot_name", "bot")),
            )
        except FileNotFoundError:
            raise ValueError(
                f"{path}: no such file; it is written by the process running the loopback Discord "
                "(listening demo writes one)"
            ) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a loopback address file: {exc!r}") from None

    @staticmethod
    def is_loopback_host(host: str) -> bool:
        """Whether ``host`` is one of the names the loopback Discord serves."""
        host = host.lower().rstrip(".")
        return host in (_API_HOST, _GATEWAY_HOST, _CDN_HOST) or host.endswith("." + _VOICE_DOMAIN)

    def connector(self) -> aiohttp.TCPConnector:
        """An aiohttp connector leading a discord.py client to the loopback (call it inside a
        running event loop): Discord's names resolve to 127.0.0.1:``port``, everything else is
        refused, and only the loopback's CA is trusted."""
        from .server import LoopbackResolver

        context = ssl.create_default_context(cadata=self.ca_pem)
        return aiohttp.TCPConnector(
            resolver=LoopbackResolver(self.is_loopback_host, self.port),
            ssl=context,
            limit=0,
            use_dns_cache=False,
        )
