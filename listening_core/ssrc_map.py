"""What the voice gateway says about SSRCs (ops 5, 11, 12 and 13), with public reads.

:class:`SsrcMap` is written by :class:`~listening_core.voice_client.VoiceClient`'s websocket hook
and read by a listening session: which user an audio SSRC belongs to (op 5, or op 12's
``audio_ssrc``), and which SSRCs carry video or RTX (op 12), with the user who announced them.
A session that holds packets from an SSRC nobody was announced for yet subscribes with
:meth:`SsrcMap.subscribe`: it is told at once when the map changes, instead of looking again on
a timer.

Writes come from the event loop, reads from the receiver's thread: every structure is a plain
dict or set changed in single steps, and a reader never sees a half-made entry.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Mapping

__all__ = ["SsrcMap"]

_log = logging.getLogger(__name__)


class SsrcMap:
    """SSRC → user for audio, and the video/RTX SSRCs, as the voice gateway announced them."""

    __slots__ = ("_audio", "_listeners", "_video", "_video_owner", "users", "video_owners")

    def __init__(self) -> None:
        self._audio: dict[int, int] = {}
        self._video: set[int] = set()
        self._video_owner: dict[int, int] = {}
        self._listeners: tuple[Callable[[], None], ...] = ()
        self.users: Mapping[int, int] = types.MappingProxyType(self._audio)
        """Audio SSRC → user, live and read-only."""
        self.video_owners: Mapping[int, int] = types.MappingProxyType(self._video_owner)
        """Video/RTX SSRC → the user who announced it, live and read-only."""

    # -- reads -------------------------------------------------------------------------------

    def user_of(self, ssrc: int) -> int | None:
        """The user whose audio ``ssrc`` carries, or ``None`` if none was announced."""
        return self._audio.get(ssrc)

    def is_video(self, ssrc: int) -> bool:
        """Whether ``ssrc`` was announced as a video or RTX stream (op 12)."""
        return ssrc in self._video

    def video_owner(self, ssrc: int) -> int | None:
        """The user who announced the video/RTX ``ssrc``, or ``None``."""
        return self._video_owner.get(ssrc)

    def owner(self, ssrc: int) -> int | None:
        """The user ``ssrc`` belongs to, audio or video, or ``None``."""
        user_id = self._audio.get(ssrc)
        return user_id if user_id is not None else self._video_owner.get(ssrc)

    def video_ssrcs(self) -> frozenset[int]:
        """The video/RTX SSRCs announced so far."""
        return frozenset(self._video)

    def __contains__(self, ssrc: object) -> bool:
        return ssrc in self._audio

    def __len__(self) -> int:
        return len(self._audio)

    # -- writes (the voice websocket hook) ---------------------------------------------------

    def map(self, ssrc: int, user_id: int) -> None:
        """Op 5 (or op 12's ``audio_ssrc``): ``ssrc`` carries ``user_id``'s audio."""
        if ssrc and self._audio.get(ssrc) != user_id:
            self._audio[ssrc] = user_id
            _log.debug("SSRC %d is user %d", ssrc, user_id)
            self._changed()

    def add_video(self, ssrc: int, user_id: int) -> None:
        """Op 12: ``ssrc`` carries video or RTX of ``user_id`` (0 if not said)."""
        known = ssrc in self._video and (not user_id or self._video_owner.get(ssrc) == user_id)
        self._video.add(ssrc)
        if user_id:
            self._video_owner[ssrc] = user_id
        if not known:
            self._changed()

    # -- subscribers -------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (on the writer's thread; it must be quick) after each change."""
        self._listeners = (*self._listeners, listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener``."""
        self._listeners = tuple(f for f in self._listeners if f is not listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # a listener's bug must not break the websocket hook
                _log.exception("an SsrcMap listener raised")

    def __repr__(self) -> str:
        return f"<SsrcMap audio={len(self._audio)} video={len(self._video)}>"
