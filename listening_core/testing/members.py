"""Virtual members: guild members voiced by the loopback itself, with no client of their own.

Each has its own DAVE client, davey (:class:`~listening_core.testing.dave_client.DaveClient`, what
discord.py runs) or libdave (:class:`~listening_core.testing.libdave_client.LibdaveClient`, what
Discord's own clients run), that joins the channel's MLS group like any client and refuses Adds for
users no op 11 announced; it speaks a :class:`~listening_core.testing.media.Schedule` at real-time
pace: one Opus frame every 20 ms from a spurt's first (as a client's audio clock sends them),
correct sequence numbers and wall-clock RTP timestamps, five silence frames after each spurt,
optional RTP header extension and padding. Its packets enter the relay directly, so many of them
are cheap: no socket, no websocket, no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..rtp import RtcpHeader, RtpHeader
from .dave_client import OP_CLIENT_DISCONNECT, OP_CLIENTS_CONNECT, DaveClient
from .media import FRAME_SAMPLES, FRAME_SECONDS, SILENCE_FRAME, Schedule, ScheduledFrame

if TYPE_CHECKING:
    from ..crypto import TransportCipher
    from .call import VoiceCall
    from .dave_group import Outgoing
    from .server import LocalDiscord
    from .world import User

_log = logging.getLogger(__name__)

__all__ = ["DAVE_IMPLEMENTATIONS", "SentOpus", "VirtualMember"]

DAVE_IMPLEMENTATIONS = ("davey", "libdave")
"""What a virtual member's ``dave`` option may name."""

EXTENSION_PROFILE = 0xBEDE
RTCP_SR = 200
VIDEO_PAYLOAD_TYPE = 101  # H.264 as Discord's clients number it
CLIENT_CONNECT = 12
NTP_UNIX_OFFSET = 2208988800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (Unix)


@dataclass(frozen=True, slots=True)
class SentOpus:
    """One frame a virtual member sent: the plain Opus and the DAVE frame that went on the wire."""

    sequence: int
    timestamp: int
    opus: bytes
    payload: bytes
    time: float
    silence: bool


class VirtualMember:
    """A member the loopback plays: joins voice, takes part in DAVE, speaks schedules.

    ``extension_body`` (a multiple of 4 bytes) is sent as an RTP header extension with every
    packet and ``padding`` adds that many bytes of RTP padding, as real Discord clients do.
    ``speaking_delay`` sends the op 5 that maps this member's SSRC that many seconds after its
    first packet of a spurt (0: just before), to exercise receivers that must hold unmapped SSRCs.
    ``dave`` picks the DAVE implementation: ``"davey"`` (discord.py's) or ``"libdave"`` (Discord's
    clients'; needs ``pip install dave-py``).  ``enforce_recognised`` (davey only; libdave always
    does) refuses Add proposals for users no op 11 announced.  ``spurt_burst`` (a fault) holds the
    first that many frames of every spurt and sends them back to back when the last of them is due,
    as a client that encodes a spurt before sending does; 0 paces every frame.
    """

    is_virtual = True

    def __init__(
        self,
        discord: LocalDiscord,
        user: User,
        *,
        extension_body: bytes = b"",
        padding: int = 0,
        speaking_delay: float = 0.0,
        rng: random.Random | None = None,
        dave: str = "davey",
        enforce_recognised: bool = True,
        spurt_burst: int = 0,
    ) -> None:
        if dave not in DAVE_IMPLEMENTATIONS:
            raise ValueError(f"dave must be one of {DAVE_IMPLEMENTATIONS}, got {dave!r}")
        if dave == "libdave":
            from .libdave_client import _require_dave

            _require_dave()  # fail here, with the pip command, not at the first DAVE message
        if spurt_burst < 0:
            raise ValueError("spurt_burst must be >= 0")
        if len(extension_body) % 4:
            raise ValueError("extension_body must be a multiple of 4 bytes long")
        if not 0 <= padding <= 255:
            raise ValueError("padding must be 0..255 bytes")
        self._discord = discord
        self.user = user
        self.user_id: int = user.id
        self.extension_body = extension_body
        self.padding = padding
        self.speaking_delay = speaking_delay
        self.dave_implementation = dave
        self.enforce_recognised = enforce_recognised
        self.spurt_burst = spurt_burst
        self._rng = rng or random.Random(user.id)
        self.ssrc: int = 0
        self.video_ssrc: int = 0
        self.joined: bool = False
        self.udp_addr: tuple[str, int] | None = None
        self.cipher: TransportCipher | None = None
        self.speaking: int = 0
        self.call: VoiceCall | None = None
        self.dave: Any = None
        """Its DAVE client: a :class:`DaveClient` or a ``LibdaveClient`` (same interface)."""
        self.sent: list[SentOpus] = []
        self.unsent_not_ready: int = 0
        self._seq = self._rng.randrange(0, 1 << 16)
        self._ts_base = self._rng.randrange(0, 1 << 32)
        self._epoch: float | None = None
        self.rtx_ssrc: int = 0
        self.video_sent: int = 0
        self._video_seq = self._rng.randrange(0, 1 << 16)
        self._video_ts = self._rng.randrange(0, 1 << 32)
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<VirtualMember {self.user.name} id={self.user_id} ssrc={self.ssrc} joined={self.joined}>"

    # -- what the call and relay use ---------------------------------------------------------

    def next_counter(self) -> int:  # virtual members receive nothing over UDP
        """Always 0: nothing is sealed to a virtual member."""
        return 0

    async def send_json(self, op: int, d: Any, *, sequenced: bool = True) -> None:
        """Voice gateway messages to a virtual member need no answer; op 11 and op 13 tell its DAVE
        client whom to recognise."""
        if op in (OP_CLIENTS_CONNECT, OP_CLIENT_DISCONNECT) and self.dave is not None:
            self.dave.clients_changed(op, d or {})

    async def deliver_dave(self, out: Outgoing) -> list[Outgoing]:
        """Handle a DAVE message as discord.py would; feed the answers back into the group."""
        if self.dave is None or self.call is None:
            return []
        answers: list[Outgoing] = []
        for message in self.dave.handle(out):
            answers.extend(self.call.dave.receive(self.user_id, message))
        return answers

    # -- joining and leaving -----------------------------------------------------------------

    async def join(
        self, channel_id: int | None = None, *, wait_ready: bool = True, timeout: float = 10.0
    ) -> None:
        """Join a voice channel (default: the guild's first); wait until DAVE can encrypt."""
        discord = self._discord
        channel_id = channel_id or discord.world.voice_channel_id
        await discord.voice_state_update(self.user, {"channel_id": str(channel_id)})
        call = await discord.call_for(channel_id)
        await self.move_to(call)
        if wait_ready and call.dave_version > 0:
            await self.wait_ready(timeout)

    async def move_to(self, call: VoiceCall) -> None:
        """Follow a voice server change: a new SSRC and a fresh DAVE session on ``call``."""
        old = self.call
        if old is not None:
            old.virtual.pop(self.user_id, None)
            old.relay.forget(self)
        self.joined = False
        self.speaking = 0
        self.call = call
        self.ssrc = call.new_ssrc()
        self.dave = self._new_dave_client(call.channel_id)
        self.dave.ssrc = self.ssrc
        key_package = self.dave.session_description(call.dave_version) if call.dave_version > 0 else []
        await call.join(self)
        for message in key_package:
            await call.route(call.dave.receive(self.user_id, message))

    def _new_dave_client(self, channel_id: int) -> Any:
        if self.dave_implementation == "libdave":
            from .libdave_client import LibdaveClient

            return LibdaveClient(self.user_id, channel_id)
        return DaveClient(self.user_id, channel_id, enforce_recognised=self.enforce_recognised)

    @property
    def alone(self) -> bool:
        """No other DAVE participant is in its call: it has no group and cannot encrypt, as on Discord."""
        call = self.call
        return call is not None and call.dave.joined <= {self.user_id}

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until this member's DAVE session can encrypt (it has joined the MLS group), or, alone
        in the call, until its key package is with the gateway (nobody could hear it anyway)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.dave is None or not (self.dave.can_encrypt or self.alone):
            if loop.time() > deadline:
                raise TimeoutError(f"{self!r}: DAVE session not ready after {timeout} s")
            await asyncio.sleep(0.01)

    async def leave(self) -> None:
        """Leave voice: the others get op 13 and a new DAVE epoch."""
        await self.stop()
        await self._discord.voice_state_update(self.user, {"channel_id": None})
        self.call = None

    async def stop(self) -> None:
        """Stop speaking at once (no silence tail)."""
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- speaking ----------------------------------------------------------------------------

    def speak(self, schedule: Schedule, *, start_at: float | None = None) -> asyncio.Task[None]:
        """Start sending ``schedule`` (at loop time ``start_at``, default now); returns the task.

        RTP timestamps count wall-clock 20 ms slots from this member's first ``speak``, so gaps
        between spurts and between calls show as timestamp jumps, as with Discord's clients.
        """
        if self.call is None or not self.joined:
            raise RuntimeError(f"{self!r} must join a voice channel before speaking")
        loop = asyncio.get_running_loop()
        t0 = loop.time() if start_at is None else start_at
        if self._epoch is None:
            self._epoch = t0
        task = asyncio.ensure_future(self._play(schedule, t0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _play(self, schedule: Schedule, t0: float) -> None:
        assert self._epoch is not None
        loop = asyncio.get_running_loop()
        # Encoded one frame at a time while waiting for the frame before it: a spurt's first frame
        # leaves on time and every frame 20 ms after the one before, as from a client's audio clock.
        frames = self._departures(schedule.frames())
        slot0 = round((t0 - self._epoch) / FRAME_SECONDS)
        announced = False
        try:
            for departure, frame in frames:
                delay = t0 + departure - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                call = self.call
                if call is None or not self.joined:
                    return
                if not frame.is_silence_tail and not self.speaking and not announced:
                    announced = True
                    if self.speaking_delay > 0:
                        loop.call_later(self.speaking_delay, self._announce, call, 1)
                    else:
                        await call.speaking(self, 1)
                timestamp = (self._ts_base + (slot0 + frame.slot) * FRAME_SAMPLES) & 0xFFFFFFFF
                self._send(call, frame.opus, timestamp, frame.is_silence_tail, loop.time())
                if frame.is_silence_tail:
                    announced = False
                    if self.speaking:
                        await call.speaking(self, 0)
        finally:
            if self.speaking and self.call is not None:
                await self.call.speaking(self, 0)

    def _departures(self, frames: Iterator[ScheduledFrame]) -> Iterator[tuple[float, ScheduledFrame]]:
        """(seconds from the schedule's start when it leaves, frame): each frame in its own slot, but
        with ``spurt_burst`` the first frames of a spurt wait for the last of them and leave together."""
        held: list[ScheduledFrame] = []
        in_spurt = False
        for frame in frames:
            if self.spurt_burst and not frame.is_silence_tail and not in_spurt:
                held.append(frame)
                if len(held) < self.spurt_burst:
                    continue
                in_spurt = True
            if held:
                yield from ((held[-1].offset, h) for h in held)
                held = []
                if not frame.is_silence_tail:
                    continue
            if frame.is_silence_tail:
                in_spurt = False
            yield frame.offset, frame
        yield from ((held[-1].offset, h) for h in held)

    def send_sender_report(self) -> bytes:
        """Send an RTCP sender report (SR) to the call, as clients do every few seconds; returns it plain."""
        call = self.call
        if call is None or not self.joined:
            raise RuntimeError(f"{self!r} must join a voice channel before sending RTCP")
        now = time.time() + NTP_UNIX_OFFSET
        ntp = (int(now) << 32) | int((now % 1) * (1 << 32))
        last = self.sent[-1] if self.sent else None
        rtp_ts = last.timestamp if last is not None else self._ts_base
        octets = sum(len(s.payload) for s in self.sent) & 0xFFFFFFFF
        body = struct.pack(">QIII", ntp, rtp_ts, len(self.sent) & 0xFFFFFFFF, octets)
        report = RtcpHeader(RTCP_SR, self.ssrc, count=0, length=6).serialize() + body
        call.relay.forward_rtcp(self, report)
        return report

    def _announce(self, call: VoiceCall, flags: int) -> None:
        if self.joined:
            self._discord.spawn(call.speaking(self, flags))

    def send_frame(self, opus: bytes, *, timestamp: int | None = None) -> SentOpus:
        """Send one frame now, outside any schedule (e.g. a corrupt one); recorded in :attr:`sent`.

        The timestamp defaults to the slot of the current wall-clock time, as a client's would.
        """
        call = self.call
        if call is None or not self.joined:
            raise RuntimeError(f"{self!r} must join a voice channel before sending")
        now = asyncio.get_running_loop().time()
        if timestamp is None:
            if self._epoch is None:
                self._epoch = now
            timestamp = (
                self._ts_base + round((now - self._epoch) / FRAME_SECONDS) * FRAME_SAMPLES
            ) & 0xFFFFFFFF
        self._send(call, opus, timestamp, opus == SILENCE_FRAME, now)
        return self.sent[-1]

    async def start_video(self, packets: int = 10, *, payload_type: int = VIDEO_PAYLOAD_TYPE) -> int:
        """Turn a camera on: announce video and RTX SSRCs (op 12) and send ``packets`` video packets.

        Returns the video SSRC. Receivers must never hand these packets to an Opus decoder.
        """
        call = self.call
        if call is None or not self.joined:
            raise RuntimeError(f"{self!r} must join a voice channel before sending video")
        if not self.video_ssrc:
            self.video_ssrc = call.new_ssrc()
            self.rtx_ssrc = call.new_ssrc()
        announcement = {
            "user_id": str(self.user_id),
            "audio_ssrc": self.ssrc,
            "video_ssrc": self.video_ssrc,
            "rtx_ssrc": self.rtx_ssrc,
            "streams": [
                {"type": "video", "ssrc": self.video_ssrc, "rtx_ssrc": self.rtx_ssrc, "active": True}
            ],
        }
        for other in call.participants():
            if other is not self:
                await other.send_json(CLIENT_CONNECT, announcement)
        for _ in range(packets):
            frame = self._rng.randbytes(self._rng.randrange(200, 1000))
            payload = self.dave.encrypt(frame) if self.dave is not None and self.dave.can_encrypt else frame
            header = RtpHeader(
                sequence=self._video_seq,
                timestamp=self._video_ts,
                ssrc=self.video_ssrc,
                payload_type=payload_type,
            )
            call.relay.forward_rtp(self, header, payload)
            self.video_sent += 1
            self._video_seq = (self._video_seq + 1) & 0xFFFF
            self._video_ts = (self._video_ts + 3000) & 0xFFFFFFFF
            await asyncio.sleep(0.005)
        return self.video_ssrc

    def _send(self, call: VoiceCall, opus: bytes, timestamp: int, silence: bool, now: float) -> None:
        if call.dave_version > 0:
            if self.dave is not None and self.dave.can_encrypt:
                payload = self.dave.encrypt_opus(opus)
            elif self.dave is not None and self.dave.sends_unencrypted:
                payload = opus  # downgraded to DAVE protocol version 0: plain, as discord.py sends
            else:
                self.unsent_not_ready += 1  # a real client cannot send before it holds a key either
                return
        else:
            payload = opus
        header = RtpHeader(
            sequence=self._seq,
            timestamp=timestamp,
            ssrc=self.ssrc,
            extension_profile=EXTENSION_PROFILE if self.extension_body else None,
            extension_words=len(self.extension_body) // 4,
            padding=self.padding > 0,
            extension_body=self.extension_body,
        )
        call.relay.forward_rtp(self, header, payload, padding=self.padding)
        self.sent.append(SentOpus(self._seq, timestamp, opus, payload, now, silence))
        self._seq = (self._seq + 1) & 0xFFFF
