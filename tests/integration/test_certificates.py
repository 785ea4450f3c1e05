"""Certificates over years, with lifetimes of seconds: a connected agent renews its certificate
without waiting to reconnect, the controller issues its own again before it runs out, and an
agent that was away past its certificate's end enrolls again in place, keeping its state."""

import json
import os
import pathlib
import socket
import ssl
import subprocess
import sys
import time

import pytest
from cryptography import x509

from tests.support import AgentProc, Controller, wait_until

pytestmark = pytest.mark.integration

LIFETIME = "30s"


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def _served_serial(controller: Controller, agent: AgentProc) -> int:
    """The serial of the certificate the controller's gRPC port shows a new connection."""
    context = ssl.create_default_context(cafile=str(agent.state_dir / "ca.pem"))
    context.load_cert_chain(agent.state_dir / "cert.pem", agent.state_dir / "key.pem")
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", controller.ports["grpc"]), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="controller.flux.internal") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def _https_serial(controller: Controller) -> int:
    context = ssl.create_default_context(cafile=str(controller.state_dir / "ca.pem"))
    with socket.create_connection(("127.0.0.1", controller.ports["http"]), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def _connected(controller: Controller, name: str) -> bool:
    return any(a["name"] == name and a["connected"] for a in controller.api("GET", "agents").json())


def test_certificates_renew_while_connected_and_an_expired_agent_enrolls_again_in_place(tmp_path, catalog_url):
    controller = Controller(tmp_path / "controller", catalog_url,
                            ("--agent-cert-lifetime", LIFETIME, "--server-cert-lifetime", LIFETIME))
    controller.run_args = ("--http-tls",)
    controller.start()
    try:
        first_server = _serial((controller.state_dir / "server.pem").read_bytes())
        assert _https_serial(controller) == first_server
        online = AgentProc.enroll(controller, tmp_path / "agents", "online-1").start()
        away = AgentProc.enroll(controller, tmp_path / "agents", "away-1")
        # What its state directory holds besides its identity (spool, settings, routes) stays.
        (away.state_dir / "kept.txt").write_text("kept")
        issued = away.read("cert.pem")
        try:
            # A current certificate is not replaced by enrolling again: the agent renews it itself.
            token = controller.join_token(["db"])
            refused = subprocess.run(
                [sys.executable, "-m", "agent.runtime.main", "enroll", "--controller", token["enroll_address"],
                 "--token", token["token"], "--name", "away-1", "--roles", "db", "--state-dir", str(away.state_dir),
                 "--ca-fingerprint", token["ca_fingerprint"]], capture_output=True, text=True)
            assert refused.returncode == 1 and "already holds an enrolled agent (away-1)" in refused.stderr

            wait_until(lambda: _connected(controller, "online-1"), 30, "the online agent connected")
            first = online.read("cert.pem")
            first_end = x509.load_pem_x509_certificate(first).not_valid_after_utc
            # Two thirds of 30 s on, the connected agent renews, and is back on its new certificate.
            wait_until(lambda: _serial(online.read("cert.pem")) != _serial(first), 40, "the agent's renewal")
            renewed_at = time.time()
            assert renewed_at < first_end.timestamp(), "renewed only after the certificate had run out"
            wait_until(lambda: _connected(controller, "online-1"), 20, "the agent back with its new certificate")
            listed = next(a for a in controller.api("GET", "agents").json() if a["name"] == "online-1")
            renewed = x509.load_pem_x509_certificate(online.read("cert.pem"))
            assert listed["cert_expires_at"] == renewed.not_valid_after_utc.isoformat()
            assert "renewed this agent's certificate" in online.log.read_text()

            # The controller's own certificate was issued again, and new connections get it.
            wait_until(lambda: _serial((controller.state_dir / "server.pem").read_bytes()) != first_server,
                       30, "the controller's new certificate")
            renewed_server = _serial((controller.state_dir / "server.pem").read_bytes())
            assert _served_serial(controller, online) == renewed_server
            # The HTTPS API too, without a restart.
            wait_until(lambda: _https_serial(controller) == renewed_server, 10, "the API's new certificate")
            assert "issued the controller's certificate again" in controller.log.read_text()

            # The agent that was away is past its certificate's end: it says what to do.
            wait_until(lambda: x509.load_pem_x509_certificate(issued).not_valid_after_utc.timestamp() < time.time(),
                       40, "the away agent's certificate to run out")
            away.start()
            wait_until(lambda: "enroll it again with a join token made for it" in away.log.read_text(), 20,
                       "the expired agent's message")
            assert not _connected(controller, "away-1")

            def enroll_again(token: dict) -> subprocess.CompletedProcess:
                return subprocess.run(
                    [sys.executable, "-m", "agent.runtime.main", "enroll", "--controller", token["enroll_address"],
                     "--token", token["token"], "--name", "away-1", "--roles", "db", "--state-dir",
                     str(away.state_dir), "--ca-fingerprint", token["ca_fingerprint"], "--json"],
                    capture_output=True, text=True)

            # Not with just any token: a host could take the name (and its jobs) over.
            taken = enroll_again(controller.join_token(["db"]))
            assert taken.returncode == 1 and "flux agents token --name away-1" in taken.stderr, taken.stderr
            assert "for agent online-1, not away-1" in enroll_again(controller.join_token(["db"], name="online-1")).stderr
            token = controller.join_token(["db"], name="away-1")
            enrolled = subprocess.run(
                [sys.executable, "-m", "agent.runtime.main", "enroll", "--controller", token["enroll_address"],
                 "--token", token["token"], "--name", "away-1", "--roles", "db", "--state-dir", str(away.state_dir),
                 "--ca-fingerprint", token["ca_fingerprint"], "--json"], capture_output=True, text=True)
            assert enrolled.returncode == 0, enrolled.stderr
            assert '"enrolled_again": true' in enrolled.stdout
            # The running agent connects with the new certificate as soon as it is there.
            wait_until(lambda: _connected(controller, "away-1"), 30, "the agent enrolled again")
            assert (away.state_dir / "kept.txt").read_text() == "kept"
            assert (away.state_dir / "spool").is_dir()
        finally:
            online.stop()
            away.stop()
    finally:
        controller.stop()


def test_the_api_over_https_is_trusted_through_the_fleet_ca(tmp_path, catalog_url):
    """`flux-controller run --http-tls`: the CLI reaches it with `flux login --ca-file`, and without
    the CA it says what to do instead of a bare TLS error."""
    controller = Controller(tmp_path / "controller", catalog_url)
    controller.run_args = ("--http-tls",)
    controller.start()
    env = {**os.environ, "FLUX_CONFIG_DIR": str(tmp_path / "cli")}
    env.pop("FLUX_API_BASE", None), env.pop("FLUX_API_TOKEN", None), env.pop("FLUX_CA_FILE", None)

    def flux(*args):
        return subprocess.run([str(pathlib.Path(sys.executable).parent / "flux"), *args], capture_output=True,
                              text=True, env=env)

    try:
        untrusted = flux("login", "--token", controller.token, "--api-base", controller.api_base)
        assert untrusted.returncode != 0 and "flux login --ca-file" in untrusted.stderr, untrusted.stderr
        assert controller.token not in untrusted.stderr
        login = flux("login", "--token", controller.token, "--api-base", controller.api_base,
                     "--ca-file", str(controller.state_dir / "ca.pem"))
        assert login.returncode == 0, login.stderr
        listed = flux("agents", "list", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
        # Plain HTTP on the same port gets nowhere.
        import httpx
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{controller.ports['http']}/api/cli/v1/agents", timeout=5)
        wrong = flux("login", "--token", controller.token, "--ca-file", str(tmp_path / "missing.pem"))
        assert wrong.returncode == 2 and "cannot read the CA file" in wrong.stderr
    finally:
        controller.stop()
