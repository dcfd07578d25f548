"""A flood of packets from SSRCs nobody announced costs no memory and no audio.

The benchmark's set-up (``bench/reliability.py``): the bot in its own process, five members'
packets and the flood sent at real-time pace from another process straight at its socket. The
same members and packets without the flood are the baseline, run first. Takes about 80 s.
"""

from __future__ import annotations

from pathlib import Path

from bench.reliability import FLOOD_RATE, FLOOD_SECONDS, flood_trial, judge_flood


async def test_10000_unannounced_ssrcs_a_second_for_30_s_cost_no_memory_and_no_audio(tmp_path: Path) -> None:
    (tmp_path / "baseline").mkdir()
    (tmp_path / "flood").mkdir()
    base = await flood_trial(tmp_path / "baseline", flood=False)
    flooded = await flood_trial(tmp_path / "flood", flood=True)
    verdict = judge_flood(base, flooded)
    checks = verdict["checks"]

    assert verdict["flood_datagrams"] == FLOOD_RATE * FLOOD_SECONDS
    # the bot's socket took every datagram of both runs: the comparison below is like for like
    assert checks["no_kernel_drops"]["ok"], checks["no_kernel_drops"]["detail"]
    # the bot and its decoding workers: within 50 MiB of the run without the flood
    assert checks["rss_within_50_mib"]["ok"], checks["rss_within_50_mib"]["detail"]
    # each member's WAV holds the same samples, from their first frame on, as without the flood
    assert checks["tracks_identical"]["ok"], checks["tracks_identical"]["detail"]
    assert checks["every_member_frame_delivered"]["ok"], checks["every_member_frame_delivered"]["detail"]
    # every flood datagram the bot received is a drop counted with its reason
    assert checks["flood_counted_as_drops"]["ok"], checks["flood_counted_as_drops"]["detail"]
    assert verdict["unattributed"] == {"unknown-ssrc": FLOOD_RATE * FLOOD_SECONDS}
    # and the log says so once, not once per SSRC
    assert checks["flood_logged_once"]["ok"], checks["flood_logged_once"]["detail"]
