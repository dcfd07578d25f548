"""Reliability under load: floods, stopping at 200 speakers, and a long soak with faults on.

``python -m bench.reliability flood|stop|soak|all`` (``tox -e soak`` runs the 30-minute soak).
Each run uses the benchmark's set-up: a loopback Discord (``listening_core.testing``) hosts the
call, the bot under test (``bench/reliability_bot.py``) runs in its own process and joins it
like any bot, the members announce their SSRCs, and ``bench/reliability_load.py``, another
process, sends their packets at real-time pace straight at the bot's UDP socket (from the voice
server's address, which discord.py's connected socket insists on).

``flood``
    5 members speak for 35 s; from the 3rd second, 10 000 datagrams a second for 30 s, each from
    an SSRC nobody announced (well-formed, sealed with the right key). The same members, same
    packets, without the flood, in the same run, are the baseline. Judged: RSS (the bot and its
    decoding workers) within 50 MiB of the baseline's; every member's track the same PCM as in
    the baseline; every flood datagram counted as a drop with a reason; no kernel drop; the
    flood's warnings logged once, not per SSRC.
``stop``
    200 members speak over a slightly lossy network (1 % lost, 3 % reordered: at the stop, some
    frames wait in the jitter buffers); the bot stops listening while they speak. Judged: every
    datagram the bot's process received before the stop is delivered (a second listener on the
    socket, called after the session's, remembers each one), every frame the receiver counted
    reached the sink, ``after`` is called within 5 s, and no thread, decoding process or file
    descriptor is left.
``soak``
    20 members speak in talk spurts for ``--minutes`` (30 by default) over a faulty network
    (loss, bursts, jitter, reordering, duplicates, forged datagrams), DAVE on, recorded to
    per-user WAV. Judged: RSS sampled every minute is flat (at most 8 MiB more at the end than
    at minute 2, and a slope fitted over the second half of the run of at most 8 MiB an hour);
    threads and file descriptors do not grow; at the end every WAV is as long as the session,
    every frame sent is accounted for (delivered, recovered by FEC or concealed, and counted,
    exactly as the network's fault log says), forged datagrams are counted as drops, each kind of
    loss is logged once per user, and the tracks stay aligned with the senders' RTP clocks.

Results go to ``bench/reliability.json`` and ``RELIABILITY.md`` (each run replaces its own
section; the others are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .run import MODE, _read_json_line, _wait_line, log, machine, versions

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 1 << 20

FLOOD_RATE = 10_000
FLOOD_SECONDS = 30.0
FLOOD_MEMBERS = 5
FLOOD_RSS_MARGIN = 50 * MIB

STOP_SPEAKERS = 200
STOP_BOUND_SECONDS = 5.0
STOP_FAULTS = {"seed": 11, "loss": 0.01, "reorder": 0.03, "reorder_delay": 0.03, "jitter": 0.01}

SOAK_MEMBERS = 20
RSS_FLAT_BYTES = 8 * MIB
"""How much the soak's RSS may grow from minute 2 to the end."""
RSS_SLOPE_MIB_PER_HOUR = 8.0
"""How fast it may still be growing over the second half of the run."""


def soak_faults(seed: int) -> dict[str, Any]:
    """The soak's network: every kind of fault the loopback's injector has, but truncation
    (a datagram cut to 8 bytes would be taken for a keep-alive, which nobody counts)."""
    from listening_core.testing.faults import FaultConfig

    return asdict(
        FaultConfig(
            seed=seed,
            loss=0.01,
            burst_rate=0.003,
            burst_length=3,
            jitter=0.015,
            reorder=0.02,
            reorder_delay=0.03,
            duplicate=0.01,
            garbage=0.002,
        )
    )


# -------------------------------------------------------------------------------------------- a rig


class Rig:
    """A loopback Discord, the bot under test in its own process, members, and the load."""

    def __init__(self, tmp: Path, *, dave: bool = False, seed: int = 0) -> None:
        self.tmp = tmp
        self.dave = dave
        self.seed = seed
        self.out = tmp / "out"
        self.members: list[Any] = []
        self.bot: asyncio.subprocess.Process | None = None
        self.load: asyncio.subprocess.Process | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Rig:
        from listening_core.testing import LocalDiscord

        self.local = await self._stack.enter_async_context(
            LocalDiscord(dave=1 if self.dave else 0, modes=(MODE,), record=False, seed=self.seed)
        )
        account = self.local.add_bot("reliability")
        self.bot_user_id = account.user.id
        address = self.local.address(account).save(self.tmp / "loopback.json")
        self.channel_id = self.local.world.voice_channel_id
        self.out.mkdir()
        self.bot_log = self.tmp / "bot.log"
        log_file = self._stack.enter_context(self.bot_log.open("w"))
        self.bot = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.reliability_bot",
            "--address",
            str(address),
            "--channel",
            str(self.channel_id),
            "--output",
            str(self.out),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            cwd=ROOT,
            limit=1 << 26,  # its reports are single JSON lines, hundreds of users long
        )
        try:
            assert self.bot.stdout is not None
            await _wait_line(self.bot.stdout, "READY", 120)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for process in (self.load, self.bot):
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if exc and exc[0] is not None:
            with contextlib.suppress(OSError):
                log("the bot's log:\n" + self.bot_log.read_text()[-3000:])
        await self._stack.aclose()

    @property
    def call(self) -> Any:
        return self.local.calls[self.channel_id]

    async def add_members(self, n: int) -> None:
        """``n`` members join and announce their SSRCs (op 5), DAVE settled when on."""
        self.members = [self.local.add_member(f"s{i}") for i in range(n)]
        for member in self.members:
            await member.join(wait_ready=self.dave)
        for member in self.members:
            await self.call.speaking(member, 1)
        if self.dave:
            epoch = self.members[-1].dave.epoch
            deadline = time.monotonic() + 60
            while True:  # the bot's DAVE session must know every member's key before they speak
                dave = (await self.command("report")).get("dave") or {}
                if dave.get("ready") and dave.get("epoch") == epoch:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the bot's DAVE session did not reach epoch {epoch}: {dave}")
                await asyncio.sleep(0.2)

    async def command(self, line: str, timeout: float = 120) -> dict[str, Any]:
        """Send ``line`` to the bot and return its JSON answer."""
        assert self.bot is not None and self.bot.stdin is not None and self.bot.stdout is not None
        self.bot.stdin.write(line.encode() + b"\n")
        await self.bot.stdin.drain()
        return await _read_json_line(self.bot.stdout, timeout)

    async def listen(self, **request: Any) -> dict[str, Any]:
        return await self.command("listen " + json.dumps(request))

    async def start_load(self, seconds: float, **spec_extra: Any) -> None:
        """Start the load process (it seals what it can first) and let it go."""
        from .floor import speech_frames

        session = next(p for p in self.call.participants() if p.user_id == self.bot_user_id)
        spec: dict[str, Any] = {
            "host": session.udp_addr[0],
            "port": session.udp_addr[1],
            "mode": session.mode,
            "key": bytes(session.secret_key).hex(),
            "seconds": seconds,
            "seed": self.seed,
            "speakers": [{"ssrc": m.ssrc} for m in self.members],
            "frames": [base64.b64encode(f).decode() for f in speech_frames()],
            **spec_extra,
        }
        if self.dave:
            started = time.monotonic()
            await self._dave_frames(spec)
            log(f"DAVE-encrypted every member's speech in {time.monotonic() - started:.1f} s")
        # discord.py's voice socket is connected to the voice server (the relay): the kernel drops
        # datagrams from anywhere else. The load takes the relay's port over.
        spec["bind"] = list(self.call.relay.address)
        self.call.relay.close()
        (self.tmp / "spec.json").write_text(json.dumps(spec))
        self.load = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.reliability_load",
            str(self.tmp / "spec.json"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            limit=1 << 26,
        )
        assert self.load.stdout is not None and self.load.stdin is not None
        started = time.monotonic()
        await _wait_line(self.load.stdout, "READY", 900)
        log(f"the load process was ready in {time.monotonic() - started:.1f} s")
        self.load.stdin.write(b"go\n")
        await self.load.stdin.drain()

    async def _dave_frames(self, spec: dict[str, Any]) -> None:
        """Each member's speech, DAVE-encrypted by the member itself, as many frames as it will send."""
        from .generator import write_dave_frames
        from .reliability_load import SPEECH, plan

        frames = [base64.b64decode(f) for f in spec["frames"]]
        ticks = int(spec["seconds"] * 50)
        for index, (member, entry) in enumerate(zip(self.members, spec["speakers"], strict=True)):
            needed = plan(spec.get("pattern", "continuous"), self.seed, index, ticks).count(SPEECH)
            path = self.tmp / f"dave-{index}.bin"
            encrypt = member.dave.encrypt_opus
            offset = (index * 37) % len(frames)
            write_dave_frames(path, [encrypt(frames[(offset + k) % len(frames)]) for k in range(needed)])
            entry["dave_frames"] = str(path)
            await asyncio.sleep(0)  # keep the loopback answering

    async def load_result(self, timeout: float) -> dict[str, Any]:
        """The load's final report (it has sent everything)."""
        assert self.load is not None and self.load.stdout is not None
        return await _read_json_line(self.load.stdout, timeout)

    def member_of(self, user_id: int | str) -> Any:
        return next(m for m in self.members if m.user_id == int(user_id))

    def warnings(self) -> list[str]:
        """The WARNING and ERROR lines of the bot's log."""
        return [
            line for line in self.bot_log.read_text().splitlines() if " WARNING " in line or " ERROR " in line
        ]


def check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": bool(ok), "detail": detail}


def _kinds(tally: dict[str, Any]) -> tuple[int, int, int]:
    kinds = tally["kinds"]
    return kinds.get("received", 0) + kinds.get("silence", 0), kinds.get("fec", 0), kinds.get("plc", 0)


# -------------------------------------------------------------------------------------------- flood


async def flood_trial(
    tmp: Path,
    *,
    flood: bool,
    members: int = FLOOD_MEMBERS,
    rate: int = FLOOD_RATE,
    flood_seconds: float = FLOOD_SECONDS,
    lead: float = 3.0,
    tail: float = 2.0,
    seed: int = 7,
) -> dict[str, Any]:
    """One run: ``members`` speak for ``lead + flood_seconds + tail``; with ``flood``, the flood
    runs from ``lead`` for ``flood_seconds``. Returns the bot's reports and each member's PCM."""
    seconds = lead + flood_seconds + tail
    async with Rig(tmp, seed=seed) as rig:
        await rig.add_members(members)
        await rig.listen(sink="wav")
        extra: dict[str, Any] = {"pattern": "continuous"}
        if flood:
            extra["flood"] = {"rate": rate, "start": lead, "seconds": flood_seconds}
        await rig.start_load(seconds, **extra)
        start = time.monotonic()
        timeline = []
        for at in [lead + 1.0 + 5.0 * i for i in range(int(flood_seconds // 5) + 1)]:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            report = await rig.command("report")
            timeline.append(
                {"at": at} | {k: report[k] for k in ("rss_bytes", "fds", "threads", "kernel_drops")}
            )
        load = await rig.load_result(seconds + 120)
        await asyncio.sleep(0.5)
        final = await rig.command("stop")
        import soundfile

        pcm = {}
        names = {}
        for user, info in final["files"].items():
            tally = final["tally"][user]
            # the member's audio: from its first frame, as many samples as frames were delivered
            samples, _ = soundfile.read(
                info["path"], dtype="int16", start=tally["first_position"], frames=tally["frames"] * 960
            )
            pcm[user] = samples.tobytes()
            names[user] = rig.member_of(user).user.name
        return {
            "flood": flood,
            "members": members,
            "timeline": timeline,
            "load": {k: v for k, v in load.items() if k != "speakers"}
            | {"per_member": {str(s["ssrc"]): s["packets"] for s in load["speakers"]}},
            "final": final,
            "names": names,
            "pcm": pcm,
            "warnings": rig.warnings(),
            "ssrcs": {str(m.user_id): m.ssrc for m in rig.members},
        }


def judge_flood(base: dict[str, Any], flooded: dict[str, Any]) -> dict[str, Any]:
    """The flood's checks against the baseline."""
    checks: dict[str, Any] = {}
    rss_base = max(p["rss_bytes"] for p in base["timeline"])
    rss_flood = max(p["rss_bytes"] for p in flooded["timeline"])
    checks["rss_within_50_mib"] = check(
        rss_flood - rss_base <= FLOOD_RSS_MARGIN,
        f"peak RSS {rss_flood / MIB:.1f} MiB with the flood, {rss_base / MIB:.1f} MiB without "
        f"({(rss_flood - rss_base) / MIB:+.1f} MiB)",
    )
    drops = [r["final"]["kernel_drops"] for r in (base, flooded)]
    checks["no_kernel_drops"] = check(
        drops == [0, 0], f"kernel socket drops: {drops[0]} without, {drops[1]} with"
    )
    sent = flooded["load"]["flood_sent"]
    got = flooded["final"]["tap"]["unmapped"]
    counted = flooded["final"]["unattributed"]
    checks["flood_counted_as_drops"] = check(
        got == counted.get("unknown-ssrc", -1) and got == sent and sum(counted.values()) == got,
        f"{sent} flood datagrams sent, {got} received by the bot, counted as drops: {counted}",
    )
    names = base["names"]
    identical, details = True, []
    for user, pcm in sorted(base["pcm"].items(), key=lambda kv: names[kv[0]]):
        other = flooded["pcm"].get(next((u for u, n in flooded["names"].items() if n == names[user]), ""))
        same = other is not None and other == pcm and len(pcm) > 0
        identical &= same
        details.append(
            f"{names[user]}: {len(pcm) // 3840} frames, "
            + ("same PCM" if same else f"DIFFERENT ({len(other or b'') // 3840} frames with the flood)")
        )
    checks["tracks_identical"] = check(identical and len(base["pcm"]) == base["members"], "; ".join(details))
    complete, details = True, []
    for run in (base, flooded):
        final = run["final"]
        for user, stats in final["stats"].items():
            ssrc = str(run["ssrcs"][user])
            expected = run["load"]["per_member"][ssrc]
            tally = final["tally"].get(user, {"frames": 0, "gaps": 0, "kinds": {}})
            received, fec, plc = _kinds(tally)
            ok = (
                received == expected == tally["frames"] == stats["frames"]
                and not stats["dropped"]
                and stats["lost"] == 0
                and tally["gaps"] == 0
            )
            complete &= ok
            if not ok:
                details.append(
                    f"{run['names'].get(user, user)} ({'flood' if run['flood'] else 'baseline'}): sent "
                    f"{expected}, delivered {tally['frames']} ({received} received, {fec} FEC, {plc} "
                    f"concealed), dropped {stats['dropped']}"
                )
    checks["every_member_frame_delivered"] = check(
        complete, "; ".join(details) or "every frame of every member, in both runs"
    )
    unmapped_warnings = [w for w in flooded["warnings"] if "SSRC" in w]
    checks["flood_logged_once"] = check(
        len(unmapped_warnings) <= 2,
        f"{len(unmapped_warnings)} warning line(s) about unannounced SSRCs"
        + (
            f": {'; '.join(w.split(' WARNING ', 1)[-1] for w in unmapped_warnings)}"
            if unmapped_warnings
            else ""
        ),
    )
    return {
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
        "rss_baseline_bytes": rss_base,
        "rss_flood_bytes": rss_flood,
        "flood_datagrams": sent,
        "unattributed": counted,
        "members": base["members"],
    }


async def run_flood(seed: int = 7) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="listening-flood-") as name:
        log(f"flood: baseline, {FLOOD_MEMBERS} members without the flood")
        (Path(name) / "base").mkdir()
        base = await flood_trial(Path(name) / "base", flood=False, seed=seed)
        log(f"flood: {FLOOD_RATE} unannounced SSRCs a second for {FLOOD_SECONDS:.0f} s")
        (Path(name) / "flood").mkdir()
        flooded = await flood_trial(Path(name) / "flood", flood=True, seed=seed)
    verdict = judge_flood(base, flooded)
    verdict["timeline"] = {"baseline": base["timeline"], "flood": flooded["timeline"]}
    return verdict


# --------------------------------------------------------------------------------------------- stop


async def stop_trial(
    tmp: Path, *, speakers: int = STOP_SPEAKERS, speak_seconds: float = 6.0, seed: int = 11
) -> dict[str, Any]:
    """``speakers`` speak; the bot stops listening after ``speak_seconds`` while they go on."""
    async with Rig(tmp, seed=seed) as rig:
        await rig.add_members(speakers)
        await rig.listen(sink="wav", keep_seqs=True)
        # a little loss and reordering: at the stop, some frames wait in the jitter buffers
        await rig.start_load(speak_seconds + 20, pattern="continuous", prebuild=True, faults=STOP_FAULTS)
        await asyncio.sleep(speak_seconds)
        during = await rig.command("report")
        final = await rig.command("stop")
        return {
            "speakers": speakers,
            "during": {k: during[k] for k in ("rss_bytes", "workers", "fds", "threads", "kernel_drops")},
            "frames_during": sum(t["frames"] for t in during["tally"].values()),
            "final": final,
            "warnings": rig.warnings(),
        }


def judge_stop(result: dict[str, Any]) -> dict[str, Any]:
    final = result["final"]
    checks: dict[str, Any] = {}
    checks["after_within_5_s"] = check(
        final["stopped_in_seconds"] is not None and final["stopped_in_seconds"] <= STOP_BOUND_SECONDS,
        f"after called {final['stopped_in_seconds']} s after stop_listening(); "
        f"threads and processes gone after {final['clean_in_seconds']} s",
    )
    checks["clean_within_5_s"] = check(
        final["clean_in_seconds"] <= STOP_BOUND_SECONDS,
        f"the session's threads and decoding processes were gone {final['clean_in_seconds']} s after the stop",
    )
    checks["after_called_once_without_error"] = check(
        final["after_calls"] == [None], f"after calls (errors): {final['after_calls']}"
    )
    left = final["left_behind"]
    checks["nothing_left_behind"] = check(
        not left["threads"] and not left["listening_threads"] and not left["unpackers"] and not left["fds"],
        f"threads {left['threads']}, decoding processes {left['unpackers']}, file descriptors {left['fds']} "
        f"(closed since: {left['fds_gone']})",
    )
    before = final["before_stop"]
    missing = {
        u: c
        for u, c in before.items()
        if c["not_delivered_count"] or c["invented_count"] or c["concealed_count"] > final["stats"][u]["late"]
    }
    received = sum(c["received_before_stop"] for c in before.values())
    checks["received_before_stop_delivered"] = check(
        not missing and len(before) == result["speakers"] and received > 0,
        f"{received} datagrams from {len(before)} speakers received before the stop; "
        + (f"not delivered: {dict(list(missing.items())[:5])}" if missing else "all delivered"),
    )
    bad = []
    for user, stats in final["stats"].items():
        tally = final["tally"].get(user, {"frames": 0, "gaps": 0, "backwards": 0, "kinds": {}})
        got, fec, plc = _kinds(tally)
        accepted = stats["decrypted"] - stats["duplicates"] - stats["late"] - stats["dave_failures"]
        if not (
            tally["frames"] == stats["frames"]
            and got == accepted - stats["corrupt"]
            and fec + plc == stats["recovered_fec"] + stats["concealed"]
            and fec + plc == stats["lost"] + stats["corrupt"] + stats["dave_failures"]
            and tally["gaps"] == 0
            and tally["backwards"] == 0
        ):
            bad.append(f"user {user}: stats {stats}, sink {tally}")
    delivered = sum(t["frames"] for t in final["tally"].values())
    total = {
        k: sum(s[k] for s in final["stats"].values()) for k in ("lost", "recovered_fec", "concealed", "late")
    }
    checks["receiver_counts_match_sink"] = check(
        not bad,
        f"{delivered} frames delivered, of which {total['lost']} lost on the way ({total['recovered_fec']} "
        f"recovered by FEC, {total['concealed']} concealed); {total['late']} late arrivals; "
        + ("; ".join(bad[:3]) if bad else "every count matches"),
    )
    return {
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
        "speakers": result["speakers"],
        "stopped_in_seconds": final["stopped_in_seconds"],
        "clean_in_seconds": final["clean_in_seconds"],
        "frames_delivered": delivered,
        "datagrams_before_stop": received,
        "kernel_drops": final["kernel_drops"],
        "during": result["during"],
    }


async def run_stop(speakers: int = STOP_SPEAKERS, seed: int = 11) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="listening-stop-") as name:
        log(f"stop: {speakers} speakers, stop listening while they speak")
        result = await stop_trial(Path(name), speakers=speakers, seed=seed)
    return judge_stop(result)


# --------------------------------------------------------------------------------------------- soak


def _slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if not sxx:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx * 3600


async def soak_trial(
    tmp: Path,
    *,
    minutes: float,
    members: int = SOAK_MEMBERS,
    sample_seconds: float = 60.0,
    dave: bool = True,
    seed: int = 3,
) -> dict[str, Any]:
    seconds = minutes * 60
    async with Rig(tmp, dave=dave, seed=seed) as rig:
        log(f"soak: {members} members joining (DAVE {'on' if dave else 'off'})")
        await rig.add_members(members)
        await rig.listen(sink="wav")
        log(f"soak: preparing {minutes:g} minutes of speech")
        await rig.start_load(seconds, pattern="spurts", faults=soak_faults(seed))
        start = time.monotonic()
        samples = []
        at = sample_seconds
        while at <= seconds:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            report = await rig.command("report")
            samples.append(
                {"at": at}
                | {
                    k: report[k]
                    for k in ("rss_bytes", "rss_main_bytes", "fds", "threads", "workers", "kernel_drops")
                }
                | {"frames": sum(t["frames"] for t in report["tally"].values())}
            )
            log(
                f"soak: {at / 60:.1f} min, RSS {report['rss_bytes'] / MIB:.1f} MiB "
                f"(the bot {report['rss_main_bytes'] / MIB:.1f} MiB), {report['fds']} fds, "
                f"{report['threads']} threads, {samples[-1]['frames']} frames"
            )
            at += sample_seconds
        load = await rig.load_result(seconds + 300)
        await asyncio.sleep(1.0)
        final = await rig.command("stop", timeout=600)
        return {
            "minutes": minutes,
            "members": members,
            "dave": dave,
            "sample_seconds": sample_seconds,
            "samples": samples,
            "load": load,
            "final": final,
            "ssrcs": {str(m.user_id): m.ssrc for m in rig.members},
            "warnings": rig.warnings(),
        }


def _logged_once(stats: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """Whether each user's losses, late packets and drops (by reason) were logged once at WARNING."""
    wrong, kinds = [], 0
    for user, s in stats.items():
        expected = {"frames were lost": s["lost"], "arrived after its frame was concealed": s["late"]}
        expected |= {f"({reason})": n for reason, n in s["dropped"].items()}
        for marker, count in expected.items():
            if not count:
                continue
            kinds += 1
            lines = [w for w in warnings if f"user {user}: " in w and marker in w and " WARNING " in w]
            if len(lines) != 1:
                wrong.append(f"user {user}, {count} x {marker!r}: {len(lines)} warning line(s)")
    return check(
        not wrong,
        "; ".join(wrong[:3])
        or f"each of {kinds} kinds of loss or drop (per user, per reason) logged exactly once",
    )


def judge_soak(result: dict[str, Any]) -> dict[str, Any]:
    final, load, samples = result["final"], result["load"], result["samples"]
    checks: dict[str, Any] = {}
    seconds = result["minutes"] * 60
    warm_at = min(120.0, seconds / 3)  # decoders, buffers and files are all made by then
    later = [s for s in samples if s["at"] >= warm_at]
    warm = later[0] if later else samples[-1]
    last = samples[-1]
    growth = last["rss_bytes"] - warm["rss_bytes"]
    # A leak grows to the end; the allocators' settling-in does not: the slope is fitted over the
    # second half of the run, and judged when that half is long enough to tell (5 minutes).
    half = [s for s in samples if s["at"] >= seconds / 2]
    slope = _slope_per_hour([(s["at"], s["rss_bytes"] / MIB) for s in half])
    judged = slope is not None and half[-1]["at"] - half[0]["at"] >= 300
    checks["rss_flat"] = check(
        growth <= RSS_FLAT_BYTES and (not judged or (slope is not None and slope <= RSS_SLOPE_MIB_PER_HOUR)),
        f"RSS {warm['rss_bytes'] / MIB:.1f} MiB at {warm['at'] / 60:.1f} min, {last['rss_bytes'] / MIB:.1f} MiB "
        f"at {last['at'] / 60:.1f} min ({growth / MIB:+.1f} MiB, at most {RSS_FLAT_BYTES / MIB:g}); slope over "
        "the second half "
        + (
            "n/a (too few samples)"
            if slope is None
            else f"{slope:+.2f} MiB/hour"
            + (f" (at most {RSS_SLOPE_MIB_PER_HOUR:g})" if judged else " (not judged: under 5 minutes)")
        ),
    )
    grew = [
        f"{key} {warm[key]} -> {max(s[key] for s in later)}"
        for key in ("fds", "threads", "workers")
        if max(s[key] for s in later) > warm[key]
    ]
    checks["no_fd_or_thread_growth"] = check(
        not grew,
        "; ".join(grew)
        or f"{warm['fds']} fds, {warm['threads']} threads, {warm['workers']} workers throughout",
    )
    left = final["left_behind"]
    checks["stop_clean"] = check(
        final["after_calls"] == [None]
        and final["stopped_in_seconds"] is not None
        and final["stopped_in_seconds"] <= STOP_BOUND_SECONDS
        and not (left["threads"] or left["listening_threads"] or left["unpackers"] or left["fds"]),
        f"after {final['after_calls']} within {final['stopped_in_seconds']} s; left behind: "
        f"threads {left['threads']}, processes {left['unpackers']}, fds {left['fds']}",
    )
    end = final["session_end_samples"]
    lengths = {u: f["frames"] for u, f in final["files"].items()}
    checks["tracks_as_long_as_the_session"] = check(
        len(lengths) == result["members"]
        and all(n == end for n in lengths.values())
        and abs(end / 48000 - final["session_seconds"]) < 0.1,
        f"{len(lengths)} WAV files, session {end} samples ({final['session_seconds']:.1f} s); lengths "
        + ("all equal to it" if set(lengths.values()) == {end} else str(sorted(set(lengths.values())))),
    )
    drops = final["kernel_drops"]
    checks["no_kernel_drops"] = check(drops == 0, f"kernel socket drops: {drops}")
    by_ssrc = {s["ssrc"]: s for s in load["speakers"]}
    problems, totals = [], {"sent": 0, "received": 0, "fec": 0, "concealed": 0, "late": 0, "lost_on_net": 0}
    garbage_sent = sum(s["garbage"] for s in load["speakers"])
    garbage_dropped = 0
    drift = 0.0
    for user, ssrc in result["ssrcs"].items():
        sent = by_ssrc[ssrc]
        stats = final["stats"].get(user)
        tally = final["tally"].get(user)
        if stats is None or tally is None:
            problems.append(f"user {user}: nothing delivered")
            continue
        garbage_dropped += sum(stats["dropped"].values())
        drift = max(drift, tally["max_drift_ms"])
        undelivered = set(sent["undelivered"])
        first = (tally["first_seq"] - sent["seq0"]) % 65536
        last = first + tally["span"] - 1
        arrived = [i for i in range(sent["packets"]) if i not in undelivered]
        missing = sum(1 for i in undelivered if first <= i <= last)
        intact = tally["span"] - missing
        received, fec, plc = _kinds(tally)
        late = stats["late"]
        totals["sent"] += sent["packets"]
        totals["received"] += received
        totals["fec"] += fec
        totals["concealed"] += plc
        totals["late"] += late
        totals["lost_on_net"] += len(undelivered)
        ok = (
            tally["frames"] == tally["span"]
            and tally["gaps"] == 0
            and tally["backwards"] == 0
            and arrived
            and first == arrived[0]
            and last == arrived[-1]
            and received + late == intact
            and fec + plc == missing + late
            and stats["lost"] == fec + plc
            and stats["recovered_fec"] == fec
            and stats["concealed"] == plc
            and stats["frames"] == tally["frames"]
        )
        if not ok:
            problems.append(
                f"user {user}: packets {first}..{last} of {sent['packets']} sent "
                f"(first/last to arrive {arrived[:1]}/{arrived[-1:]}), {missing} lost on the network, "
                f"{tally['frames']} frames for {tally['span']} sequence numbers, {received} received "
                f"+ {late} late (expected {intact}), {fec} FEC + {plc} concealed (expected {missing + late}); "
                f"stats lost {stats['lost']} fec {stats['recovered_fec']} concealed {stats['concealed']}; "
                f"gaps {tally['gaps']} backwards {tally['backwards']}"
            )
    checks["every_frame_accounted_for"] = check(
        not problems,
        "; ".join(problems[:3])
        or f"{totals['sent']} frames sent by {result['members']} members, {totals['lost_on_net']} lost on the "
        f"network: {totals['received']} delivered as received, {totals['fec']} recovered by FEC, "
        f"{totals['concealed']} concealed, {totals['late']} late arrivals counted; all per the fault log",
    )
    checks["forged_datagrams_counted"] = check(
        garbage_dropped == garbage_sent,
        f"{garbage_sent} forged datagrams sent, {garbage_dropped} counted as drops against their users",
    )
    checks["tracks_aligned"] = check(
        drift <= 100.0, f"largest distance between a frame's place and its RTP time: {drift} ms"
    )
    checks["drops_logged_once"] = _logged_once(final["stats"], result["warnings"])
    return {
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
        "minutes": result["minutes"],
        "members": result["members"],
        "dave": result["dave"],
        "faults": {k: v for k, v in soak_faults(0).items() if k != "seed" and v},
        "rss_mib": [[s["at"], round(s["rss_bytes"] / MIB, 2)] for s in samples],
        "rss_main_mib": [[s["at"], round(s["rss_main_bytes"] / MIB, 2)] for s in samples],
        "fds": [s["fds"] for s in samples],
        "threads": [s["threads"] for s in samples],
        "rss_slope_mib_per_hour": None if slope is None else round(slope, 3),
        "rss_growth_mib": round(growth / MIB, 2),
        "totals": totals,
        "session_seconds": final["session_seconds"],
        "stopped_in_seconds": final["stopped_in_seconds"],
        "sample_seconds": result["sample_seconds"],
        "generator_max_behind_ms": load["max_behind_ms"],
        "warnings": len(result["warnings"]),
    }


async def run_soak(
    minutes: float,
    members: int = SOAK_MEMBERS,
    sample_seconds: float = 60.0,
    dave: bool = True,
    seed: int = 3,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="listening-soak-") as name:
        result = await soak_trial(
            Path(name), minutes=minutes, members=members, sample_seconds=sample_seconds, dave=dave, seed=seed
        )
    return judge_soak(result)


# ------------------------------------------------------------------------------------------- report


LABELS = {
    "rss_within_50_mib": "RSS within 50 MiB of the baseline",
    "no_kernel_drops": "no datagram dropped by the kernel",
    "flood_counted_as_drops": "every flood datagram counted as a drop, with its reason",
    "tracks_identical": "every member's track the same PCM as the baseline's",
    "every_member_frame_delivered": "every member frame delivered",
    "flood_logged_once": "the flood logged once, not per SSRC",
    "after_within_5_s": "after() within 5 s of the stop",
    "clean_within_5_s": "threads and processes gone within 5 s",
    "after_called_once_without_error": "after() called once, without error",
    "nothing_left_behind": "no thread, process or file descriptor left",
    "received_before_stop_delivered": "every datagram received before the stop delivered",
    "receiver_counts_match_sink": "the receiver's counts match what the sink got",
    "rss_flat": "RSS flat",
    "no_fd_or_thread_growth": "no file descriptor or thread growth",
    "stop_clean": "stop clean and within 5 s",
    "tracks_as_long_as_the_session": "every WAV as long as the session",
    "every_frame_accounted_for": "every frame sent accounted for",
    "forged_datagrams_counted": "forged datagrams counted",
    "tracks_aligned": "tracks aligned",
    "drops_logged_once": "every kind of loss logged once per user at WARNING",
}


def _section(title: str, how: str, verdict: dict[str, Any] | None, notes: str = "") -> list[str]:
    lines = [f"## {title}", "", how, ""]
    if verdict is None:
        return [*lines, "Not run yet.", ""]
    lines += [
        f"Run {verdict['date']} by `{verdict['command']}` in {verdict.get('duration_seconds')} s: "
        f"**{'PASS' if verdict['ok'] else 'FAIL'}**.",
        "",
        "| check | result | |",
        "|---|---|---|",
    ]
    for name, c in verdict["checks"].items():
        detail = c["detail"].replace("|", "\\|")
        label = LABELS.get(name, name.replace("_", " "))
        lines.append(f"| {label} | {'pass' if c['ok'] else '**FAIL**'} | {detail} |")
    return [*lines, "", *([notes, ""] if notes else [])]


def markdown(results: dict[str, Any]) -> str:
    """RELIABILITY.md from the results."""
    m = results.get("machine") or {}
    v = results.get("versions") or {}
    lines = [
        "# Reliability",
        "",
        "What a recording bot keeps when the network and the load are hostile, measured with the "
        "benchmark set-up: a loopback Discord hosts the call, the bot runs in its own process and joins "
        "it like any bot, and another process sends the members' packets at real-time pace straight at "
        "the bot's UDP socket (from the voice server's address). Made by `bench/reliability.py`; raw "
        "figures in `bench/reliability.json`. Each section is replaced when its run is repeated.",
        "",
        f"Machine: {m.get('cpu', 'unknown')} ({m.get('cores')} cores, {m.get('memory_gib')} GiB, "
        f"Python {m.get('python')}); listening-core {v.get('listening-core')}, discord.py "
        f"{v.get('discord.py')}, davey {v.get('davey')}, {v.get('libopus')}.",
        "",
    ]
    lines += _section(
        "Flood of unannounced SSRCs",
        f"{FLOOD_MEMBERS} members speak for 35 s while, for {FLOOD_SECONDS:g} s, {FLOOD_RATE} datagrams a "
        "second arrive from SSRCs nobody announced (each from a new one; well-formed and sealed with the "
        "call's key). The same members and packets without the flood, in the same run, are the baseline; "
        "RSS is the bot's process and its decoding workers. Command: `python -m bench.reliability flood` "
        "(the same run is `pytest tests/test_flood.py`).",
        results.get("flood"),
    )
    lines += _section(
        "Stopping under load",
        f"{STOP_SPEAKERS} members speak over a slightly lossy network (1 % lost, 3 % reordered, so that "
        "frames wait in the jitter buffers at the stop) with per-user WAV; the bot stops listening while "
        "they speak. A second listener on the voice socket, called after the session's own for every "
        "datagram, remembers what the process received before `stop_listening()`; the sink must get "
        "every one of those. Command: `python -m bench.reliability stop` (the same run is "
        "`pytest tests/test_stop_under_load.py`).",
        results.get("stop"),
    )
    soak = results.get("soak")
    faults = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in soak_faults(0).items() if k != "seed" and v)
    how = (
        f"{SOAK_MEMBERS} members speak in talk spurts (3-12 s of speech, five silence frames, 0.5-4 s of "
        f"nothing) with DAVE on, over a network with {faults} (probabilities per packet, delays in "
        "seconds), recorded to per-user WAV (48 kHz stereo). RSS (the bot's process and its decoding "
        "workers), threads and file descriptors are sampled every minute. At the end each member's "
        "frames are checked against the network's fault log: every frame sent is delivered, recovered "
        "by FEC or concealed, and counted. The full run, one command: `tox -e soak` "
        "(= `python -m bench.reliability soak --minutes 30`; about 35 minutes and 7 GB of WAV in a "
        "temporary directory, deleted at the end)."
    )
    notes = ""
    if soak is not None:
        notes = (
            f"This run: {soak['minutes']:g} minutes, {soak['members']} members, DAVE "
            f"{'on' if soak['dave'] else 'off'}, sampled every {soak.get('sample_seconds', 60):g} s. RSS (MiB): "
            + ", ".join(f"{v:.1f}" for _, v in soak["rss_mib"])
            + "; of which the bot's own process: "
            + ", ".join(f"{v:.1f}" for _, v in soak.get("rss_main_mib", []))
            + ". Frames: "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in soak["totals"].items())
            + "."
        )
        if soak["minutes"] < 30:
            notes += f" **A short validation run** ({soak['minutes']:g} min); the full one is 30 minutes."
    lines += _section("Soak", how, soak, notes)
    return "\n".join(lines)


def _command() -> str:
    if os.environ.get("TOX_ENV_NAME") == "soak":
        return "tox -e soak" + (" -- " + shlex.join(sys.argv[2:]) if sys.argv[2:] else "")
    return "python -m bench.reliability " + shlex.join(sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["flood", "stop", "soak", "all"])
    parser.add_argument("--minutes", type=float, default=30.0, help="the soak's length")
    parser.add_argument("--members", type=int, default=SOAK_MEMBERS, help="the soak's members")
    parser.add_argument("--sample-seconds", type=float, default=60.0, help="the soak's sampling period")
    parser.add_argument("--no-dave", action="store_true", help="run the soak without DAVE")
    parser.add_argument("--speakers", type=int, default=STOP_SPEAKERS, help="speakers of the stop run")
    parser.add_argument("--output", default=str(ROOT / "RELIABILITY.md"))
    parser.add_argument("--json", default=str(HERE / "reliability.json"))
    args = parser.parse_args(argv)

    path = Path(args.json)
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = machine()
    results["versions"] = versions()
    stamp = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": _command(),
    }
    ok = True
    for what in ["flood", "stop", "soak"] if args.what == "all" else [args.what]:
        started = time.monotonic()
        if what == "flood":
            verdict = asyncio.run(run_flood())
        elif what == "stop":
            verdict = asyncio.run(run_stop(args.speakers))
        else:
            verdict = asyncio.run(
                run_soak(args.minutes, args.members, args.sample_seconds, dave=not args.no_dave)
            )
        verdict |= stamp | {"duration_seconds": round(time.monotonic() - started)}
        results[what] = verdict
        ok &= verdict["ok"]
        for name, c in verdict["checks"].items():
            log(f"{what}: {'pass' if c['ok'] else 'FAIL'} {name}: {c['detail']}")
        path.write_text(json.dumps(results, indent=1) + "\n")
        Path(args.output).write_text(markdown(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
