"""The soak's verdict (``bench/reliability.py``): what it calls flat, complete and accounted for.

The soak itself runs for 30 minutes (``tox -e soak``); these check, on made-up reports, that each
way a long recording can go wrong (memory or descriptors growing, a frame neither delivered nor
concealed, a concealment not counted, a short track) fails it.
"""

from __future__ import annotations

import copy
from typing import Any

from bench.reliability import MIB, judge_soak

USERS = {"101": 5001, "102": 5002}
PACKETS = 1000  # per member
SEQ0 = 65000  # sequence numbers wrap during the run
UNDELIVERED = [0, 17, 18, 19, 500, 999]  # lost on the network: the first, a burst, one, the last


def _clean() -> dict[str, Any]:
    samples = [
        {"at": 60.0 * m, "rss_bytes": (150 << 20) + (m % 2) * 4096, "rss_main_bytes": 100 << 20}
        | {"fds": 40, "threads": 7, "workers": 2, "kernel_drops": 0, "frames": 0}
        for m in range(1, 11)
    ]
    speakers, stats, tally = [], {}, {}
    for user, ssrc in USERS.items():
        speakers.append(
            {"ssrc": ssrc, "seq0": SEQ0, "packets": PACKETS, "undelivered": UNDELIVERED, "garbage": 2}
        )
        first, last = 1, PACKETS - 2  # the first and last to arrive
        missing = sum(1 for i in UNDELIVERED if first <= i <= last)  # 4, of which FEC recovered 3
        span = last - first + 1
        stats[user] = {
            "frames": span,
            "lost": missing,
            "recovered_fec": 3,
            "concealed": missing - 3,
            "late": 0,
            "dropped": {"decrypt-failed": 2},
        }
        tally[user] = {
            "first_seq": (SEQ0 + first) % 65536,
            "span": span,
            "frames": span,
            "gaps": 0,
            "backwards": 0,
            "max_drift_ms": 0.0,
            "kinds": {"received": span - missing - 5, "silence": 5, "fec": 3, "plc": missing - 3},
        }
    end = 600 * 48000
    return {
        "minutes": 10,
        "sample_seconds": 60.0,
        "members": len(USERS),
        "dave": True,
        "samples": samples,
        "load": {"speakers": speakers, "max_behind_ms": 1.0},
        "ssrcs": USERS,
        "warnings": [
            f"2026-11-26 06:00:0{i},000 WARNING listening_core.receiver: listening session 1, user {user}: {what}"
            for i, user in enumerate(USERS)
            for what in (
                "frames were lost; recovering them (FEC) or concealing them (further ones are counted, not logged)",
                "transport decryption failed (decrypt-failed); the packet was dropped (further ones are counted...)",
            )
        ],
        "final": {
            "stats": stats,
            "tally": tally,
            "files": {u: {"frames": end} for u in USERS},
            "session_end_samples": end,
            "session_seconds": 600.0,
            "kernel_drops": 0,
            "after_calls": [None],
            "stopped_in_seconds": 0.3,
            "left_behind": {"threads": [], "listening_threads": [], "unpackers": [], "fds": []},
        },
    }


def _failed(result: dict[str, Any]) -> set[str]:
    return {name for name, c in judge_soak(result)["checks"].items() if not c["ok"]}


def test_a_clean_soak_passes() -> None:
    verdict = judge_soak(_clean())
    assert verdict["ok"], verdict["checks"]
    assert verdict["totals"]["sent"] == 2 * PACKETS
    assert verdict["rss_slope_mib_per_hour"] is not None and abs(verdict["rss_slope_mib_per_hour"]) < 1


def test_memory_growing_steadily_fails() -> None:
    result = _clean()
    for s in result["samples"]:
        s["rss_bytes"] += int(s["at"] / 60 * 2 * MIB)  # 2 MiB a minute
    assert _failed(result) == {"rss_flat"}


def _samples(minutes: int, every: float, mib_per_minute: float) -> list[dict[str, Any]]:
    count = int(minutes * 60 / every)
    return [
        {"at": every * k, "rss_bytes": (150 << 20) + int(every * k / 60 * mib_per_minute * MIB)}
        | {"rss_main_bytes": 100 << 20, "fds": 40, "threads": 7, "workers": 2, "kernel_drops": 0, "frames": 0}
        for k in range(1, count + 1)
    ]


def test_slow_but_steady_growth_over_the_full_run_fails() -> None:
    result = _clean()
    result["minutes"] = 30
    result["samples"] = _samples(30, 60, 0.2)  # 5.6 MiB from minute 2 on: under the bound, but a leak
    verdict = judge_soak(result)
    assert not verdict["checks"]["rss_flat"]["ok"]
    assert "+12.00 MiB/hour (at most 8)" in verdict["checks"]["rss_flat"]["detail"]


def test_a_short_run_is_judged_on_its_growth_not_its_slope() -> None:
    result = _clean()
    result["minutes"] = 3
    result["samples"] = _samples(3, 20, 0.25)  # the allocators settling in
    verdict = judge_soak(result)
    assert verdict["checks"]["rss_flat"]["ok"], verdict["checks"]["rss_flat"]
    assert "not judged" in verdict["checks"]["rss_flat"]["detail"]


def test_descriptors_or_threads_growing_fail() -> None:
    result = _clean()
    result["samples"][-1]["fds"] += 1
    assert _failed(result) == {"no_fd_or_thread_growth"}
    result = _clean()
    result["samples"][-3]["threads"] += 1
    assert _failed(result) == {"no_fd_or_thread_growth"}


def test_a_frame_neither_delivered_nor_concealed_fails() -> None:
    result = _clean()
    tally = result["final"]["tally"]["101"]
    tally["frames"] -= 1
    tally["kinds"]["received"] -= 1
    tally["gaps"] = 1
    assert "every_frame_accounted_for" in _failed(result)


def test_a_concealment_not_counted_fails() -> None:
    result = _clean()
    result["final"]["stats"]["102"]["concealed"] -= 1
    assert _failed(result) == {"every_frame_accounted_for"}


def test_a_frame_lost_on_the_way_but_delivered_as_received_fails() -> None:
    result = _clean()
    speakers = copy.deepcopy(result["load"]["speakers"])
    speakers[0]["undelivered"] = [*UNDELIVERED, 600]  # the network lost one more than the sink shows
    result["load"]["speakers"] = speakers
    assert _failed(result) == {"every_frame_accounted_for"}


def test_a_short_track_or_a_forged_datagram_not_counted_fails() -> None:
    result = _clean()
    result["final"]["files"]["101"]["frames"] -= 960
    assert _failed(result) == {"tracks_as_long_as_the_session"}
    result = _clean()
    result["final"]["stats"]["101"]["dropped"] = {"decrypt-failed": 1}
    assert _failed(result) == {"forged_datagrams_counted"}


def test_a_loss_not_logged_or_logged_twice_fails() -> None:
    result = _clean()
    result["warnings"] = result["warnings"][1:]
    assert _failed(result) == {"drops_logged_once"}
    result = _clean()
    result["warnings"].append(result["warnings"][0])
    assert _failed(result) == {"drops_logged_once"}


def test_a_session_that_leaves_a_process_behind_fails() -> None:
    result = _clean()
    result["final"]["left_behind"]["unpackers"] = [1234]
    assert _failed(result) == {"stop_clean"}
