"""Peer adapter: discord-ext-voice-recv 0.5.x receiving through a loopback Discord, measured.

Runs in the peer's OWN virtualenv (see ``bench/peers/README.md``), never in listening-core's:
it imports only discord.py, discord-ext-voice-recv and the standard library. It logs in to a
``listening_core.testing.LocalDiscord`` whose address file another process wrote with
``LocalDiscord.address(account).save(path)``, joins a voice channel with
``voice_recv.VoiceRecvClient``, listens with one sink for ``--seconds`` seconds counted from the
first RTP packet on its UDP socket, then prints ONE line of JSON to stdout::

    python bench/peer_voice_recv.py --address FILE --channel ID --seconds S \
        --sink wave|count --output DIR [--ready-file FILE] [--timeout T]

``--sink count``  a sink that asks voice-recv for PCM (``wants_opus() == False``, so voice-recv
                  decodes every frame with its per-SSRC Opus decoder) and only counts frames.
``--sink wave``   the same counting, plus one WAV file per speaker in DIR, written by voice-recv's
                  own ``WaveSink`` (one instance per SSRC; voice-recv's ``WaveSink`` itself
                  writes every speaker into one file).

The JSON line::

    {"frames": {"<user_id>": n, ...},   # real frames voice-recv delivered in the window, per user
     "plc_frames": {"<user_id>": n},    # frames voice-recv made up for gaps (its FakePacket)
     "errors": ["...", ...],            # what went wrong; the session ending on an error is here
     "cpu_seconds": c,                  # CPU time (user+sys, all threads) of this process
     "cpu_user_seconds": u, "cpu_sys_seconds": s,   # the same split, from getrusage
     "wall_seconds": w,                 # first packet .. end of the window
     "packets": {"rtp": n, "rtcp": n, "other": n},  # what the UDP socket handed over from the
                                        # sink's attachment to the window's end (RTP: in the window)
     "socket_drops": d,                 # /proc/net/udp "drops" of the voice socket, or null
     "socket_rcvbuf": b,                # SO_RCVBUF of the voice socket (bytes), or null
     "session_ended_early": bool,       # voice-recv stopped listening by itself (an error)
     "idle_before_window": {"wall_seconds": w, "cpu_seconds": c},  # listening, no packet yet
     "wav_files": {"<user_id>": "path"},  # --sink wave only
     "log_warnings": {"<logger: message>": n},  # voice-recv's WARNINGs, counted
     "sink": "wave"|"count",
     "versions": {...}}

The window starts at the first RTP packet and lasts ``--seconds``; CPU, frames and packets are
all snapshotted at its end, before the teardown. Frames are keyed by user id as a string (JSON);
a frame whose SSRC was never mapped to a user is keyed ``"ssrc:<n>"``.

Exit status: 0 when the listening window was measured (even if voice-recv failed inside it:
that is in ``errors``), 1 when it never started (login, voice connect or no packet in time),
3 when the hard ``--timeout`` fired before any result; the JSON line is printed in every case.
Diagnostics go to stderr; a line ``peer_voice_recv: LISTENING ...`` marks the moment the sink is
attached, and ``--ready-file`` is written at that moment too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import platform
import resource
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import discord
from aiohttp.abc import AbstractResolver, ResolveResult
from discord.ext import voice_recv

log = logging.getLogger("peer_voice_recv")

# The host names a LocalDiscord serves (listening_core/testing/remote.py keeps the same list).
_API_HOST = "discord.com"
_GATEWAY_HOST = "gateway.discord.gg"
_CDN_HOST = "cdn.discordapp.com"
_VOICE_DOMAIN = "loopback.discord.media"

MAX_ERRORS = 50


# -- reaching the loopback without importing listening_core --------------------------------------
#
# listening_core.testing.remote.LoopbackAddress.connector() imports the whole loopback server
# (numpy, soundfile, cryptography, davey...), which do not belong in the peer's environment. The
# address file is plain JSON ({"port", "ca_pem", "token", "bot_name"}); this is the same
# resolver and TLS context, built with aiohttp alone.


def _is_loopback_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host in (_API_HOST, _GATEWAY_HOST, _CDN_HOST) or host.endswith("." + _VOICE_DOMAIN)


class _LoopbackResolver(AbstractResolver):
    def __init__(self, port: int) -> None:
        self._port = port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if not _is_loopback_host(host):
            raise OSError(f"the loopback Discord does not serve {host!r}; refusing to resolve it")
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=self._port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


def load_address(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return {"port": int(data["port"]), "ca_pem": str(data["ca_pem"]), "token": str(data["token"])}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot read the loopback address file {path}: {exc!r}") from None


def make_connector(address: dict[str, Any]) -> aiohttp.TCPConnector:
    context = ssl.create_default_context(cadata=address["ca_pem"])
    return aiohttp.TCPConnector(
        resolver=_LoopbackResolver(address["port"]), ssl=context, limit=0, use_dns_cache=False
    )


# -- measurement ---------------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Collects voice-recv's and discord.py's ERROR records (voice-recv logs and swallows most of
    its failures: a packet that fails decryption, one it cannot parse, a dying router thread)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.counts: collections.Counter[str] = collections.Counter()
        self.warnings: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().splitlines()[0][:200]
        except Exception:  # a record that cannot format itself is still an error
            message = str(record.msg)[:200]
        key = f"{record.name}: {message}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            key += f" [{type(exc).__name__}: {str(exc)[:200]}]"
        self.counts[key] += 1


class WarningCounter(logging.Handler):
    """Counts voice-recv's WARNING records (e.g. its flush path dropping packets)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            return
        msg = str(record.msg).splitlines()[0][:120]  # the format string: groups like messages
        self.counts[f"{record.name}: {msg}"] += 1


class PacketProbe:
    """A second socket listener on discord.py's reader thread: counts what the UDP socket hands
    over and notes the wall and CPU clocks at the first RTP packet (the window's start)."""

    def __init__(self) -> None:
        self.rtp = 0
        self.rtcp = 0
        self.other = 0
        self.first_wall: float | None = None
        self.first_cpu: float | None = None
        self.first_rusage: resource.struct_rusage | None = None
        self.first = threading.Event()

    def __call__(self, data: bytes) -> None:
        if len(data) >= 12 and data[0] >> 6 == 2:
            if 200 <= data[1] <= 204:
                self.rtcp += 1
                return
            self.rtp += 1
            if self.first_wall is None:
                self.first_wall = time.perf_counter()
                self.first_cpu = time.process_time()
                self.first_rusage = resource.getrusage(resource.RUSAGE_SELF)
                self.first.set()
        else:
            self.other += 1

    def snapshot(self) -> dict[str, int]:
        return {"rtp": self.rtp, "rtcp": self.rtcp, "other": self.other}


class CountingSink(voice_recv.AudioSink):
    """Wants PCM (so voice-recv decodes) and counts frames per SSRC; optionally writes WAV files
    through one voice-recv ``WaveSink`` per SSRC. Called only on voice-recv's router thread."""

    def __init__(self, wave_dir: Path | None = None) -> None:
        super().__init__()
        self.frames: collections.Counter[int] = collections.Counter()
        self.plc: collections.Counter[int] = collections.Counter()
        self.ssrc_user: dict[int, int] = {}
        self.wave_dir = wave_dir
        self.waves: dict[int, voice_recv.WaveSink] = {}
        self.wave_paths: dict[int, Path] = {}
        self.write_errors: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._closed = False

    def wants_opus(self) -> bool:
        return False

    def write(self, user: Any, data: voice_recv.VoiceData) -> None:
        packet = data.packet
        ssrc = packet.ssrc
        if user is not None and ssrc not in self.ssrc_user:
            self.ssrc_user[ssrc] = user.id
        if packet:  # voice-recv's FakePacket (a gap it filled) is falsy
            self.frames[ssrc] += 1
        else:
            self.plc[ssrc] += 1
        if self.wave_dir is None:
            return
        with self._lock:
            if self._closed:
                return
            sink = self.waves.get(ssrc)
            if sink is None:
                name = f"{user.id}.wav" if user is not None else f"ssrc-{ssrc}.wav"
                path = self.wave_dir / name
                if path in self.wave_paths.values():
                    path = self.wave_dir / f"{path.stem}-ssrc-{ssrc}.wav"
                sink = self.waves[ssrc] = voice_recv.WaveSink(str(path))
                self.wave_paths[ssrc] = path
            try:
                sink.write(user, data)
            except Exception as exc:  # keep counting even if the disk fails
                self.write_errors[f"{type(exc).__name__}: {exc}"] += 1

    def cleanup(self) -> None:
        with self._lock:
            self._closed = True
            for sink in self.waves.values():
                sink.cleanup()

    def name_files(self, vc: Any) -> dict[str, str]:
        """After cleanup: rename ``ssrc-<n>.wav`` (audio that came before voice-recv knew whose SSRC
        it was) to ``<user_id>.wav`` where the user is known by now; returns user key -> path."""
        out: dict[str, str] = {}
        for ssrc, path in self.wave_paths.items():
            key = self._key(ssrc, vc)
            if path.name.startswith("ssrc-") and not key.startswith("ssrc:"):
                target = path.with_name(f"{key}.wav")
                if not target.exists():
                    try:
                        path.rename(target)
                        path = self.wave_paths[ssrc] = target
                    except OSError:
                        pass
            out[key] = str(path)
        return out

    def by_user(self, counter: collections.Counter[int], vc: Any) -> dict[str, int]:
        """``counter`` (per SSRC) summed per user id; unmapped SSRCs as ``"ssrc:<n>"``."""
        out: collections.Counter[str] = collections.Counter()
        for ssrc, n in list(counter.items()):
            out[self._key(ssrc, vc)] += n
        return dict(out)

    def _key(self, ssrc: int, vc: Any) -> str:
        user_id = self.ssrc_user.get(ssrc)
        if user_id is None and vc is not None:
            user_id = vc._get_id_from_ssrc(ssrc)
        return str(user_id) if user_id is not None else f"ssrc:{ssrc}"


def socket_stats(sock: socket.socket | None) -> tuple[int | None, int | None]:
    """(drops, SO_RCVBUF) of ``sock``: drops from /proc/net/udp{,6}, matched by the socket's inode."""
    if sock is None:
        return None, None
    try:
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        inode = str(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return None, None
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            if len(fields) >= 13 and fields[9] == inode:
                return int(fields[12]), rcvbuf
    return None, rcvbuf


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "discord.py": discord.__version__,
        "discord-ext-voice-recv": None,
        "aiohttp": aiohttp.__version__,
    }
    from importlib.metadata import PackageNotFoundError, version

    # Each looked up on its own: PyNaCl missing once took voice-recv's version down with it (to
    # the module's __version__, which 0.5.x does not have: None).
    for dist in ("discord-ext-voice-recv", "PyNaCl"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    if out["discord-ext-voice-recv"] is None:
        out["discord-ext-voice-recv"] = getattr(voice_recv, "__version__", None)
    try:
        if not discord.opus.is_loaded():
            discord.opus._load_default()
        out["libopus"] = discord.opus._lib.opus_get_version_string().decode()
    except Exception:
        out["libopus"] = None
    return out


# -- the run -------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.errors: list[str] = []
        self.result: dict[str, Any] | None = None
        self.measured = False
        self._printed = False
        self._print_lock = threading.Lock()
        self.error_log = ErrorLog()
        self.warning_log = WarningCounter()
        self.probe = PacketProbe()
        self.sink: CountingSink | None = None
        self.vc: Any = None
        self.session_error: BaseException | None = None
        self.session_ended = threading.Event()

    def error(self, message: str) -> None:
        log.error("%s", message)
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)

    # The JSON line goes out exactly once, from the main flow or from the watchdog.
    def emit(self, payload: dict[str, Any]) -> None:
        with self._print_lock:
            if self._printed:
                return
            self._printed = True
            sys.stdout.write(json.dumps(payload, sort_keys=True) + "\n")
            sys.stdout.flush()

    def payload(self) -> dict[str, Any]:
        if self.result is not None:
            data = dict(self.result)
        else:
            data = {
                "frames": {},
                "plc_frames": {},
                "cpu_seconds": None,
                "cpu_user_seconds": None,
                "cpu_sys_seconds": None,
                "wall_seconds": None,
                "packets": self.probe.snapshot(),
                "socket_drops": None,
                "socket_rcvbuf": None,
                "session_ended_early": None,  # no window was measured
            }
        errors = list(self.errors)
        if self.session_error is not None:
            error = self.session_error
            errors.append(f"voice-recv session ended with {type(error).__name__}: {error}")
        for message, n in self.error_log.counts.most_common(MAX_ERRORS):
            errors.append(f"logged {n}x: {message}")
        data["errors"] = errors
        data["log_warnings"] = dict(self.warning_log.counts)
        data["versions"] = versions()
        data["sink"] = self.args.sink
        return data

    def watchdog(self) -> None:
        self.error(f"hard timeout after {self.args.timeout:.0f} s; exiting without a clean disconnect")
        self._finish_files()
        if self.sink is not None and self.result is not None and self.args.sink == "wave":
            self.result["wav_files"] = self.sink.name_files(self.vc)
        self.emit(self.payload())
        os._exit(0 if self.measured else 3)

    def _finish_files(self) -> None:
        if self.sink is not None:
            try:
                self.sink.cleanup()
            except Exception as exc:
                self.error(f"closing WAV files failed: {exc!r}")

    def after(self, error: BaseException | None) -> None:
        """voice-recv's ``after`` callback: called on its stopper thread when listening ends."""
        if error is not None:
            self.session_error = error
        self.session_ended.set()

    async def main(self) -> int:
        args = self.args
        try:
            address = load_address(args.address)
        except ValueError as exc:
            self.error(str(exc))
            return 1
        intents = discord.Intents.default()
        intents.members = True
        intents.voice_states = True
        client = discord.Client(intents=intents, connector=make_connector(address), guild_ready_timeout=0.1)
        runner = asyncio.ensure_future(client.start(address["token"]))
        try:
            return await self._listen(client, runner)
        finally:
            await self._teardown(client, runner)

    async def _listen(self, client: discord.Client, runner: asyncio.Future[None]) -> int:
        args = self.args
        ready = asyncio.ensure_future(client.wait_until_ready())
        done, _ = await asyncio.wait(
            {ready, runner}, timeout=args.connect_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if ready not in done:
            ready.cancel()
            if runner in done and runner.exception() is not None:
                self.error(f"login failed: {runner.exception()!r}")
            else:
                self.error(f"not logged in after {args.connect_timeout} s")
            return 1
        channel = client.get_channel(args.channel)
        if not isinstance(channel, discord.VoiceChannel):
            self.error(f"channel {args.channel} is not a voice channel the bot can see ({channel!r})")
            return 1
        try:
            self.vc = vc = await channel.connect(cls=voice_recv.VoiceRecvClient, timeout=args.connect_timeout)
        except Exception as exc:
            self.error(f"voice connect failed: {exc!r}")
            return 1
        log.info("voice mode %s", vc.mode)
        if vc.mode not in voice_recv.reader.PacketDecryptor.supported_modes:
            self.error(f"voice mode {vc.mode} is not one voice-recv can decrypt")
        dave = getattr(vc._connection, "dave_protocol_version", 0)
        if dave:
            # discord.py negotiated DAVE; voice-recv hands the still DAVE-encrypted frames to Opus.
            self.error(f"DAVE protocol version {dave} negotiated: voice-recv cannot open DAVE frames")

        wave_dir = None
        if args.sink == "wave":
            wave_dir = Path(args.output)
            wave_dir.mkdir(parents=True, exist_ok=True)
        self.sink = sink = CountingSink(wave_dir)
        # The probe first: it sees each packet just before voice-recv's own listener does.
        vc._connection.add_socket_listener(self.probe)
        try:
            vc.listen(sink, after=self.after)
        except Exception as exc:
            self.error(f"listen() failed: {exc!r}")
            return 1
        print(
            f"peer_voice_recv: LISTENING user={client.user.id} channel={args.channel}",
            file=sys.stderr,
            flush=True,
        )
        listen_wall, listen_cpu = time.perf_counter(), time.process_time()
        if args.ready_file:
            Path(args.ready_file).write_text(f"{client.user.id}\n")

        loop = asyncio.get_running_loop()
        got_first = await loop.run_in_executor(None, self.probe.first.wait, args.first_packet_timeout)
        if not got_first:
            self.error(f"no RTP packet within {args.first_packet_timeout} s of listening")
            return 1
        assert self.probe.first_wall is not None and self.probe.first_cpu is not None
        end = self.probe.first_wall + args.seconds
        # Sleep in a worker thread on voice-recv's end-of-session event: no polling in the window.
        remaining = end - time.perf_counter()
        if remaining > 0 and vc.is_listening():
            await loop.run_in_executor(None, self.session_ended.wait, remaining)
        # Snapshot everything at the window's end, before tearing anything down.
        wall = time.perf_counter() - self.probe.first_wall
        cpu = time.process_time() - self.probe.first_cpu
        ru = resource.getrusage(resource.RUSAGE_SELF)
        ru0 = self.probe.first_rusage
        assert ru0 is not None
        drops, rcvbuf = socket_stats(getattr(vc._connection, "socket", None))
        ended_early = self.session_ended.is_set() or not vc.is_listening()
        self.result = {
            "frames": sink.by_user(sink.frames, vc),
            "plc_frames": sink.by_user(sink.plc, vc),
            "cpu_seconds": round(cpu, 6),
            "cpu_user_seconds": round(ru.ru_utime - ru0.ru_utime, 6),
            "cpu_sys_seconds": round(ru.ru_stime - ru0.ru_stime, 6),
            "wall_seconds": round(wall, 6),
            "packets": self.probe.snapshot(),
            "socket_drops": drops,
            "socket_rcvbuf": rcvbuf,
            "session_ended_early": ended_early,
            "idle_before_window": {
                "wall_seconds": round(self.probe.first_wall - listen_wall, 6),
                "cpu_seconds": round(self.probe.first_cpu - listen_cpu, 6),
            },
        }
        self.measured = True
        if ended_early:
            self.error(
                f"voice-recv stopped listening by itself after {wall:.2f} s of the {args.seconds} s window"
            )
        return 0

    async def _teardown(self, client: discord.Client, runner: asyncio.Future[None]) -> None:
        vc = self.vc
        if vc is not None:
            with _suppress_into(self, "stop_listening"):
                vc._connection.remove_socket_listener(self.probe)
                vc.stop_listening()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.session_ended.wait, 5.0)
            with _suppress_into(self, "voice disconnect"):
                await asyncio.wait_for(vc.disconnect(force=True), 10)
        self._finish_files()
        if self.sink is not None and self.result is not None:
            if self.sink.write_errors:
                for message, n in self.sink.write_errors.items():
                    self.error(f"WAV write failed {n}x: {message}")
            if self.args.sink == "wave":
                self.result["wav_files"] = self.sink.name_files(vc)
        with _suppress_into(self, "client close"):
            await asyncio.wait_for(client.close(), 10)
        if not runner.done():
            runner.cancel()
        with _suppress_into(self, "client runner", quiet=(asyncio.CancelledError,)):
            await asyncio.wait_for(runner, 5)


class _suppress_into:
    """Record an exception as an error of ``run`` instead of letting it out (teardown steps)."""

    def __init__(self, run: Run, what: str, quiet: tuple[type[BaseException], ...] = ()) -> None:
        self.run, self.what, self.quiet = run, what, quiet

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        if not isinstance(exc, self.quiet):
            self.run.error(f"{self.what} failed: {exc!r}")
        return isinstance(exc, (Exception, *self.quiet))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the loopback's address file (LoopbackAddress.save)")
    parser.add_argument("--channel", required=True, type=int, help="voice channel id to join")
    parser.add_argument(
        "--seconds", required=True, type=float, help="listen this long after the first packet"
    )
    parser.add_argument("--sink", choices=("wave", "count"), default="count")
    parser.add_argument("--output", default=".", help="directory for the WAV files (--sink wave)")
    parser.add_argument("--ready-file", help="written (with the bot's user id) once the sink is attached")
    parser.add_argument("--connect-timeout", type=float, default=30.0, help="login and voice connect, each")
    parser.add_argument("--first-packet-timeout", type=float, default=60.0)
    parser.add_argument(
        "--timeout", type=float, help="hard limit for the whole run (default: the others summed + 40 s)"
    )
    parser.add_argument("--log-level", default="WARNING", help="stderr log level (DEBUG, INFO, WARNING...)")
    args = parser.parse_args(argv)
    if args.timeout is None:
        args.timeout = 2 * args.connect_timeout + args.first_packet_timeout + args.seconds + 40.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.WARNING),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run = Run(args)
    # One handler on "discord" sees voice-recv's records too (they propagate): count each once.
    logging.getLogger("discord").addHandler(run.error_log)
    logging.getLogger("discord.ext.voice_recv").addHandler(run.warning_log)
    # voice-recv's own loggers are chatty at INFO; its WARNINGs are counted even when not shown.
    logging.getLogger("discord.ext.voice_recv").setLevel(min(logging.WARNING, logging.getLogger().level))

    watchdog = threading.Timer(args.timeout, run.watchdog)
    watchdog.daemon = True
    watchdog.start()
    code = 1
    try:
        code = asyncio.run(run.main())
    except Exception as exc:  # anything unforeseen still ends in a JSON line
        run.error(f"adapter crashed: {exc!r}")
    except KeyboardInterrupt:
        run.error("interrupted")
    watchdog.cancel()
    run.emit(run.payload())
    # voice-recv leaves threads behind (its keep-alive sleeps 5000 s; its stopper thread is not a
    # daemon): leave without waiting for them.
    sys.stderr.flush()
    os._exit(0 if run.measured else (code or 1))


if __name__ == "__main__":
    main()
