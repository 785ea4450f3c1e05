"""The fleet's private CA: the controller's server certificate and agent certificates.

Keys are ECDSA P-256. Agent certificates carry the agent's name as CN and DNS SAN and
are for client authentication only; the controller's certificate carries SERVER_NAME,
a name no agent can hold (agent names have no dots), so an agent certificate can never
pass for the controller.
"""

import datetime
import hashlib
import ipaddress
import socket
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import ControllerConfig, StateDir

SERVER_NAME = "controller.flux.internal"
CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=825)
AGENT_LIFETIME = datetime.timedelta(days=365)


class PKIError(Exception):
    pass


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    serial: int
    not_after: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    return serialization.load_pem_private_key(pem, password=None)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(pem_or_der: bytes) -> str:
    """`sha256:<hex>` of a certificate's DER encoding."""
    if pem_or_der.lstrip().startswith(b"-----"):
        der = x509.load_pem_x509_certificate(pem_or_der).public_bytes(serialization.Encoding.DER)
    else:
        der = pem_or_der
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Flux fleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def create_ca() -> tuple[bytes, bytes]:
    """A new self-signed CA; returns (cert PEM, key PEM)."""
    key = new_key()
    name = _name("Flux fleet CA")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert_pem(cert), key_pem(key)


class CertificateAuthority:
    def __init__(self, ca_cert_pem: bytes, ca_key_pem: bytes, agent_lifetime: datetime.timedelta = AGENT_LIFETIME,
                 server_lifetime: datetime.timedelta = SERVER_LIFETIME):
        self.cert_pem = ca_cert_pem
        self.cert = x509.load_pem_x509_certificate(ca_cert_pem)
        self._key = load_key(ca_key_pem)
        self.agent_lifetime = agent_lifetime
        self.server_lifetime = server_lifetime

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    def _builder(self, subject: x509.Name, public_key, lifetime: datetime.timedelta):
        now = _now()
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        # Valid a little before now, for clocks behind this one: a tenth of a short lifetime.
        backdate = min(datetime.timedelta(minutes=5), lifetime / 10)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - backdate)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )

    def _issue(self, builder) -> Issued:
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert_pem(cert), cert.serial_number, cert.not_valid_after_utc)

    def issue_server(self, extra_names: list[str]) -> tuple[Issued, bytes]:
        """The controller's certificate; returns it and its new key's PEM."""
        key = new_key()
        names: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME)]
        for entry in ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra_names]:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(entry)))
            except ValueError:
                names.append(x509.DNSName(entry))
        builder = (
            self._builder(_name(SERVER_NAME), key.public_key(), self.server_lifetime)
            .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(names))), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        return self._issue(builder), key_pem(key)

    def sign_agent_csr(self, csr_pem: bytes, name: str) -> Issued:
        """Signs an agent's CSR. The subject is set from `name`, whatever the CSR asked."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PKIError(f"malformed certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise PKIError("certificate signing request signature is invalid")
        if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
            raise PKIError("certificate signing request must use an EC key")
        builder = (
            self._builder(_name(name), csr.public_key(), self.agent_lifetime)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        return self._issue(builder)


def server_names(pem: bytes) -> list[str]:
    """The DNS names and addresses a server certificate was issued for (to issue it again)."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in names if isinstance(n, (x509.DNSName, x509.IPAddress))]


def due_for_renewal(pem: bytes, now: datetime.datetime | None = None) -> bool:
    """True once less than a third of the certificate's lifetime remains."""
    cert = x509.load_pem_x509_certificate(pem)
    now = now or _now()
    return cert.not_valid_after_utc - now < (cert.not_valid_after_utc - cert.not_valid_before_utc) / 3


def not_after(pem: bytes) -> datetime.datetime:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc


def cert_serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def certificate_authority(state: StateDir, config: ControllerConfig) -> CertificateAuthority:
    """The fleet's CA as a state directory holds it, issuing for the lifetimes its config sets."""
    return CertificateAuthority(state.read("ca.pem"), state.read("ca.key"),
                                datetime.timedelta(seconds=config.agent_cert_seconds),
                                datetime.timedelta(seconds=config.server_cert_seconds))
