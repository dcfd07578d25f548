"""The benchmark suite's own logic: when a load counts as held, and the table it publishes."""

from __future__ import annotations

import argparse
import copy
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

import bench.run
from bench.run import judge, judge_idle, markdown, peer_version, peer_version_text

GOOD_OURS: dict[str, Any] = {
    "receiver": "ours",
    "sink": "wav",
    "speakers": 100,
    "frames": 50_000,
    "lost": 0,
    "late": 0,
    "dropped": 0,
    "kernel_drops": 0,
    "latency_p99_ms": 8.0,
    "cpu_seconds": 5.0,
    "generator": {"max_behind_ms": 3.0},
}


def test_a_clean_run_is_held_and_costed() -> None:
    result = judge(copy.deepcopy(GOOD_OURS), seconds=10)
    assert result["held"] is True and result["problems"] == []
    assert result["cpu_us_per_frame"] == 100.0


def test_any_drop_loss_shortfall_or_backlog_is_not_held() -> None:
    for change, words in [
        ({"kernel_drops": 3}, "dropped by the kernel"),
        ({"lost": 1}, "1 lost"),
        ({"frames": 40_000}, "delivered 40000 frames of 50000"),
        ({"latency_p99_ms": 900.0}, "falling behind"),
        ({"generator": {"max_behind_ms": 80.0}}, "generator fell"),
    ]:
        result = judge(copy.deepcopy(GOOD_OURS) | change, seconds=10)
        assert result["held"] is False
        assert any(words in p for p in result["problems"]), (change, result["problems"])


def test_the_peer_is_judged_on_its_own_report() -> None:
    peer = {
        "frames": {"1": 2500, "2": 2500},
        "wall_seconds": 25.0,
        "socket_drops": 0,
        "cpu_seconds": 1.5,
        "session_ended_early": False,
    }
    base = {
        "receiver": "peer",
        "sink": "wav",
        "speakers": 2,
        "generator": {"max_behind_ms": 1.0},
        "peer": peer,
    }
    assert judge(copy.deepcopy(base), seconds=25)["held"] is True
    ended = copy.deepcopy(base)
    ended["peer"] |= {"session_ended_early": True, "errors": ["OpusError: corrupted stream"]}
    result = judge(ended, seconds=25)
    assert result["held"] is False and "corrupted stream" in result["problems"][0]


def _cost(n: int, us: float, ratio: float, **more: Any) -> dict[str, Any]:
    return {
        "speakers": n,
        "held": True,
        "problems": [],
        "cpu_us_per_frame": us,
        "ratio_to_floor": ratio,
        "rss_bytes": (100 << 20) + n * 300_000,
        "latency_p50_ms": 4.0,
        "latency_p99_ms": 9.0,
    } | more


def _results() -> dict[str, Any]:
    """A full run's results, every figure held."""
    return {
        "date": "2026-11-26T04:00:00+00:00",
        "command": "tox -e bench",
        "duration_seconds": 600,
        "machine": {"cpu": "CPU", "cores": 2, "memory_gib": 24, "python": "3.11"},
        "versions": {
            "listening-core": "0.1",
            "discord.py": "2.7.1",
            "libopus": "libopus 1.3.1",
            "discord-ext-voice-recv": "0.5.2",
        },
        "parts": list(bench.run.PARTS),
        "floor": {"xchacha": {"both": {"best_us": 50.0}}, "aes_gcm": {"both": {"best_us": 49.0}}},
        "pipeline_cost": {
            "10": _cost(10, 80.0, 1.6),
            "100": _cost(100, 75.0, 1.5),
            "300": _cost(300, 60.0, 1.2, latency_p99_ms=25.0),
        },
        "peer_cost": _cost(10, 300.0, 6.0),
        "capacity_wav": {"speakers": 300},
        "capacity_ogg": {"speakers": 1500},
        "capacity_peer": {"speakers": 45},
        "latency": {
            "100": {"held": True, "problems": [], "latency_p50_ms": 4.0, "latency_p99_ms": 9.0},
            "300": {"held": True, "problems": [], "latency_p50_ms": 9.0, "latency_p99_ms": 25.0},
        },
        "resample16": {
            "speakers": 100,
            "stereo_48k": _cost(100, 75.0, 1.5),
            "mono_16k": _cost(100, 90.0, 1.8),
            "ratio": 1.2,
        },
        "idle": {
            "sessions": 20,
            "held": True,
            "problems": [],
            "connected_pct_per_session": 0.01,
            "listening_pct_per_session": 0.04,
            "own_pct_per_session": 0.03,
        },
        "memory_per_speaker_bytes": 300_000,
        "memory_over_time": {
            "held": True,
            "problems": [],
            "points": [{"at": 60.0, "rss_bytes": 100 << 20}, {"at": 600.0, "rss_bytes": 101 << 20}],
            "growth_ratio": 1.01,
        },
        "dave_cost": {
            "speakers": 40,
            "with": {"held": True},
            "without": {"held": True},
            "extra_us_per_frame": 5.0,
        },
        "streams": {
            "throughput": {"frames_per_second": 800000, "delivery_cpu_us_per_frame": 0.13},
            "frames": {
                "10": {
                    "held": True,
                    "frames_per_second": 500.0,
                    "latency_p50_ms": 4.1,
                    "latency_p99_ms": 8.4,
                },
                "100": {
                    "held": True,
                    "frames_per_second": 5000.0,
                    "latency_p50_ms": 5.6,
                    "latency_p99_ms": 14.6,
                },
            },
            "pcm16k": {"10": {"held": True, "frames_per_second": 500.0}},
        },
        "transcribe": {
            "cpu_threads": 2,
            "runs": [
                {
                    "members": 4,
                    "held": True,
                    "rtf": 0.12,
                    "latency_p50": 1.2,
                    "latency_p95": 2.5,
                    "received": 1300,
                    "receive_latency_p99_ms": 12.5,
                    "receive_latency_p99_ms_idle_engine": 11.0,
                }
            ],
        },
        "seed": "cannot run",
    }


def _row(text: str, starts: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith("| " + starts)]
    assert len(rows) == 1, (starts, rows)
    return rows[0]


def test_markdown_reports_every_target_with_its_verdict() -> None:
    text = markdown(_results())
    expected = {
        "pipeline cost, 10 speakers": ("= 1.6x floor", "≤ 2x", "met"),
        "pipeline cost, 100 speakers": ("= 1.5x floor", "≤ 1.4x", "not met: 0.1x over"),
        "pipeline cost, 300 speakers": ("= 1.2x floor", "≤ 1.3x", "met"),
        "capacity, per-user WAV": ("300 speakers", "≥ 400", "not met: 100 speakers short"),
        "capacity, ogg-opus": ("1500 speakers", "≥ 1000", "met"),
        "capacity vs discord-ext-voice-recv": ("6.7x", "≥ 3x", "met"),
        "16 kHz mono WAV (resampled) vs 48 kHz stereo, 100 speakers": ("= 1.2x", "≤ 1.3x", "met"),
        "latency, arrival to on_audio, 100 speakers": ("p99 9.0 ms", "p99 ≤ 10 ms", "met"),
        "latency, arrival to on_audio, 300 speakers": ("p99 25.0 ms", "p99 ≤ 20 ms", "not met: 5 ms over"),
        "idle listening sessions (20)": ("listening's own 0.030 % of a core", "≤ 0.05 % of a core", "met"),
        "RSS per active speaker": ("0.29 MiB", "≤ 1 MiB", "met"),
        "DAVE's extra cost, 40 speakers": ("5.0 µs/frame", "", ""),
        "live stream, 100 speakers, one loop taking every frame": ("p50 5.6 ms, p99 14.6 ms", "", ""),
        "live stream, 10 speakers, one loop taking 16 kHz mono chunks": ("500.0 frames/s", "", ""),
        "transcription, 4 members speaking at once": (
            "sink p99 12.5 ms (11.0 ms with an engine that does nothing)",
            "",
            "",
        ),
    }
    for what, (measured, target, met) in expected.items():
        row = _row(text, what)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert measured in cells[1], (what, row)
        assert cells[2] == target and cells[3] == met, (what, row)
    assert "not measured" not in text and "None" not in text
    assert "discord-ext-voice-recv 0.5.2" in text
    assert "cannot run" in text


def test_a_run_that_was_not_held_shows_no_figure() -> None:
    results = _results()
    bad = {
        "held": False,
        "problems": ["the generator fell 80 ms behind (the machine is overloaded)"],
        "tries": 3,
    }
    results["pipeline_cost"]["300"] |= bad | {"ratio_to_floor": None}
    results["latency"]["300"] |= bad
    results["dave_cost"] = {
        "speakers": 40,
        "with": bad | {"cpu_us_per_frame": 70.0},
        "without": {"held": True},
    }
    results["resample16"] = {
        "speakers": 100,
        "stereo_48k": _cost(100, 75.0, 1.5),
        "mono_16k": _cost(100, 95.0, 1.9) | bad,
    }
    results["idle"] = {"sessions": 20} | bad
    results["memory_over_time"] |= bad
    results["streams"]["frames"]["100"] = bad | {"latency_p99_ms": 25.0}
    text = markdown(results)
    for what in (
        "pipeline cost, 300 speakers",
        "latency, arrival to on_audio, 300 speakers",
        "DAVE's extra cost",
        "16 kHz mono WAV",
        "idle listening sessions",
        "RSS late in a long run",
        "live stream, 100 speakers, one loop taking every frame",
    ):
        row = _row(text, what)
        assert "not held (the generator fell 80 ms behind" in row and "3 tries" in row, row
        assert "µs/frame" not in row and "p99 25.0" not in row and "95.0" not in row, row
        assert "x1.01" not in row and "| met |" not in row, row


def test_dave_cost_publishes_no_extra_from_a_run_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    async def fake_trial(receiver: str, speakers: int, seconds: float, **options: Any) -> dict[str, Any]:
        dave = options.get("dave", False)
        calls.append(dave)
        result = copy.deepcopy(GOOD_OURS) | {"speakers": speakers, "cpu_seconds": 4.0 if dave else 5.0}
        if dave:  # the generator always falls behind with DAVE on
            result["generator"] = {"max_behind_ms": 90.0}
        return judge(result, seconds=10)

    monkeypatch.setattr(bench.run, "trial", fake_trial)
    out = bench.run.dave_cost(100, 10, retries=2)
    assert calls == [False, True, True, True]  # the held one once, the other retried twice
    assert "extra_us_per_frame" not in out
    assert out["with"]["held"] is False and out["with"]["tries"] == 3
    assert "not held (the generator fell 90.0 ms behind" in markdown(_results() | {"dave_cost": out})


def test_a_retry_that_holds_is_published(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = iter([{"generator": {"max_behind_ms": 90.0}}, {}])

    async def fake_trial(receiver: str, speakers: int, seconds: float, **options: Any) -> dict[str, Any]:
        return judge(copy.deepcopy(GOOD_OURS) | next(runs), seconds=10)

    monkeypatch.setattr(bench.run, "trial", fake_trial)
    result = bench.run.held_trial("ours", 100, 10, retries=2, what="test")
    assert result["held"] is True and result["tries"] == 2
    assert "generator fell" in result["earlier_problems"][0][0]


def test_resample_ratio_is_of_the_two_held_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    async def fake_trial(receiver: str, speakers: int, seconds: float, **options: Any) -> dict[str, Any]:
        seen.append(options.get("sink_options"))
        cpu = 6.0 if options.get("sink_options") else 5.0
        return judge(copy.deepcopy(GOOD_OURS) | {"cpu_seconds": cpu}, seconds=10)

    monkeypatch.setattr(bench.run, "trial", fake_trial)
    out = bench.run.resample_cost(100, 10, retries=0)
    assert seen == [None, {"sample_rate": 16000, "channels": 1}]
    assert out["ratio"] == 1.2


IDLE_WINDOW: dict[str, Any] = {
    "seconds": 30.0,
    "sessions": 20,
    "connected": 20,
    "threads": 30,
    "workers": 0,
    "ended": [],
}


def test_idle_is_judged_per_session_against_connected_only() -> None:
    result = judge_idle(
        {
            "sessions": 20,
            "connected": IDLE_WINDOW | {"cpu_seconds": 0.06, "listening": 0},
            "listening": IDLE_WINDOW | {"cpu_seconds": 0.3, "listening": 20},
        },
        seconds=30,
    )
    assert result["held"] is True, result["problems"]
    assert result["connected_pct_per_session"] == 0.01
    assert result["listening_pct_per_session"] == 0.05
    assert result["own_pct_per_session"] == 0.04


def test_idle_with_a_client_gone_or_a_stalled_window_is_not_held() -> None:
    for change, words in [
        ({"connected": 19}, "19 of 20 clients connected"),
        ({"listening": 18}, "18 of 20 clients listening"),
        ({"seconds": 45.0}, "the machine stalled"),
        ({"ended": ["session 3 ended: OSError()"]}, "session 3 ended"),
    ]:
        result = judge_idle(
            {
                "sessions": 20,
                "connected": IDLE_WINDOW | {"cpu_seconds": 0.06, "listening": 0},
                "listening": IDLE_WINDOW | {"cpu_seconds": 0.3, "listening": 20} | change,
            },
            seconds=30,
        )
        assert result["held"] is False
        assert any(words in p for p in result["problems"]), (change, result["problems"])


def test_the_peer_version_is_never_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    all_versions: list[dict[str, Any]] = [
        {},
        {"discord-ext-voice-recv": None},
        {"discord-ext-voice-recv": "None"},
    ]
    extras: list[dict[str, Any]] = [
        {},
        {"capacity_peer": {"speakers": None, "error": "pip failed"}},
        {"peer_cost": {}},
    ]
    for versions in all_versions:
        for extra in extras:
            text = peer_version_text({"versions": versions} | extra)
            assert "None" not in text and text.startswith("discord-ext-voice-recv "), text
    assert peer_version_text({"versions": {"discord-ext-voice-recv": "0.5.2a179"}}).endswith("0.5.2a179")
    # An environment without the peer, or one whose lookup prints "None", has no version: not "None".
    monkeypatch.setattr(bench.run, "PEER_PYTHON", tmp_path / "missing")
    assert peer_version() is None
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho None\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(bench.run, "PEER_PYTHON", fake)
    assert peer_version() is None
    fake.write_text("#!/bin/sh\necho 0.5.2a179\n")
    assert peer_version() == "0.5.2a179"
    # The lookup itself, in an environment without voice-recv (this one): nothing, not "None".
    monkeypatch.setattr(bench.run, "PEER_PYTHON", Path(sys.executable))
    assert peer_version() is None


def test_a_partial_run_says_what_it_did_not_measure() -> None:
    full = _results()
    partial = {k: full[k] for k in ("date", "command", "duration_seconds", "machine", "versions", "seed")}
    partial["versions"] = {k: v for k, v in partial["versions"].items() if k != "discord-ext-voice-recv"}
    partial |= {"parts": ["idle"], "idle": full["idle"]}
    text = markdown(partial)
    assert "A partial run: only idle." in text
    assert "Raw figures: `bench/results.json`" in text  # unless main() says where they went
    assert "discord-ext-voice-recv not run" in text and "None" not in text
    for what in ("pipeline cost, 10 speakers", "capacity, ogg-opus", "latency, arrival to on_audio, 300"):
        assert "not measured in this run" in _row(text, what)
    assert "listening's own 0.030 %" in _row(text, "idle listening sessions")
    partial["idle"] = full["idle"] | {"own_pct_per_session": -0.0002, "listening_pct_per_session": 0.0148}
    assert "listening's own 0.000 % of a core (listening 0.015 %" in _row(markdown(partial), "idle listening")


def test_only_names_known_parts() -> None:
    assert bench.run._parts("idle,resample16") == ["idle", "resample16"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown part"):
        bench.run._parts("idle,everything")


def test_a_negative_dave_cost_is_shown_as_noise_not_as_a_figure() -> None:
    results = _results()
    results["dave_cost"] = {
        "speakers": 40,
        "with": {"held": True, "cpu_us_per_frame": 266.95},
        "without": {"held": True, "cpu_us_per_frame": 283.26},
        "extra_us_per_frame": -16.31,
    }
    row = _row(markdown(results), "DAVE's extra cost")
    assert "-16.31" not in row
    assert "below the noise: 266.95 µs/frame with DAVE, 283.26 without" in row
