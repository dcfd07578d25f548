"""The UDP media relay of the loopback Discord.

Every member's RTP and RTCP is opened with the sender's transport key and re-sealed, for each
other member of the call, with that member's key and nonce counter; the payload (the DAVE layer)
is never touched, as on Discord. Between sealing and sending sits a seeded
:class:`~listening_core.testing.faults.FaultInjector` per sender→recipient stream. The relay keeps
a log of what it sent and what it injected, so tests can compare a receiver against the truth.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..errors import PacketError
from ..rtp import DiscoveryPacket, PacketKind, RtpHeader, classify
from .faults import FaultConfig, FaultInjector

if TYPE_CHECKING:
    from ..crypto import TransportCipher

_log = logging.getLogger(__name__)

__all__ = ["RelayStats", "SentFrame", "UdpRelay"]


class Endpoint(Protocol):
    """A call participant as the relay sees it (a real client's session or a virtual member)."""

    user_id: int
    ssrc: int
    video_ssrc: int
    joined: bool
    udp_addr: tuple[str, int] | None
    cipher: TransportCipher | None

    @property
    def is_virtual(self) -> bool: ...

    def next_counter(self) -> int:
        """The next transport nonce counter for a packet sealed for this participant."""
        ...


class Roster(Protocol):
    """What the relay needs from the call: who is in it."""

    def endpoints(self) -> list[Endpoint]:
        """Everyone in the call."""
        ...

    def endpoint_by_ssrc(self, ssrc: int) -> Endpoint | None:
        """The participant sending with ``ssrc`` (audio or video), or None."""
        ...


@dataclass(frozen=True, slots=True)
class SentFrame:
    """One RTP packet the relay sent (before faults) from a sender to a recipient."""

    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes  # the DAVE-layer frame, exactly as forwarded
    time: float  # loop time when it was sealed and handed to the fault injector
    marker: bool = False


@dataclass
class RelayStats:
    """Counters of what the relay received and refused."""

    received: int = 0
    forwarded_rtp: int = 0
    forwarded_rtcp: int = 0
    discovery: int = 0
    keepalives: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)


class UdpRelay(asyncio.DatagramProtocol):
    """One voice server's UDP socket: IP discovery, and forwarding between the call's members."""

    def __init__(self, roster: Roster, faults: FaultConfig, *, record: bool = True) -> None:
        self._roster = roster
        self.faults = faults
        self.record = record
        self.stats: RelayStats = RelayStats()
        self.transport: asyncio.DatagramTransport | None = None
        self._injectors: dict[tuple[int, int], FaultInjector] = {}
        #: (sender user id, recipient user id) -> what was sent, in order
        self.sent: dict[tuple[int, int], list[SentFrame]] = collections.defaultdict(list)
        self._by_addr: dict[tuple[str, int], Endpoint] = {}

    # -- asyncio plumbing --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the relay's UDP socket is bound to (once it is open)."""
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Close the UDP socket; datagrams the fault injectors delayed past this are not sent."""
        if self.transport is not None:
            self.transport.close()

    def forget(self, endpoint: Endpoint) -> None:
        """Stop routing datagrams from ``endpoint``'s address (it left the call)."""
        if endpoint.udp_addr is not None and self._by_addr.get(endpoint.udp_addr) is endpoint:
            del self._by_addr[endpoint.udp_addr]

    def injector(self, sender_id: int, recipient_id: int) -> FaultInjector:
        """The fault injector of one sender→recipient stream (made on first use)."""
        key = (sender_id, recipient_id)
        found = self._injectors.get(key)
        if found is None:
            found = self._injectors[key] = FaultInjector(self.faults, f"{sender_id}->{recipient_id}")
        return found

    # -- receiving ---------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.stats.received += 1
        try:
            kind = classify(data)
            if kind is PacketKind.DISCOVERY:
                self._discovery(data, addr)
            elif kind is PacketKind.KEEPALIVE:
                self.stats.keepalives += 1
            elif kind is PacketKind.RTP:
                self._rtp(data, addr)
            elif kind is PacketKind.RTCP:
                self._rtcp(data, addr)
            else:
                self.stats.dropped["unknown-kind"] += 1
        except PacketError as exc:
            self.stats.dropped[exc.reason] += 1
        except Exception:  # never let one datagram stop the relay
            _log.exception("loopback relay: unexpected error on a datagram from %s", addr)
            self.stats.dropped["relay-error"] += 1

    def _discovery(self, data: bytes, addr: tuple[str, int]) -> None:
        request = DiscoveryPacket.parse(data)
        if request.type != 1:
            self.stats.dropped["discovery-response"] += 1
            return
        endpoint = self._roster.endpoint_by_ssrc(request.ssrc)
        if endpoint is None or endpoint.is_virtual:
            self.stats.dropped["discovery-unknown-ssrc"] += 1
            return
        self.stats.discovery += 1
        if endpoint.udp_addr is not None:
            self._by_addr.pop(endpoint.udp_addr, None)
        endpoint.udp_addr = addr
        self._by_addr[addr] = endpoint
        self._send(DiscoveryPacket.response(request.ssrc, addr[0], addr[1]).serialize(), addr)

    def _sender(self, addr: tuple[str, int]) -> Endpoint | None:
        endpoint = self._by_addr.get(addr)
        if endpoint is None:
            # A client that skipped IP discovery is found by the address it announced.
            for candidate in self._roster.endpoints():
                if candidate.udp_addr == addr and not candidate.is_virtual:
                    self._by_addr[addr] = candidate
                    return candidate
        return endpoint

    def _rtp(self, data: bytes, addr: tuple[str, int]) -> None:
        sender = self._sender(addr)
        if sender is None or sender.cipher is None or not sender.joined:
            self.stats.dropped["unknown-source"] += 1
            return
        header, payload = sender.cipher.open_rtp(data)
        if header.ssrc not in (sender.ssrc, sender.video_ssrc) or header.ssrc == 0:
            self.stats.dropped["unknown-ssrc"] += 1
            return
        self.forward_rtp(sender, header, payload)

    def _rtcp(self, data: bytes, addr: tuple[str, int]) -> None:
        sender = self._sender(addr)
        if sender is None or sender.cipher is None or not sender.joined:
            self.stats.dropped["unknown-source"] += 1
            return
        plain = sender.cipher.open_rtcp(data)
        self.forward_rtcp(sender, plain)

    # -- forwarding --------------------------------------------------------------------------

    def forward_rtp(self, sender: Endpoint, header: RtpHeader, payload: bytes, *, padding: int = 0) -> None:
        """Seal ``payload`` under ``header`` for every other member and send it through the faults."""
        self.stats.forwarded_rtp += 1
        loop = asyncio.get_running_loop()
        now = loop.time()
        for recipient in self._roster.endpoints():
            if recipient is sender or recipient.is_virtual or not recipient.joined:
                continue
            if recipient.udp_addr is None or recipient.cipher is None:
                continue
            sealed = recipient.cipher.seal_rtp(
                header,
                payload,
                extension_body=header.extension_body,
                padding=padding,
                counter=recipient.next_counter(),
            )
            if self.record:
                self.sent[(sender.user_id, recipient.user_id)].append(
                    SentFrame(header.sequence, header.timestamp, header.ssrc, payload, now, header.marker)
                )
            self._schedule(
                self.injector(sender.user_id, recipient.user_id).apply(sealed, now), recipient.udp_addr
            )

    def forward_rtcp(self, sender: Endpoint, plain: bytes) -> None:
        """Re-seal a plain RTCP packet for every other member (RTCP is not subject to faults)."""
        self.stats.forwarded_rtcp += 1
        for recipient in self._roster.endpoints():
            if recipient is sender or recipient.is_virtual or not recipient.joined:
                continue
            if recipient.udp_addr is None or recipient.cipher is None:
                continue
            self._send(recipient.cipher.seal_rtcp(plain, recipient.next_counter()), recipient.udp_addr)

    def send_raw(self, data: bytes, recipient: Endpoint) -> None:
        """Send bytes to a member as they are (for tests that forge datagrams)."""
        if recipient.udp_addr is not None:
            self._send(data, recipient.udp_addr)

    def _schedule(self, plan: list[tuple[float, bytes]], addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for when, data in plan:
            if when <= now:
                self._send(data, addr)
            else:
                loop.call_at(when, self._send, data, addr)

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)
