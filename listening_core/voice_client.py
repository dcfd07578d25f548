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

A listening session lasts as long as the voice connection: when the bot leaves voice (by
:meth:`VoiceClient.disconnect`, or because Discord removed it) or is moved to another channel,
the session ends like :meth:`VoiceClient.stop_listening` (everything received is delivered and
the sink cleaned up) and ``after`` gets a :class:`ListeningInterrupted` that says which. A voice
server change or a resumed voice websocket does not end it: the same sink goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import discord
from discord.voice_state import VoiceConnectionState

from .connection import DAVE_KEY_RETENTION as DAVE_KEY_RETENTION
from .connection import ConnectionDave, _ConnectionState
from .errors import ListeningInterrupted, ListeningStateError
from .live import OVERFLOW_REASON, live_overflow
from .pool import AudioProcessPool
from .receiver import AudioReceiver, ListenOptions, UserStats
from .sinks import AudioSink, MultiSink, _unused_name
from .ssrc_map import SsrcMap

if TYPE_CHECKING:
    from discord.types.voice import SupportedModes

    from .hookspecs import SinkSpec
    from .plugins import SinkRegistry

_log = logging.getLogger(__name__)

__all__ = ["RECEIVE_BUFFER", "ListeningInterrupted", "ListeningStateError", "VoiceClient"]

RECEIVE_BUFFER = 4 * 1024 * 1024
"""Bytes of socket receive buffer asked for while listening (several seconds of a large call)."""


class VoiceClient(discord.VoiceClient):
    """A :class:`discord.VoiceClient` that can receive audio. See the module docstring."""

    # discord.py's SupportedModes does not list aead_aes256_gcm_rtpsize, which this client adds
    supported_modes: tuple[SupportedModes, ...] = (  # type: ignore[assignment]
        "aead_aes256_gcm_rtpsize",
        "aead_xchacha20_poly1305_rtpsize",
    )

    def __init__(self, client: discord.Client, channel: discord.abc.Connectable) -> None:
        self._init_listening()
        super().__init__(client, channel)

    def _init_listening(self) -> None:
        """The client's own state, before discord.py's (also what a test's socket-less client needs)."""
        self.ssrc_map: SsrcMap = SsrcMap()
        """What the voice gateway said about SSRCs: audio SSRC -> user, video/RTX SSRCs (ops 5, 12)."""
        self._receiver: AudioReceiver | None = None
        self._last_receiver: AudioReceiver | None = None
        self._attached: tuple[AudioReceiver, ...] = ()  # sessions still reading datagrams
        # sessions ended by a move, with the transport key of the channel they recorded: they
        # read the datagrams still coming under that key, never the new channel's
        self._moved: dict[AudioReceiver, Any] = {}
        self._reading = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._aes: tuple[bytes, Any] | None = None
        self._interruption: list[BaseException] = []  # why the connection ended the session, if it did
        self._leaving: asyncio.Event | None = None  # set when the disconnect under way is done

    def create_connection_state(self) -> VoiceConnectionState:
        """discord.py's connection state, with this client's hook on the voice websocket (it maps SSRCs
        to users and sees members connect and disconnect) and its reconnection mended (see
        :class:`_ConnectionState`)."""
        return _ConnectionState(self, hook=self._websocket_hook)

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
                        self._add_video_ssrc(int(data[key]), user_id)
                for stream in data.get("streams") or []:
                    for key in ("ssrc", "rtx_ssrc"):
                        if stream.get(key):
                            self._add_video_ssrc(int(stream[key]), user_id)
            elif op == 13:  # CLIENT_DISCONNECT
                user_id = int(data["user_id"])
                self.client.dispatch(
                    "listening_member_disconnect", self._member(user_id) or self._user(user_id), self
                )
        except (KeyError, TypeError, ValueError):
            _log.debug("ignoring a voice websocket message we could not read: %s", msg)

    def _add_video_ssrc(self, ssrc: int, user_id: int) -> None:
        self.ssrc_map.add_video(ssrc, user_id)

    def _map_ssrc(self, ssrc: int, user_id: int) -> None:
        self.ssrc_map.map(ssrc, user_id)

    def _member(self, user_id: int) -> discord.Member | None:
        guild = self.guild
        return guild.get_member(user_id) if guild is not None else None

    def _user(self, user_id: int) -> discord.abc.Snowflake:
        return self.client.get_user(user_id) or discord.Object(user_id)

    # -- what a receiver sees of this client ---------------------------------------------------------

    def listening_link(self) -> _Link:
        """The narrow view a :class:`~listening_core.receiver.AudioReceiver` gets of this client:
        the transport keys, the DAVE opener, the SSRC map, member lookup, event dispatch and the
        datagram fan-out; never the client itself."""
        return _Link(self)

    # -- datagrams ----------------------------------------------------------------------------------

    def _attach(self, receiver: AudioReceiver) -> None:
        """Start handing datagrams to ``receiver`` (it reads until it calls :meth:`_detach`)."""
        self._attached = (*self._attached, receiver)
        self._grow_socket_buffer()
        if not self._reading:
            # One listener for the connection's lifetime: discord.py's reader pauses when it has
            # none, and datagrams queued in the socket meanwhile would reach the next session.
            self._connection.add_socket_listener(self._on_datagram)
            self._reading = True

    def _grow_socket_buffer(self) -> None:
        """Ask for a receive buffer of :data:`RECEIVE_BUFFER` bytes on the voice socket.

        The kernel's default (about 200 KiB) holds well under a second of a large call: one
        pause of the reader thread (a garbage collection, a busy sink) and datagrams are dropped
        before anyone sees them. The kernel caps the request at ``net.core.rmem_max``.
        """
        sock = getattr(self._connection, "socket", None)
        if not isinstance(sock, socket.socket):
            return
        with contextlib.suppress(OSError):
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < RECEIVE_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)

    def _detach(self, receiver: AudioReceiver) -> None:
        self._attached = tuple(r for r in self._attached if r is not receiver)
        self._moved.pop(receiver, None)

    def _on_datagram(self, data: bytes) -> None:
        moved = self._moved
        for receiver in self._attached:  # between sessions: none, the datagram is dropped
            if moved:
                key = moved.get(receiver)
                if key is not None and self._connection.secret_key != key:
                    continue  # the other channel's audio: not for a session of this one
            receiver.on_datagram(data)

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
        sink: AudioSink | str | Sequence[AudioSink | str],
        *,
        options: Any = None,
        after: Callable[[AudioSink, BaseException | None], Any] | None = None,
        pool: AudioProcessPool | None = None,
        listen_options: ListenOptions | None = None,
    ) -> AudioSink:
        """Start receiving into ``sink`` and return it.

        ``sink`` is an :class:`~listening_core.sinks.AudioSink` or the name of an installed sink
        plugin (``options`` then configure it: a dict or the plugin's options object), or a list
        of those: they are combined in a :class:`~listening_core.sinks.MultiSink` (returned) and
        ``options`` maps sink names to their options. Every name and option is checked before
        anything starts. ``after(sink, error)``, sync or async, is called exactly once, after the
        sink's cleanup. ``pool`` lets several voice clients share decoding processes; without it
        the session starts its own and shuts it down when it ends.
        """
        if not self.is_connected():
            raise ListeningStateError(
                "connect to a voice channel before listening: "
                "vc = await channel.connect(cls=listening_core.VoiceClient)"
            )
        if self._current() is not None:
            raise ListeningStateError("already listening; call stop_listening() first")
        if listen_options is not None and not isinstance(listen_options, ListenOptions):
            # before anything starts: the receiver thread would die on it, leaving the session running
            raise TypeError(
                f"listen_options must be a listening_core.ListenOptions, not {type(listen_options).__name__}"
            )
        from .plugins import default_registry

        registry = default_registry()
        specs: dict[str, SinkSpec] = {}
        if isinstance(sink, str):
            specs[sink] = registry.get(sink)
            sink = registry.create(sink, options)
        elif isinstance(sink, (list, tuple)):
            sink, specs = _build_multi(registry, sink, options)
        elif options is not None:
            raise ListeningStateError(
                "options apply to a sink given by name; configure a sink instance directly"
            )
        if not isinstance(sink, AudioSink):
            raise TypeError(f"sink must be an AudioSink or a sink name, not {type(sink).__name__}")
        own_pool = pool is None and sink.wants_pcm
        if own_pool:
            try:
                pool = AudioProcessPool()  # raises LibopusNotFound, with the fix, before anything runs
                pool.start(1)
            except BaseException:
                with contextlib.suppress(Exception):
                    sink.cleanup()  # built for this session, which will not start
                raise

        # Set when the voice connection ends the session (see _end_session): what after() and
        # the plugins hear of, unless the sink failed, which says more.
        interruption: list[BaseException] = []

        def finished(done: AudioSink, error: BaseException | None = None) -> None:
            error = error or next(iter(interruption), None)
            if not specs:
                registry.session_finished(done, None, error)
            for name, spec in specs.items():
                registry.session_finished(done[name] if isinstance(done, MultiSink) else done, spec, error)

        def after_session(done: AudioSink, error: BaseException | None) -> Any:
            return None if after is None else after(done, error or next(iter(interruption), None))

        receiver = AudioReceiver(
            self,
            sink,
            pool=pool,
            after=after_session,
            options=listen_options,
            own_pool=own_pool,
            on_finished=finished,
        )
        self._receiver = receiver
        self._interruption = interruption
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
        receiver = self._current()
        if receiver is None:
            raise ListeningStateError("not listening: start with vc.listen(sink) first")
        receiver.pause()

    def resume_listening(self) -> None:
        """Receive again after :meth:`pause_listening`."""
        receiver = self._current()
        if receiver is None:
            raise ListeningStateError("not listening: start with vc.listen(sink) first")
        receiver.resume()

    def is_listening(self) -> bool:
        """Whether a listening session is running (paused or not); False once its sink failed."""
        return self._current() is not None

    def _current(self) -> AudioReceiver | None:
        """The running session, forgetting one that ended by itself (its sink failed)."""
        receiver = self._receiver
        if receiver is not None and receiver.stopping:
            self._receiver, self._last_receiver = None, receiver
            return None
        return receiver

    def is_listening_paused(self) -> bool:
        """Whether the listening session is paused."""
        return self._receiver is not None and self._receiver.paused

    async def wait_for_listen_ready(self, timeout: float | None = 30.0) -> None:
        """Wait until a new ``listen`` can start: the previous session finished cleaning up."""
        receiver = (
            self._receiver if self._receiver is not None and self._receiver.stopping else self._last_receiver
        )
        if receiver is None:
            return
        if receiver.finished.is_set():
            return
        # Woken by the session itself, not polled, and with no thread blocked on its behalf (one
        # could outlive the loop): the thread that finishes the session schedules the wake-up.
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # this loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_resolve, done)

        forget = receiver.when_finished(wake)
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            raise TimeoutError(f"the previous listening session did not finish within {timeout} s") from None
        finally:
            forget()

    def listening_stats(self) -> dict[int, UserStats]:
        """Per-user statistics of the current (or last) listening session, by user id.

        Frames a live stream (:class:`~listening_core.live.LiveSink`) dropped because its
        consumer fell behind are counted in ``dropped["stream-overflow"]``."""
        receiver = self._receiver or self._last_receiver
        if receiver is None:
            return {}
        stats = dict(receiver.stats)
        for user_id, count in live_overflow(receiver.sink).items():
            before = stats.get(user_id) or UserStats()
            dropped = before.dropped.copy()
            dropped[OVERFLOW_REASON] += count
            stats[user_id] = dataclasses.replace(before, dropped=dropped)  # the session's own untouched
        return stats

    def _end_session(self, reason: str, message: str) -> None:
        """End the listening session because the voice connection ended or moved (``after`` hears
        :class:`ListeningInterrupted`); no-op when not listening."""
        if self._current() is None:
            return
        _log.info("listening session ended: %s", message)
        self._interruption.append(ListeningInterrupted(reason, message))
        if reason == "moved" and self._receiver is not None:
            self._moved[self._receiver] = list(self._connection.secret_key or ())
        self.stop_listening()

    async def on_voice_state_update(self, data: Any) -> None:
        """discord.py's handler; a move to another channel first ends the listening session."""
        channel_id = data.get("channel_id")
        if channel_id is not None and self.channel is not None and int(channel_id) != self.channel.id:
            self._end_session(
                "moved", f"the bot was moved from voice channel {self.channel.id} to {channel_id}"
            )
        await super().on_voice_state_update(data)

    def cleanup(self) -> None:
        """discord.py calls this when the connection is gone for good (however it ended): the
        listening session ends with it, rather than waiting forever for audio."""
        self._end_session(
            "disconnected",
            "disconnected from voice by Discord (removed from the channel, the channel deleted, "
            "or the connection could not be restored)",
        )
        self._reading = False  # discord.py dropped its socket listeners
        super().cleanup()

    async def disconnect(self, *, force: bool = False) -> None:
        """End listening (the sink is finished and ``after`` gets a :class:`ListeningInterrupted`
        saying so), then disconnect. Call :meth:`stop_listening` first for a plain stop."""
        self._end_session("disconnected", "VoiceClient.disconnect() was called while listening")
        if self._leaving is not None:
            # A disconnect is under way (bot.close() while the bot leaves voice): a second one
            # would clear the confirmation the first waits for, and both would wait their whole
            # timeout. This one waits for the first instead.
            await self._leaving.wait()
            return
        self._leaving = asyncio.Event()
        try:
            await super().disconnect(force=force)
        finally:
            self._leaving.set()
            self._leaving = None
        self._reading = False  # discord.py dropped its socket listeners
        with contextlib.suppress(TimeoutError):
            await self.wait_for_listen_ready(timeout=15.0)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Link:
    """:meth:`VoiceClient.listening_link`: what a receiver needs of the client, and no more."""

    __slots__ = ("_vc", "channel_id", "dave", "guild_id", "loop", "ssrcs")

    def __init__(self, vc: VoiceClient) -> None:
        self._vc = vc
        self.channel_id: int = vc.channel.id
        guild = vc.guild
        self.guild_id: int | None = guild.id if guild is not None else None
        self.loop: asyncio.AbstractEventLoop = vc.loop
        self.ssrcs: SsrcMap = vc.ssrc_map
        self.dave: ConnectionDave = ConnectionDave(vc._connection)

    def transport_keys(self) -> tuple[str | None, Any]:
        conn = self._vc._connection
        return conn.mode, conn.secret_key

    def member(self, user_id: int) -> discord.Member | None:
        return self._vc._member(user_id)

    def dispatch(self, event: str, user_id: int) -> None:
        vc = self._vc
        member = vc._member(user_id) or vc._user(user_id)
        vc.loop.call_soon_threadsafe(vc.client.dispatch, event, member, vc)

    def attach(self, receiver: AudioReceiver) -> None:
        self._vc._attach(receiver)

    def detach(self, receiver: AudioReceiver) -> None:
        self._vc._detach(receiver)

    def keep_task(self, task: asyncio.Task[Any]) -> None:
        tasks = self._vc._tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _build_multi(
    registry: SinkRegistry, sinks: Sequence[AudioSink | str], options: Any
) -> tuple[MultiSink, dict[str, SinkSpec]]:
    """The :class:`MultiSink` for ``listen([...])``: every name and option is checked first."""
    if not sinks:
        raise ValueError("listen() was given an empty list of sinks; name at least one")
    names = [s for s in sinks if isinstance(s, str)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"listen() was given the sink {repeated[0]!r} twice; list each sink once")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(
            "with a list of sinks, options maps sink names to their options: "
            "options={'wav': {'directory': 'out'}}"
        )
    stray = [key for key in options if key not in names]
    if stray:
        raise ValueError(
            f"options were given for {stray[0]!r}, which is not among the sinks listed ({', '.join(names)})"
        )
    specs = {name: registry.get(name) for name in names}
    validated = {name: registry.validate_options(specs[name], options.get(name)) for name in names}
    built: dict[str, AudioSink] = {}
    try:
        for item in sinks:
            if isinstance(item, str):
                built[item] = registry.create(item, validated[item])
            elif isinstance(item, AudioSink):
                built[_unused_name(item, built.keys() | specs.keys())] = item
            else:
                raise TypeError(f"sinks must be AudioSink instances or sink names, not {type(item).__name__}")
    except BaseException:
        for name, made in built.items():
            if name in specs:
                with contextlib.suppress(Exception):
                    made.cleanup()
        raise
    return MultiSink(built), specs
