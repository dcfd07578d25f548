"""DAVE protocol version changes while listening: downgrade to version 0 and upgrade back to 1.

A virtual member speaks without a break while the loopback downgrades the call (op 21 → op 23 →
op 22: the member sends plain Opus) and, seconds later, upgrades it again (op 24 with epoch 1: a
new MLS group, then op 29/30 → op 23 → op 22: the member encrypts again).  A real discord.py 2.7.1
client listens through all of it with :class:`listening_core.VoiceClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import pytest

from listening_core import AudioFrame, FrameKind, UserStats
from listening_core.crypto import is_dave_frame
from listening_core.testing import FaultConfig, LocalDiscord, Schedule
from listening_core.testing.clients import close_client
from listening_core.testing.media import SILENCE_FRAME, Spurt, load_pcm, reference_decode
from listening_core.testing.members import SentOpus

from .helpers import wait_dave_ready, wait_for
from .test_listen import MODES, CollectingSink, _recorder, _stop_and_wait

SPEECH = ("alice", "bob", "carol", "dave")  # about 10.5 s, spoken as one spurt


@dataclass
class Outcome:
    """What one run through a downgrade and an upgrade produced."""

    sent: list[SentOpus]
    got: list[AudioFrame]
    stats: UserStats
    versions: list[int]
    """discord.py's ``dave_protocol_version``, each value it took, in order."""
    payload_runs: list[tuple[str, int]]
    """The member's speech frames as runs of ("dave" | "plain", count), in send order."""
    version_changes: list[str]


async def _watch_versions(conn: object, seen: list[int]) -> None:
    """Record every change of discord.py's ``dave_protocol_version`` (polled every 5 ms)."""
    while True:
        version = int(getattr(conn, "dave_protocol_version"))  # noqa: B009 - discord.py private state
        if not seen or seen[-1] != version:
            seen.append(version)
        await asyncio.sleep(0.005)


def _payload_runs(sent: list[SentOpus]) -> list[tuple[str, int]]:
    runs: list[tuple[str, int]] = []
    for s in sent:
        if s.opus == SILENCE_FRAME:
            continue
        kind = "dave" if is_dave_frame(s.payload) else "plain" if s.payload == s.opus else "other"
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + 1)
        else:
            runs.append((kind, 1))
    return runs


async def _speak_through_transitions(local: LocalDiscord) -> Outcome:
    alice = local.add_member("alice")
    await alice.join()
    client, vc = await _recorder(local)
    watcher: asyncio.Task[None] | None = None
    try:
        await wait_dave_ready(vc, epoch=1)
        await asyncio.sleep(0.3)
        conn = vc._connection
        call = local.calls[local.world.voice_channel_id]
        versions: list[int] = []
        watcher = asyncio.ensure_future(_watch_versions(conn, versions))
        sink = CollectingSink()
        vc.listen(sink)
        speaking = alice.speak(Schedule([Spurt(0.0, b"".join(load_pcm(name) for name in SPEECH))]))

        await asyncio.sleep(1.5)
        assert alice.dave is not None and alice.dave.can_encrypt
        await call.downgrade_dave()
        await wait_for(lambda: conn.dave_protocol_version == 0, 5)
        assert call.dave.protocol_version == 0
        assert alice.dave.sends_unencrypted and conn.dave_downgraded

        await asyncio.sleep(3.0)
        await call.upgrade_dave()
        await wait_for(lambda: not call.dave.upgrading, 5)
        await wait_for(lambda: conn.can_encrypt and not conn.dave_downgraded, 5)
        assert alice.dave.can_encrypt and not alice.dave.downgraded

        await speaking
        await asyncio.sleep(0.3)
        await _stop_and_wait(vc)
        return Outcome(
            sent=list(alice.sent),
            got=list(sink.frames[alice.user_id]),
            stats=vc.listening_stats()[alice.user_id],
            versions=versions,
            payload_runs=_payload_runs(alice.sent),
            version_changes=[t.kind for t in call.dave.version_changes],
        )
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await close_client(client)


def _assert_all_received(outcome: Outcome) -> None:
    sent, got = outcome.sent, outcome.got
    assert [f.sequence for f in got] == [s.sequence for s in sent]
    assert outcome.stats.dave_failures == 0, outcome.stats.dropped
    assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in got)
    assert b"".join(f.pcm or b"" for f in got) == reference_decode([s.opus for s in sent])
    assert outcome.stats.frames == len(sent)


CASES = [(mode, 0.0) for mode in MODES] + [(MODES[1], 0.15)]


@pytest.mark.parametrize(("mode", "delay"), CASES)
async def test_listening_through_downgrade_and_upgrade(mode: str, delay: float) -> None:
    # With ``delay`` the gateway's DAVE messages reach the bot that much later than media (and than
    # the virtual member, which gets them in-process): the bot lags every transition.
    async with LocalDiscord(modes=(mode,), dave_delay=delay) as local:
        outcome = await _speak_through_transitions(local)
    # The member really sent DAVE frames, then about 3 s of plain Opus, then DAVE frames again.
    assert [kind for kind, _ in outcome.payload_runs] == ["dave", "plain", "dave"]
    assert outcome.payload_runs[1][1] >= 125
    # Every frame it sent reached the sink, in order, exactly as sent, and nothing failed DAVE.
    _assert_all_received(outcome)
    # discord.py itself went 1 -> 0 -> 1 (the upgrade sets 1 on op 24, before the new group exists).
    assert outcome.versions == [1, 0, 1]
    assert outcome.version_changes == ["downgrade", "upgrade"]


async def test_plain_frames_in_flight_across_the_upgrade() -> None:
    # Media jitter (up to 40 ms) lets the member's last plain frames arrive after the bot's op 24:
    # the receiver must keep accepting plain frames until the upgrade's transition executes.
    faults = FaultConfig(seed=7, jitter=0.04)
    async with LocalDiscord(modes=(MODES[1],), faults=faults) as local:
        outcome = await _speak_through_transitions(local)
    assert [kind for kind, _ in outcome.payload_runs] == ["dave", "plain", "dave"]
    _assert_all_received(outcome)
