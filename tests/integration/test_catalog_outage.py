"""The controller while its catalog is down: every API request is answered 503 "catalog
unavailable" at once, and it serves again within seconds of the catalog's return."""

import time

import httpx
import pytest

from tests import support
from tests.support import Controller, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def own_catalog(tmp_path):
    cluster = support.test_cluster(tmp_path / "pg")
    cluster.create_database("flux_catalog")
    yield cluster
    support.remove_cluster(cluster)


def test_a_catalog_outage_is_answered_503_at_once_and_recovered_from(tmp_path, own_catalog):
    controller = Controller(tmp_path / "controller", own_catalog.url("flux_catalog")).start()
    try:
        assert controller.api("GET", "list").status_code == 200
        own_catalog.stop()
        answers = []
        for _ in range(5):
            started = time.monotonic()
            response = controller.api("GET", "list")
            answers.append((response.status_code, time.monotonic() - started, response.json()))
        for status, seconds, body in answers:
            assert status == 503 and "catalog unavailable" in body["error"]
        # The first may wait for its connection to fail; the rest are answered without trying.
        assert all(seconds < 1.0 for _, seconds, _ in answers[1:]), answers
        assert controller.api("GET", "agents").status_code == 503
        assert "catalog unavailable" in controller.log.read_text()
        # Past its lease, the controller no longer leads: what it would forward to a leader is
        # refused at once (it is the last leader it knows, and never forwards to itself).
        wait_until(lambda: controller.api("GET", "list").headers.get("Flux-Controller", "").endswith("follower"),
                   10, "the controller to stop leading")
        started = time.monotonic()
        refused = controller.api("GET", "agents", timeout=10)
        assert refused.status_code == 503 and "cannot renew its lease" in refused.json()["error"], refused.text
        assert time.monotonic() - started < 2

        own_catalog.start()
        back = time.monotonic()
        wait_until(lambda: controller.api("GET", "list").status_code == 200, 10, "the API to serve again")
        assert time.monotonic() - back < 5
        assert controller.api("GET", "auth/verify").status_code == 200
    finally:
        controller.stop()
