"""Requests over plain HTTP load no CA bundle: httpx's default loads the whole bundle into a new
SSL context for every client (about 65 ms of CPU), which the docker agent's probe paid on every
try and the CLI on every command."""

import http.server
import json
import ssl
import threading
import types

import pytest

from agent.adapters import stacks
from cli.client import ApiClient
from cli.config import Settings


class _Answers(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def loaded(monkeypatch):
    """The CA files and bundles loaded into SSL contexts while the test runs."""
    calls = []
    for name in ("load_verify_locations", "load_default_certs"):
        def counted(self, *args, _original=getattr(ssl.SSLContext, name), _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(ssl.SSLContext, name, counted)
    return calls


def test_a_command_against_a_plain_http_api_loads_no_ca_bundle(server, loaded):
    client = ApiClient(Settings(f"http://127.0.0.1:{server}/api", "flx_test"))
    assert client._http.get("anything").json() == {"ok": True}
    assert loaded == []


def test_a_command_against_an_https_api_still_checks_certificates_against_the_system_cas(loaded):
    ApiClient(Settings("https://flux.example.com/api", "flx_test"))
    assert loaded, "an https API base must be checked against trusted CAs"


def test_the_stack_probe_loads_no_ca_bundle(server, loaded):
    settings = types.SimpleNamespace(advertise_host="127.0.0.1")
    spec = types.SimpleNamespace(jwt_secret="s" * 32)
    assert stacks.probe(settings, spec, server, timeout=5) == {"status": 200}
    assert loaded == []
