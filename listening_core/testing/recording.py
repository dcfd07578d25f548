"""End-to-end recording for sink tests: members speak schedules into a sink through the loopback.

:func:`record` is the harness a sink's end-to-end test needs: it adds the members, logs a bot in
(:func:`~listening_core.testing.join_voice`), starts ``vc.listen(sink, options=..., after=...)``,
has every member speak its :class:`~listening_core.testing.Schedule` from a common start, lets
members join late, runs your own coroutine during the session, stops listening, waits until the
sink was cleaned up and ``after`` called, closes the bot, and returns a :class:`Recording`::

    from listening_core.testing import Schedule, record
    from listening_core.testing.recording import assert_placed, reference_track

    async def test_my_sink(local_discord, tmp_path):
        schedules = {"alice": Schedule.from_clips([("alice", 0.0)])}
        rec = await record(local_discord, "my-sink", options={"directory": tmp_path}, schedules=schedules)
        assert rec.error is None
        track = ...  # read what the sink wrote for rec.members["alice"].user_id
        assert_placed(track, reference_track(rec.schedules["alice"]))

The other helpers check what a file sink wrote and how it behaves when things go wrong:

- :func:`reference_track`, :func:`first_audible`, :func:`assert_placed`: a member's track as a
  perfect receiver writes it, and "this track holds it sample for sample, silence around it";
- :func:`fill_disk`: the disk fills up under one open file, mid-session;
- :func:`record_until_killed`: a recording process is SIGKILLed mid-clip (crash safety).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .clients import close_client, join_voice
from .media import Schedule

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ..receiver import UserStats
    from ..sinks import AudioSink
    from .members import VirtualMember
    from .server import LocalDiscord

__all__ = [
    "Recording",
    "assert_placed",
    "fill_disk",
    "first_audible",
    "record",
    "record_until_killed",
    "reference_track",
]


@dataclass
class Recording:
    """What :func:`record` did and what came of it.

    During the session (in ``during``) everything but :attr:`finished` and :attr:`stats` is
    already set; :attr:`calls` fills in when ``after`` is called.
    """

    sink: AudioSink
    """The sink that recorded (the plugin's instance when a name was given)."""
    voice_client: Any
    """The bot's :class:`listening_core.VoiceClient` (disconnected once :func:`record` returns)."""
    members: dict[str, VirtualMember]
    """Every member by name, late joiners included."""
    schedules: dict[str, Schedule]
    """What each member spoke, by name."""
    start: float
    """Loop time just after ``listen()`` returned: session sample 0 is taken inside it, just before."""
    speak_at: float
    """Loop time the schedules started at (their 0 s): ``start + lead``."""
    calls: list[tuple[AudioSink, BaseException | None]] = field(default_factory=list)
    """Every ``after(sink, error)`` call (exactly one is expected)."""
    finished: float | None = None
    """Loop time once the sink was cleaned up and ``after`` called."""
    stats: dict[int, UserStats] = field(default_factory=dict)
    """``vc.listening_stats()`` after the session: per user id."""

    @property
    def error(self) -> BaseException | None:
        """The error ``after`` received (``None``: the sink finished cleanly); asserts one call."""
        assert len(self.calls) == 1, f"after() was called {len(self.calls)} times: {self.calls!r}"
        return self.calls[0][1]

    @property
    def user_ids(self) -> dict[str, int]:
        """Each member's user id, by name."""
        return {name: member.user_id for name, member in self.members.items()}


async def record(
    local: LocalDiscord,
    sink: AudioSink | str,
    *,
    schedules: Mapping[str, Schedule],
    options: Any = None,
    late: Mapping[str, tuple[float, Schedule]] | None = None,
    during: Callable[[Recording], Awaitable[Any]] | None = None,
    settle: float = 0.3,
    lead: float = 0.2,
    tail: float = 0.3,
    timeout: float = 30.0,
) -> Recording:
    """Record ``schedules`` (member name → what they say) into ``sink``; see the module.

    - Each name in ``schedules`` becomes a member of the loopback guild who joins the voice
      channel; then a bot joins with :func:`join_voice` and, ``settle`` seconds later, listens
      with ``vc.listen(sink, options=options, after=...)`` (``sink``: an instance or a plugin's
      name, ``options`` only with a name).
    - Every member speaks its schedule from ``speak_at = start + lead`` (loop time), so the
      schedules' offsets are all on one clock.
    - ``late`` (name → ``(seconds after speak_at, schedule)``): members who join while the
      session runs, at that time, and speak their schedule from the moment they have joined.
    - ``during(recording)``, if given, runs once the late members have joined, while the others
      speak (to fill a disk, kill a connection...).
    - When every schedule has been spoken and ``tail`` more seconds have passed, listening stops;
      :func:`record` waits (``timeout``) until the sink was cleaned up and ``after`` called, then
      closes the bot.
    """
    loop = asyncio.get_running_loop()
    members = {name: local.add_member(name) for name in schedules}
    for member in members.values():
        await member.join()
    client, vc = await join_voice(local)
    try:
        await asyncio.sleep(settle)
        calls: list[tuple[AudioSink, BaseException | None]] = []
        listening = vc.listen(sink, options=options, after=lambda s, e: calls.append((s, e)))
        start = loop.time()
        recording = Recording(
            sink=listening,
            voice_client=vc,
            members=members,
            schedules=dict(schedules),
            start=start,
            speak_at=start + lead,
            calls=calls,
        )
        tasks = [
            members[name].speak(schedule, start_at=recording.speak_at) for name, schedule in schedules.items()
        ]
        for name, (delay, schedule) in sorted((late or {}).items(), key=lambda item: item[1][0]):
            await asyncio.sleep(max(0.0, recording.speak_at + delay - loop.time()))
            newcomer = members[name] = local.add_member(name)
            await newcomer.join()
            recording.schedules[name] = schedule
            tasks.append(newcomer.speak(schedule))
        if during is not None:
            await during(recording)
        await asyncio.gather(*tasks)
        await asyncio.sleep(tail)
        vc.stop_listening()
        await vc.wait_for_listen_ready(timeout)
        recording.finished = loop.time()
        recording.stats = vc.listening_stats()
    finally:
        await close_client(client)
    return recording


# --------------------------------------------------------------------------------- checking files


def reference_track(schedule: Schedule) -> npt.NDArray[np.int16]:
    """The member's track as a perfect receiver writes it, ``(n, 2)`` int16, from its first slot."""
    import numpy as np

    return np.frombuffer(schedule.reference_pcm(), dtype="<i2").reshape(-1, 2)


def first_audible(track: npt.NDArray[Any]) -> int:
    """The index of the first sample (row) of ``track`` that is not silence."""
    import numpy as np

    return int(np.flatnonzero(np.any(track != 0, axis=1))[0])


def assert_placed(track: npt.NDArray[Any], reference: npt.NDArray[Any]) -> int:
    """Assert ``reference`` sits in ``track`` sample for sample with only silence around it;
    returns its offset in ``track``."""
    import numpy as np

    offset = first_audible(track) - first_audible(reference)
    assert offset >= 0
    assert np.array_equal(track[offset : offset + len(reference)], reference)
    assert not track[:offset].any() and not track[offset + len(reference) :].any()
    return offset


def fill_disk(path: str | os.PathLike[str]) -> int:
    """The disk is full for ``path``, a file this process is writing: every file descriptor open
    on it is pointed at ``/dev/full``, so its next write fails with ENOSPC. Returns the file's
    size at that moment (Linux: reads ``/proc/self/fd``)."""
    target = str(pathlib.Path(path).resolve())
    fds = [int(n) for n in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{n}") == target]
    if not fds:
        raise FileNotFoundError(f"{target} is not open in this process")
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(full, fd)
    finally:
        os.close(full)
    return os.path.getsize(target)


# --------------------------------------------------------------------------------- crash safety


def record_until_killed(
    sink: str,
    directory: str | os.PathLike[str],
    *,
    clip: str = "three-phrases",
    kill_after: float = 3.0,
    options: Mapping[str, Any] | None = None,
    timeout: float = 60.0,
) -> int:
    """Record ``clip``, spoken by the member ``alice``, into the sink plugin ``sink`` (files in
    ``directory``) in a child process that SIGKILLs itself ``kill_after`` seconds into the clip;
    returns the frames she had sent by then. Whatever the sink left in ``directory`` is what a
    crash leaves."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    side = directory.parent / f".{directory.name}.killed.json"
    args = {
        "sink": sink,
        "options": {"directory": str(directory), **(options or {})},
        "clip": clip,
        "kill_after": kill_after,
        "side": str(side),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", __name__, json.dumps(args)],
        start_new_session=True,
    )
    try:
        assert proc.wait(timeout=timeout) == -signal.SIGKILL, f"the recorder exited with {proc.returncode}"
    finally:
        with contextlib.suppress(ProcessLookupError):  # its decode workers, orphaned by the kill
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        return int(json.loads(side.read_text())["sent"])
    finally:
        side.unlink()


async def _record_and_die(args: dict[str, Any]) -> None:
    from .server import LocalDiscord

    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        _client, vc = await join_voice(local)
        await asyncio.sleep(0.3)
        vc.listen(args["sink"], options=args["options"])
        alice.speak(Schedule.from_clips([(args["clip"], 0.0)]))
        await asyncio.sleep(float(args["kill_after"]))
        pathlib.Path(args["side"]).write_text(json.dumps({"sent": len(alice.sent)}))
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":  # record_until_killed's child; the decode workers are spawned: they import this
    asyncio.run(_record_and_die(json.loads(sys.argv[1])))
