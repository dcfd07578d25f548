"""Robustness of the receive pipeline end to end, through the loopback Discord.

What is proven here, one behaviour per test: RTCP reaches the sink; video, other payload types,
keep-alives and discovery datagrams never reach a decoder; a corrupt Opus frame costs that frame
only; a rejoin with a new SSRC continues the user's track; packets from an SSRC mapped late are
held and attributed, never-mapped ones are dropped and counted; speaking events; pause/resume
keeps the timeline true; stop delivers everything and leaves nothing behind; a failing sink
does not break the connection; sinks chosen by name; one pool shared by two guilds; playback
while listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import multiprocessing
import os
import threading
import time
import uuid
from typing import Any

import discord
import pytest
from discord.ext import commands

from listening_core import (
    AudioFrame,
    AudioProcessPool,
    AudioSink,
    FrameKind,
    ListenOptions,
    RtcpPacket,
    VoiceClient,
)
from listening_core.hookspecs import SinkSpec, hookimpl
from listening_core.opus import OpusDecoder, OpusError
from listening_core.plugins import OptionsError, UnknownSinkError, default_registry
from listening_core.rtp import DiscoveryPacket, RtpHeader
from listening_core.sinks import SinkError
from listening_core.testing import LocalDiscord, Schedule
from listening_core.testing.clients import close_client, connect_client
from listening_core.testing.media import SILENCE_FRAME, OpusEncoder, Spurt, load_pcm, reference_decode
from listening_core.unpacker import DECODE, OK, AudioUnpacker

from .helpers import wait_dave_ready, wait_for
from .test_listen import CollectingSink, _recorder

SAMPLES_PER_SECOND = 48_000
TOLERANCE_S = 0.15  # the 5 ms tick plus loopback scheduling
TOLERANCE = round(TOLERANCE_S * SAMPLES_PER_SECOND)
CORRUPT_OPUS = b"\x02\xff\xff"  # code 2 (two frames) with a first-frame length beyond the packet


# -- helpers ------------------------------------------------------------------------------------


class RecordingSink(CollectingSink):
    """CollectingSink that also keeps RTCP and counts cleanups."""

    def __init__(self) -> None:
        super().__init__()
        self.rtcp: list[RtcpPacket] = []

    def on_rtcp(self, packet: RtcpPacket) -> None:
        self.rtcp.append(packet)


def _speech(seconds: float, clip: str = "alice", *, start: float = 0.0, skip: float = 0.2) -> Spurt:
    """``seconds`` of a clip (past its leading silence) as one spurt starting at ``start``."""
    pcm = load_pcm(clip)
    first = round(skip * SAMPLES_PER_SECOND) * 4
    return Spurt(start, pcm[first : first + round(seconds * SAMPLES_PER_SECOND) * 4])


def _mono(loop_time: float) -> float:
    """A loop time as time.monotonic() (the same clock on Linux; keep the conversion explicit)."""
    loop = asyncio.get_running_loop()
    return loop_time - loop.time() + time.monotonic()


async def _ready_call(local: LocalDiscord, *members: Any, bot_cls: Any = None) -> tuple[Any, VoiceClient]:
    """Members join, then a recorder bot joins with listening_core.VoiceClient; DAVE settled."""
    for member in members:
        await member.join()
    if bot_cls is None:
        client, vc = await _recorder(local)
    else:
        client = await connect_client(local, local.add_bot("recorder"), cls=bot_cls, command_prefix="!")
        channel = client.get_channel(local.world.voice_channel_id)
        assert isinstance(channel, discord.VoiceChannel)
        vc = await asyncio.wait_for(channel.connect(cls=VoiceClient), 20)
    await wait_dave_ready(vc, epoch=1)
    await asyncio.sleep(0.3)  # let the last epoch settle
    return client, vc


async def _wait_finished(vc: VoiceClient) -> None:
    """``wait_for_listen_ready``, failing (not hanging) if the session never finishes."""
    receiver = vc._last_receiver
    try:
        await vc.wait_for_listen_ready(timeout=10)
    except TimeoutError:
        if receiver is not None:
            # wait_for_listen_ready's executor thread blocks on this event with no timeout: release
            # it, or closing the event loop waits for that thread forever
            receiver.finished.set()
        raise AssertionError(
            "the listening session never finished: the sink was not cleaned up nor after called"
        ) from None


async def _stop(vc: VoiceClient) -> None:
    vc.stop_listening()
    await _wait_finished(vc)


def _assert_exact(frames: list[AudioFrame], sent: list[Any]) -> None:
    """Every frame sent, once, in order, decoded sample for sample like the reference."""
    assert [f.sequence for f in frames] == [s.sequence for s in sent]
    assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in frames), [
        f.kind for f in frames if f.kind not in (FrameKind.RECEIVED, FrameKind.SILENCE)
    ]
    assert b"".join(f.pcm or b"" for f in frames) == reference_decode([s.opus for s in sent])


def _bot_session(local: LocalDiscord, client: discord.Client) -> Any:
    assert client.user is not None
    return local.calls[local.world.voice_channel_id].sessions[client.user.id]


def _sent_times(local: LocalDiscord, client: discord.Client, member: Any) -> list[float]:
    """Loop times at which the relay sent ``member``'s audio frames to the bot, in order."""
    assert client.user is not None
    call = local.calls[local.world.voice_channel_id]
    return [f.time for f in call.relay.sent[(member.user_id, client.user.id)] if f.ssrc == member.ssrc]


def _forge_rtp(member: Any, *, ssrc: int, sequence: int, payload_type: int, payload: bytes) -> None:
    """Send one RTP packet through the relay as ``member`` (re-sealed for every other member)."""
    header = RtpHeader(sequence=sequence & 0xFFFF, timestamp=12345, ssrc=ssrc, payload_type=payload_type)
    member.call.relay.forward_rtp(member, header, payload)


# -- 1. RTCP ----------------------------------------------------------------------------------------


async def test_rtcp_sender_report_reaches_sink() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            sink = RecordingSink()
            vc.listen(sink)
            await alice.speak(Schedule([_speech(0.2)]))  # op 5 maps alice's SSRC
            reports = [alice.send_sender_report()]
            await asyncio.sleep(0.05)
            reports.append(alice.send_sender_report())
            await wait_for(lambda: len(sink.rtcp) >= 2, timeout=5)
            await asyncio.sleep(0.1)
            await _stop(vc)

            assert len(sink.rtcp) == 2
            for packet, plain in zip(sink.rtcp, reports, strict=True):
                assert isinstance(packet, RtcpPacket)
                assert packet.ssrc == alice.ssrc
                assert packet.user_id == alice.user_id
                assert packet.packet_type == 200
                assert packet.data == plain
        finally:
            await close_client(client)


# -- 2. video and other payload types ---------------------------------------------------------------


async def test_video_never_reaches_a_decoder() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            sink = CollectingSink()
            vc.listen(sink)
            speaking = alice.speak(Schedule([_speech(1.0)]))
            await asyncio.sleep(0.2)
            video_ssrc = await alice.start_video(20)  # camera on while speaking
            await speaking
            await asyncio.sleep(0.3)
            await _stop(vc)

            assert alice.video_sent == 20
            assert video_ssrc in vc.ssrc_map.video_ssrcs()
            assert set(sink.frames) == {alice.user_id}
            frames = sink.frames[alice.user_id]
            assert all(f.ssrc == alice.ssrc for f in frames)
            _assert_exact(frames, alice.sent)
            stats = vc.listening_stats()[alice.user_id]
            assert stats.concealed == 0 and stats.lost == 0 and stats.corrupt == 0
            # every video packet is counted against the member who sent it
            assert stats.dropped["not-audio"] == 20, (
                dict(stats.dropped),
                dict(vc._last_receiver.unattributed),
            )
        finally:
            await close_client(client)


async def test_non_opus_payload_type_on_audio_ssrc_is_dropped_and_counted() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            sink = CollectingSink()
            vc.listen(sink)
            await alice.speak(Schedule([_speech(0.4)]))
            # five packets with payload type 99 on alice's audio SSRC, with fresh sequence numbers
            for k in range(5):
                _forge_rtp(
                    alice,
                    ssrc=alice.ssrc,
                    sequence=alice._seq + 1000 + k,
                    payload_type=99,
                    payload=bytes(range(100)),
                )
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            await alice.speak(Schedule([_speech(0.4, "bob")]))
            await asyncio.sleep(0.3)
            await _stop(vc)

            frames = sink.frames[alice.user_id]
            assert [f.sequence for f in frames] == [s.sequence for s in alice.sent]
            assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in frames)
            assert b"".join(f.pcm or b"" for f in frames) == reference_decode([s.opus for s in alice.sent])
            stats = vc.listening_stats()[alice.user_id]
            assert stats.dropped["not-audio"] == 5
            assert stats.corrupt == 0 and stats.concealed == 0
        finally:
            await close_client(client)


# -- 3. keep-alives and discovery ------------------------------------------------------------------


async def test_keepalives_and_discovery_are_never_audio() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            call = local.calls[local.world.voice_channel_id]
            session = _bot_session(local, client)
            host, port = vc._connection.socket.getsockname()[:2]
            junk = [
                (7).to_bytes(8, "little"),  # discord.py's keep-alive: an 8-byte counter
                b"\x80\x78" + bytes(6),  # 8 bytes that start like RTP
                DiscoveryPacket.response(vc.ssrc, host, port).serialize(),  # 74-byte response
                DiscoveryPacket.request(vc.ssrc).serialize(),  # and a request
            ]
            sink = CollectingSink()
            vc.listen(sink)
            receiver = vc._receiver
            assert receiver is not None
            for _ in range(5):
                for data in junk:
                    call.relay.send_raw(data, session)
            await asyncio.sleep(0.3)
            assert not sink.frames

            async def keep_sending() -> None:  # and more of them in the middle of a spurt
                while True:
                    for data in junk:
                        call.relay.send_raw(data, session)
                    await asyncio.sleep(0.03)

            noise = asyncio.ensure_future(keep_sending())
            try:
                await alice.speak(Schedule([_speech(0.6)]))
            finally:
                noise.cancel()
            await asyncio.sleep(0.3)
            assert receiver.is_alive()
            assert vc.is_listening()
            await _stop(vc)

            assert set(sink.frames) == {alice.user_id}
            _assert_exact(sink.frames[alice.user_id], alice.sent)
            assert receiver.unattributed["receiver-error"] == 0
            assert receiver.error is None
        finally:
            await close_client(client)


# -- 4. a corrupt Opus frame ------------------------------------------------------------------------


async def test_corrupt_opus_frame_costs_that_frame_only() -> None:
    with pytest.raises(OpusError):
        OpusDecoder().decode(CORRUPT_OPUS)
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            sink = CollectingSink()
            vc.listen(sink)
            await alice.speak(Schedule([_speech(0.5)]))
            await asyncio.sleep(0.1)
            corrupt = alice.send_frame(CORRUPT_OPUS)
            await asyncio.sleep(0.1)
            await alice.speak(Schedule([_speech(0.5, "bob")]))
            await asyncio.sleep(0.3)
            await _stop(vc)

            sent = alice.sent
            k = next(i for i, s in enumerate(sent) if s is corrupt)
            frames = sink.frames[alice.user_id]
            assert [f.sequence for f in frames] == [s.sequence for s in sent]
            assert frames[k].kind is FrameKind.PLC
            assert all(
                f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for i, f in enumerate(frames) if i != k
            )
            stats = vc.listening_stats()[alice.user_id]
            assert stats.corrupt == 1
            assert stats.lost == 0 and stats.dave_failures == 0
            # before the corrupt frame: exactly the reference decode
            before = reference_decode([s.opus for s in sent[:k]])
            assert b"".join(f.pcm or b"" for f in frames[:k]) == before
            # from it on: a reference that conceals at that slot
            concealed = reference_decode([None if i == k else s.opus for i, s in enumerate(sent)])
            assert b"".join(f.pcm or b"" for f in frames) == concealed
        finally:
            await close_client(client)


# -- 5. rejoin with a new SSRC ---------------------------------------------------------------------


async def test_rejoin_with_new_ssrc_continues_the_track() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice, bot_cls=commands.Bot)
        try:
            events: list[tuple[str, int]] = []

            async def on_connect(member: Any, voice_client: Any) -> None:
                events.append(("connect", member.id))

            async def on_disconnect(member: Any, voice_client: Any) -> None:
                events.append(("disconnect", member.id))

            client.add_listener(on_connect, "on_listening_member_connect")
            client.add_listener(on_disconnect, "on_listening_member_disconnect")

            sink = CollectingSink()
            vc.listen(sink)
            await alice.speak(Schedule([_speech(0.5)]))
            first = list(alice.sent)
            old_ssrc = alice.ssrc
            await asyncio.sleep(0.2)
            await alice.leave()
            await wait_for(lambda: ("disconnect", alice.user_id) in events, timeout=5)
            await asyncio.sleep(0.3)
            await alice.join()
            assert alice.ssrc != old_ssrc
            await wait_for(lambda: ("connect", alice.user_id) in events, timeout=5)
            await alice.speak(Schedule([_speech(0.5, "bob")]))
            second = alice.sent[len(first) :]
            await asyncio.sleep(0.3)
            await _stop(vc)

            assert events == [("disconnect", alice.user_id), ("connect", alice.user_id)]
            frames = sink.frames[alice.user_id]
            assert {f.ssrc for f in frames} == {old_ssrc, alice.ssrc}
            assert [f.sequence for f in frames] == [s.sequence for s in alice.sent]
            assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in frames)
            positions = [f.position for f in frames]
            assert all(b >= a + f.samples for a, b, f in zip(positions, positions[1:], frames, strict=False))
            # each SSRC is its own Opus stream (its own decoder)
            n = len(first)
            assert b"".join(f.pcm or b"" for f in frames[:n]) == reference_decode([s.opus for s in first])
            assert b"".join(f.pcm or b"" for f in frames[n:]) == reference_decode([s.opus for s in second])
        finally:
            await close_client(client)


# -- 6. unmapped SSRCs --------------------------------------------------------------------------------


async def test_late_mapped_ssrc_is_held_then_attributed() -> None:
    async with LocalDiscord() as local:
        late = local.add_member("x", speaking_delay=0.5)  # op 5 comes 0.5 s after its first packet
        client, vc = await _ready_call(local, late)
        try:
            assert late.ssrc not in vc.ssrc_map.users
            sink = CollectingSink()
            vc.listen(sink)
            loop = asyncio.get_running_loop()
            start = loop.time() + 0.1
            await late.speak(Schedule([_speech(1.0)]), start_at=start)
            await asyncio.sleep(0.3)
            receiver = vc._receiver
            assert receiver is not None
            await _stop(vc)

            assert vc.ssrc_map.users[late.ssrc] == late.user_id
            assert set(sink.frames) == {late.user_id}
            frames = sink.frames[late.user_id]
            _assert_exact(frames, late.sent)
            assert receiver.unattributed["unknown-ssrc"] == 0
            # held frames keep their arrival time: the first frame sits where it was sent
            first_sent = _sent_times(local, client, late)[0]
            assert abs(frames[0].position - receiver.clock.sample_at(_mono(first_sent))) <= TOLERANCE
        finally:
            await close_client(client)


async def test_never_mapped_ssrc_is_dropped_after_hold_and_counted() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            call = local.calls[local.world.voice_channel_id]
            stranger = 0x5EED5EED
            while stranger in call._ssrcs:
                stranger += 1
            sink = CollectingSink()
            vc.listen(sink, listen_options=ListenOptions(unmapped_hold=0.3))
            receiver = vc._receiver
            assert receiver is not None
            for k in range(10):
                _forge_rtp(alice, ssrc=stranger, sequence=100 + k, payload_type=120, payload=bytes(80))
            await asyncio.sleep(0.1)
            assert receiver.unattributed["unknown-ssrc"] == 0  # still held
            await wait_for(lambda: receiver.unattributed["unknown-ssrc"] == 10, timeout=3)
            assert stranger not in receiver._unmapped
            await alice.speak(Schedule([_speech(0.3)]))  # the session carries on
            await asyncio.sleep(0.3)
            await _stop(vc)

            assert receiver.unattributed["unknown-ssrc"] == 10
            assert set(sink.frames) == {alice.user_id}
            assert all(f.ssrc == alice.ssrc for f in sink.frames[alice.user_id])
            _assert_exact(sink.frames[alice.user_id], alice.sent)
        finally:
            await close_client(client)


# -- 7. speaking events ---------------------------------------------------------------------------


async def test_speaking_start_and_stop_once_per_spurt() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice, bot_cls=commands.Bot)
        try:
            loop = asyncio.get_running_loop()
            events: list[tuple[str, int, float]] = []

            async def on_start(member: Any, voice_client: Any) -> None:
                assert voice_client is vc
                events.append(("start", member.id, loop.time()))

            async def on_stop(member: Any, voice_client: Any) -> None:
                assert voice_client is vc
                events.append(("stop", member.id, loop.time()))

            client.add_listener(on_start, "on_listening_speaking_start")
            client.add_listener(on_stop, "on_listening_speaking_stop")
            sink = CollectingSink()
            vc.listen(sink)
            first = _speech(0.4)
            gap_start = (first.end_slot * 0.02) + 1.0  # one second after the first spurt's tail
            await alice.speak(Schedule([first, _speech(0.4, "bob", start=gap_start)]))
            await asyncio.sleep(0.5)
            await _stop(vc)

            times = _sent_times(local, client, alice)
            assert len(times) == len(alice.sent)
            split = next(i for i in range(1, len(times)) if times[i] - times[i - 1] > 0.5)
            spurts = [(times[0], times[split - 1]), (times[split], times[-1])]
            mine = [(kind, t) for kind, uid, t in events if uid == alice.user_id]
            assert [kind for kind, _ in mine] == ["start", "stop", "start", "stop"], events
            for i, (first_packet, last_packet) in enumerate(spurts):
                started, stopped = mine[2 * i][1], mine[2 * i + 1][1]
                assert first_packet - 0.01 <= started <= first_packet + TOLERANCE_S
                assert last_packet < stopped <= last_packet + 0.1 + TOLERANCE_S
        finally:
            await close_client(client)


# -- 8. pause / resume ------------------------------------------------------------------------------


async def test_pause_discards_and_resume_keeps_timeline_true() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            sink = CollectingSink()
            vc.listen(sink)
            receiver = vc._receiver
            assert receiver is not None
            assert not vc.is_listening_paused()
            speaking = alice.speak(Schedule([_speech(2.6, skip=0.0)]))
            await asyncio.sleep(0.8)
            vc.pause_listening()
            paused_at = time.monotonic()
            assert vc.is_listening_paused() and vc.is_listening()
            await asyncio.sleep(0.8)
            vc.resume_listening()
            resumed_at = time.monotonic()
            assert not vc.is_listening_paused() and vc.is_listening()
            await speaking
            await asyncio.sleep(0.3)
            await _stop(vc)

            clock = receiver.clock
            pause_pos, resume_pos = clock.sample_at(paused_at), clock.sample_at(resumed_at)
            frames = sink.frames[alice.user_id]
            before = [f for f in frames if f.position < pause_pos + TOLERANCE]
            after = [f for f in frames if f.position > resume_pos - TOLERANCE]
            inside = [f for f in frames if pause_pos + TOLERANCE <= f.position <= resume_pos - TOLERANCE]
            assert not inside, [(f.sequence, f.kind, f.position) for f in inside[:5]]
            assert before and after
            # what was received is exactly what was sent: nothing concealed for the paused stretch
            assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in frames), [
                (f.sequence, f.kind) for f in frames if f.kind not in (FrameKind.RECEIVED, FrameKind.SILENCE)
            ][:5]
            stats = vc.listening_stats()[alice.user_id]
            assert stats.lost == 0 and stats.concealed == 0
            # frames after the resume sit at their true (wall-clock) positions
            sent_at = {
                f.sequence: t for f, t in zip(alice.sent, _sent_times(local, client, alice), strict=True)
            }
            for f in after:
                assert abs(f.position - clock.sample_at(_mono(sent_at[f.sequence]))) <= TOLERANCE
            # the gap across the pause equals the wall-clock time between the two frames
            a, b = before[-1], after[0]
            wall = (sent_at[b.sequence] - sent_at[a.sequence]) * SAMPLES_PER_SECOND
            assert abs((b.position - a.position) - wall) <= TOLERANCE
            assert b.position - a.position > 0.5 * SAMPLES_PER_SECOND
        finally:
            await close_client(client)


async def test_pause_while_speaking_ends_the_speaking_event() -> None:
    """(Beyond the brief's list.) Pausing discards audio: a member who was speaking stops, for the bot."""
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice, bot_cls=commands.Bot)
        try:
            events: list[str] = []

            async def on_start(member: Any, voice_client: Any) -> None:
                events.append("start")

            async def on_stop(member: Any, voice_client: Any) -> None:
                events.append("stop")

            client.add_listener(on_start, "on_listening_speaking_start")
            client.add_listener(on_stop, "on_listening_speaking_stop")
            vc.listen(CollectingSink())
            speaking = alice.speak(Schedule([_speech(1.2)]))
            await wait_for(lambda: events == ["start"], timeout=5)
            await asyncio.sleep(0.2)
            vc.pause_listening()  # in the middle of the spurt
            await asyncio.sleep(0.4)
            assert events == ["start", "stop"]
            vc.resume_listening()
            await speaking
            await asyncio.sleep(0.4)
            await _stop(vc)
            assert events == ["start", "stop", "start", "stop"]
        finally:
            await close_client(client)


# -- 9. stop ------------------------------------------------------------------------------------------


def _listening_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("listening-core") and t.is_alive()]


def _unpackers() -> list[Any]:
    return [p for p in multiprocessing.active_children() if isinstance(p, AudioUnpacker)]


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("after_kind", ["sync", "async"])
async def test_stop_delivers_everything_and_leaves_nothing_behind(after_kind: str) -> None:
    # a pool started and shut down once beforehand, so that multiprocessing's own one-time
    # helpers (the spawn resource tracker) do not count against the session's fds
    with AudioProcessPool(1) as warm:
        warm.start(1)
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            assert client.user is not None
            call = local.calls[local.world.voice_channel_id]
            sink = CollectingSink()
            after_calls: list[tuple[Any, Any]] = []
            after_done: list[bool] = []
            if after_kind == "sync":

                def after(s: AudioSink, e: BaseException | None) -> None:
                    after_calls.append((s, e))

            else:

                async def after(s: AudioSink, e: BaseException | None) -> None:
                    after_calls.append((s, e))
                    await asyncio.sleep(0.05)
                    after_done.append(True)

            await wait_for(lambda: not _listening_threads() and not _unpackers(), timeout=5)
            fds = _fd_count()
            vc.listen(sink, after=after)
            speaking = alice.speak(Schedule([_speech(1.5)]))
            log = call.relay.sent[(alice.user_id, client.user.id)]
            await asyncio.sleep(0.7)
            n = len(log)
            while len(log) == n:  # stop in the middle of the spurt, right after a frame was relayed
                await asyncio.sleep(0)
            relayed = [f.sequence for f in log]
            vc.stop_listening()
            assert not vc.is_listening()
            await _wait_finished(vc)
            assert sink.cleaned == 1
            assert after_calls == [(sink, None)]
            if after_kind == "async":
                await wait_for(lambda: after_done == [True], timeout=5)  # it was awaited, to the end
            await speaking

            got = [f.sequence for f in sink.frames[alice.user_id]]
            assert len(relayed) > 20
            assert got[: len(relayed)] == relayed, sorted(set(relayed) - set(got))  # all sent before the stop
            assert got == [s.sequence for s in alice.sent][: len(got)]  # in order, nothing invented
            assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in sink.frames[alice.user_id])
            assert sink.cleaned == 1
            assert after_calls == [(sink, None)]
            assert not _listening_threads()
            assert not _unpackers()
            assert abs(_fd_count() - fds) <= 2
        finally:
            await close_client(client)


# -- 10. a failing sink -------------------------------------------------------------------------------


class FailingSink(CollectingSink):
    def __init__(self, after_frames: int) -> None:
        super().__init__()
        self.after_frames = after_frames
        self.error = RuntimeError("the sink broke")
        self.calls = 0

    def on_audio(self, frame: AudioFrame) -> None:
        self.calls += 1
        if self.calls > self.after_frames:
            raise self.error
        super().on_audio(frame)


async def test_failing_sink_reports_and_connection_keeps_working() -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            bad = FailingSink(after_frames=5)
            after_calls: list[tuple[Any, Any]] = []
            vc.listen(bad, after=lambda s, e: after_calls.append((s, e)))
            await alice.speak(Schedule([_speech(0.4)]))
            await asyncio.sleep(0.3)
            await _stop(vc)

            assert bad.calls == 6  # the sink is not called again after it raised
            assert bad.cleaned == 1
            assert len(after_calls) == 1
            sink, error = after_calls[0]
            assert sink is bad
            assert error is bad.error or (isinstance(error, SinkError) and error.__cause__ is bad.error)

            good = CollectingSink()
            first = len(alice.sent)
            vc.listen(good)
            await alice.speak(Schedule([_speech(0.4, "bob")]))
            await asyncio.sleep(0.3)
            await _stop(vc)
            assert good.cleaned == 1
            _assert_exact(good.frames[alice.user_id], alice.sent[first:])  # a fresh decoder
        finally:
            await close_client(client)


# -- 11. sinks chosen by name -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    label: str = dataclasses.field(default="probe", metadata={"help": "a name for the recording"})
    limit: int = dataclasses.field(default=0, metadata={"help": "frames to keep, 0 for all"})


class ProbeSink(CollectingSink):
    instances: list[ProbeSink] = []

    def __init__(self, options: ProbeOptions) -> None:
        super().__init__()
        self.options = options
        ProbeSink.instances.append(self)


class ProbePlugin:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def listening_sinks(self) -> list[SinkSpec]:
        return [SinkSpec(self.name, ProbeSink, ProbeOptions, "test sink that keeps frames in memory")]


async def test_sinks_chosen_by_name() -> None:
    name = f"probe-{uuid.uuid4().hex[:8]}"
    registry = default_registry()
    registry.register(ProbePlugin(name), name=f"test-plugin-{name}")
    assert name in registry
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            with pytest.raises(UnknownSinkError) as unknown:
                vc.listen("no-such-sink")
            message = str(unknown.value)
            assert "installed sinks" in message and name in message
            assert name in unknown.value.installed
            assert not vc.is_listening()

            with pytest.raises(OptionsError) as bad_options:
                vc.listen(name, options={"typo": 1})
            message = str(bad_options.value)
            assert "typo" in message and "label" in message and "limit" in message
            assert not vc.is_listening()

            sink = vc.listen(name, options={"label": "meeting", "limit": 7})
            assert isinstance(sink, ProbeSink) and sink in ProbeSink.instances
            assert sink.options == ProbeOptions(label="meeting", limit=7)
            assert vc.is_listening()
            await alice.speak(Schedule([_speech(0.3)]))
            await asyncio.sleep(0.3)
            await _stop(vc)
            assert sink.cleaned == 1
            _assert_exact(sink.frames[alice.user_id], alice.sent)
        finally:
            await close_client(client)


# -- 12. two guilds, one pool -------------------------------------------------------------------------


async def test_two_guilds_share_one_pool() -> None:
    pool = AudioProcessPool(max_workers=2)
    try:
        async with (
            LocalDiscord(guild_name="One", seed=1) as one,
            LocalDiscord(guild_name="Two", seed=2) as two,
        ):
            a = one.add_member("alice")
            b = two.add_member("bob")
            client_a, vc_a = await _ready_call(one, a)
            client_b, vc_b = await _ready_call(two, b)
            try:
                sink_a, sink_b = CollectingSink(), CollectingSink()
                vc_a.listen(sink_a, pool=pool)
                vc_b.listen(sink_b, pool=pool)
                await asyncio.gather(
                    a.speak(Schedule([_speech(0.8)])),
                    b.speak(Schedule([_speech(0.8, "bob")])),
                )
                await asyncio.sleep(0.3)
                vc_a.stop_listening()
                await _wait_finished(vc_a)
                assert pool.processes  # still up for the other guild
                vc_b.stop_listening()
                await _wait_finished(vc_b)

                assert set(sink_a.frames) == {a.user_id}
                assert set(sink_b.frames) == {b.user_id}
                _assert_exact(sink_a.frames[a.user_id], a.sent)
                _assert_exact(sink_b.frames[b.user_id], b.sent)
                assert sink_a.cleaned == 1 and sink_b.cleaned == 1
                # neither session shut the shared pool down: it still decodes
                frame = OpusEncoder().encode(bytes(3840))
                for worker in range(2):
                    answers = await asyncio.wrap_future(
                        pool.submit(worker, [(("probe", worker), DECODE, frame, 960)])
                    )
                    assert answers[0][0] == OK and answers[0][1] is not None and len(answers[0][1]) == 3840
            finally:
                await close_client(client_a)
                await close_client(client_b)
        pool.shutdown()  # the owner shuts it down, cleanly
        assert not pool.processes
        assert not _unpackers()
    finally:
        with contextlib.suppress(Exception):
            pool.shutdown()
        for process in _unpackers():  # never leave workers behind for the next test
            process.kill()
            process.join(5)


# -- 13. playback while listening --------------------------------------------------------------------


async def test_playback_keeps_working_while_listening() -> None:
    async with LocalDiscord() as local:
        player_client = await connect_client(local, local.add_bot("player"))
        listener_client = await connect_client(local, local.add_bot("listener"))
        try:
            player_channel = player_client.get_channel(local.world.voice_channel_id)
            listener_channel = listener_client.get_channel(local.world.voice_channel_id)
            assert isinstance(player_channel, discord.VoiceChannel)
            assert isinstance(listener_channel, discord.VoiceChannel)
            # alone, the player has no DAVE group (as on Discord); the listener's join creates it
            player_vc = await asyncio.wait_for(player_channel.connect(), 20)
            listener_vc = await asyncio.wait_for(listener_channel.connect(cls=VoiceClient), 20)
            assert isinstance(listener_vc, VoiceClient)
            await wait_dave_ready(listener_vc, epoch=1)
            await wait_dave_ready(player_vc, epoch=1)
            await asyncio.sleep(0.3)
            assert player_client.user is not None and listener_client.user is not None
            player_id, listener_id = player_client.user.id, listener_client.user.id
            call = local.calls[local.world.voice_channel_id]

            sink = CollectingSink()
            listener_vc.listen(sink)
            pcm = load_pcm("dave")[: 3840 * 60 + 1000]  # 60 whole frames and a partial one
            played = asyncio.Event()
            player_vc.play(
                discord.PCMAudio(io.BytesIO(pcm)),
                after=lambda _: player_client.loop.call_soon_threadsafe(played.set),
            )
            await asyncio.sleep(0.2)
            answered = asyncio.Event()
            listener_vc.play(  # the listening bot talks back at the same time
                discord.PCMAudio(io.BytesIO(load_pcm("bob")[: 3840 * 30])),
                after=lambda _: listener_client.loop.call_soon_threadsafe(answered.set),
            )
            await asyncio.wait_for(played.wait(), 10)
            await asyncio.wait_for(answered.wait(), 10)
            await asyncio.sleep(0.3)
            await _stop(listener_vc)

            expected = OpusEncoder().encode_pcm(pcm[: len(pcm) - len(pcm) % 3840]) + [SILENCE_FRAME] * 5
            relayed = call.relay.sent[(player_id, listener_id)]
            assert len(relayed) == len(expected) == 65
            frames = sink.frames[player_id]
            assert [f.sequence for f in frames] == [f.sequence for f in relayed]
            assert [f.opus for f in frames] == expected
            assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in frames)
            assert b"".join(f.pcm or b"" for f in frames) == reference_decode(expected)
            assert listener_id not in sink.frames  # its own playback is not heard back
            assert len(call.relay.sent[(listener_id, player_id)]) == 30 + 5
        finally:
            await close_client(listener_client)
            await close_client(player_client)
