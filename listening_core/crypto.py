"""Transport encryption (the ``_rtpsize`` AEAD modes) and the DAVE gate, with no I/O.

Wire layout (``docs/voice-protocol.md`` section 3)::

    clear RTP header (AAD: 12 + 4·CC + 4·X bytes, the extension preamble included)
    ciphertext( extension body ‖ Opus/DAVE frame ‖ RTP padding ) ‖ 16-byte tag ‖ u32 counter BE

The nonce is the 4 counter bytes followed by zeros (12 bytes for AES-256-GCM, 24 for
XChaCha20-Poly1305). RTCP keeps its first 8 bytes clear as the AAD. :func:`transport_cipher`
builds one cipher per session key; :func:`dave_decrypt` then removes the end-to-end layer.
"""

from __future__ import annotations

import logging
import struct
from typing import ClassVar, Protocol

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import DaveError, DecryptError, PacketError, _pip_install
from .frames import OPUS_SILENCE
from .rtp import RtpHeader


def _davey_import_error(exc: ImportError) -> ImportError:
    """The error to raise when ``import davey`` fails: what is wrong, and the command that fixes it.

    Every voice call on Discord is end-to-end encrypted (DAVE), so the receiver cannot work
    without davey; this is raised when :class:`~listening_core.VoiceClient` (or this module) is
    first imported. ``name`` stays ``"davey"``, so tools can tell which module is missing.
    """
    tail = "(`listening doctor` checks everything voice receive needs)"
    if isinstance(exc, ModuleNotFoundError) and exc.name == "davey":
        return ModuleNotFoundError(
            "listening-core needs davey to open the end-to-end encryption (DAVE) of Discord voice "
            f"calls, and it is not installed: {_pip_install('davey')} {tail}",
            name="davey",
        )
    return ImportError(
        f"davey is installed but cannot be imported ({type(exc).__name__}: {exc}); reinstall it: "
        f"{_pip_install('davey', reinstall=True)} {tail}",
        name="davey",
    )


try:
    import davey
except ImportError as _exc:
    raise _davey_import_error(_exc) from _exc

__all__ = [
    "DAVE_MAGIC",
    "OPUS_SILENCE",
    "SUPPORTED_MODES",
    "AesGcmCipher",
    "DaveError",
    "DaveSessionLike",
    "DecryptError",
    "PacketError",
    "TransportCipher",
    "XChaChaCipher",
    "dave_decrypt",
    "is_dave_frame",
    "transport_cipher",
]

_log = logging.getLogger(__name__)

SUPPORTED_MODES = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")
"""Transport encryption modes this package opens and seals, in order of preference."""

KEY_SIZE = 32
TAG_SIZE = 16
COUNTER_SIZE = 4
RTCP_AAD_SIZE = 8
_OVERHEAD = TAG_SIZE + COUNTER_SIZE
_U32 = struct.Struct(">I")

DAVE_MAGIC = b"\xfa\xfa"
"""The marker ending every DAVE-encrypted frame."""
# supplemental bytes = 8-byte truncated tag + ULEB128 nonce (>= 1) + ranges + size byte + magic
_DAVE_MIN_SUPPLEMENTAL = 8 + 1 + 1 + len(DAVE_MAGIC)

_Buffer = bytes | bytearray | memoryview


class TransportCipher:
    """One session key of one ``_rtpsize`` mode: opens what Discord sends, seals like Discord.

    Build it with :func:`transport_cipher`. The AEAD context is created once, here.
    """

    __slots__ = ("_nonce_pad",)

    mode: ClassVar[str]
    """The mode name as negotiated in op 1 / op 4."""
    nonce_size: ClassVar[int]

    def __init__(self, key: bytes | bytearray | list[int]) -> None:
        key = bytes(key)
        if len(key) != KEY_SIZE:
            raise ValueError(f"{self.mode} needs a {KEY_SIZE}-byte key, got {len(key)} bytes")
        self._nonce_pad = bytes(self.nonce_size - COUNTER_SIZE)
        self._set_key(key)

    def _set_key(self, key: bytes) -> None:
        raise NotImplementedError

    def _decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Open ``ciphertext ‖ tag``; raise :class:`DecryptError` ``"bad-tag"`` on failure."""
        raise NotImplementedError

    def _encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Return ``ciphertext ‖ tag``."""
        raise NotImplementedError

    # -- opening (receive side) ---------------------------------------------------------------

    def open_rtp(self, datagram: _Buffer) -> tuple[RtpHeader, bytes]:
        """Decrypt an RTP datagram; return its header and the Opus/DAVE frame.

        The extension body and RTP padding are stripped from the frame; the decrypted extension
        body is left in ``header.extension_body``. Raises :class:`PacketError` for a malformed
        header and :class:`DecryptError` (``"truncated"``, ``"bad-extension"``, ``"bad-tag"``,
        ``"bad-padding"``) when the rest does not open.
        """
        data = datagram if type(datagram) is bytes else bytes(datagram)
        header = RtpHeader.parse(data)
        hs = header.header_size
        end = len(data) - COUNTER_SIZE
        body = end - TAG_SIZE - hs  # plaintext length
        if body < 0:
            raise DecryptError(
                "truncated", f"RTP datagram of {len(data)} bytes has no room for tag and counter"
            )
        ext = 4 * header.extension_words
        if ext > body:
            raise DecryptError("bad-extension", f"extension of {ext} bytes exceeds the {body}-byte payload")
        plain = self._decrypt(data[end:] + self._nonce_pad, data[hs:end], data[:hs])
        stop = body
        if header.padding:
            pad = plain[-1] if body else 0
            if pad == 0 or pad > body - ext:
                raise DecryptError(
                    "bad-padding", f"padding length {pad} with {body - ext} bytes after extension"
                )
            stop -= pad
        if ext:
            header.extension_body = plain[:ext]
        elif stop == body:
            return header, plain
        return header, plain[ext:stop]

    def open_rtcp(self, datagram: _Buffer) -> bytes:
        """Decrypt an RTCP datagram; return the plain RTCP packet (clear 8 bytes ‖ decrypted rest)."""
        data = datagram if type(datagram) is bytes else bytes(datagram)
        end = len(data) - COUNTER_SIZE
        if end - TAG_SIZE < RTCP_AAD_SIZE:
            raise DecryptError(
                "truncated", f"RTCP datagram of {len(data)} bytes has no room for tag and counter"
            )
        aad = data[:RTCP_AAD_SIZE]
        return aad + self._decrypt(data[end:] + self._nonce_pad, data[RTCP_AAD_SIZE:end], aad)

    # -- sealing (send side, used by the loopback server) -------------------------------------

    def seal_rtp(
        self,
        header: RtpHeader,
        payload: bytes,
        *,
        extension_body: bytes = b"",
        padding: int = 0,
        counter: int,
    ) -> bytes:
        """Encrypt one RTP packet the way Discord and discord.py do.

        ``extension_body`` (a multiple of 4 bytes) goes encrypted right after the clear extension
        preamble; with no ``header.extension_profile`` a non-empty body uses ``0xBEDE``.
        ``padding`` (0..255) appends that many RTP padding bytes and sets the P bit.
        """
        if len(extension_body) % 4:
            raise ValueError(f"extension body must be a multiple of 4 bytes, got {len(extension_body)}")
        if not 0 <= padding <= 255:
            raise ValueError(f"RTP padding must be 0..255 bytes, got {padding}")
        aad = header.serialize(extension_words=len(extension_body) // 4, padding=padding > 0)
        plain = bytes(extension_body) + bytes(payload)
        if padding:
            plain += bytes(padding - 1) + bytes((padding,))
        ctr = self._counter(counter)
        return aad + self._encrypt(ctr + self._nonce_pad, plain, aad) + ctr

    def seal_rtcp(self, plain: bytes, counter: int) -> bytes:
        """Encrypt a plain RTCP packet: the first 8 bytes stay clear as the AAD."""
        if len(plain) < RTCP_AAD_SIZE:
            raise ValueError(f"an RTCP packet is at least 8 bytes, got {len(plain)}")
        aad = bytes(plain[:RTCP_AAD_SIZE])
        ctr = self._counter(counter)
        return aad + self._encrypt(ctr + self._nonce_pad, bytes(plain[RTCP_AAD_SIZE:]), aad) + ctr

    @staticmethod
    def _counter(counter: int) -> bytes:
        if not 0 <= counter <= 0xFFFFFFFF:
            raise ValueError(f"nonce counter must fit in 32 bits, got {counter}")
        return _U32.pack(counter)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} mode={self.mode!r}>"


class AesGcmCipher(TransportCipher):
    """``aead_aes256_gcm_rtpsize``: AES-256-GCM, 12-byte nonce."""

    __slots__ = ("_aead",)

    mode = "aead_aes256_gcm_rtpsize"
    nonce_size = 12

    def _set_key(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def _decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptError(
                "bad-tag", "AES-GCM authentication failed (wrong key or tampered packet)"
            ) from None

    def _encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)


class XChaChaCipher(TransportCipher):
    """``aead_xchacha20_poly1305_rtpsize``: XChaCha20-Poly1305 (IETF), 24-byte nonce."""

    __slots__ = ("_key",)

    mode = "aead_xchacha20_poly1305_rtpsize"
    nonce_size = 24

    def _set_key(self, key: bytes) -> None:
        self._key = key

    def _decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            out: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                ciphertext, aad, nonce, self._key
            )
        except nacl.exceptions.CryptoError:
            raise DecryptError(
                "bad-tag", "XChaCha20-Poly1305 authentication failed (wrong key or tampered packet)"
            ) from None
        return out

    def _encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        out: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, aad, nonce, self._key
        )
        return out


_CIPHERS: dict[str, type[TransportCipher]] = {cls.mode: cls for cls in (AesGcmCipher, XChaChaCipher)}


def transport_cipher(mode: str, key: bytes | bytearray | list[int]) -> TransportCipher:
    """Build the cipher for ``mode`` and the 32-byte ``secret_key`` from op 4 (bytes or list of ints)."""
    cls = _CIPHERS.get(mode)
    if cls is None:
        raise ValueError(
            f"unsupported transport encryption mode {mode!r}; supported: {', '.join(SUPPORTED_MODES)}"
        )
    return cls(key)


# -- DAVE -------------------------------------------------------------------------------------


class DaveSessionLike(Protocol):
    """The part of :class:`davey.DaveSession` the gate uses."""

    @property
    def ready(self) -> bool:
        """Whether the session holds the MLS group's keys (it can decrypt)."""
        ...

    def decrypt(self, user_id: int, media_type: davey.MediaType, packet: bytes) -> bytes:
        """Open one DAVE frame from ``user_id``; raise :class:`ValueError` when it does not open."""
        ...

    def can_passthrough(self, user_id: int) -> bool:
        """Whether a plain (not DAVE-encrypted) frame from ``user_id`` is accepted right now."""
        ...


def is_dave_frame(frame: _Buffer) -> bool:
    """True when ``frame`` ends in a well-formed DAVE trailer (sane size byte, then ``FA FA``)."""
    n = len(frame)
    if n < _DAVE_MIN_SUPPLEMENTAL or frame[-1] != 0xFA or frame[-2] != 0xFA:
        return False
    return _DAVE_MIN_SUPPLEMENTAL <= frame[-3] <= n


def _dave_reason(message: str) -> str:
    # davey 0.1.7 messages: "Failed to decrypt: NoDecryptorForUser",
    # "Failed to decrypt: DecryptionFailed(NoValidCryptorFound { ... })",
    # "Failed to decrypt: DecryptionFailed(UnencryptedWhenPassthroughDisabled)"
    flat = message.lower().replace(" ", "").replace("_", "")
    if "novalidcryptor" in flat or "nodecryptorforuser" in flat:
        return "no-key"
    if "unencryptedwhenpassthroughdisabled" in flat:
        return "unencrypted"
    return "dave-failed"


def dave_decrypt(
    session: DaveSessionLike | None,
    user_id: int,
    frame: bytes,
    *,
    protocol_version: int,
    downgraded: bool = False,
) -> bytes:
    """Remove DAVE end-to-end encryption from one transport-decrypted audio frame.

    - the Opus silence frame ``F8 FF FE`` passes as is;
    - ``protocol_version`` 0 (DAVE off): the frame passes as is, unless it carries a DAVE trailer
      and the session is still ready (a sender finishing a downgrade), then it is decrypted;
    - ``downgraded`` (the call went to version 0 and is upgrading back): a plain frame passes, as
      senders send plain frames until the upgrade's transition executes;
    - DAVE on but no ready session yet: :class:`DaveError` ``"no-key"`` (hold and retry);
    - otherwise ``session.decrypt``; a plain frame is accepted only while
      ``session.can_passthrough(user_id)``.

    Raises :class:`DaveError` with reason ``"no-key"`` (sender's key not known yet, or the frame
    does not open under any key held: hold it briefly and retry after the commit/welcome),
    ``"unencrypted"`` (plain frame, passthrough off) or ``"dave-failed"``.
    """
    if frame == OPUS_SILENCE:
        return frame
    ready = session is not None and session.ready
    if protocol_version == 0 and not (ready and is_dave_frame(frame)):
        return frame
    if downgraded and not is_dave_frame(frame):
        return frame
    if session is None or not ready:
        raise DaveError("no-key", "DAVE session is not ready yet; hold the frame and retry")
    try:
        return session.decrypt(user_id, davey.MediaType.audio, frame)
    except ValueError as exc:
        message = str(exc)
        raise DaveError(_dave_reason(message), f"DAVE decrypt for user {user_id}: {message}") from None
