"""Seeded, reproducible network faults for the loopback's UDP relay (sans-I/O: no sockets, no clock).

The relay hands every datagram it would forward from one member to another to a `FaultInjector`
for that sender→receiver stream and sends what `FaultInjector.apply` returns, at the times it
returns. Everything is decided by the seed and the stream name, so a failing test replays exactly.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass, field

from ..rtp import RTP_HEADER_SIZE, PacketKind, classify

__all__ = ["MAX_REORDER_DELAY", "FaultConfig", "FaultInjector", "FaultStats"]

_log = logging.getLogger(__name__)

MAX_REORDER_DELAY = 0.06
"""Largest allowed `FaultConfig.reorder_delay` in seconds."""

_PROBABILITIES = ("loss", "burst_rate", "reorder", "duplicate", "truncate", "garbage")
# Uniform draws taken for every RTP datagram, used or not, so that the fate of datagram n depends
# only on (seed, stream, n) and never on the outcome of earlier datagrams.
_DRAWS_PER_DATAGRAM = 9


@dataclass(frozen=True)
class FaultConfig:
    """What can go wrong on one link, and how often. All zero (the default) is a perfect link.

    Probabilities are per offered RTP datagram; delays are in seconds.
    """

    seed: int = 0
    loss: float = 0.0
    """Probability that a datagram is lost on its own (outside a burst)."""
    burst_rate: float = 0.0
    """Probability that a burst of losses starts at a datagram that is not already in a burst."""
    burst_length: int = 3
    """Consecutive RTP datagrams of the stream lost by each burst, the first one included."""
    reorder: float = 0.0
    """Probability that a datagram is held back by `reorder_delay`, so that later ones overtake it."""
    reorder_delay: float = 0.04
    """Extra delay of a reordered datagram; at most `MAX_REORDER_DELAY`."""
    duplicate: float = 0.0
    """Probability that a delivered datagram is delivered twice (byte-identical, same instant)."""
    jitter: float = 0.0
    """Largest extra delay of a datagram; each one gets its own, uniform in [0, jitter]."""
    truncate: float = 0.0
    """Probability that a delivered datagram is cut to a length uniform in [1, len - 1]."""
    garbage: float = 0.0
    """Probability that a forged datagram is injected next to a real one (see `FaultInjector`)."""

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"FaultConfig.seed must be an int, got {self.seed!r}")
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultConfig.{name} is a probability and must lie in [0, 1], got {value!r}")
        if (
            isinstance(self.burst_length, bool)
            or not isinstance(self.burst_length, int)
            or self.burst_length < 1
        ):
            raise ValueError(f"FaultConfig.burst_length must be an int >= 1, got {self.burst_length!r}")
        for name in ("jitter", "reorder_delay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"FaultConfig.{name} is a delay in seconds and must be >= 0, got {value!r}")
        if self.reorder_delay > MAX_REORDER_DELAY:
            raise ValueError(
                f"FaultConfig.reorder_delay must be at most {MAX_REORDER_DELAY} s "
                f"(a receiver's jitter buffer is not expected to wait longer), got {self.reorder_delay!r}"
            )

    @property
    def is_perfect(self) -> bool:
        """True when no fault can happen, so a relay may skip the injector altogether."""
        return self.jitter == 0 and all(getattr(self, name) == 0 for name in _PROBABILITIES)


@dataclass
class FaultStats:
    """Everything one `FaultInjector` did, as counts and as RTP sequence numbers.

    Counts are of datagrams. The sequence lists are in the order the datagrams were offered; RTP
    sequence numbers wrap at 65536, so a run longer than that repeats numbers.
    """

    offered: int = 0
    """Datagrams given to `apply`, RTP or not."""
    passed_through: int = 0
    """Non-RTP datagrams (keep-alives, IP discovery, RTCP, anything else), forwarded untouched."""
    sent: int = 0
    """Datagrams scheduled for delivery: every entry of every list `apply` returned."""
    lost: int = 0
    """RTP datagrams lost on their own (uniform loss)."""
    lost_in_bursts: int = 0
    """RTP datagrams lost in bursts."""
    bursts: int = 0
    """Bursts started."""
    reordered: int = 0
    """Delivered RTP datagrams held back by `reorder_delay`."""
    duplicated: int = 0
    """Delivered RTP datagrams sent twice (each counts one extra datagram in `sent`)."""
    truncated: int = 0
    """Delivered RTP datagrams cut short (a duplicate of one is the same short copy)."""
    garbage: int = 0
    """Forged datagrams injected."""
    lost_seqs: list[int] = field(default_factory=list)
    burst_lost_seqs: list[int] = field(default_factory=list)
    reordered_seqs: list[int] = field(default_factory=list)
    duplicated_seqs: list[int] = field(default_factory=list)
    truncated_seqs: list[int] = field(default_factory=list)
    garbage_seqs: list[int] = field(default_factory=list)
    """Sequence numbers of the real datagrams the garbage went next to (and whose header it copies)."""
    garbage_datagrams: list[bytes] = field(default_factory=list)
    """The injected datagrams themselves, so a test can tell them from real ones."""

    @property
    def total_lost(self) -> int:
        """RTP datagrams never delivered, uniform and burst losses together."""
        return self.lost + self.lost_in_bursts

    @property
    def all_lost_seqs(self) -> set[int]:
        """Sequence numbers of every lost datagram, uniform and burst losses together."""
        return {*self.lost_seqs, *self.burst_lost_seqs}


def _rtp_sequence(datagram: bytes) -> int | None:
    """The RTP sequence number of `datagram`, or None when `classify` says it is not RTP."""
    if classify(datagram) is not PacketKind.RTP:
        return None
    return int.from_bytes(datagram[2:4], "big")


def _stream_seed(seed: int, stream: str | int) -> int:
    # repr() keeps the stream "1" apart from the stream 1.
    digest = hashlib.sha256(f"{seed}\x00{stream!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class FaultInjector:
    """Applies a `FaultConfig` to one stream of datagrams (say one sender→receiver pair).

    Each injector owns a random generator derived from ``(config.seed, stream)``: the same seed and
    stream give the same faults, and how the relay interleaves calls across streams changes nothing.

    Semantics of `apply`, in this order:

    - Only RTP datagrams (as `listening_core.rtp.classify` tells them: version 2, at least 12 bytes,
      second byte not an RTCP type 200..204) are subject to faults. Anything else (keep-alives, IP
      discovery, RTCP) is returned untouched at `now` and counted in `passed_through`.
    - Loss: a datagram inside a burst is lost; otherwise a burst may start at it (it and the next
      ``burst_length - 1`` RTP datagrams are lost; bursts never overlap); otherwise it may be lost on
      its own. A datagram is lost at most once and counted in exactly one of `lost` / `lost_in_bursts`.
    - A delivered datagram goes at ``now + U(0, jitter)``, plus `reorder_delay` if it is reordered.
      Jitter larger than the sending interval reorders on its own; only `reorder_delay` counts as
      `reordered`.
    - It may be truncated to a length uniform in [1, len - 1], then duplicated: the copy is
      byte-identical to what was delivered (truncated or not) and goes at the same instant.
    - Independently of the datagram's own fate, a forged datagram may be injected at
      ``now + U(0, jitter)``: the real datagram's 12-byte RTP header (same SSRC, sequence and
      timestamp) followed by random bytes, as long as the real one (at least 16 bytes of body). It
      reaches the same per-SSRC path as the real one and must fail decryption there.

    The returned list is sorted by delivery time (stable, so a datagram precedes its duplicate).
    """

    __slots__ = ("_burst_left", "_rng", "config", "stats", "stream")

    def __init__(self, config: FaultConfig, stream: str | int = "") -> None:
        self.config: FaultConfig = config
        self.stream: str | int = stream
        self.stats: FaultStats = FaultStats()
        self._rng = random.Random(_stream_seed(config.seed, stream))
        self._burst_left = 0

    def __repr__(self) -> str:
        return f"<FaultInjector stream={self.stream!r} config={self.config!r}>"

    def apply(self, datagram: bytes, now: float) -> list[tuple[float, bytes]]:
        """What to send for `datagram` offered at `now`: ``(absolute time, bytes)`` pairs, [] when lost."""
        stats = self.stats
        stats.offered += 1
        seq = _rtp_sequence(datagram)
        if seq is None:
            stats.passed_through += 1
            stats.sent += 1
            return [(now, datagram)]

        cfg = self.config
        rng = self._rng
        u_burst, u_loss, u_jitter, u_reorder, u_truncate, u_cut, u_duplicate, u_garbage, u_garbage_jitter = (
            rng.random() for _ in range(_DRAWS_PER_DATAGRAM)
        )
        garbage_seed = rng.getrandbits(64)

        out: list[tuple[float, bytes]] = []
        if self._burst_left > 0:
            self._burst_left -= 1
            stats.lost_in_bursts += 1
            stats.burst_lost_seqs.append(seq)
        elif u_burst < cfg.burst_rate:
            self._burst_left = cfg.burst_length - 1
            stats.bursts += 1
            stats.lost_in_bursts += 1
            stats.burst_lost_seqs.append(seq)
        elif u_loss < cfg.loss:
            stats.lost += 1
            stats.lost_seqs.append(seq)
        else:
            when = now + u_jitter * cfg.jitter
            if u_reorder < cfg.reorder:
                when += cfg.reorder_delay
                stats.reordered += 1
                stats.reordered_seqs.append(seq)
            data = datagram
            if u_truncate < cfg.truncate:
                data = datagram[: 1 + int(u_cut * (len(datagram) - 1))]
                stats.truncated += 1
                stats.truncated_seqs.append(seq)
            out.append((when, data))
            if u_duplicate < cfg.duplicate:
                out.append((when, data))
                stats.duplicated += 1
                stats.duplicated_seqs.append(seq)

        if u_garbage < cfg.garbage:
            forged = _forge(datagram, garbage_seed)
            out.append((now + u_garbage_jitter * cfg.jitter, forged))
            stats.garbage += 1
            stats.garbage_seqs.append(seq)
            stats.garbage_datagrams.append(forged)

        out.sort(key=lambda item: item[0])
        stats.sent += len(out)
        return out


def _forge(datagram: bytes, seed: int) -> bytes:
    body_size = max(len(datagram) - RTP_HEADER_SIZE, 16)
    return datagram[:RTP_HEADER_SIZE] + random.Random(seed).randbytes(body_size)
