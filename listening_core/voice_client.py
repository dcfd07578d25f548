"""``VoiceClient``: discord.py's voice client that can also listen.

Use it as ``vc = await channel.connect(cls=listening_core.VoiceClient)``. Playback works as
before (in both ``_rtpsize`` AEAD modes: discord.py 2.7 sends only XChaCha, this client also
AES-GCM, which Discord prefers where it is offered). Listening adds :meth:`VoiceClient.listen`,
:meth:`stop_listening`, :meth:`pause_listening`, :meth:`resume_listening`,
:meth:`is_listening`, :meth:`is_listening_paused`, :meth:`wait_for_listen_ready` and
:meth:`listening_stats`.

The client watches its voice websocket (through discord.py's documented hook) to map SSRCs to
users (op 5), to see members connect and disconnect (ops 11 and 13) and to learn which SSRCs carry
video (op 12), and dispatches ``on_listening_member_connect(member, vc)`` and
``on_listening_member_disconnect(member, vc)``; while listening, also
``on_listening_speaking_start(member, vc)`` and ``on_listening_speaking_stop(member, vc)``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections.abc import Callable
from typing import Any

import discord
from discord.voice_state import VoiceConnectionState

from .errors import ListeningError
from .pool import AudioProcessPool
from .receiver import AudioReceiver, ListenOptions, UserStats
from .sinks import AudioSink

_log = logging.getLogger(__name__)

__all__ = ["ListeningStateError", "VoiceClient"]


class ListeningStateError(ListeningError, RuntimeError):
    """``listen`` and friends were called in a state that does not allow it (the message says why)."""


class VoiceClient(discord.VoiceClient):
    """A :class:`discord.VoiceClient` that can receive audio. See the module docstring."""

    supported_modes = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")  # type: ignore[assignment]

    def __init__(self, client: discord.Client, channel: discord.abc.Connectable) -> None:
        self._ssrc_to_user: dict[int, int] = {}
        self._video_ssrcs: set[int] = set()
        self._receiver: AudioReceiver | None = None
        self._last_receiver: AudioReceiver | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._aes: tuple[bytes, Any] | None = None
        super().__init__(client, channel)

    def create_connection_state(self) -> VoiceConnectionState:
        return VoiceConnectionState(self, hook=self._websocket_hook)

    # -- the voice websocket hook ---------------------------------------------------------------

    async def _websocket_hook(self, ws: Any, msg: dict[str, Any]) -> None:
        op, data = msg.get("op"), msg.get("d") or {}
        try:
            if op == 5:  # SPEAKING: maps an SSRC to a user
                self._map_ssrc(int(data["ssrc"]), int(data["user_id"]))
            elif op == 11:  # CLIENTS_CONNECT
                for user_id in data.get("user_ids", []):
                    self.client.dispatch(
                        "listening_member_connect",
                        self._member(int(user_id)) or self._user(int(user_id)),
                        self,
                    )
            elif op == 12:  # CLIENT_CONNECT / video announcement of another member
                user_id = int(data.get("user_id") or 0)
                audio = int(data.get("audio_ssrc") or 0)
                if user_id and audio:
                    self._map_ssrc(audio, user_id)
                for key in ("video_ssrc", "rtx_ssrc"):
                    if data.get(key):
                        self._video_ssrcs.add(int(data[key]))
                for stream in data.get("streams") or []:
                    for key in ("ssrc", "rtx_ssrc"):
                        if stream.get(key):
                            self._video_ssrcs.add(int(stream[key]))
            elif op == 13:  # CLIENT_DISCONNECT
                user_id = int(data["user_id"])
                self.client.dispatch(
                    "listening_member_disconnect", self._member(user_id) or self._user(user_id), self
                )
        except (KeyError, TypeError, ValueError):
            _log.debug("ignoring a voice websocket message we could not read: %s", msg)

    def _map_ssrc(self, ssrc: int, user_id: int) -> None:
        if ssrc and self._ssrc_to_user.get(ssrc) != user_id:
            self._ssrc_to_user[ssrc] = user_id
            _log.debug("SSRC %d is user %d", ssrc, user_id)

    def _member(self, user_id: int) -> discord.Member | None:
        guild = self.guild
        return guild.get_member(user_id) if guild is not None else None

    def _user(self, user_id: int) -> discord.abc.Snowflake:
        return self.client.get_user(user_id) or discord.Object(user_id)

    # -- AES-GCM playback (discord.py 2.7 only sends XChaCha) -------------------------------------

    def _encrypt_aead_aes256_gcm_rtpsize(self, header: bytes, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = bytes(self.secret_key)
        if self._aes is None or self._aes[0] != key:
            self._aes = (key, AESGCM(key))
        nonce = struct.pack(">I", self._incr_nonce)
        self.checked_add("_incr_nonce", 1, 4294967295)
        return header + self._aes[1].encrypt(nonce + bytes(8), bytes(data), bytes(header)) + nonce

    # -- listening -------------------------------------------------------------------------------

    def listen(
        self,
        sink: AudioSink | str,
        *,
        options: Any = None,
        after: Callable[[AudioSink, BaseException | None], Any] | None = None,
        pool: AudioProcessPool | None = None,
        listen_options: ListenOptions | None = None,
    ) -> AudioSink:
        """Start receiving into ``sink`` and return it.

        ``sink`` is an :class:`~listening_core.sinks.AudioSink` or the name of an installed sink
        plugin (``options`` then configure it: a dict or the plugin's options object).
        ``after(sink, error)``, sync or async, is called exactly once, after the sink's cleanup.
        ``pool`` lets several voice clients share decoding processes; without it the session
        starts its own and shuts it down when it ends.
        """
        if not self.is_connected():
            raise ListeningStateError(
                "connect to a voice channel before listening: await channel.connect(cls=VoiceClient)"
            )
        if self._receiver is not None:
            raise ListeningStateError("already listening; call stop_listening() first")
        from .plugins import default_registry

        registry = default_registry()
        spec = None
        if isinstance(sink, str):
            spec = registry.get(sink)
            sink = registry.create(sink, options)
        elif options is not None:
            raise ListeningStateError(
                "options apply to a sink given by name; configure a sink instance directly"
            )
        if not isinstance(sink, AudioSink):
            raise TypeError(f"sink must be an AudioSink or a sink name, not {type(sink).__name__}")
        own_pool = pool is None and sink.wants_pcm
        if own_pool:
            pool = AudioProcessPool()
            pool.start(1)
        receiver = AudioReceiver(
            self,
            sink,
            pool=pool,
            after=after,
            options=listen_options,
            own_pool=own_pool,
            on_finished=functools.partial(registry.session_finished, spec=spec),
        )
        self._receiver = receiver
        receiver.start()
        return sink

    def stop_listening(self) -> None:
        """Stop listening: every frame received so far is delivered, then the sink is cleaned up
        and ``after`` called. Returns at once; ``await wait_for_listen_ready()`` waits for it."""
        receiver = self._receiver
        if receiver is None:
            return
        self._receiver = None
        self._last_receiver = receiver
        receiver.stop()

    def pause_listening(self) -> None:
        """Discard received audio until :meth:`resume_listening` (the timeline keeps running)."""
        if self._receiver is None:
            raise ListeningStateError("not listening")
        self._receiver.pause()

    def resume_listening(self) -> None:
        """Receive again after :meth:`pause_listening`."""
        if self._receiver is None:
            raise ListeningStateError("not listening")
        self._receiver.resume()

    def is_listening(self) -> bool:
        """Whether a listening session is running (paused or not)."""
        return self._receiver is not None

    def is_listening_paused(self) -> bool:
        """Whether the listening session is paused."""
        return self._receiver is not None and self._receiver.paused

    async def wait_for_listen_ready(self, timeout: float | None = 30.0) -> None:
        """Wait until a new ``listen`` can start: the previous session finished cleaning up."""
        receiver = self._last_receiver
        if receiver is not None:
            await asyncio.wait_for(asyncio.to_thread(receiver.finished.wait), timeout)

    def listening_stats(self) -> dict[int, UserStats]:
        """Per-user statistics of the current (or last) listening session, by user id."""
        receiver = self._receiver or self._last_receiver
        return dict(receiver.stats) if receiver is not None else {}

    async def disconnect(self, *, force: bool = False) -> None:
        """Stop listening (the sink is finished and ``after`` called), then disconnect."""
        self.stop_listening()
        await super().disconnect(force=force)
        receiver = self._last_receiver
        if receiver is not None:
            await asyncio.to_thread(receiver.finished.wait, 15.0)
