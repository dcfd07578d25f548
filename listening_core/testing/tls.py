"""A throwaway certificate authority for the loopback Discord.

discord.py only speaks ``https://`` and ``wss://`` to Discord, so the loopback serves TLS with a
certificate issued by a CA made fresh for each :class:`~listening_core.testing.LocalDiscord`;
clients trust that CA through the SSL context handed to their connector. Nothing is written to
disk and nothing is trusted system-wide.
"""

from __future__ import annotations

import datetime
import ssl
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["TestCertificateAuthority"]


class TestCertificateAuthority:
    """A CA and one server certificate valid for ``hostnames``, both made in memory."""

    __test__ = False  # not a pytest test class

    def __init__(self, hostnames: Iterable[str]) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "listening-core loopback test CA")])
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            # key identifiers: Python 3.13's default context verifies strictly (VERIFY_X509_STRICT)
            # and refuses a chain without them ("Missing Authority Key Identifier")
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key()), critical=False
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        names = sorted(set(hostnames))
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
            .sign(self._ca_key, hashes.SHA256())
        )

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate in PEM, for clients that want to trust it."""
        return self._ca_cert.public_bytes(serialization.Encoding.PEM)

    def server_context(self) -> ssl.SSLContext:
        """An SSL context for the loopback's listening sockets."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert_pem = self._cert.public_bytes(serialization.Encoding.PEM)
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # ssl can only load a certificate chain from files; keep them only as long as loading takes.
        with tempfile.TemporaryDirectory(prefix="listening-core-tls-") as tmp:
            cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert_file.write_bytes(cert_pem + self.ca_pem)
            key_file.write_bytes(key_pem)
            ctx.load_cert_chain(cert_file, key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this CA (and only it), with hostname checking on."""
        # With cadata given, the system's default roots are not loaded: only this CA is trusted.
        return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
