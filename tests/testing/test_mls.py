"""MLS wire helpers, checked against real davey sessions."""

from __future__ import annotations

import contextlib

import davey
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from listening_core.testing import mls
from listening_core.testing.mls import MLSFormatError, Reader

CHANNEL = 987_654_321_012_345_678
GROUP_ID = CHANNEL.to_bytes(8, "big")


def _pending(uid: int, sender: mls.ExternalSender) -> davey.DaveSession:
    session = davey.DaveSession(1, uid, CHANNEL)
    session.set_external_sender(sender.package())
    return session


@pytest.fixture(scope="module")
def two_member_commit() -> tuple[mls.ExternalSender, bytes, bytes, bytes, bytes]:
    """(sender, add proposal, key package of the joiner, commit, welcome)."""
    sender = mls.ExternalSender()
    a = _pending(1, sender)
    b = _pending(2, sender)
    kp = b.get_serialized_key_package()
    proposal = sender.add_proposal(GROUP_ID, 0, kp)
    result = a.process_proposals(davey.ProposalsOperationType.append, mls.vl(proposal))
    assert result is not None and result.welcome is not None
    return sender, proposal, kp, bytes(result.commit), bytes(result.welcome)


# -- varints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, b"\x00"), (63, b"\x3f"), (64, b"\x40\x40"), (16383, b"\x7f\xff"), (16384, b"\x80\x00\x40\x00")],
)
def test_varint_boundaries(value: int, encoded: bytes) -> None:
    assert mls.encode_varint(value) == encoded
    assert Reader(encoded).varint() == value


@given(st.integers(min_value=0, max_value=(1 << 30) - 1))
def test_varint_roundtrip(value: int) -> None:
    r = Reader(mls.encode_varint(value) + b"tail")
    assert r.varint() == value
    assert r.take(4) == b"tail"
    r.expect_end()


@given(st.binary(max_size=300))
def test_vl_roundtrip(data: bytes) -> None:
    r = Reader(mls.vl(data))
    assert r.opaque() == data
    assert r.at_end()


def test_varint_rejects_bad_encodings() -> None:
    with pytest.raises(MLSFormatError, match="0b11"):
        Reader(b"\xc0\x00\x00\x00").varint()
    with pytest.raises(MLSFormatError, match="non-minimal"):
        Reader(b"\x40\x01").varint()
    with pytest.raises(MLSFormatError, match="truncated"):
        Reader(b"\x05abc").opaque()
    with pytest.raises(MLSFormatError):
        mls.encode_varint(1 << 30)
    with pytest.raises(MLSFormatError, match="trailing"):
        Reader(b"\x00x").expect_end()


# -- external sender and proposals -----------------------------------------------------------------


def test_external_sender_package_layout_and_davey_accepts_it() -> None:
    sender = mls.ExternalSender(identity=b"gw")
    package = sender.package()
    r = Reader(package)
    key = r.opaque()
    assert len(key) == 65 and key[0] == 4 and key == sender.public_key
    assert r.u16() == 1
    assert r.opaque() == b"gw"
    r.expect_end()
    davey.DaveSession(1, 5, CHANNEL).set_external_sender(package)  # must not raise


def test_add_proposal_structure_and_signature(two_member_commit: tuple) -> None:
    sender, proposal, _, _, _ = two_member_commit
    info = mls.parse_proposal_message(proposal)
    assert info.group_id == GROUP_ID and info.epoch == 0
    assert info.sender_type == mls.SENDER_EXTERNAL and info.sender_index == 0
    assert info.proposal.proposal_type == mls.PROPOSAL_ADD
    assert info.proposal.key_package is not None and info.proposal.key_package.user_id == 2
    # Signature = SignWithLabel("FramedContentTBS", version || wire_format || FramedContent).
    tbs = proposal[: len(proposal) - len(mls.vl(info.signature))]
    assert sender.verify_with_label(b"FramedContentTBS", tbs, info.signature)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sender.public_key)
    public.verify(
        info.signature, mls.vl(b"MLS 1.0 FramedContentTBS") + mls.vl(tbs), ec.ECDSA(hashes.SHA256())
    )


def test_remove_proposal_structure() -> None:
    sender = mls.ExternalSender()
    message = sender.remove_proposal(GROUP_ID, 7, 3)
    info = mls.parse_proposal_message(message)
    assert (info.epoch, info.proposal.proposal_type, info.proposal.removed) == (7, mls.PROPOSAL_REMOVE, 3)
    with pytest.raises(ValueError):
        sender.remove_proposal(GROUP_ID, 0, -1)


def test_key_package_identity(two_member_commit: tuple) -> None:
    kp = two_member_commit[2]
    info = mls.parse_key_package(kp)
    assert info.user_id == 2
    assert info.cipher_suite == mls.CIPHERSUITE_P256
    assert (info.not_before, info.not_after) == (0, (1 << 64) - 1)  # DAVE's required lifetime
    assert len(info.leaf.signature_key) == 65


def test_proposal_ref_matches_davey_commit(two_member_commit: tuple) -> None:
    _, proposal, _, commit, _ = two_member_commit
    info = mls.parse_commit_message(commit)
    assert info.wire_format == mls.WIRE_PUBLIC
    assert info.group_id == GROUP_ID and info.epoch == 0
    assert (info.sender_type, info.sender_index) == (mls.SENDER_MEMBER, 0)
    assert info.proposal_refs == (mls.proposal_ref(proposal),)
    assert info.inline_proposals == ()


def test_remove_commit_has_path_and_ref() -> None:
    sender = mls.ExternalSender()
    a = _pending(1, sender)
    b = _pending(2, sender)
    add = sender.add_proposal(GROUP_ID, 0, b.get_serialized_key_package())
    result = a.process_proposals(davey.ProposalsOperationType.append, mls.vl(add))
    assert result is not None
    a.process_commit(result.commit)
    remove = sender.remove_proposal(GROUP_ID, 1, 1)
    result = a.process_proposals(davey.ProposalsOperationType.append, mls.vl(remove))
    assert result is not None and result.welcome is None
    commit, welcome = mls.split_commit_welcome(result.commit)
    assert welcome is None
    info = mls.parse_commit_message(commit)
    assert info.epoch == 1 and info.proposal_refs == (mls.proposal_ref(remove),) and info.has_path
    a.process_commit(commit)
    assert a.epoch == 2


def test_revoke_payload_is_understood_by_davey() -> None:
    sender = mls.ExternalSender()
    a = _pending(1, sender)
    b = _pending(2, sender)
    add = sender.add_proposal(GROUP_ID, 0, b.get_serialized_key_package())
    payload = mls.proposals_payload([add])
    assert payload[0] == 0
    assert a.process_proposals(davey.ProposalsOperationType.append, payload[1:]) is not None
    revoke = mls.revoke_payload([mls.proposal_ref(add)])
    assert revoke[0] == 1
    assert a.process_proposals(davey.ProposalsOperationType.revoke, revoke[1:]) is None


# -- splitting op 28 -------------------------------------------------------------------------------


def test_split_commit_welcome(two_member_commit: tuple) -> None:
    _, _, _, commit, welcome = two_member_commit
    assert mls.split_commit_welcome(commit + welcome) == (commit, welcome)
    assert mls.split_commit_welcome(commit) == (commit, None)
    info = mls.parse_welcome(welcome)
    assert info.cipher_suite == 2 and info.secrets == 1


def test_split_private_message_commit() -> None:
    body = mls.vl(GROUP_ID) + (5).to_bytes(8, "big") + b"\x03" + mls.vl(b"") + mls.vl(b"sd") + mls.vl(b"ct")
    commit = b"\x00\x01\x00\x02" + body
    assert mls.split_commit_welcome(commit) == (commit, None)
    info = mls.parse_commit_message(commit)
    assert info.wire_format == mls.WIRE_PRIVATE and info.epoch == 5 and info.proposal_refs is None


def test_every_truncation_raises_mlsformaterror(two_member_commit: tuple) -> None:
    _, proposal, kp, commit, welcome = two_member_commit
    data = commit + welcome
    for n in range(len(commit)):
        with pytest.raises(MLSFormatError):
            mls.split_commit_welcome(data[:n])
    for n in range(len(commit) + 1, len(data)):
        with pytest.raises(MLSFormatError):
            mls.split_commit_welcome(data[:n])
    for n in range(0, len(kp), 7):
        with pytest.raises(MLSFormatError):
            mls.parse_key_package(kp[:n])
    for n in range(0, len(proposal), 5):
        with pytest.raises(MLSFormatError):
            mls.parse_proposal_message(proposal[:n])


def test_wrong_message_types_rejected(two_member_commit: tuple) -> None:
    _, proposal, kp, commit, welcome = two_member_commit
    with pytest.raises(MLSFormatError, match="commit"):
        mls.split_commit_welcome(proposal)  # a proposal, not a commit
    with pytest.raises(MLSFormatError, match="wire format"):
        mls.split_commit_welcome(b"\x00\x01\x00\x03" + welcome)  # an MLSMessage-wrapped welcome
    with pytest.raises(MLSFormatError, match="version"):
        mls.split_commit_welcome(b"\x00\x02" + commit[2:])
    with pytest.raises(MLSFormatError):
        mls.split_commit_welcome(commit + kp)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_only_mlsformaterror(data: bytes) -> None:
    for parse in (
        mls.split_commit_welcome,
        mls.parse_key_package,
        mls.parse_welcome,
        mls.parse_proposal_message,
    ):
        with contextlib.suppress(MLSFormatError):
            parse(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_commit(two_member_commit: tuple, data: st.DataObject) -> None:
    _, _, _, commit, welcome = two_member_commit
    raw = bytearray(commit + welcome)
    index = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    raw[index] = data.draw(st.integers(min_value=0, max_value=255))
    with contextlib.suppress(MLSFormatError):
        mls.split_commit_welcome(bytes(raw))
