"""Just enough MLS (RFC 9420) wire encoding for a loopback DAVE voice gateway.

The voice gateway is the MLS group's only *external sender*: it signs Add / Remove proposals with its
own P-256 key and inspects (but never decrypts) the commits members send back.  Everything here is
pure byte manipulation; malformed input always raises :class:`MLSFormatError`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

_log = logging.getLogger(__name__)

__all__ = [
    "CIPHERSUITE_P256",
    "CONTENT_APPLICATION",
    "CONTENT_COMMIT",
    "CONTENT_PROPOSAL",
    "CREDENTIAL_BASIC",
    "MLS_VERSION_10",
    "PROPOSAL_ADD",
    "PROPOSAL_REMOVE",
    "SENDER_EXTERNAL",
    "SENDER_MEMBER",
    "WIRE_PRIVATE",
    "WIRE_PUBLIC",
    "WIRE_WELCOME",
    "CommitInfo",
    "ExternalSender",
    "KeyPackageInfo",
    "LeafNodeInfo",
    "MLSFormatError",
    "ProposalInfo",
    "ProposalMessageInfo",
    "Reader",
    "WelcomeInfo",
    "encode_varint",
    "parse_commit_message",
    "parse_key_package",
    "parse_proposal_message",
    "parse_welcome",
    "proposal_ref",
    "proposals_payload",
    "ref_hash",
    "revoke_payload",
    "split_commit_welcome",
    "vl",
]

MLS_VERSION_10 = 1
CIPHERSUITE_P256 = 2  # MLS_128_DHKEMP256_AES128GCM_SHA256_P256

WIRE_PUBLIC = 1
WIRE_PRIVATE = 2
WIRE_WELCOME = 3
WIRE_GROUP_INFO = 4
WIRE_KEY_PACKAGE = 5

SENDER_MEMBER = 1
SENDER_EXTERNAL = 2
SENDER_NEW_MEMBER_PROPOSAL = 3
SENDER_NEW_MEMBER_COMMIT = 4

CONTENT_APPLICATION = 1
CONTENT_PROPOSAL = 2
CONTENT_COMMIT = 3

PROPOSAL_ADD = 1
PROPOSAL_UPDATE = 2
PROPOSAL_REMOVE = 3
PROPOSAL_PSK = 4
PROPOSAL_REINIT = 5
PROPOSAL_EXTERNAL_INIT = 6
PROPOSAL_GROUP_CONTEXT_EXTENSIONS = 7

PROPOSAL_OR_REF_PROPOSAL = 1
PROPOSAL_OR_REF_REFERENCE = 2

CREDENTIAL_BASIC = 1
CREDENTIAL_X509 = 2

LEAF_SOURCE_KEY_PACKAGE = 1
LEAF_SOURCE_UPDATE = 2
LEAF_SOURCE_COMMIT = 3

_LABEL_PREFIX = b"MLS 1.0 "
_MAX_VARINT = (1 << 30) - 1


class MLSFormatError(ValueError):
    """Raised for any malformed or unexpected MLS / DAVE binary input."""


# --------------------------------------------------------------------------------------------------
# Variable-length vectors (RFC 9420 section 2.1.2)


def encode_varint(n: int) -> bytes:
    """Encode ``n`` as an RFC 9420 variable-length integer (1, 2 or 4 bytes, minimal)."""
    if n < 0 or n > _MAX_VARINT:
        raise MLSFormatError(f"length {n} cannot be encoded as an MLS varint")
    if n < 1 << 6:
        return bytes([n])
    if n < 1 << 14:
        return (n | 0x4000).to_bytes(2, "big")
    return (n | 0x8000_0000).to_bytes(4, "big")


def vl(data: bytes) -> bytes:
    """Return ``data`` prefixed with its RFC 9420 varint length (an ``opaque<V>``)."""
    return encode_varint(len(data)) + data


class Reader:
    """A bounds-checked cursor over MLS/TLS-encoded bytes; every failure is an :class:`MLSFormatError`."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str = "MLS data", pos: int = 0) -> None:
        self.data: bytes = bytes(data)
        self.pos: int = pos
        self.what: str = what

    @property
    def remaining(self) -> int:
        """Number of unread bytes."""
        return len(self.data) - self.pos

    def at_end(self) -> bool:
        """True when every byte was consumed."""
        return self.pos >= len(self.data)

    def expect_end(self) -> None:
        """Raise unless every byte was consumed."""
        if self.remaining:
            raise MLSFormatError(f"{self.what}: {self.remaining} trailing byte(s) at offset {self.pos}")

    def take(self, n: int, field: str = "field") -> bytes:
        """Read exactly ``n`` bytes."""
        if n < 0 or self.pos + n > len(self.data):
            raise MLSFormatError(
                f"{self.what}: truncated {field} at offset {self.pos} (need {n} bytes, have {self.remaining})"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, size: int, field: str = "integer") -> int:
        """Read a big-endian unsigned integer of ``size`` bytes."""
        return int.from_bytes(self.take(size, field), "big")

    def u8(self, field: str = "u8") -> int:
        """Read a uint8."""
        return self.uint(1, field)

    def u16(self, field: str = "u16") -> int:
        """Read a big-endian uint16."""
        return self.uint(2, field)

    def u32(self, field: str = "u32") -> int:
        """Read a big-endian uint32."""
        return self.uint(4, field)

    def u64(self, field: str = "u64") -> int:
        """Read a big-endian uint64."""
        return self.uint(8, field)

    def varint(self, field: str = "length") -> int:
        """Read an RFC 9420 variable-length integer (minimal encoding required)."""
        start = self.pos
        first = self.u8(field)
        prefix = first >> 6
        if prefix == 0:
            return first
        if prefix == 1:
            value = ((first & 0x3F) << 8) | self.u8(field)
            minimum = 1 << 6
        elif prefix == 2:
            value = ((first & 0x3F) << 24) | self.uint(3, field)
            minimum = 1 << 14
        else:
            raise MLSFormatError(f"{self.what}: invalid varint prefix 0b11 for {field} at offset {start}")
        if value < minimum:
            raise MLSFormatError(f"{self.what}: non-minimal varint for {field} at offset {start}")
        return value

    def opaque(self, field: str = "vector") -> bytes:
        """Read an ``opaque<V>``: a varint length followed by that many bytes."""
        n = self.varint(f"{field} length")
        return self.take(n, field)

    def sub(self, field: str = "vector") -> Reader:
        """Read an ``opaque<V>`` and return a reader over its content."""
        return Reader(self.opaque(field), f"{self.what} {field}")


# --------------------------------------------------------------------------------------------------
# Parsed structures


@dataclass(frozen=True)
class LeafNodeInfo:
    """The fields of an MLS LeafNode the voice gateway cares about."""

    encryption_key: bytes
    signature_key: bytes
    credential_type: int
    identity: bytes | None
    source: int

    @property
    def user_id(self) -> int | None:
        """The Discord user id in a basic credential (8-byte big-endian identity), else None."""
        if self.credential_type != CREDENTIAL_BASIC or self.identity is None or len(self.identity) != 8:
            return None
        return int.from_bytes(self.identity, "big")


@dataclass(frozen=True)
class KeyPackageInfo:
    """A parsed MLS KeyPackage."""

    version: int
    cipher_suite: int
    init_key: bytes
    leaf: LeafNodeInfo
    not_before: int | None
    not_after: int | None

    @property
    def user_id(self) -> int | None:
        """The user id in the leaf node's basic credential."""
        return self.leaf.user_id


@dataclass(frozen=True)
class ProposalInfo:
    """One parsed Proposal (only Add and Remove have details)."""

    proposal_type: int
    key_package: KeyPackageInfo | None = None
    removed: int | None = None


@dataclass(frozen=True)
class CommitInfo:
    """A commit MLSMessage as seen by the delivery service.

    ``proposal_refs`` / ``inline_proposals`` are None for a PrivateMessage (contents are encrypted).
    """

    wire_format: int
    group_id: bytes
    epoch: int
    sender_type: int | None
    sender_index: int | None
    proposal_refs: tuple[bytes, ...] | None
    inline_proposals: tuple[ProposalInfo, ...] | None
    has_path: bool | None
    raw: bytes


@dataclass(frozen=True)
class WelcomeInfo:
    """A parsed (bare) MLS Welcome."""

    cipher_suite: int
    secrets: int
    raw: bytes


@dataclass(frozen=True)
class ProposalMessageInfo:
    """A parsed PublicMessage carrying a proposal."""

    group_id: bytes
    epoch: int
    sender_type: int
    sender_index: int | None
    proposal: ProposalInfo
    signature: bytes


# --------------------------------------------------------------------------------------------------
# Structure walkers


def _read_credential(r: Reader) -> tuple[int, bytes | None]:
    ctype = r.u16("credential_type")
    if ctype == CREDENTIAL_BASIC:
        return ctype, r.opaque("identity")
    if ctype == CREDENTIAL_X509:
        r.opaque("certificates")
        return ctype, None
    raise MLSFormatError(f"{r.what}: unsupported credential type {ctype}")


def _read_leaf_node(r: Reader) -> tuple[LeafNodeInfo, int | None, int | None]:
    encryption_key = r.opaque("encryption_key")
    signature_key = r.opaque("signature_key")
    ctype, identity = _read_credential(r)
    for name in ("versions", "cipher_suites", "extensions", "proposals", "credentials"):
        r.opaque(f"capabilities.{name}")
    source = r.u8("leaf_node_source")
    not_before = not_after = None
    if source == LEAF_SOURCE_KEY_PACKAGE:
        not_before = r.u64("lifetime.not_before")
        not_after = r.u64("lifetime.not_after")
    elif source == LEAF_SOURCE_COMMIT:
        r.opaque("parent_hash")
    elif source != LEAF_SOURCE_UPDATE:
        raise MLSFormatError(f"{r.what}: invalid leaf_node_source {source}")
    r.opaque("leaf extensions")
    r.opaque("leaf signature")
    leaf = LeafNodeInfo(encryption_key, signature_key, ctype, identity, source)
    return leaf, not_before, not_after


def _read_key_package(r: Reader) -> KeyPackageInfo:
    version = r.u16("key package version")
    if version != MLS_VERSION_10:
        raise MLSFormatError(f"{r.what}: unsupported key package protocol version {version}")
    suite = r.u16("cipher_suite")
    init_key = r.opaque("init_key")
    leaf, not_before, not_after = _read_leaf_node(r)
    if leaf.source != LEAF_SOURCE_KEY_PACKAGE:
        raise MLSFormatError(f"{r.what}: key package leaf node has source {leaf.source}, expected 1")
    r.opaque("key package extensions")
    r.opaque("key package signature")
    return KeyPackageInfo(version, suite, init_key, leaf, not_before, not_after)


def _read_proposal(r: Reader) -> ProposalInfo:
    ptype = r.u16("proposal_type")
    if ptype == PROPOSAL_ADD:
        return ProposalInfo(ptype, key_package=_read_key_package(r))
    if ptype == PROPOSAL_UPDATE:
        _read_leaf_node(r)
    elif ptype == PROPOSAL_REMOVE:
        return ProposalInfo(ptype, removed=r.u32("removed leaf index"))
    elif ptype == PROPOSAL_PSK:
        psktype = r.u8("psktype")
        if psktype == 1:
            r.opaque("psk_id")
        elif psktype == 2:
            r.u8("resumption usage")
            r.opaque("psk_group_id")
            r.u64("psk_epoch")
        else:
            raise MLSFormatError(f"{r.what}: invalid psktype {psktype}")
        r.opaque("psk_nonce")
    elif ptype == PROPOSAL_REINIT:
        r.opaque("group_id")
        r.u16("version")
        r.u16("cipher_suite")
        r.opaque("extensions")
    elif ptype == PROPOSAL_EXTERNAL_INIT:
        r.opaque("kem_output")
    elif ptype == PROPOSAL_GROUP_CONTEXT_EXTENSIONS:
        r.opaque("extensions")
    else:
        raise MLSFormatError(f"{r.what}: unknown proposal type {ptype}")
    return ProposalInfo(ptype)


def _read_sender(r: Reader) -> tuple[int, int | None]:
    stype = r.u8("sender_type")
    if stype in (SENDER_MEMBER, SENDER_EXTERNAL):
        return stype, r.u32("sender index")
    if stype in (SENDER_NEW_MEMBER_PROPOSAL, SENDER_NEW_MEMBER_COMMIT):
        return stype, None
    raise MLSFormatError(f"{r.what}: invalid sender_type {stype}")


def _read_commit_body(r: Reader) -> tuple[tuple[bytes, ...], tuple[ProposalInfo, ...], bool]:
    refs: list[bytes] = []
    inline: list[ProposalInfo] = []
    proposals = r.sub("commit proposals")
    while not proposals.at_end():
        kind = proposals.u8("ProposalOrRef type")
        if kind == PROPOSAL_OR_REF_PROPOSAL:
            inline.append(_read_proposal(proposals))
        elif kind == PROPOSAL_OR_REF_REFERENCE:
            refs.append(proposals.opaque("proposal reference"))
        else:
            raise MLSFormatError(f"{r.what}: invalid ProposalOrRef type {kind}")
    present = r.u8("commit path presence")
    if present == 1:
        _read_leaf_node(r)
        r.opaque("update path nodes")
    elif present != 0:
        raise MLSFormatError(f"{r.what}: invalid optional<UpdatePath> marker {present}")
    return tuple(refs), tuple(inline), present == 1


def _read_commit_message(r: Reader) -> CommitInfo:
    start = r.pos
    version = r.u16("version")
    if version != MLS_VERSION_10:
        raise MLSFormatError(f"{r.what}: unsupported MLS protocol version {version}")
    wire = r.u16("wire_format")
    if wire == WIRE_PUBLIC:
        group_id = r.opaque("group_id")
        epoch = r.u64("epoch")
        stype, sindex = _read_sender(r)
        r.opaque("authenticated_data")
        ctype = r.u8("content_type")
        if ctype != CONTENT_COMMIT:
            raise MLSFormatError(f"{r.what}: expected a commit (content type 3), got content type {ctype}")
        refs, inline, has_path = _read_commit_body(r)
        r.opaque("signature")
        r.opaque("confirmation_tag")
        if stype == SENDER_MEMBER:
            r.opaque("membership_tag")
        raw = r.data[start : r.pos]
        return CommitInfo(wire, group_id, epoch, stype, sindex, refs, inline, has_path, raw)
    if wire == WIRE_PRIVATE:
        group_id = r.opaque("group_id")
        epoch = r.u64("epoch")
        ctype = r.u8("content_type")
        if ctype != CONTENT_COMMIT:
            raise MLSFormatError(f"{r.what}: expected a commit (content type 3), got content type {ctype}")
        r.opaque("authenticated_data")
        r.opaque("encrypted_sender_data")
        r.opaque("ciphertext")
        raw = r.data[start : r.pos]
        return CommitInfo(wire, group_id, epoch, None, None, None, None, None, raw)
    raise MLSFormatError(f"{r.what}: expected a public or private message, got wire format {wire}")


def _read_welcome(r: Reader) -> WelcomeInfo:
    start = r.pos
    suite = r.u16("welcome cipher_suite")
    secrets = r.sub("welcome secrets")
    count = 0
    while not secrets.at_end():
        secrets.opaque("new_member key package ref")
        secrets.opaque("encrypted_group_secrets.kem_output")
        secrets.opaque("encrypted_group_secrets.ciphertext")
        count += 1
    r.opaque("encrypted_group_info")
    if count == 0:
        raise MLSFormatError(f"{r.what}: welcome carries no group secrets")
    return WelcomeInfo(suite, count, r.data[start : r.pos])


# --------------------------------------------------------------------------------------------------
# Public parsing API


def parse_key_package(data: bytes) -> KeyPackageInfo:
    """Parse a bare KeyPackage (op 26 payload); the whole input must be consumed."""
    r = Reader(data, "key package")
    kp = _read_key_package(r)
    r.expect_end()
    return kp


def parse_welcome(data: bytes) -> WelcomeInfo:
    """Parse a bare Welcome (op 30 payload after the transition id); the whole input must be consumed."""
    r = Reader(data, "welcome")
    info = _read_welcome(r)
    r.expect_end()
    return info


def parse_commit_message(data: bytes) -> CommitInfo:
    """Parse a commit MLSMessage (public or private); the whole input must be consumed."""
    r = Reader(data, "commit")
    info = _read_commit_message(r)
    r.expect_end()
    return info


def split_commit_welcome(data: bytes) -> tuple[bytes, bytes | None]:
    """Split an op 28 payload into (commit MLSMessage, bare Welcome or None).

    The commit is walked field by field to find where it ends; anything after it must be exactly
    one well-formed Welcome.
    """
    r = Reader(data, "commit/welcome")
    commit = _read_commit_message(r)
    if r.at_end():
        return commit.raw, None
    rest = Reader(r.data, "welcome", r.pos)
    _read_welcome(rest)
    rest.expect_end()
    return commit.raw, r.data[r.pos :]


def parse_proposal_message(data: bytes) -> ProposalMessageInfo:
    """Parse a PublicMessage carrying a proposal (what :class:`ExternalSender` produces)."""
    r = Reader(data, "proposal message")
    version = r.u16("version")
    wire = r.u16("wire_format")
    if version != MLS_VERSION_10 or wire != WIRE_PUBLIC:
        raise MLSFormatError(f"proposal message: expected MLS 1.0 public message, got {version}/{wire}")
    group_id = r.opaque("group_id")
    epoch = r.u64("epoch")
    stype, sindex = _read_sender(r)
    r.opaque("authenticated_data")
    ctype = r.u8("content_type")
    if ctype != CONTENT_PROPOSAL:
        raise MLSFormatError(f"proposal message: expected content type 2, got {ctype}")
    proposal = _read_proposal(r)
    signature = r.opaque("signature")
    if stype == SENDER_MEMBER:
        r.opaque("membership_tag")
    r.expect_end()
    return ProposalMessageInfo(group_id, epoch, stype, sindex, proposal, signature)


# --------------------------------------------------------------------------------------------------
# Hashing and payload helpers


def ref_hash(label: bytes, value: bytes) -> bytes:
    """RFC 9420 RefHash with SHA-256 (ciphersuite 2): ``H(label<V> || value<V>)``."""
    return hashlib.sha256(vl(label) + vl(value)).digest()


def proposal_ref(message: bytes) -> bytes:
    """The ProposalRef of a proposal PublicMessage without membership tag (an external proposal).

    AuthenticatedContent is ``wire_format || FramedContent || FramedContentAuthData``, which for such a
    message is exactly the MLSMessage minus its 2-byte protocol version.
    """
    info = parse_proposal_message(message)
    if info.sender_type == SENDER_MEMBER:
        raise MLSFormatError("proposal_ref: member proposals carry a membership tag; not supported")
    return ref_hash(b"MLS 1.0 Proposal Reference", message[2:])


def proposals_payload(messages: Iterable[bytes]) -> bytes:
    """Op 27 append payload: ``u8 0 || (concatenated MLSMessages)<V>``."""
    return b"\x00" + vl(b"".join(messages))


def revoke_payload(refs: Iterable[bytes]) -> bytes:
    """Op 27 revoke payload: ``u8 1 || (concatenated ProposalRef<V>)<V>``."""
    return b"\x01" + vl(b"".join(vl(ref) for ref in refs))


# --------------------------------------------------------------------------------------------------
# The external sender


class ExternalSender:
    """The voice gateway's MLS external sender: a P-256 signing key plus a basic credential."""

    def __init__(
        self, identity: bytes = b"listening_core", private_key: ec.EllipticCurvePrivateKey | None = None
    ) -> None:
        self.identity: bytes = bytes(identity)
        self._key = private_key if private_key is not None else ec.generate_private_key(ec.SECP256R1())
        if not isinstance(self._key.curve, ec.SECP256R1):
            raise ValueError("the external sender key must be on P-256")
        self.public_key: bytes = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def package(self) -> bytes:
        """The op 25 payload: ``signature_key<V> || u16 credential_type=1 || identity<V>``."""
        return vl(self.public_key) + CREDENTIAL_BASIC.to_bytes(2, "big") + vl(self.identity)

    def sign_with_label(self, label: bytes, content: bytes) -> bytes:
        """RFC 9420 SignWithLabel: ECDSA-P256-SHA256 (DER) over ``("MLS 1.0 " + label)<V> || content<V>``."""
        return self._key.sign(vl(_LABEL_PREFIX + label) + vl(content), ec.ECDSA(hashes.SHA256()))

    def verify_with_label(self, label: bytes, content: bytes, signature: bytes) -> bool:
        """Check a signature made by :meth:`sign_with_label`."""
        from cryptography.exceptions import InvalidSignature

        try:
            self._key.public_key().verify(
                signature, vl(_LABEL_PREFIX + label) + vl(content), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            return False
        return True

    def _proposal_message(self, group_id: bytes, epoch: int, proposal: bytes) -> bytes:
        if not 0 <= epoch < 1 << 64:
            raise ValueError(f"epoch {epoch} out of range")
        framed = (
            vl(group_id)
            + epoch.to_bytes(8, "big")
            + bytes([SENDER_EXTERNAL])
            + (0).to_bytes(4, "big")  # sender_index: we are external sender #0
            + vl(b"")  # authenticated_data
            + bytes([CONTENT_PROPOSAL])
            + proposal
        )
        head = MLS_VERSION_10.to_bytes(2, "big") + WIRE_PUBLIC.to_bytes(2, "big")
        signature = self.sign_with_label(b"FramedContentTBS", head + framed)
        return head + framed + vl(signature)

    def add_proposal(self, group_id: bytes, epoch: int, key_package: bytes) -> bytes:
        """An external Add proposal MLSMessage for ``key_package`` (validated first)."""
        parse_key_package(key_package)
        return self._proposal_message(group_id, epoch, PROPOSAL_ADD.to_bytes(2, "big") + key_package)

    def remove_proposal(self, group_id: bytes, epoch: int, leaf_index: int) -> bytes:
        """An external Remove proposal MLSMessage for ``leaf_index``."""
        if not 0 <= leaf_index < 1 << 32:
            raise ValueError(f"leaf index {leaf_index} out of range")
        return self._proposal_message(
            group_id, epoch, PROPOSAL_REMOVE.to_bytes(2, "big") + leaf_index.to_bytes(4, "big")
        )
