"""The catalog watch tells a catalog gone from a controller too busy to hear it in time: a refused
connection makes it gone at once, a probe that times out only when the next ones time out too
(thousands of agents connecting at once slow the controller's own probe)."""

import asyncio
import socket
import time

import pytest

from controller.store import base
from controller.store.base import Store

pytestmark = pytest.mark.integration


async def _watch_until_gone(url: str, limit: float) -> tuple[list[tuple[float, bool]], float | None]:
    """Runs the watch on `url`; (when, available) every 0.25 s, and when it found the catalog gone."""
    store = Store(url)
    watch = asyncio.create_task(store.keep_watch())
    started = time.monotonic()
    seen = []
    try:
        while time.monotonic() - started < limit:
            seen.append((time.monotonic() - started, store.available))
            if not store.available:
                return seen, time.monotonic() - started
            await asyncio.sleep(0.25)
        return seen, None
    finally:
        watch.cancel()


def test_one_probe_that_times_out_is_not_a_catalog_gone_but_three_in_a_row_are(monkeypatch):
    monkeypatch.setattr(base, "WATCH_EVERY_S", 0.01)

    async def scenario():
        # Accepts connections and never answers: each probe waits out its 2 s connect timeout.
        held = []
        server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await _watch_until_gone(f"postgresql://flux@127.0.0.1:{port}/flux", 15)
        finally:
            server.close()

    seen, gone_at = asyncio.run(scenario())
    assert gone_at is not None, "three probes in a row timed out and the catalog was never found gone"
    # Each probe waits 2 s: gone after the third, not after the first.
    assert all(available for at, available in seen if at < 4.5), seen
    assert gone_at >= 5.5, gone_at


def test_a_refused_probe_makes_the_catalog_gone_at_once(monkeypatch):
    monkeypatch.setattr(base, "WATCH_EVERY_S", 0.01)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    seen, gone_at = asyncio.run(_watch_until_gone(f"postgresql://flux@127.0.0.1:{port}/flux", 5))
    assert gone_at is not None and gone_at < 1.5, seen
