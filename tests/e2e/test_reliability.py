"""Reliability of a recording through the loopback Discord: nothing received is lost, or it is counted.

Most tests record to real WAV files (the ``wav`` sink, chosen by name) next to a sink that keeps
every frame, while virtual members speak, and break something in the middle:

- a decoding worker is killed: a new one takes its place within a second, only the frames it had
  in flight are lost, concealed where they belong and counted, and the session goes on;
- the DAVE epoch changes every five seconds for a minute while three members speak, and DAVE is
  downgraded and upgraded again: the frames are decrypted and the files continue;
- the voice server changes (new endpoint, key and SSRCs) and the voice websocket is resumed: the
  same file goes on, speech after the reconnect lands where it was sent, the gap is silence;
- the bot is disconnected or moved to another channel: the session ends, ``after`` hears why,
  the files are whole, and no worker process or thread is left behind;
- packets held up and then delivered in a burst (a delay spike, or a sender catching up) keep
  the talk spurt in one piece, where it was spoken.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import signal
import time
from typing import Any

import discord
import numpy as np
import pytest
import soundfile

from listening_core import AudioFrame, AudioSink, FrameKind, VoiceClient
from listening_core.crypto import is_dave_frame
from listening_core.rtp import ts_diff
from listening_core.sinks import MultiSink
from listening_core.testing import LocalDiscord, Schedule
from listening_core.testing.clients import close_client
from listening_core.testing.media import SILENCE_FRAME, Spurt, load_pcm, reference_decode
from listening_core.voice_client import ListeningInterrupted

from .helpers import wait_dave_ready, wait_for
from .test_listen import CollectingSink
from .test_listen_robustness import (
    TOLERANCE,
    _listening_threads,
    _mono,
    _ready_call,
    _speech,
    _stop,
    _unpackers,
    _wait_finished,
)

FRAME = 960  # samples per channel in a 20 ms frame


# -- helpers ------------------------------------------------------------------------------------


def _record(vc: VoiceClient, directory: Any, after: Any = None) -> tuple[MultiSink, CollectingSink]:
    """Listen into the ``wav`` sink (by name) and a sink that keeps every frame."""
    frames = CollectingSink()
    sink = vc.listen(["wav", frames], options={"wav": {"directory": directory}}, after=after)
    assert isinstance(sink, MultiSink)
    return sink, frames


def _read_wav(path: Any) -> np.ndarray:
    data, rate = soundfile.read(path, dtype="int16", always_2d=True)
    assert rate == 48_000 and data.shape[1] == 2
    return data


def _pcm(frames: list[AudioFrame]) -> bytes:
    return b"".join(f.pcm or b"" for f in frames)


def _assert_file_holds(data: np.ndarray, frames: list[AudioFrame]) -> None:
    """Every frame's PCM sits in the file at the frame's session position, sample for sample."""
    for frame in frames:
        assert frame.pcm is not None
        got = data[frame.position : frame.position + FRAME].tobytes()
        assert got == frame.pcm, f"frame {frame.sequence} is not in the file at {frame.position}"


def _assert_on_schedule(frames: list[AudioFrame], clock: Any, member: Any, relayed: dict[int, float]) -> None:
    """One SSRC's frames sit where their RTP timestamps put them, and the first one between the
    moment the member's schedule says it was spoken and the moment the relay sent it (a member
    whose event loop was held up sends late, in a burst: the receiver may place it either way)."""
    first = frames[0]
    for f in frames:
        offset = ts_diff(f.timestamp, first.timestamp)
        assert f.position - first.position == offset, f"frame {f.sequence} is misplaced by " + str(
            f.position - first.position - offset
        )
    spoken = clock.sample_at(_mono(_spoken_at(member, first.timestamp)))
    sent = clock.sample_at(_mono(relayed[first.sequence]))
    assert spoken - TOLERANCE <= first.position <= sent + TOLERANCE, (spoken, first.position, sent)


def _spoken_at(member: Any, timestamp: int) -> float:
    """The loop time at which ``member``'s schedule put the frame with RTP ``timestamp`` (a virtual
    member's RTP clock counts 20 ms slots from its first ``speak``)."""
    return float(member._epoch + ts_diff(timestamp, member._ts_base) / 48_000)


def _relay_times(call: Any, member: Any, bot_id: int) -> dict[int, float]:
    """Loop time at which ``call``'s relay sent each of ``member``'s frames to the bot, by sequence."""
    return {f.sequence: f.time for f in call.relay.sent[(member.user_id, bot_id)]}


# -- 1. a decoding worker dies ----------------------------------------------------------------------


async def test_killed_worker_is_replaced_and_only_its_frames_in_flight_are_concealed(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="listening_core")
    async with LocalDiscord() as local:
        members = [local.add_member(name) for name in ("alice", "bob", "carol")]
        client, vc = await _ready_call(local, *members)
        try:
            assert client.user is not None
            after_calls: list[tuple[Any, Any]] = []
            sink, frames = _record(vc, tmp_path, after=lambda s, e: after_calls.append((s, e)))
            receiver = vc._receiver
            assert receiver is not None and receiver.pool is not None
            pool = receiver.pool
            schedules = [Schedule([_speech(3.0, clip)]) for clip in ("dave", "bob", "carol")]
            start = asyncio.get_running_loop().time() + 0.1
            speaking = [m.speak(s, start_at=start) for m, s in zip(members, schedules, strict=True)]
            await wait_for(lambda: all(m.ssrc in receiver._streams for m in members), timeout=5)
            await asyncio.sleep(0.8)

            # alice's decoder process: stopped, so that batches pile up in flight, then killed
            index = pool.worker_for((receiver.session_id, members[0].ssrc))
            on_it = [m for m in members if pool.worker_for((receiver.session_id, m.ssrc)) == index]
            elsewhere = [m for m in members if m not in on_it]
            workers_before = len(pool.processes)
            victim = pool._workers[index].process
            assert victim is not None and victim.pid is not None
            pid = victim.pid
            os.kill(pid, signal.SIGSTOP)
            await wait_for(lambda: len(pool._workers[index].pending) >= 3, timeout=5)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()

            def replaced() -> bool:
                pids = pool.processes
                return pid not in pids and len(pids) == workers_before

            await wait_for(replaced, timeout=5, interval=0.005)
            respawn = time.monotonic() - killed_at
            assert respawn < 1.0, f"the worker was replaced {respawn:.2f} s after it was killed"

            await asyncio.gather(*speaking)
            await asyncio.sleep(0.3)
            assert vc.is_listening()  # the session went on by itself
            vc.stop_listening()
            await _wait_finished(vc)

            assert after_calls == [(sink, None)]  # a dead worker is not the end of the session
            assert not _unpackers() and not _listening_threads()
            stats = vc.listening_stats()
            files = sink["wav"].paths  # type: ignore[attr-defined]
            assert set(files) == {m.user_id for m in members}
            died = [r for r in caplog.records if r.name == "listening_core.pool" and "died" in r.getMessage()]
            assert len(died) == 1 and died[0].levelno == logging.WARNING
            for member in members:
                got = frames.frames[member.user_id]
                sent = member.sent
                user = stats[member.user_id]
                assert [f.sequence for f in got] == [s.sequence for s in sent]  # nothing missing
                assert user.frames == len(sent) and user.lost == 0
                concealed = [i for i, f in enumerate(got) if f.kind is FrameKind.PLC]
                warned = [
                    r
                    for r in caplog.records
                    if r.name == "listening_core.receiver"
                    and f"user {member.user_id}:" in r.getMessage()
                    and "decoding worker" in r.getMessage()
                ]
                if member in elsewhere:
                    assert not concealed and user.concealed == 0 and not warned
                    assert _pcm(got) == reference_decode([s.opus for s in sent])
                else:
                    # what the worker held when it died, one run of frames, concealed and counted
                    assert concealed, f"{member.user.name} lost nothing: no frame was in flight"
                    k, n = concealed[0], len(concealed)
                    assert concealed == list(range(k, k + n))
                    assert user.concealed == user.dropped["decoder-died"] == n
                    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
                    # before: the old decoder's output; the gap: silence; after: a fresh decoder's
                    assert _pcm(got[:k]) == reference_decode([s.opus for s in sent[:k]])
                    assert _pcm(got[k : k + n]) == bytes(n * FRAME * 4)
                    assert _pcm(got[k + n :]) == reference_decode([s.opus for s in sent[k + n :]])
                    assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in got[k + n :])
                # on the timeline, the concealed frames too, and the speech after the kill where
                # it was sent
                relayed = _relay_times(local.calls[local.world.voice_channel_id], member, client.user.id)
                _assert_on_schedule(got, receiver.clock, member, relayed)
                data = _read_wav(files[member.user_id])
                _assert_file_holds(data, got)
                assert not data[: got[0].position].any()  # silence before the member spoke
        finally:
            await close_client(client)


# -- 2. DAVE key changes ------------------------------------------------------------------------------


class KeptFrames(AudioSink):
    """Keeps each frame's sequence, kind, Opus, RTP timestamp and position (not its PCM: a minute of
    three speakers)."""

    def __init__(self) -> None:
        self.frames: dict[int, list[tuple[int, FrameKind, bytes | None, int, int]]] = collections.defaultdict(
            list
        )

    def on_audio(self, frame: AudioFrame) -> None:
        kept = (frame.sequence, frame.kind, frame.opus, frame.timestamp, frame.position)
        self.frames[frame.user_id].append(kept)


def _continuous(seconds: float, clips: tuple[str, ...]) -> Schedule:
    """``seconds`` of speech without a pause: ``clips`` one after another, over and over.

    Each clip is its own spurt (a member encodes a spurt when it starts it: one long spurt
    would hold the event loop for seconds), starting right after the previous one's silence.
    """
    spurts, slot = [], 0
    while slot * 0.02 < seconds:
        spurt = Spurt(slot * 0.02, load_pcm(clips[len(spurts) % len(clips)]))
        spurts.append(spurt)
        slot = spurt.end_slot
    return Schedule(spurts)


KEY_CHANGE_EVERY = 5.0
KEY_CHANGE_FOR = 60.0


@pytest.mark.timeout(KEY_CHANGE_FOR + 200)
async def test_epoch_change_every_five_seconds_for_a_minute_loses_almost_nothing() -> None:
    # DAVE messages reach the bot 50 ms after the media, as on a busy gateway: after each epoch
    # change, frames under the new key arrive before the bot can open them.
    async with LocalDiscord(dave_delay=0.05) as local:
        members = [local.add_member(name) for name in ("alice", "bob", "carol")]
        client, vc = await _ready_call(local, *members)
        try:
            call = local.calls[local.world.voice_channel_id]
            conn = vc._connection
            sink = KeptFrames()
            vc.listen(sink)
            orders = (("alice", "bob", "carol", "dave"), ("bob", "carol", "dave"), ("carol", "dave", "alice"))
            schedules = [_continuous(KEY_CHANGE_FOR + 1.0, clips) for clips in orders]
            start = asyncio.get_running_loop().time() + 0.2
            speaking = [m.speak(s, start_at=start) for m, s in zip(members, schedules, strict=True)]
            epoch = conn.dave_session.epoch
            changes = round(KEY_CHANGE_FOR / KEY_CHANGE_EVERY)
            for _ in range(changes):
                await asyncio.sleep(KEY_CHANGE_EVERY)
                before = conn.dave_session.epoch
                await call.force_epoch_change()
                await wait_for(lambda: conn.dave_session.epoch > before, timeout=5)  # noqa: B023
            await asyncio.gather(*speaking)
            await asyncio.sleep(0.3)
            await _stop(vc)

            assert conn.dave_session.epoch >= epoch + changes  # the key really changed each time
            stats = vc.listening_stats()
            for member in members:
                sent = {s.sequence: s.opus for s in member.sent}
                got = sink.frames[member.user_id]
                user = stats[member.user_id]
                assert len(sent) > 0.99 * KEY_CHANGE_FOR * 50, f"{member.user.name} could not send"
                assert member.unsent_not_ready <= 0.005 * len(sent)
                # every frame sent has its place in the track, once, in order
                assert [seq for seq, *_ in got] == [s.sequence for s in member.sent]
                delivered = [
                    seq
                    for seq, kind, opus, *_ in got
                    if kind in (FrameKind.RECEIVED, FrameKind.SILENCE) and opus == sent[seq]
                ]
                assert len(delivered) >= 0.995 * len(sent), (
                    f"{member.user.name}: {len(delivered)} of {len(sent)} frames delivered; {user}"
                )
                # what was not delivered is counted: undecryptable, lost or concealed
                missing = len(sent) - len(delivered)
                assert user.concealed + user.recovered_fec == missing
                assert user.dave_failures <= missing
                assert user.frames == len(got)
                # and the track stayed on the timeline through every key change
                _, _, _, ts0, pos0 = got[0]
                assert [pos - pos0 for *_, pos in got] == [ts_diff(ts, ts0) for *_, ts, _ in got]
        finally:
            await close_client(client)


async def test_dave_downgrade_and_upgrade_keep_the_files_going(tmp_path: Any) -> None:
    async with LocalDiscord() as local:
        members = [local.add_member(name) for name in ("alice", "bob")]
        client, vc = await _ready_call(local, *members)
        try:
            assert client.user is not None
            call = local.calls[local.world.voice_channel_id]
            conn = vc._connection
            after_calls: list[tuple[Any, Any]] = []
            sink, frames = _record(vc, tmp_path, after=lambda s, e: after_calls.append((s, e)))
            receiver = vc._receiver
            assert receiver is not None
            schedules = [_continuous(6.5, ("alice", "bob")), _continuous(6.5, ("carol", "dave"))]
            start = asyncio.get_running_loop().time() + 0.2
            speaking = [m.speak(s, start_at=start) for m, s in zip(members, schedules, strict=True)]
            await asyncio.sleep(1.5)
            await call.downgrade_dave()
            await wait_for(lambda: conn.dave_protocol_version == 0 and conn.dave_downgraded, timeout=5)
            await asyncio.sleep(2.0)
            await call.upgrade_dave()
            await wait_for(lambda: not call.dave.upgrading, timeout=5)
            await wait_for(lambda: conn.can_encrypt and not conn.dave_downgraded, timeout=5)
            await asyncio.gather(*speaking)
            await asyncio.sleep(0.3)
            await _stop(vc)

            assert after_calls == [(sink, None)]
            files = sink["wav"].paths  # type: ignore[attr-defined]
            assert set(files) == {m.user_id for m in members}
            assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.wav", "bob.wav"]  # one each
            stats = vc.listening_stats()
            for member in members:
                sent = member.sent
                # the member really sent DAVE frames, then plain Opus, then DAVE frames again
                kinds = [is_dave_frame(s.payload) for s in sent if s.opus != SILENCE_FRAME]
                runs = [kind for kind, _ in itertools.groupby(kinds)]
                assert runs == [True, False, True]
                got = frames.frames[member.user_id]
                assert [f.sequence for f in got] == [s.sequence for s in sent]
                assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in got)
                assert _pcm(got) == reference_decode([s.opus for s in sent])
                user = stats[member.user_id]
                assert user.dave_failures == 0 and user.concealed == 0 and user.frames == len(sent)
                relayed = _relay_times(call, member, client.user.id)
                _assert_on_schedule(got, receiver.clock, member, relayed)
                # the file holds all of it, where it belongs, to the end of the session
                data = _read_wav(files[member.user_id])
                _assert_file_holds(data, got)
                assert len(data) >= got[-1].end
        finally:
            await close_client(client)


# -- 3. reconnects ------------------------------------------------------------------------------------


async def test_voice_server_change_continues_the_same_files(tmp_path: Any) -> None:
    # DAVE messages lag the media by 50 ms: on the new server, frames arrive before their key
    async with LocalDiscord(dave_delay=0.05) as local:
        members = [local.add_member(name) for name in ("alice", "bob")]
        client, vc = await _ready_call(local, *members)
        try:
            assert client.user is not None
            old_call = local.calls[local.world.voice_channel_id]
            after_calls: list[tuple[Any, Any]] = []
            sink, frames = _record(vc, tmp_path, after=lambda s, e: after_calls.append((s, e)))
            receiver = vc._receiver
            assert receiver is not None
            schedules = [_continuous(5.0, ("alice", "bob")), _continuous(5.0, ("carol", "dave"))]
            start = asyncio.get_running_loop().time() + 0.2
            speaking = [m.speak(s, start_at=start) for m, s in zip(members, schedules, strict=True)]
            await asyncio.sleep(1.7)
            old_key, old_ssrcs = bytes(vc._connection.secret_key), [m.ssrc for m in members]
            new_call = await local.change_voice_server()
            await wait_for(
                lambda: vc._connection.ws.gateway == f"wss://{new_call.endpoint}/?v=8" and vc.is_connected(),
                timeout=15,
            )
            await asyncio.gather(*speaking)
            await asyncio.sleep(0.3)
            await _stop(vc)

            # a new server: new endpoint, new transport key, new SSRCs
            assert new_call.endpoint != old_call.endpoint
            assert bytes(vc._connection.secret_key) != old_key
            assert all(m.ssrc != old for m, old in zip(members, old_ssrcs, strict=True))
            assert after_calls == [(sink, None)]  # a server change does not end the session
            files = sink["wav"].paths  # type: ignore[attr-defined]
            assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.wav", "bob.wav"]  # one each
            stats = vc.listening_stats()
            undelivered = counted = 0
            for member, old_ssrc in zip(members, old_ssrcs, strict=True):
                got = frames.frames[member.user_id]
                before = [f for f in got if f.ssrc == old_ssrc]
                after = [f for f in got if f.ssrc == member.ssrc]
                assert before and after and len(before) + len(after) == len(got)
                assert got == before + after
                # every frame that reached the bot, from either server, is in the track, as sent
                relayed = (
                    old_call.relay.sent[(member.user_id, client.user.id)]
                    + new_call.relay.sent[(member.user_id, client.user.id)]
                )
                delivered = {f.sequence for f in got}
                assert [f.sequence for f in got] == [r.sequence for r in relayed if r.sequence in delivered]
                # the new server's first frames may be under a key the bot never gets (sent before
                # the epoch that added the bot): those, and only those, are concealed and counted
                undecryptable = [i for i, f in enumerate(after) if f.kind is FrameKind.PLC]
                assert undecryptable == list(range(len(undecryptable)))
                assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in before)
                by_seq = {s.sequence: s.opus for s in member.sent}
                # each server's stream is its own Opus stream (a fresh decoder), decoded exactly
                assert _pcm(before) == reference_decode([by_seq[f.sequence] for f in before])
                assert _pcm(after) == reference_decode(
                    [None if f.kind is FrameKind.PLC else by_seq[f.sequence] for f in after]
                )
                undelivered += len(relayed) - len(got)
                user = stats[member.user_id]
                counted += sum(user.dropped.values()) - user.dave_failures  # those were delivered, concealed
                assert user.frames == len(got)
                assert user.concealed == user.dave_failures == len(undecryptable) <= 10
                # both streams on the timeline: the speech after the move where it was sent
                _assert_on_schedule(
                    before, receiver.clock, member, _relay_times(old_call, member, client.user.id)
                )
                _assert_on_schedule(
                    after, receiver.clock, member, _relay_times(new_call, member, client.user.id)
                )
                # and in the file: each frame in place, silence across the gap (what was sent while
                # the bot moved never reached it), the old stream's end to the new stream's start
                data = _read_wav(files[member.user_id])
                _assert_file_holds(data, got)
                assert not data[before[-1].end : after[0].position].any()
                # every 20 ms of the gap: not sent (the member waited for its new key), or sent and
                # never relayed to the bot, or relayed and counted
                missed = ts_diff(after[0].timestamp, before[-1].timestamp) // FRAME - 1
                assert missed == len(member.sent) - len(got) + member.unsent_not_ready <= 10
            # what reached the bot and was not delivered is counted (frames that came before the key)
            assert undelivered == counted + sum(receiver.unattributed.values())
        finally:
            await close_client(client)


async def test_voice_websocket_resume_keeps_the_recording_whole(tmp_path: Any) -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            assert client.user is not None
            call = local.calls[local.world.voice_channel_id]
            conn = vc._connection
            after_calls: list[tuple[Any, Any]] = []
            sink, frames = _record(vc, tmp_path, after=lambda s, e: after_calls.append((s, e)))
            receiver = vc._receiver
            assert receiver is not None
            start = asyncio.get_running_loop().time() + 0.2
            speaking = alice.speak(_continuous(4.0, ("alice", "bob")), start_at=start)
            await asyncio.sleep(1.2)
            session, old_ws = call.sessions[client.user.id], conn.ws
            await local.interrupt_voice(client.user.id, 4015)  # "voice server crashed": resume
            await wait_for(lambda: conn.ws is not old_ws and vc.is_connected(), timeout=10)
            assert call.sessions[client.user.id] is session and session.ws is not None  # resumed
            # the resumed websocket carries DAVE: the bot follows an epoch change made after it
            epoch = conn.dave_session.epoch
            await call.force_epoch_change()
            await wait_for(lambda: conn.dave_session.epoch > epoch, timeout=5)
            await speaking
            await asyncio.sleep(0.3)
            assert vc.is_connected() and vc.is_listening()
            await _stop(vc)

            assert after_calls == [(sink, None)]
            # the audio never stopped (the UDP socket did not change): every frame, exactly
            got = frames.frames[alice.user_id]
            assert [f.sequence for f in got] == [s.sequence for s in alice.sent]
            assert {f.ssrc for f in got} == {alice.ssrc}
            assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in got)
            assert _pcm(got) == reference_decode([s.opus for s in alice.sent])
            user = vc.listening_stats()[alice.user_id]
            assert user.frames == len(alice.sent) and user.concealed == 0 and user.dave_failures == 0
            _assert_on_schedule(got, receiver.clock, alice, _relay_times(call, alice, client.user.id))
            assert [p.name for p in tmp_path.iterdir()] == ["alice.wav"]
            data = _read_wav(sink["wav"].paths[alice.user_id])  # type: ignore[attr-defined]
            _assert_file_holds(data, got)
        finally:
            await close_client(client)


# -- 4. the end of the connection ends the session ---------------------------------------------------

ENDINGS = {
    "disconnect": "disconnected",  # the bot leaves: vc.disconnect()
    "kicked": "disconnected",  # Discord removes the bot: voice state without a channel, then 4014
    "closed-4014": "disconnected",  # the voice server closes with 4014 and nothing follows
    "dragged": "moved",  # someone moves the bot to another channel
    "move_to": "moved",  # the bot moves itself: vc.move_to(channel)
}


@pytest.mark.parametrize("how", list(ENDINGS))
async def test_disconnect_or_move_ends_the_session_cleanly(how: str, tmp_path: Any) -> None:
    async with LocalDiscord() as local:
        alice, bob = local.add_member("alice"), local.add_member("bob")
        other = local.world.voice_channel_ids[1]
        await bob.join(other)  # speaking in the other channel all along
        client, vc = await _ready_call(local, alice)
        try:
            assert client.user is not None
            bot = local.world.users[client.user.id]
            call = local.calls[local.world.voice_channel_id]
            after_calls: list[tuple[Any, Any]] = []
            sink, frames = _record(vc, tmp_path, after=lambda s, e: after_calls.append((s, e)))
            loop = asyncio.get_running_loop()
            start = loop.time() + 0.2
            speaking = [
                alice.speak(_continuous(4.0, ("alice", "bob")), start_at=start),
                bob.speak(_continuous(6.0, ("carol", "dave")), start_at=start),
            ]
            await asyncio.sleep(1.2)
            ended_at = loop.time()
            if how == "disconnect":
                await vc.disconnect()
            elif how == "kicked":
                await local.voice_state_update(bot, {"channel_id": None})
            elif how == "closed-4014":
                # discord.py waits this long for a new voice server before it gives up
                vc._connection.timeout = 2.0
                await local.interrupt_voice(client.user.id, 4014)
            elif how == "dragged":
                await local.voice_state_update(bot, {"channel_id": str(other)})
            else:
                channel = client.get_channel(other)
                assert isinstance(channel, discord.VoiceChannel)
                await vc.move_to(channel)
            await wait_for(lambda: bool(after_calls), timeout=10)
            await vc.wait_for_listen_ready(timeout=5)
            await wait_for(lambda: not _listening_threads() and not _unpackers(), timeout=5)
            await asyncio.sleep(0.3)

            # after, once, with the reason
            assert len(after_calls) == 1
            done, error = after_calls[0]
            assert done is sink
            assert isinstance(error, ListeningInterrupted) and error.reason == ENDINGS[how]
            assert ("moved" if ENDINGS[how] == "moved" else "disconnect") in str(error)
            assert not vc.is_listening()
            # everything that reached the bot before the end is in the track, exactly
            got = frames.frames[alice.user_id]
            relayed = [f.sequence for f in call.relay.sent[(alice.user_id, client.user.id)]]
            before_end = [
                f.sequence for f in call.relay.sent[(alice.user_id, client.user.id)] if f.time < ended_at
            ]
            assert len(before_end) > 40
            assert [f.sequence for f in got] == relayed[: len(got)] and len(got) >= len(before_end)
            assert _pcm(got) == reference_decode([s.opus for s in alice.sent[: len(got)]])
            # the files are closed and whole: alice's alone (the other channel's bob never got in)
            assert set(frames.frames) == {alice.user_id}
            assert [p.name for p in tmp_path.iterdir()] == ["alice.wav"]
            data = _read_wav(tmp_path / "alice.wav")
            _assert_file_holds(data, got)
            assert len(data) >= got[-1].end
            if ENDINGS[how] == "moved":
                # the bot is in the other channel, where a new session records bob
                await wait_for(lambda: vc.is_connected() and vc.channel.id == other, timeout=10)
                await wait_dave_ready(vc)
                fresh = CollectingSink()
                vc.listen(fresh)
                await wait_for(lambda: len(fresh.frames[bob.user_id]) >= 10, timeout=5)
                await _stop(vc)
                assert set(fresh.frames) == {bob.user_id}
            else:
                assert not vc.is_connected()
            for task in speaking:
                task.cancel()
        finally:
            await close_client(client)


async def test_disconnect_confirmed_before_the_gateway_send_returns_is_prompt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """discord.py marked its own disconnect as expected only after the gateway send returned; a
    confirmation (voice state update without a channel) handled before that was taken for an
    external disconnect, started a second one, and the first then waited its whole timeout (30 s)
    for a confirmation it had cleared itself. The example bot overran its shutdown that way."""
    original = discord.Guild.change_voice_state

    async def confirmed_first(self: discord.Guild, **kwargs: Any) -> None:
        await original(self, **kwargs)
        if kwargs.get("channel", True) is None:
            await asyncio.sleep(0.5)  # Discord's confirmation is handled meanwhile

    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            monkeypatch.setattr(discord.Guild, "change_voice_state", confirmed_first)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.wait_for(vc.disconnect(), timeout=20)
            assert loop.time() - started < 10, "disconnect waited for a confirmation it had already had"
            assert not vc.is_connected()
        finally:
            await close_client(client)


async def test_a_disconnect_during_a_disconnect_waits_for_it() -> None:
    """``bot.close()`` while the bot is leaving voice (a shutdown right after ``!stop``) calls
    ``disconnect(force=True)`` again: a second disconnect cleared the confirmation the first
    waited for, and both waited their whole timeout. The example bot overran its shutdown so."""
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            first = asyncio.ensure_future(vc.disconnect())
            await asyncio.sleep(0)  # the first is under way
            await asyncio.wait_for(asyncio.gather(first, vc.disconnect(force=True)), timeout=40)
            assert loop.time() - started < 10, "the two disconnects waited for each other's confirmation"
            assert not vc.is_connected()
        finally:
            await close_client(client)


# -- 5. delay spikes ----------------------------------------------------------------------------------


async def test_a_burst_after_a_delay_keeps_the_spurt_in_one_piece(tmp_path: Any) -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        client, vc = await _ready_call(local, alice)
        try:
            assert client.user is not None
            call = local.calls[local.world.voice_channel_id]
            sink, frames = _record(vc, tmp_path)
            receiver = vc._receiver
            assert receiver is not None
            schedule = _continuous(2.5, ("alice", "bob"))
            await asyncio.sleep(0.5)
            # the member's first 300 ms go out at once (a sender catching up, as discord.py's
            # player does after a stall), then, mid-spurt, its event loop stalls for 300 ms and
            # it catches up again: the bot gets each stretch in one burst
            loop = asyncio.get_running_loop()
            speaking = alice.speak(schedule, start_at=loop.time() - 0.3)
            await asyncio.sleep(1.0)
            time.sleep(0.3)  # the stall is the point: it holds up the member, not the bot
            await speaking
            await asyncio.sleep(0.3)
            await _stop(vc)

            relayed = call.relay.sent[(alice.user_id, client.user.id)]
            bursts = [t for t, _ in itertools.groupby(round(f.time, 2) for f in relayed)]
            assert len(bursts) < len(relayed) - 15  # the stretches did arrive together
            got = frames.frames[alice.user_id]
            assert [f.sequence for f in got] == [s.sequence for s in alice.sent]
            assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in got)
            # no hole after a burst's first frame, nothing shifted: every frame where its RTP
            # timestamp puts it, the first one where it was spoken
            _assert_on_schedule(got, receiver.clock, alice, _relay_times(call, alice, client.user.id))
            data = _read_wav(sink["wav"].paths[alice.user_id])  # type: ignore[attr-defined]
            _assert_file_holds(data, got)
        finally:
            await close_client(client)
