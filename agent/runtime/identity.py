"""Enrollment: trust the controller's CA by fingerprint, then trade a CSR for a certificate."""

import _ssl
import hashlib
import re
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..errors import AgentError

# The name the controller's certificate carries for agents; agents verify it instead
# of the address they dial, which may be any of the controller's names.
CONTROLLER_TLS_NAME = "controller.flux.internal"
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AgentError(f"--controller must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def check_fingerprint(text: str) -> str:
    value = text.strip().lower()
    if not _FINGERPRINT.match(value):
        raise AgentError(f"--ca-fingerprint must look like sha256:<64 hex digits>, got {text!r}")
    return value


def der_fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fetch_pinned_ca(host: str, port: int, fingerprint: str, timeout: float = 10) -> bytes:
    """The CA certificate (PEM) the controller presents, if it matches `fingerprint`.

    The chain is read without verification, then the pin decides: the CA must have
    exactly this fingerprint and must have issued the certificate the server showed.
    (Python 3.11 reads a peer's whole chain only through this private accessor,
    public from 3.13 on as SSLSocket.get_unverified_chain.)
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=CONTROLLER_TLS_NAME) as tls:
                chain = [c.public_bytes(_ssl.ENCODING_DER) for c in tls._sslobj.get_unverified_chain()]
    except (OSError, ssl.SSLError) as exc:
        raise AgentError(f"cannot reach the controller at {host}:{port}: {exc}", retryable=True) from None
    if not chain:
        raise AgentError(f"controller at {host}:{port} presented no certificate")
    matches = [der for der in chain if der_fingerprint(der) == fingerprint]
    if not matches:
        raise AgentError(
            f"controller at {host}:{port} does not present a CA with fingerprint {fingerprint}; "
            "refusing to enroll (check the fingerprint shown with the join token)"
        )
    ca = x509.load_der_x509_certificate(matches[0])
    leaf = x509.load_der_x509_certificate(chain[0])
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:
        raise AgentError(f"controller's certificate was not issued by the pinned CA: {exc}") from None
    return ca.public_bytes(serialization.Encoding.PEM)


def new_key_and_csr(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def certificate_expiry(cert_pem: bytes) -> str:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.isoformat()


def certificate_expired(cert_pem: bytes) -> bool:
    import datetime

    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc <= datetime.datetime.now(datetime.timezone.utc)


def seconds_until_renewal(cert_pem: bytes) -> float:
    """How long until less than a third of the certificate's lifetime remains (0: it is due)."""
    import datetime

    cert = x509.load_pem_x509_certificate(cert_pem)
    due = cert.not_valid_after_utc - (cert.not_valid_after_utc - cert.not_valid_before_utc) / 3
    return max(0.0, (due - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def needs_renewal(cert_pem: bytes, now=None) -> bool:
    """True once less than a third of the certificate's lifetime remains."""
    import datetime

    cert = x509.load_pem_x509_certificate(cert_pem)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime / 3
