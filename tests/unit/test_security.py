"""Tokens, the private CA and sealed secrets."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.runtime.identity import check_fingerprint, der_fingerprint, new_key_and_csr
from controller.pki import SERVER_NAME, CertificateAuthority, PKIError, create_ca, fingerprint
from controller.secretbox import SecretBox, SecretBoxError, new_master_key
from controller.tokens import (is_well_formed_api_token, is_well_formed_join_token, new_api_token,
                               new_join_token, token_hash)


def test_api_tokens_have_the_product_format_and_a_checksum():
    token = new_api_token()
    assert is_well_formed_api_token(token)
    prefix, body, checksum = token.rsplit("_", 2)
    assert prefix == "flx_live" and len(body) == 32 and len(checksum) == 4
    tampered = token[:-1] + ("0" if token[-1] != "0" else "1")
    assert not is_well_formed_api_token(tampered)
    assert not is_well_formed_api_token("flx_live_" + "g" * 32 + "_0000")
    assert new_api_token() != token
    assert token_hash(token) != token and len(token_hash(token)) == 64


def test_join_tokens_are_distinct_from_api_tokens():
    token = new_join_token()
    assert is_well_formed_join_token(token)
    assert not is_well_formed_api_token(token)
    assert not is_well_formed_join_token(new_api_token())


@pytest.fixture(scope="module")
def ca():
    return CertificateAuthority(*create_ca())


def test_agent_certificates_name_the_agent_and_are_client_only(ca):
    _, csr = new_key_and_csr("someone-else")
    issued = ca.sign_agent_csr(csr, "db-1")
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "db-1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(ca.cert)
    assert issued.not_after > datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=300)


def test_server_certificate_carries_the_controller_name(ca):
    issued, _ = ca.issue_server(["flux.example.com", "10.0.0.5"])
    sans = x509.load_pem_x509_certificate(issued.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    names = sans.get_values_for_type(x509.DNSName)
    assert SERVER_NAME in names and "flux.example.com" in names
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)].count("10.0.0.5") == 1


def test_malformed_csr_is_refused(ca):
    with pytest.raises(PKIError, match="malformed"):
        ca.sign_agent_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "x")


def test_fingerprints_agree_between_controller_and_agent(ca):
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    assert fingerprint(ca.cert_pem) == der_fingerprint(der) == ca.fingerprint
    assert check_fingerprint(ca.fingerprint.upper().replace("SHA256", "sha256")) == ca.fingerprint
    with pytest.raises(Exception, match="sha256:<64 hex digits>"):
        check_fingerprint("md5:abc")


def test_secret_box_round_trip_and_binding():
    box = SecretBox(new_master_key())
    sealed = box.seal(b"jwt-secret", "project:1")
    assert b"jwt-secret" not in sealed.encode()
    assert box.open(sealed, "project:1") == b"jwt-secret"
    with pytest.raises(SecretBoxError):
        box.open(sealed, "project:2")
    with pytest.raises(SecretBoxError):
        SecretBox(new_master_key()).open(sealed, "project:1")
    with pytest.raises(SecretBoxError, match="32 bytes"):
        SecretBox(b"short")


def test_agents_renew_once_two_thirds_of_the_lifetime_are_gone(ca):
    from agent.runtime.identity import needs_renewal

    _, csr = new_key_and_csr("db-1")
    issued = ca.sign_agent_csr(csr, "db-1")
    now = datetime.datetime.now(datetime.timezone.utc)
    assert not needs_renewal(issued.cert_pem, now)
    assert not needs_renewal(issued.cert_pem, now + datetime.timedelta(days=200))
    assert needs_renewal(issued.cert_pem, now + datetime.timedelta(days=250))


def test_a_renewal_interrupted_between_its_two_files_is_finished_at_start(tmp_path):
    from agent.runtime.config import StateDir
    from agent.runtime.connection import finish_renewal

    state = StateDir(tmp_path)
    (tmp_path / "key.pem").write_text("new key")  # replaced before the interruption
    (tmp_path / "cert.pem").write_text("old cert")
    (tmp_path / "cert.pem.new").write_text("new cert")
    finish_renewal(state)
    assert (tmp_path / "key.pem").read_text() == "new key"
    assert (tmp_path / "cert.pem").read_text() == "new cert"
    assert not (tmp_path / "cert.pem.new").exists()
