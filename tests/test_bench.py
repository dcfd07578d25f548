"""The benchmark suite's own logic: when a load counts as held, and the table it publishes."""

from __future__ import annotations

import copy
from typing import Any

from bench.run import judge, markdown

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


def test_markdown_reports_every_target() -> None:
    brief = {"speakers": 10, "cpu_us_per_frame": 80.0, "ratio_to_floor": 1.6, "rss_bytes": 100 << 20}
    results = {
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
        "floor": {"xchacha": {"both": {"best_us": 50.0}}, "aes_gcm": {"both": {"best_us": 49.0}}},
        "pipeline_cost": {"10": brief, "100": brief | {"speakers": 100}},
        "peer_cost": brief | {"cpu_us_per_frame": 300.0, "ratio_to_floor": 6.0},
        "capacity_wav": {"speakers": 300},
        "capacity_ogg": {"speakers": 600},
        "capacity_peer": {"speakers": 45},
        "latency": {"latency_p50_ms": 4.0, "latency_p99_ms": 9.0, "speakers": 100},
        "memory_per_speaker_bytes": 300_000,
        "memory_over_time": {
            "points": [{"at": 60.0, "rss_bytes": 100 << 20}, {"at": 600.0, "rss_bytes": 101 << 20}],
            "growth_ratio": 1.01,
        },
        "dave_cost": {"speakers": 40, "extra_us_per_frame": 5.0},
        "seed": "cannot run",
    }
    text = markdown(results)
    for needle in (
        "≤ 1.3x",
        "≥ 250",
        "≥ 3x",
        "≥ 2000",
        "p99 ≤ 10 ms",
        "≤ 1 MiB",
        "| 300 speakers |",
        "| 6.7x |",
        "| 600 speakers |",
        "p99 9.0 ms",
        "0.29 MiB",
        "cannot run",
    ):
        assert needle in text, needle
