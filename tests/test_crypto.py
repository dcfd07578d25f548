"""Tests for listening_core.crypto: both _rtpsize AEAD modes against discord.py, and the DAVE gate."""

from __future__ import annotations

import contextlib
import os
import struct
from types import SimpleNamespace
from typing import Any

import davey
import nacl.bindings
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from discord.voice_client import VoiceClient
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from listening_core.crypto import (
    DAVE_MAGIC,
    OPUS_SILENCE,
    SUPPORTED_MODES,
    AesGcmCipher,
    DaveError,
    DecryptError,
    TransportCipher,
    XChaChaCipher,
    dave_decrypt,
    is_dave_frame,
    transport_cipher,
)
from listening_core.errors import PacketError
from listening_core.rtp import ONE_BYTE_PROFILE, RtcpHeader, RtpHeader, build_extension_body

AES, XCHACHA = SUPPORTED_MODES
KEY = bytes(range(32))
OPUS = bytes.fromhex("fc ff fe") + bytes(range(60))  # any bytes stand in for an Opus frame


def _raw_seal(mode: str, key: bytes, aad: bytes, plain: bytes, counter: int) -> bytes:
    """Seal straight from the wire description, independently of TransportCipher."""
    ctr = struct.pack(">I", counter)
    if mode == AES:
        return aad + AESGCM(key).encrypt(ctr + bytes(8), plain, aad) + ctr
    sealed: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plain, aad, ctr + bytes(20), key)
    return aad + sealed + ctr


@pytest.fixture(params=SUPPORTED_MODES)
def mode(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def cipher(mode: str) -> TransportCipher:
    return transport_cipher(mode, KEY)


# -- factory ----------------------------------------------------------------------------------


def test_factory_picks_class() -> None:
    assert type(transport_cipher(AES, KEY)) is AesGcmCipher
    assert type(transport_cipher(XCHACHA, list(KEY))) is XChaChaCipher  # op 4 gives a list of ints
    assert transport_cipher(XCHACHA, KEY).mode == XCHACHA
    assert XCHACHA in repr(transport_cipher(XCHACHA, KEY))


def test_unknown_mode_names_supported_modes() -> None:
    with pytest.raises(ValueError) as info:
        transport_cipher("xsalsa20_poly1305_lite", KEY)
    assert all(m in str(info.value) for m in SUPPORTED_MODES)
    assert not isinstance(info.value, PacketError)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_bad_key_size(mode: str, size: int) -> None:
    with pytest.raises(ValueError, match="32-byte key"):
        transport_cipher(mode, bytes(size))


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("csrc", [(), (1, 0xFFFFFFFF)])
@pytest.mark.parametrize("ext_body", [b"", build_extension_body([(1, b"\x30"), (5, b"abcdef")])])
@pytest.mark.parametrize("padding", [0, 1, 7, 255])
def test_round_trip(cipher: TransportCipher, csrc: tuple[int, ...], ext_body: bytes, padding: int) -> None:
    header = RtpHeader(True, 120, 65535, 0xFFFFFFFF, 0xDEADBEEF, csrc)
    packet = cipher.seal_rtp(header, OPUS, extension_body=ext_body, padding=padding, counter=0xFFFFFFFF)
    assert packet[-4:] == b"\xff\xff\xff\xff"
    assert packet[0] == 0x80 | (0x20 if padding else 0) | (0x10 if ext_body else 0) | len(csrc)
    opened, payload = cipher.open_rtp(packet)
    assert payload == OPUS
    assert (opened.sequence, opened.timestamp, opened.ssrc, opened.csrc) == (
        65535,
        0xFFFFFFFF,
        0xDEADBEEF,
        csrc,
    )
    assert opened.marker and opened.padding == (padding > 0)
    assert opened.extension_body == ext_body
    if ext_body:
        assert opened.extension_profile == ONE_BYTE_PROFILE
        assert opened.extensions() == [(1, b"\x30"), (5, b"abcdef")]
    # memoryview / bytearray input opens the same
    assert cipher.open_rtp(memoryview(packet))[1] == OPUS
    assert cipher.open_rtp(bytearray(packet))[1] == OPUS


def test_empty_payload_and_empty_extension(cipher: TransportCipher) -> None:
    header = RtpHeader(extension_profile=ONE_BYTE_PROFILE)
    packet = cipher.seal_rtp(header, b"", counter=0)
    assert packet[12:16] == b"\xbe\xde\x00\x00" and len(packet) == 16 + 20
    opened, payload = cipher.open_rtp(packet)
    assert payload == b"" and opened.extension_body == b"" and opened.extension_words == 0


def test_matches_independent_wire_description(mode: str, cipher: TransportCipher) -> None:
    header = RtpHeader(sequence=9, timestamp=960, ssrc=77, csrc=(5,))
    ext = b"\x10\x42\x00\x00"
    packet = cipher.seal_rtp(header, OPUS, extension_body=ext, padding=3, counter=12)
    aad = header.serialize(extension_words=1, padding=True)
    assert aad[0] == 0xB1 and len(aad) == 12 + 4 + 4
    assert packet == _raw_seal(mode, KEY, aad, ext + OPUS + b"\x00\x00\x03", 12)


def test_rtcp_round_trip(cipher: TransportCipher) -> None:
    plain = RtcpHeader(200, 4242, length=6).serialize() + os.urandom(20)
    sealed = cipher.seal_rtcp(plain, counter=3)
    assert sealed[:8] == plain[:8] and len(sealed) == len(plain) + 20
    assert cipher.open_rtcp(sealed) == plain
    assert cipher.open_rtcp(memoryview(sealed)) == plain
    assert cipher.open_rtcp(cipher.seal_rtcp(plain[:8], counter=4)) == plain[:8]


@given(
    marker=st.booleans(),
    sequence=st.integers(0, 0xFFFF),
    timestamp=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    csrc=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15).map(tuple),
    ext_words=st.integers(0, 8),
    padding=st.integers(0, 255),
    payload=st.binary(max_size=1400),
    counter=st.integers(0, 0xFFFFFFFF),
    mode=st.sampled_from(SUPPORTED_MODES),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_seal_open_identity(
    marker: bool,
    sequence: int,
    timestamp: int,
    ssrc: int,
    csrc: tuple[int, ...],
    ext_words: int,
    padding: int,
    payload: bytes,
    counter: int,
    mode: str,
    data: st.DataObject,
) -> None:
    ext_body = data.draw(st.binary(min_size=4 * ext_words, max_size=4 * ext_words))
    cipher = transport_cipher(mode, KEY)
    header = RtpHeader(marker, 120, sequence, timestamp, ssrc, csrc)
    packet = cipher.seal_rtp(header, payload, extension_body=ext_body, padding=padding, counter=counter)
    opened, got = cipher.open_rtp(packet)
    assert got == payload
    assert opened.extension_body == ext_body
    assert (opened.marker, opened.sequence, opened.timestamp, opened.ssrc, opened.csrc) == (
        marker,
        sequence,
        timestamp,
        ssrc,
        csrc,
    )


@given(data=st.binary(max_size=300), mode=st.sampled_from(SUPPORTED_MODES))
@settings(max_examples=300)
def test_open_random_bytes_raises_only_packet_error(data: bytes, mode: str) -> None:
    cipher = transport_cipher(mode, KEY)
    for datagram in (data, b"\x80\x78" + data, b"\x90\x78" + data[:10] + b"\xbe\xde" + data[10:]):
        with contextlib.suppress(PacketError):
            cipher.open_rtp(datagram)
        with contextlib.suppress(PacketError):
            cipher.open_rtcp(datagram)


@pytest.mark.parametrize(("csrc", "ext_body", "padding"), [((), b"", 0), ((7, 8), bytes(8), 3)])
def test_every_bit_of_a_packet_is_authenticated(
    cipher: TransportCipher, csrc: tuple[int, ...], ext_body: bytes, padding: int
) -> None:
    packet = cipher.seal_rtp(
        RtpHeader(True, 120, 5, 960, 77, csrc), OPUS, extension_body=ext_body, padding=padding, counter=9
    )
    for i in range(len(packet)):
        for bit in range(8):
            with pytest.raises(PacketError):
                cipher.open_rtp(packet[:i] + bytes((packet[i] ^ 1 << bit,)) + packet[i + 1 :])


@given(
    sequence=st.integers(0, 0xFFFF),
    csrc=st.lists(st.integers(0, 0xFFFFFFFF), max_size=3).map(tuple),
    ext_words=st.integers(0, 4),
    padding=st.integers(0, 40),
    payload=st.binary(max_size=200),
    mode=st.sampled_from(SUPPORTED_MODES),
    mutation=st.sampled_from(["flip", "set", "truncate", "extend", "cut", "splice"]),
    data=st.data(),
)
@settings(max_examples=400, deadline=None)
def test_a_changed_packet_never_opens(
    sequence: int,
    csrc: tuple[int, ...],
    ext_words: int,
    padding: int,
    payload: bytes,
    mode: str,
    mutation: str,
    data: st.DataObject,
) -> None:
    """Any change to a sealed packet (clear header, extension, payload, padding, tag, counter,
    length) makes it fail with the documented packet error, never opening, never anything else."""
    cipher = transport_cipher(mode, KEY)
    ext_body = data.draw(st.binary(min_size=4 * ext_words, max_size=4 * ext_words))
    packet = cipher.seal_rtp(
        RtpHeader(False, 120, sequence, 960 * sequence, 0x1234, csrc),
        payload,
        extension_body=ext_body,
        padding=padding,
        counter=sequence,
    )
    n = len(packet)
    i = data.draw(st.integers(0, n - 1))
    if mutation == "flip":
        mutated = packet[:i] + bytes((packet[i] ^ data.draw(st.integers(1, 255)),)) + packet[i + 1 :]
    elif mutation == "set":
        mutated = packet[:i] + bytes((data.draw(st.integers(0, 255)),)) + packet[i + 1 :]
    elif mutation == "truncate":
        mutated = packet[:i]
    elif mutation == "extend":
        mutated = packet + data.draw(st.binary(min_size=1, max_size=40))
    elif mutation == "cut":
        mutated = packet[:i] + packet[i + data.draw(st.integers(1, 8)) :]
    else:
        mutated = packet[:i] + data.draw(st.binary(min_size=1, max_size=16)) + packet[i:]
    assume(mutated != packet)
    with pytest.raises(PacketError) as info:
        cipher.open_rtp(mutated)
    assert info.value.reason in {"truncated", "bad-version", "bad-extension", "bad-tag", "bad-padding"}


# -- against discord.py 2.7.1's own sending code ----------------------------------------------


def _discord_voice_client(mode: str, key: bytes, *, dave_session: Any = None) -> VoiceClient:
    vc = VoiceClient.__new__(VoiceClient)
    vc._connection = SimpleNamespace(  # type: ignore[assignment]
        dave_session=dave_session,
        can_encrypt=dave_session is not None,
        mode=mode,
        secret_key=list(key),
        ssrc=0x11223344,
    )
    vc.sequence = 65535
    vc.timestamp = 0xFFFFFC40
    vc._incr_nonce = 0
    return vc


def test_opens_what_discord_py_sends() -> None:
    vc = _discord_voice_client(XCHACHA, KEY)
    cipher = transport_cipher(XCHACHA, KEY)
    for i in range(3):
        frame = OPUS + bytes([i])
        packet = vc._get_voice_packet(frame)
        header, payload = cipher.open_rtp(packet)
        assert payload == frame
        assert (header.sequence, header.timestamp, header.ssrc, header.payload_type) == (
            vc.sequence,
            vc.timestamp,
            0x11223344,
            120,
        )
        assert packet[-4:] == struct.pack(">I", i)
        # our sealing is byte-for-byte what discord.py sends
        assert cipher.seal_rtp(header, frame, counter=i) == packet
        vc.checked_add("sequence", 1, 65535)
        vc.checked_add("timestamp", 960, 4294967295)
    assert vc.sequence == 2  # wrapped


def test_discord_py_packet_with_other_key_or_mode_fails() -> None:
    packet = _discord_voice_client(XCHACHA, KEY)._get_voice_packet(OPUS)
    for cipher in (transport_cipher(XCHACHA, bytes(32)), transport_cipher(AES, KEY)):
        with pytest.raises(DecryptError) as info:
            cipher.open_rtp(packet)
        assert info.value.reason == "bad-tag"


# -- failures ---------------------------------------------------------------------------------


def _reason(cipher: TransportCipher, datagram: bytes) -> str:
    with pytest.raises(PacketError) as info:
        cipher.open_rtp(datagram)
    return info.value.reason


def test_tampering_is_bad_tag(cipher: TransportCipher) -> None:
    packet = cipher.seal_rtp(RtpHeader(ssrc=5), OPUS, extension_body=bytes(4), padding=2, counter=1)
    for index in (1, 9, 13, 15, 20, len(packet) - 20, len(packet) - 5, len(packet) - 1):
        bad = bytearray(packet)
        bad[index] ^= 0x01
        assert _reason(cipher, bytes(bad)) == "bad-tag", index
    # a length word pushed past the datagram is caught before decrypting
    bad = bytearray(packet)
    bad[14] ^= 0x01
    assert _reason(cipher, bytes(bad)) == "bad-extension"


def test_wrong_key_and_wrong_mode(mode: str, cipher: TransportCipher) -> None:
    packet = cipher.seal_rtp(RtpHeader(), OPUS, counter=1)
    assert _reason(transport_cipher(mode, bytes(32)), packet) == "bad-tag"
    other = AES if mode == XCHACHA else XCHACHA
    assert _reason(transport_cipher(other, KEY), packet) == "bad-tag"


def test_truncated(cipher: TransportCipher) -> None:
    packet = cipher.seal_rtp(RtpHeader(), b"", counter=1)
    assert len(packet) == 32
    assert _reason(cipher, packet[:31]) == "truncated"
    assert _reason(cipher, packet[:11]) == "truncated"
    assert _reason(cipher, packet[:-1]) in {"truncated", "bad-tag"}
    rtcp = cipher.seal_rtcp(bytes([0x80, 201, 0, 1]) + bytes(4), counter=1)
    with pytest.raises(DecryptError) as info:
        cipher.open_rtcp(rtcp[:27])
    assert info.value.reason == "truncated"
    bad = bytearray(rtcp)
    bad[3] ^= 1  # the clear RTCP head is authenticated
    with pytest.raises(DecryptError) as info:
        cipher.open_rtcp(bytes(bad))
    assert info.value.reason == "bad-tag"


def test_extension_longer_than_payload(mode: str, cipher: TransportCipher) -> None:
    aad = RtpHeader().serialize(extension_words=5)  # claims 20 bytes of extension body
    assert _reason(cipher, _raw_seal(mode, KEY, aad, bytes(19), 1)) == "bad-extension"
    assert cipher.open_rtp(_raw_seal(mode, KEY, aad, bytes(20), 1))[1] == b""


@pytest.mark.parametrize(
    ("plain", "expected"),
    [
        (OPUS + b"\x00", "bad-padding"),  # N = 0
        (b"\x05", "bad-padding"),  # N bigger than what is there
        (b"\x04\x04\x04\x04" + b"\x09", "bad-padding"),  # N = 9, only 1 byte past the extension
        (b"", "bad-padding"),  # P set, nothing at all
        (OPUS + b"\x00\x02", OPUS),  # N = 2 strips exactly 2
        (b"\x04\x04\x04\x04" + b"\x01", b""),  # padding only, after the extension
    ],
)
def test_padding_lies(mode: str, cipher: TransportCipher, plain: bytes, expected: str | bytes) -> None:
    ext = 1 if plain.startswith(b"\x04\x04\x04\x04") else 0
    aad = RtpHeader().serialize(extension_words=ext, padding=True)
    packet = _raw_seal(mode, KEY, aad, plain, 9)
    if isinstance(expected, str):
        assert _reason(cipher, packet) == expected
    else:
        assert cipher.open_rtp(packet)[1] == expected


def test_seal_argument_checks(cipher: TransportCipher) -> None:
    with pytest.raises(ValueError):
        cipher.seal_rtp(RtpHeader(), OPUS, extension_body=b"abc", counter=0)
    with pytest.raises(ValueError):
        cipher.seal_rtp(RtpHeader(), OPUS, padding=256, counter=0)
    with pytest.raises(ValueError):
        cipher.seal_rtp(RtpHeader(), OPUS, counter=1 << 32)
    with pytest.raises(ValueError):
        cipher.seal_rtcp(b"\x80\xc8", counter=0)


def test_error_hierarchy() -> None:
    assert issubclass(DaveError, DecryptError)
    assert issubclass(DecryptError, PacketError)
    assert issubclass(PacketError, ValueError)


# -- DAVE -------------------------------------------------------------------------------------

CHANNEL_ID = 5678
BOT_ID = 1001
SPEAKER_ID = 1002


def _vl(data: bytes) -> bytes:
    """RFC 9420 variable-length vector."""
    n = len(data)
    if n < 64:
        return bytes([n]) + data
    if n < 16384:
        return struct.pack(">H", 0x4000 | n) + data
    return struct.pack(">I", 0x80000000 | n) + data


def _dave_pair() -> tuple[davey.DaveSession, davey.DaveSession]:
    """A two-member DAVE group formed the way the voice gateway forms it (we play the external sender)."""
    signer = ec.generate_private_key(ec.SECP256R1())
    public = signer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    external_sender = _vl(public) + struct.pack(">H", 1) + _vl(b"voice-gateway")
    bot = davey.DaveSession(1, BOT_ID, CHANNEL_ID)
    speaker = davey.DaveSession(1, SPEAKER_ID, CHANNEL_ID)
    bot.set_external_sender(external_sender)
    speaker.set_external_sender(external_sender)
    content = (
        _vl(struct.pack(">Q", CHANNEL_ID))
        + struct.pack(">Q", bot.epoch or 0)
        + struct.pack(">BI", 2, 0)  # sender: external, index 0
        + _vl(b"")
        + b"\x02"  # content type: proposal
        + struct.pack(">H", 1)  # Add
        + speaker.get_serialized_key_package()
    )
    tbs = struct.pack(">HH", 1, 1) + content
    signature = signer.sign(_vl(b"MLS 1.0 FramedContentTBS") + _vl(tbs), ec.ECDSA(hashes.SHA256()))
    proposal = struct.pack(">HH", 1, 1) + content + _vl(signature)
    commit_welcome = bot.process_proposals(davey.ProposalsOperationType.append, _vl(proposal), [SPEAKER_ID])
    assert commit_welcome is not None and commit_welcome.welcome is not None
    bot.process_commit(commit_welcome.commit)
    speaker.process_welcome(commit_welcome.welcome)
    assert bot.ready and speaker.ready
    return bot, speaker


@pytest.fixture(scope="module")
def dave_pair() -> tuple[davey.DaveSession, davey.DaveSession]:
    return _dave_pair()


def _dave_reason(session: Any, user_id: int, frame: bytes, protocol_version: int = 1) -> str:
    with pytest.raises(DaveError) as info:
        dave_decrypt(session, user_id, frame, protocol_version=protocol_version)
    return info.value.reason


def test_silence_passes_in_every_state(dave_pair: tuple[davey.DaveSession, davey.DaveSession]) -> None:
    fresh = davey.DaveSession(1, BOT_ID, CHANNEL_ID)
    for session in (None, fresh, dave_pair[0]):
        for version in (0, 1):
            assert dave_decrypt(session, SPEAKER_ID, OPUS_SILENCE, protocol_version=version) == OPUS_SILENCE


def test_not_ready_is_no_key() -> None:
    fresh = davey.DaveSession(1, BOT_ID, CHANNEL_ID)
    assert not fresh.ready
    assert _dave_reason(fresh, SPEAKER_ID, OPUS) == "no-key"
    assert _dave_reason(None, SPEAKER_ID, OPUS) == "no-key"
    # davey itself, asked anyway, says NoDecryptorForUser
    with pytest.raises(ValueError, match="NoDecryptorForUser"):
        fresh.decrypt(SPEAKER_ID, davey.MediaType.audio, OPUS)


def test_protocol_version_zero_passes_plain_frames() -> None:
    assert dave_decrypt(None, SPEAKER_ID, OPUS, protocol_version=0) == OPUS
    fresh = davey.DaveSession(1, BOT_ID, CHANNEL_ID)
    assert dave_decrypt(fresh, SPEAKER_ID, OPUS, protocol_version=0) == OPUS


def test_decrypts_real_dave_frames(dave_pair: tuple[davey.DaveSession, davey.DaveSession]) -> None:
    bot, speaker = dave_pair
    encrypted = speaker.encrypt_opus(OPUS)
    assert encrypted != OPUS and is_dave_frame(encrypted)
    assert dave_decrypt(bot, SPEAKER_ID, encrypted, protocol_version=1) == OPUS
    # during a downgrade (protocol 0) a still-encrypted frame is still opened
    assert dave_decrypt(bot, SPEAKER_ID, speaker.encrypt_opus(OPUS), protocol_version=0) == OPUS


def test_dave_failures(dave_pair: tuple[davey.DaveSession, davey.DaveSession]) -> None:
    bot, speaker = dave_pair
    encrypted = bytearray(speaker.encrypt_opus(OPUS))
    encrypted[0] ^= 0x01
    assert is_dave_frame(bytes(encrypted))
    # davey cannot tell a tampered frame from one under a key it does not hold yet
    assert _dave_reason(bot, SPEAKER_ID, bytes(encrypted)) == "no-key"
    # a member the bot has no decryptor for
    assert _dave_reason(bot, 999, speaker.encrypt_opus(OPUS)) == "no-key"
    assert not bot.can_passthrough(SPEAKER_ID)
    assert _dave_reason(bot, SPEAKER_ID, OPUS) == "unencrypted"
    assert _dave_reason(bot, SPEAKER_ID, b"garbage") == "unencrypted"


def test_passthrough_accepts_plain_frames() -> None:
    bot, _speaker = _dave_pair()
    bot.set_passthrough_mode(True)
    assert bot.can_passthrough(SPEAKER_ID)
    assert dave_decrypt(bot, SPEAKER_ID, b"garbage", protocol_version=1) == b"garbage"
    assert dave_decrypt(bot, SPEAKER_ID, OPUS, protocol_version=1) == OPUS
    bot.set_passthrough_mode(False, 0)
    assert _dave_reason(bot, SPEAKER_ID, OPUS) == "unencrypted"


def test_unknown_davey_error_is_dave_failed() -> None:
    class Broken:
        ready = True

        def decrypt(self, user_id: int, media_type: davey.MediaType, packet: bytes) -> bytes:
            raise ValueError("Failed to decrypt: SomethingNew")

        def can_passthrough(self, user_id: int) -> bool:
            return False

    assert _dave_reason(Broken(), SPEAKER_ID, OPUS) == "dave-failed"


@given(
    how=st.sampled_from(["size", "magic", "cut-trailer", "body", "truncate", "append"]),
    opus=st.binary(min_size=1, max_size=120),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_a_broken_dave_frame_is_refused_with_a_reason(
    dave_pair: tuple[davey.DaveSession, davey.DaveSession], how: str, opus: bytes, data: st.DataObject
) -> None:
    """A DAVE frame with a lying trailer size, bad magic, cut supplemental bytes, a tampered body,
    cut short or lengthened: refused with DaveError and a reason, whatever the bytes."""
    bot, speaker = dave_pair
    frame = bytes(speaker.encrypt_opus(opus))  # its length varies (the nonce grows): draw positions apart
    n = len(frame)
    where, value = data.draw(st.integers(0, 1 << 16)), data.draw(st.integers(1, 255))
    if how == "size":  # the supplemental size byte, just before the magic
        mutated = frame[:-3] + bytes((frame[-3] ^ value,)) + frame[-2:]
    elif how == "magic":
        i = n - 1 - where % 2
        mutated = frame[:i] + bytes((frame[i] ^ value,)) + frame[i + 1 :]
    elif how == "cut-trailer":  # supplemental bytes cut short, the magic kept
        mutated = frame[: -(3 + where % 10)] + DAVE_MAGIC
    elif how == "body":
        i = where % (n - 3)
        mutated = frame[:i] + bytes((frame[i] ^ value,)) + frame[i + 1 :]
    elif how == "truncate":
        mutated = frame[: where % n]
    else:
        mutated = frame + bytes((value,)) * (1 + where % 20)
    assume(mutated != frame and mutated != OPUS_SILENCE)
    with pytest.raises(DaveError) as info:
        dave_decrypt(bot, SPEAKER_ID, mutated, protocol_version=1)
    assert info.value.reason in {"no-key", "unencrypted", "dave-failed"}
    if not mutated.endswith(DAVE_MAGIC):
        assert info.value.reason == "unencrypted"  # not a DAVE frame, and passthrough is off


def test_is_dave_frame() -> None:
    trailer_ok = bytes(20) + bytes([12]) + b"\xfa\xfa"
    assert is_dave_frame(trailer_ok)
    assert not is_dave_frame(OPUS_SILENCE)
    assert not is_dave_frame(OPUS)
    assert not is_dave_frame(b"\xfa\xfa")
    assert not is_dave_frame(bytes(20) + bytes([11]) + b"\xfa\xfa")  # smaller than tag+nonce+size+magic
    assert not is_dave_frame(bytes(5) + bytes([13]) + b"\xfa\xfa")  # bigger than the frame
    assert not is_dave_frame(bytes(20) + bytes([12]) + b"\xfa\xfb")


def test_discord_py_with_dave_end_to_end(mode: str) -> None:
    """discord.py's own send path (DAVE + XChaCha) through our transport opening and DAVE gate."""
    bot, speaker = _dave_pair()
    vc = _discord_voice_client(XCHACHA, KEY, dave_session=speaker)
    packet = vc._get_voice_packet(OPUS)
    header, frame = transport_cipher(XCHACHA, KEY).open_rtp(packet)
    assert frame != OPUS and is_dave_frame(frame)
    # the same DAVE frame re-sealed the way a real client sends it (mode, extension, padding)
    cipher = transport_cipher(mode, KEY)
    resealed = cipher.seal_rtp(header, frame, extension_body=bytes(8), padding=16, counter=7)
    assert resealed[0] == 0xB0
    _header2, frame2 = cipher.open_rtp(resealed)
    assert frame2 == frame
    assert dave_decrypt(bot, SPEAKER_ID, frame, protocol_version=1) == OPUS
    # libdave rejects a replayed frame; the gate reports it like a missing key
    assert _dave_reason(bot, SPEAKER_ID, frame2) == "no-key"
