"""Enrollment, mutual TLS, the agent stream and jobs, against a real controller and agents."""

import datetime
import errno
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import grpc
import psycopg
import pytest

from agent.runtime.identity import new_key_and_csr
from controller.pki import SERVER_NAME, CertificateAuthority, create_ca
from proto import fleet_pb2 as pb
from proto import fleet_pb2_grpc
from tests.support import AgentProc, CuttableProxy, run, script, small_disk, wait_until

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _connect_with(controller, ca_pem: bytes, key: bytes | None, cert: bytes | None):
    """Opens the Fleet stream with the given client identity and returns the first reply."""
    credentials = grpc.ssl_channel_credentials(ca_pem, key, cert)
    with grpc.secure_channel(f"127.0.0.1:{controller.ports['grpc']}", credentials,
                             options=[("grpc.ssl_target_name_override", SERVER_NAME)]) as channel:
        stream = fleet_pb2_grpc.FleetStub(channel).Connect(
            iter([pb.AgentMessage(hello=pb.Hello(facts=pb.Facts(hostname="probe")))]), timeout=5)
        return next(stream)


def enroll_cli(token: dict, name: str, roles: str, base, fingerprint: str | None = None):
    return run(script("flux-agent"), "enroll", "--controller", token["enroll_address"],
               "--token", token["token"], "--name", name, "--roles", roles,
               "--state-dir", str(base / name),
               "--ca-fingerprint", fingerprint or token["ca_fingerprint"], check=False)


def test_enroll_connect_list_and_ping(controller, agents):
    agent = agents("db-1", "db")
    wait_until(lambda: controller.connected("db-1"), 15, "db-1 connected")

    listed = controller.agent("db-1")
    assert listed["roles"] == ["db"]
    assert listed["revoked"] is False
    facts = listed["facts"]
    assert facts["hostname"]
    assert facts["agent_version"] == "0.1.0"
    assert re.match(r"^\d+\.\d+", facts["tools"]["pg_dump"])
    assert re.match(r"^\d+\.\d+", facts["tools"]["psql"])
    assert facts["spool_free_bytes"] > 0
    assert datetime.datetime.fromisoformat(listed["cert_expires_at"]) > datetime.datetime.now(datetime.timezone.utc)

    ping = controller.api("POST", "agents/db-1/ping")
    assert ping.status_code == 200, ping.text
    assert 0 < ping.json()["rtt_ms"] < 5000

    # The agent's certificate is from the fleet CA and names the agent.
    assert b"BEGIN CERTIFICATE" in agent.read("cert.pem")
    assert (agent.state_dir / "key.pem").stat().st_mode & 0o077 == 0


def test_heartbeats_update_last_seen(controller, agents):
    agents("hb-1")
    wait_until(lambda: controller.connected("hb-1"), 15, "hb-1 connected")
    first = controller.agent("hb-1")["last_seen"]
    wait_until(lambda: controller.agent("hb-1")["last_seen"] != first, 10, "a heartbeat")


def test_client_without_certificate_is_refused(controller, agents):
    ca_pem = (controller.state_dir / "ca.pem").read_bytes()
    with pytest.raises(grpc.RpcError) as refused:
        _connect_with(controller, ca_pem, None, None)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_with_certificate_from_another_ca_is_refused(controller):
    other = CertificateAuthority(*create_ca())
    key, csr = new_key_and_csr("intruder")
    cert = other.sign_agent_csr(csr, "intruder").cert_pem
    ca_pem = (controller.state_dir / "ca.pem").read_bytes()
    with pytest.raises(grpc.RpcError) as refused:
        _connect_with(controller, ca_pem, key, cert)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_revoked_agent_is_disconnected_and_refused(controller, agents):
    agent = agents("rev-1")
    wait_until(lambda: controller.connected("rev-1"), 15, "rev-1 connected")

    revoked_at = time.monotonic()
    response = controller.api("POST", "agents/rev-1/revoke")
    assert response.status_code == 200, response.text
    # The stream closes within 5 seconds and the agent stops for good.
    code = agent.proc.wait(timeout=5)
    assert time.monotonic() - revoked_at < 5
    assert code == 78
    assert not controller.connected("rev-1")
    assert controller.agent("rev-1")["revoked"] is True
    assert "revoked" in agent.log.read_text()

    with pytest.raises(grpc.RpcError) as refused:
        _connect_with(controller, agent.read("ca.pem"), agent.read("key.pem"), agent.read("cert.pem"))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in refused.value.details()


def test_join_token_works_once(controller, tmp_path):
    token = controller.join_token(["db"])
    AgentProc.enroll(controller, tmp_path, "once-1", "db", token=token)
    second = enroll_cli(token, "once-2", "db", tmp_path)
    assert second.returncode == 1
    assert "join token was already used" in second.stderr
    assert not (tmp_path / "once-2" / "cert.pem").exists()
    assert controller.agent("once-2") is None


def test_expired_join_token_is_refused(controller, tmp_path):
    token = controller.join_token(["db"], ttl=60)
    with psycopg.connect(controller.catalog_url, autocommit=True) as conn:
        conn.execute("UPDATE join_tokens SET expires_at = now() - interval '1 second'")
    proc = enroll_cli(token, "late-1", "db", tmp_path)
    assert proc.returncode == 1
    assert "join token has expired" in proc.stderr
    assert controller.agent("late-1") is None


def test_join_token_cannot_grant_other_roles(controller, tmp_path):
    token = controller.join_token(["db"])
    proc = enroll_cli(token, "dock-1", "docker", tmp_path)
    assert proc.returncode == 1
    assert "does not grant role(s) docker" in proc.stderr
    assert controller.agent("dock-1") is None


def test_enroll_refuses_a_controller_whose_ca_does_not_match(controller, tmp_path):
    token = controller.join_token(["db"])
    wrong = "sha256:" + "0" * 64
    proc = enroll_cli(token, "pin-1", "db", tmp_path, fingerprint=wrong)
    assert proc.returncode == 1
    assert "does not present a CA with fingerprint" in proc.stderr
    # The token was never sent, so it still works.
    AgentProc.enroll(controller, tmp_path, "pin-1", "db", token=token)


def test_agents_reconnect_after_controller_restart(controller, agents):
    agents("re-1")
    agents("re-2")
    wait_until(lambda: controller.connected("re-1") and controller.connected("re-2"), 15, "agents connected")
    assert controller.stop() == 0
    controller.start()
    restarted = time.monotonic()
    wait_until(lambda: controller.connected("re-1") and controller.connected("re-2"), 10,
               "agents reconnected")
    assert time.monotonic() - restarted < 10


# One agent session in a process of its own: connects, and once the controller is gone, reports
# what asyncio said of the tasks the ended stream left behind.
_ONE_SESSION = """
import asyncio, gc, json, sys
from agent.errors import AgentError
from agent.runtime.config import StateDir
from agent.runtime.connection import Agent, Backoff

async def main():
    said = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: said.append(context["message"]))
    agent = Agent(StateDir(sys.argv[1]), tools={"pg_dump": "test", "psql": "test"})
    try:
        await agent.session(Backoff())
    except AgentError as exc:
        print("session ended:", exc, file=sys.stderr)
    for _ in range(3):  # what the ended stream left is collected, and anything pending is destroyed
        gc.collect()
        await asyncio.sleep(0.2)
    print(json.dumps(said))

asyncio.run(main())
"""


def test_a_stream_that_ends_leaves_no_task_of_it_pending(controller, agents):
    """An ended stream's requests end with it: no "Task was destroyed but it is pending!" nor
    "aclose(): asynchronous generator is already running" in the agent's log at every reconnect."""
    agent = agents("tidy-1", start=False)
    proc = subprocess.Popen([sys.executable, "-c", _ONE_SESSION, str(agent.state_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: controller.connected("tidy-1"), 15, "the agent's session connected")
        assert controller.stop() == 0
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "session ended" in err, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == [], err[-2000:]


HEAP = 64 << 20  # a glibc thread arena grows in heaps of this size, each aligned to it


def _malloc_heaps(pid: int) -> int:
    """The thread arenas' heaps in a process's memory map: anonymous mappings that start on a
    64 MiB boundary and run, as one or two (the part in use, then the reserved rest), to the next."""
    spans = []
    for line in pathlib.Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[4] == "0":  # no file behind it
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    ends = {start: end for start, end in spans}
    heaps = 0
    for start, end in spans:
        if start % HEAP == 0 and (end == start + HEAP or ends.get(end) == start + HEAP):
            heaps += 1
    return heaps


def test_the_controllers_threads_share_two_malloc_arenas(controller, agents):
    """gRPC's threads and TLS allocate through glibc's malloc, which would give each thread an
    arena of its own and keep what connections that come and go freed there (hundreds of MB at
    5,000 agents); the controller caps it at two arenas, the main one and one heap's worth more."""
    for i in range(3):
        agents(f"arena-{i}")
    wait_until(lambda: all(controller.connected(f"arena-{i}") for i in range(3)), 15, "the agents connected")
    assert controller.api("POST", "agents/arena-0/ping").status_code == 200
    assert _malloc_heaps(controller.proc.pid) <= 1


def test_job_result_survives_a_dropped_connection(controller, agents):
    agent = agents("drop-1", start=False)
    proxy = CuttableProxy(controller.ports["grpc"])
    try:
        agent.point_at(f"127.0.0.1:{proxy.port}")
        agent.start()
        wait_until(lambda: controller.connected("drop-1"), 15, "drop-1 connected")
        job = controller.api("POST", "agents/drop-1/jobs", {"kind": "diag.wait", "params": {"seconds": 3}})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        wait_until(lambda: controller.api("GET", f"jobs/{job_id}").json()["progress"], 5, "progress")

        proxy.cut()
        wait_until(lambda: not controller.connected("drop-1"), 10, "the controller to notice the drop")
        time.sleep(3)  # the job finishes while the agent cannot reach the controller
        assert controller.api("GET", f"jobs/{job_id}").json()["state"] == "sent"
        proxy.restore()

        done = controller.api("GET", f"jobs/{job_id}", params={"wait": 20}).json()
        assert done["state"] == "succeeded", done
        assert done["output"]["waited_s"] >= 3
    finally:
        proxy.close()


def test_same_job_sent_twice_runs_once(controller, agents):
    agent = agents("dup-1")
    wait_until(lambda: controller.connected("dup-1"), 15, "dup-1 connected")
    body = {"kind": "diag.wait", "params": {"seconds": 2}, "job_id": "dup-job-0001"}
    assert controller.api("POST", "agents/dup-1/jobs", body).status_code == 202
    # A restart makes the controller send every open job again on reconnect.
    controller.stop()
    controller.start()
    assert controller.api("POST", "agents/dup-1/jobs", body).status_code == 202
    done = controller.api("GET", "jobs/dup-job-0001", params={"wait": 20}).json()
    assert done["state"] == "succeeded", done
    time.sleep(1)
    log = agent.log.read_text()
    assert log.count("job dup-job-0001 (diag.wait) started") == 1
    assert "job dup-job-0001 (diag.wait) received again" in log


def test_the_job_route_refuses_a_kind_or_params_off_the_contract(controller, agents):
    agents("bad-1", start=False)
    for body, problem in [
        ({"kind": "tenant.explode", "params": {}}, "unknown job kind 'tenant.explode'"),
        ({"kind": "tenant.drop", "params": {"project_id": "x", "short_id": "y"}}, "not by hand"),
        ({"kind": "diag.wait", "params": {"secs": 2}}, "diag.wait params: secs: unknown key"),
        ({"kind": "diag.wait", "params": {"seconds": "2"}},
         "diag.wait params: seconds: expected a number, got a string"),
        ({"kind": "diag.wait", "params": {"seconds": True}},
         "diag.wait params: seconds: expected a number, got a boolean"),
    ]:
        refused = controller.api("POST", "agents/bad-1/jobs", body)
        assert refused.status_code == 400 and problem in refused.json()["error"], refused.text
    with psycopg.connect(controller.catalog_url) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_agent_killed_mid_job_reports_it_failed_on_restart(controller, agents):
    agent = agents("kill-1")
    wait_until(lambda: controller.connected("kill-1"), 15, "kill-1 connected")
    job_id = controller.api("POST", "agents/kill-1/jobs",
                            {"kind": "diag.wait", "params": {"seconds": 30}}).json()["id"]
    wait_until(lambda: controller.api("GET", f"jobs/{job_id}").json()["progress"], 5, "progress")
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()
    agent.start()
    done = controller.api("GET", f"jobs/{job_id}", params={"wait": 20}).json()
    assert done["state"] == "failed"
    assert "stopped while this job was running" in done["error"]
    assert done["retryable"] is True


def test_an_agent_renews_its_certificate_before_it_runs_out(controller, agents):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    agent = agents("renew-1", start=False)
    # Give the agent a certificate with ten days left of a year.
    ca = x509.load_pem_x509_certificate((controller.state_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((controller.state_dir / "ca.key").read_bytes(), None)
    key = serialization.load_pem_private_key(agent.read("key.pem"), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    old = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renew-1")]))
           .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(days=355)).not_valid_after(now + datetime.timedelta(days=10))
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .sign(ca_key, hashes.SHA256()))
    (agent.state_dir / "cert.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    with psycopg.connect(controller.catalog_url, autocommit=True) as conn:
        conn.execute("UPDATE agents SET cert_serial = %s, cert_expires_at = %s WHERE name = 'renew-1'",
                     (str(old.serial_number), old.not_valid_after_utc))

    old_key = agent.read("key.pem")
    agent.start()
    # The controller records the new certificate a moment before the agent has written it.
    renewed = wait_until(lambda: (a := controller.agent("renew-1")) and a["connected"]
                         and datetime.datetime.fromisoformat(a["cert_expires_at"]) > now + datetime.timedelta(days=300)
                         and x509.load_pem_x509_certificate(agent.read("cert.pem")).serial_number != old.serial_number
                         and a, 20, "a renewed certificate")
    new = x509.load_pem_x509_certificate(agent.read("cert.pem"))
    assert new.serial_number != old.serial_number
    assert new.not_valid_after_utc > now + datetime.timedelta(days=300)
    assert renewed["connected"] is True
    assert agent.read("key.pem") != old_key
    # The old certificate is refused from now on.
    with pytest.raises(grpc.RpcError) as refused:
        _connect_with(controller, agent.read("ca.pem"), old_key, old.public_bytes(serialization.Encoding.PEM))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_job_too_large_for_an_agent_fails_at_once_and_the_agent_keeps_working(controller, agents):
    agent = agents("big-1")
    wait_until(lambda: controller.connected("big-1"), 15, "big-1 connected")
    padding = "x" * (17 * 1024 * 1024)
    refused = controller.api("POST", "agents/big-1/jobs", {"kind": "diag.wait", "params": {"seconds": 0, "pad": padding}},
                             timeout=60)
    assert refused.status_code == 413, refused.text[:300]
    assert "limit of a message to an agent" in refused.json()["error"]
    # Nothing was recorded to be sent again on the next reconnect.
    with psycopg.connect(controller.catalog_url) as conn:
        assert conn.execute("SELECT count(*) FROM jobs WHERE agent = 'big-1'").fetchone()[0] == 0

    # Non-ASCII text is not inflated six-fold: 6 MB of it goes through.
    wide = controller.api("POST", "agents/big-1/jobs", {"kind": "diag.wait", "params": {"seconds": 0, "pad": "é" * (3 * 1024 * 1024)}},
                          timeout=60)
    assert wide.status_code == 202, wide.text[:300]
    done = controller.api("GET", f"jobs/{wide.json()['id']}", params={"wait": 20}).json()
    assert done["state"] == "succeeded", done
    assert controller.connected("big-1")
    assert agent.log.read_text().count("connected to the controller") == 1


def _fill(directory: pathlib.Path) -> pathlib.Path:
    """Writes a file until the disk under `directory` takes no more."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def test_an_agent_whose_disk_is_full_refuses_jobs_it_cannot_record_and_stays_connected(controller, agents):
    agent = agents("full-1", start=False)
    with small_disk(agent.state_dir / "spool") as spool:
        agent.start()
        try:
            wait_until(lambda: controller.connected("full-1"), 15, "full-1 connected")

            # The disk fills while a job runs: its result goes from memory all the same.
            job = controller.api("POST", "agents/full-1/jobs", {"kind": "diag.wait", "params": {"seconds": 2}}).json()
            wait_until(lambda: controller.api("GET", f"jobs/{job['id']}").json()["progress"], 5, "progress")
            filler = _fill(spool)
            done = controller.api("GET", f"jobs/{job['id']}", params={"wait": 20}).json()
            assert done["state"] == "succeeded", done
            assert "its record could not be written" in agent.log.read_text()

            # A job that cannot be recorded is not run (it could run twice), and the agent says why.
            job = controller.api("POST", "agents/full-1/jobs", {"kind": "diag.wait", "params": {"seconds": 0}}).json()
            refused = controller.api("GET", f"jobs/{job['id']}", params={"wait": 20}).json()
            assert refused["state"] == "failed" and refused["retryable"], refused
            assert f"the agent cannot record the job in {spool} (No space left on device" in refused["error"]
            assert agent.proc.poll() is None and controller.connected("full-1")

            filler.unlink()
            job = controller.api("POST", "agents/full-1/jobs", {"kind": "diag.wait", "params": {"seconds": 0}}).json()
            assert controller.api("GET", f"jobs/{job['id']}", params={"wait": 20}).json()["state"] == "succeeded"
        finally:  # stopped before its disk is unmounted
            agent.stop()
