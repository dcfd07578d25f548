"""The project's exception hierarchy.

Every error listening-core raises derives from :class:`ListeningError`. Errors about one bad
datagram or frame derive from :class:`PacketError` and carry a short machine-readable
:attr:`~PacketError.reason` (``"truncated"``, ``"bad-tag"``, ``"no-key"`` ...) that receivers use
as a drop-counter key; such errors are expected on a live connection and are not bugs.
"""

from __future__ import annotations

import logging

__all__ = ["DaveError", "DecryptError", "ListeningError", "PacketError"]

_log = logging.getLogger(__name__)


class ListeningError(Exception):
    """Base class of every error raised by listening-core."""


class PacketError(ListeningError, ValueError):
    """A datagram or frame is malformed; it should be dropped (and counted under :attr:`reason`)."""

    reason: str
    """Short machine-readable cause, e.g. ``"truncated"``, ``"bad-version"``, ``"bad-extension"``."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message if message is not None else reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type[PacketError], tuple[str, str]]:
        # keep the reason when errors cross a process boundary (pickle)
        return (type(self), (self.reason, str(self)))


class DecryptError(PacketError):
    """Transport (or end-to-end) decryption failed: ``"bad-tag"``, ``"truncated"``, ``"bad-padding"``."""


class DaveError(DecryptError):
    """DAVE end-to-end decryption failed.

    Reasons: ``"no-key"`` (the sender's key is not known yet: hold the frame briefly and retry
    after the pending commit/welcome is processed), ``"unencrypted"`` (a plain frame while the
    sender's passthrough is off: drop it), ``"dave-failed"`` (anything else: drop it).
    """
