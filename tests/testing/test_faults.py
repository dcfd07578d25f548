from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listening_core.testing.faults import MAX_REORDER_DELAY, FaultConfig, FaultInjector, FaultStats

N = 20_000
CADENCE = 0.02
EPS = 1e-9  # float rounding of absolute times


def rtp(seq: int, *, ssrc: int = 0x1234, size: int = 80) -> bytes:
    """A plausible encrypted RTP datagram whose body is unique per sequence number."""
    header = struct.pack(">BBHII", 0x80, 0x78, seq & 0xFFFF, (seq * 960) & 0xFFFFFFFF, ssrc)
    body = (seq.to_bytes(4, "big") * (size // 4 + 1))[: size - len(header)]
    return header + body


@dataclass
class Offer:
    now: float
    datagram: bytes
    out: list[tuple[float, bytes]]


@dataclass
class Tally:
    """What the outputs show, counted independently of FaultStats."""

    sent: int = 0
    lost: int = 0
    reordered: int = 0
    duplicated: int = 0
    truncated: int = 0
    garbage: int = 0
    lost_seqs: list[int] = field(default_factory=list)
    duplicated_seqs: list[int] = field(default_factory=list)
    truncated_seqs: list[int] = field(default_factory=list)
    garbage_seqs: list[int] = field(default_factory=list)


def run(injector: FaultInjector, n: int = N, *, first_seq: int = 0) -> list[Offer]:
    offers = []
    for i in range(n):
        now = i * CADENCE
        datagram = rtp(first_seq + i)
        offers.append(Offer(now, datagram, injector.apply(datagram, now)))
    return offers


def tally(offers: list[Offer], stats: FaultStats, reorder_delay: float) -> Tally:
    """Classify every output; needs jitter = 0 (so a reordered datagram is told by its time)."""
    t = Tally()
    garbage = set(stats.garbage_datagrams)
    for offer in offers:
        seq = int.from_bytes(offer.datagram[2:4], "big")
        real = []
        for when, data in offer.out:
            t.sent += 1
            if data == offer.datagram or (
                0 < len(data) < len(offer.datagram) and offer.datagram.startswith(data)
            ):
                real.append((when, data))
            else:
                assert data in garbage
                assert data[:12] == offer.datagram[:12]
                assert when == offer.now
                t.garbage += 1
                t.garbage_seqs.append(seq)
        if not real:
            t.lost += 1
            t.lost_seqs.append(seq)
            continue
        assert len(real) <= 2
        if len(real) == 2:
            assert real[0] == real[1]
            t.duplicated += 1
            t.duplicated_seqs.append(seq)
        when, data = real[0]
        if data != offer.datagram:
            t.truncated += 1
            t.truncated_seqs.append(seq)
        if when != offer.now:
            assert when == pytest.approx(offer.now + reorder_delay, abs=1e-12)
            t.reordered += 1
    return t


def within(count: int, trials: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p))


def test_perfect_link_changes_nothing() -> None:
    config = FaultConfig(seed=3)
    assert config.is_perfect
    injector = FaultInjector(config)
    for offer in run(injector, 200):
        assert offer.out == [(offer.now, offer.datagram)]
    assert injector.stats == FaultStats(offered=200, sent=200)


def test_same_seed_same_faults() -> None:
    config = FaultConfig(
        seed=7, loss=0.1, burst_rate=0.02, reorder=0.1, duplicate=0.1, jitter=0.01, truncate=0.1, garbage=0.1
    )
    first, second = FaultInjector(config, "a->b"), FaultInjector(config, "a->b")
    assert [o.out for o in run(first, 2000)] == [o.out for o in run(second, 2000)]
    assert first.stats == second.stats


def test_different_seeds_or_streams_differ() -> None:
    config = FaultConfig(seed=7, loss=0.1)
    baseline = FaultInjector(config, "a->b")
    other_seed = FaultInjector(FaultConfig(seed=8, loss=0.1), "a->b")
    other_stream = FaultInjector(config, "a->c")
    int_stream = FaultInjector(config, 1)
    str_stream = FaultInjector(config, "1")
    for injector in (baseline, other_seed, other_stream, int_stream, str_stream):
        run(injector, 2000)
    assert baseline.stats.lost_seqs != other_seed.stats.lost_seqs
    assert baseline.stats.lost_seqs != other_stream.stats.lost_seqs
    assert int_stream.stats.lost_seqs != str_stream.stats.lost_seqs


def test_streams_are_independent_of_interleaving() -> None:
    config = FaultConfig(
        seed=11,
        loss=0.05,
        burst_rate=0.01,
        reorder=0.05,
        duplicate=0.05,
        jitter=0.005,
        truncate=0.05,
        garbage=0.05,
    )
    alone_a, alone_b = FaultInjector(config, "a"), FaultInjector(config, "b")
    out_a = [o.out for o in run(alone_a, 3000)]
    out_b = [o.out for o in run(alone_b, 3000, first_seq=40_000)]

    mixed_a, mixed_b = FaultInjector(config, "a"), FaultInjector(config, "b")
    got_a: list[list[tuple[float, bytes]]] = []
    got_b: list[list[tuple[float, bytes]]] = []
    i = j = 0
    pattern = [0, 1, 1, 0, 0, 0, 1]  # an irregular interleaving, with extra non-RTP datagrams in stream a
    step = 0
    while i < 3000 or j < 3000:
        if (pattern[step % len(pattern)] == 0 and i < 3000) or j >= 3000:
            got_a.append(mixed_a.apply(rtp(i), i * CADENCE))
            i += 1
        else:
            got_b.append(mixed_b.apply(rtp(40_000 + j), j * CADENCE))
            j += 1
        step += 1
    assert got_a == out_a
    assert got_b == out_b
    assert mixed_a.stats == alone_a.stats and mixed_b.stats == alone_b.stats


@pytest.mark.parametrize("name", ["loss", "reorder", "duplicate", "truncate", "garbage"])
def test_single_fault_rate_matches_config(name: str) -> None:
    p = 0.05
    rate: dict[str, Any] = {name: p}
    config = replace(FaultConfig(seed=1), **rate)
    injector = FaultInjector(config, name)
    t = tally(run(injector), injector.stats, config.reorder_delay)
    stats = injector.stats
    counted = {
        "loss": t.lost,
        "reorder": t.reordered,
        "duplicate": t.duplicated,
        "truncate": t.truncated,
        "garbage": t.garbage,
    }[name]
    recorded = {
        "loss": stats.lost,
        "reorder": stats.reordered,
        "duplicate": stats.duplicated,
        "truncate": stats.truncated,
        "garbage": stats.garbage,
    }[name]
    assert counted == recorded
    assert within(counted, N, p), f"{name}: {counted} of {N}"
    assert sum(counted for counted in (t.lost, t.reordered, t.duplicated, t.truncated, t.garbage)) == counted


def test_stats_match_schedule_with_every_fault() -> None:
    config = FaultConfig(
        seed=5,
        loss=0.05,
        burst_rate=0.01,
        burst_length=4,
        reorder=0.05,
        reorder_delay=0.05,
        duplicate=0.05,
        truncate=0.05,
        garbage=0.05,
    )
    injector = FaultInjector(config, "all")
    offers = run(injector)
    stats = injector.stats
    t = tally(offers, stats, config.reorder_delay)

    assert stats.offered == N and stats.passed_through == 0
    assert t.sent == stats.sent == N - stats.total_lost + stats.duplicated + stats.garbage
    assert t.lost == stats.total_lost
    assert sorted(t.lost_seqs) == sorted(stats.lost_seqs + stats.burst_lost_seqs)
    assert set(t.lost_seqs) == stats.all_lost_seqs
    assert (t.reordered, t.duplicated, t.truncated, t.garbage) == (
        stats.reordered,
        stats.duplicated,
        stats.truncated,
        stats.garbage,
    )
    assert t.duplicated_seqs == stats.duplicated_seqs
    assert t.truncated_seqs == stats.truncated_seqs
    assert t.garbage_seqs == stats.garbage_seqs
    assert len(stats.reordered_seqs) == stats.reordered

    # Each rate, over the datagrams it applies to, within 4 sigma.
    trials_for_bursts = N - stats.lost_in_bursts + stats.bursts
    assert within(stats.bursts, trials_for_bursts, 0.01)
    assert within(stats.lost, N - stats.lost_in_bursts, 0.05)
    delivered = N - stats.total_lost
    for count in (stats.reordered, stats.duplicated, stats.truncated):
        assert within(count, delivered, 0.05)
    assert within(stats.garbage, N, 0.05)


def test_bursts_lose_exactly_burst_length_consecutive_datagrams() -> None:
    length = 5
    injector = FaultInjector(FaultConfig(seed=2, burst_rate=0.01, burst_length=length), "bursts")
    offers = run(injector)
    lost = [i for i, offer in enumerate(offers) if not offer.out]
    assert lost, "no burst happened"
    runs: list[list[int]] = []
    for i in lost:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    for k, lost_run in enumerate(runs):
        # back-to-back bursts merge into one run; only the very last may be cut off by the end of the input
        if lost_run[-1] != N - 1:
            assert len(lost_run) % length == 0, (k, lost_run)
    stats = injector.stats
    assert stats.lost == 0 and stats.lost_in_bursts == len(lost)
    assert stats.bursts == math.ceil(len(lost) / length)
    assert stats.burst_lost_seqs == lost  # seq == index here
    assert within(stats.bursts, N - stats.lost_in_bursts + stats.bursts, 0.01)


def test_a_datagram_is_lost_at_most_once() -> None:
    injector = FaultInjector(FaultConfig(seed=4, loss=1.0, burst_rate=0.3, burst_length=2))
    run(injector, 1000)
    stats = injector.stats
    assert stats.lost + stats.lost_in_bursts == 1000 == stats.total_lost
    assert not set(stats.lost_seqs) & set(stats.burst_lost_seqs)
    assert stats.sent == 0


@pytest.mark.parametrize("jitter", [0.0, 0.01])
def test_reordered_datagrams_arrive_after_later_ones_within_the_bound(jitter: float) -> None:
    delay = 0.045
    injector = FaultInjector(FaultConfig(seed=9, reorder=0.1, reorder_delay=delay, jitter=jitter), "reorder")
    offers = run(injector, 5000)
    arrivals = sorted(
        (when, int.from_bytes(data[2:4], "big")) for offer in offers for when, data in offer.out
    )
    position = {seq: k for k, (_, seq) in enumerate(arrivals)}
    reordered = set(injector.stats.reordered_seqs)
    assert reordered
    for seq, offer in enumerate(offers):
        ((when, _),) = offer.out
        if seq in reordered:
            assert delay - EPS <= when - offer.now <= delay + jitter + EPS
        else:
            assert 0 <= when - offer.now <= jitter + EPS
    if jitter == 0:
        # held back 45 ms at a 20 ms cadence: overtaken by the next two datagrams unless they are held too
        for seq in reordered:
            overtaken_by = [
                later for later in (seq + 1, seq + 2) if later < len(offers) and later not in reordered
            ]
            assert all(position[later] < position[seq] for later in overtaken_by)
        overtaken = [seq for seq in reordered if seq + 1 < len(offers) and position[seq + 1] < position[seq]]
        assert len(overtaken) >= 0.85 * len(reordered)


def test_jitter_is_uniform_in_range() -> None:
    jitter = 0.03
    injector = FaultInjector(FaultConfig(seed=6, jitter=jitter))
    delays = [offer.out[0][0] - offer.now for offer in run(injector)]
    assert all(0 <= d <= jitter + EPS for d in delays)
    mean = sum(delays) / len(delays)
    assert abs(mean - jitter / 2) < 4 * jitter / math.sqrt(12 * len(delays))


def test_duplicates_are_byte_identical_and_simultaneous() -> None:
    injector = FaultInjector(FaultConfig(seed=8, duplicate=0.2, truncate=0.2, jitter=0.01))
    offers = run(injector, 3000)
    duplicated = set(injector.stats.duplicated_seqs)
    assert duplicated
    for seq, offer in enumerate(offers):
        if seq in duplicated:
            assert len(offer.out) == 2 and offer.out[0] == offer.out[1]
        else:
            assert len(offer.out) == 1


def test_truncation_shortens_to_a_prefix() -> None:
    injector = FaultInjector(FaultConfig(seed=10, truncate=0.3))
    offers = run(injector, 3000)
    truncated = set(injector.stats.truncated_seqs)
    lengths = set()
    for seq, offer in enumerate(offers):
        ((_, data),) = offer.out
        if seq in truncated:
            assert 1 <= len(data) < len(offer.datagram) and offer.datagram.startswith(data)
            lengths.add(len(data))
        else:
            assert data == offer.datagram
    assert min(lengths) < 12 < max(lengths)  # some lose the RTP header, some keep it


def test_garbage_is_recognisable() -> None:
    injector = FaultInjector(FaultConfig(seed=12, garbage=0.2, loss=0.2))
    offers = run(injector, 3000)
    stats = injector.stats
    assert len(stats.garbage_datagrams) == stats.garbage == len(stats.garbage_seqs) > 0
    injected = [data for offer in offers for _, data in offer.out if data != offer.datagram]
    assert injected == stats.garbage_datagrams
    for data, seq in zip(stats.garbage_datagrams, stats.garbage_seqs, strict=True):
        assert data[:12] == rtp(seq)[:12] and data != rtp(seq) and len(data) == len(rtp(seq))
    # garbage does not depend on the real datagram being delivered
    assert set(stats.garbage_seqs) & set(stats.lost_seqs)


@pytest.mark.parametrize(
    "datagram",
    [
        b"\x00\x00\x00\x00\x00\x00\x00\x01",  # keep-alive
        struct.pack(">HHI", 2, 70, 0x1234) + bytes(66),  # IP discovery response
        bytes([0x81, 200]) + bytes(26),  # RTCP sender report
        bytes([0x81, 204]) + bytes(10),  # RTCP APP
        b"\x80\x78\x00\x01",  # too short for RTP
        b"\x40" + bytes(20),  # RTP version 1
    ],
)
def test_non_rtp_passes_through_untouched(datagram: bytes) -> None:
    config = FaultConfig(
        seed=1, loss=1.0, burst_rate=1.0, duplicate=1.0, jitter=0.05, truncate=1.0, garbage=1.0, reorder=1.0
    )
    injector = FaultInjector(config)
    assert injector.apply(datagram, 1.5) == [(1.5, datagram)]
    assert injector.stats == FaultStats(offered=1, passed_through=1, sent=1)


def test_non_rtp_datagrams_do_not_shift_the_rtp_faults() -> None:
    config = FaultConfig(seed=13, loss=0.2, jitter=0.01)
    plain, mixed = FaultInjector(config), FaultInjector(config)
    expected = [o.out for o in run(plain, 500)]
    got = []
    for i in range(500):
        mixed.apply(b"\0" * 8, i * CADENCE)
        got.append(mixed.apply(rtp(i), i * CADENCE))
    assert got == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": -0.1}, "loss"),
        ({"loss": 1.5}, "loss"),
        ({"burst_rate": 2.0}, "burst_rate"),
        ({"reorder": float("nan")}, "reorder"),
        ({"duplicate": -1e-9}, "duplicate"),
        ({"truncate": 1.01}, "truncate"),
        ({"garbage": 7}, "garbage"),
        ({"jitter": -0.01}, "jitter"),
        ({"jitter": float("inf")}, "jitter"),
        ({"reorder_delay": -0.01}, "reorder_delay"),
        ({"reorder_delay": MAX_REORDER_DELAY + 0.001}, "reorder_delay"),
        ({"burst_length": 0}, "burst_length"),
        ({"burst_length": 2.5}, "burst_length"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_invalid_config_raises(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=rf"FaultConfig\.{message}\b"):
        FaultConfig(**kwargs)  # type: ignore[arg-type]


def test_edge_values_are_valid() -> None:
    FaultConfig(loss=0.0, reorder=1.0, reorder_delay=MAX_REORDER_DELAY, jitter=0.0, burst_length=1)


probability = st.floats(0.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**64),
    loss=probability,
    burst_rate=st.floats(0.0, 0.3),
    burst_length=st.integers(1, 6),
    reorder=probability,
    duplicate=probability,
    jitter=st.floats(0.0, 0.1),
    truncate=probability,
    garbage=probability,
    kinds=st.lists(st.sampled_from(["rtp", "keepalive", "rtcp"]), min_size=1, max_size=200),
)
def test_stats_always_account_for_the_outputs(
    seed: int,
    loss: float,
    burst_rate: float,
    burst_length: int,
    reorder: float,
    duplicate: float,
    jitter: float,
    truncate: float,
    garbage: float,
    kinds: list[str],
) -> None:
    config = FaultConfig(
        seed=seed,
        loss=loss,
        burst_rate=burst_rate,
        burst_length=burst_length,
        reorder=reorder,
        duplicate=duplicate,
        jitter=jitter,
        truncate=truncate,
        garbage=garbage,
    )
    injector = FaultInjector(config, "prop")
    sent = 0
    for i, kind in enumerate(kinds):
        datagram = {"rtp": rtp(i), "keepalive": b"\1" * 8, "rtcp": bytes([0x80, 201]) + bytes(30)}[kind]
        now = i * CADENCE
        out = injector.apply(datagram, now)
        assert [when for when, _ in out] == sorted(when for when, _ in out)
        assert all(now <= when <= now + jitter + config.reorder_delay + EPS for when, _ in out)
        sent += len(out)
    stats = injector.stats
    rtp_offered = kinds.count("rtp")
    assert stats.offered == len(kinds) and stats.passed_through == len(kinds) - rtp_offered
    assert stats.sent == sent == stats.offered - stats.total_lost + stats.duplicated + stats.garbage
    assert stats.lost_in_bursts <= stats.bursts * burst_length
    assert stats.bursts <= stats.lost_in_bursts
    assert len(stats.lost_seqs) == stats.lost and len(stats.burst_lost_seqs) == stats.lost_in_bursts
    assert stats.reordered + stats.total_lost <= rtp_offered
