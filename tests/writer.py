"""A steady writer through the gateway, as an app would be during a migration: one INSERT per tick
at a fixed rate over one TLS connection, each with the next id of its own. A write is
acknowledged when the gateway answers 2xx; a refused one (503 while writes pause, a connection
error) is tried again at the next tick with the same id, so the acknowledged ids are exactly
1..n and `lost` can be told from what the database holds afterwards."""

import ssl
import threading
import time

import httpx


class Writer:
    def __init__(self, gateway_port: int, ca_file: str, host: str, token: str, path: str = "/writes",
                 rate: float = 50, body=lambda i: {"id": i}, address: str = "127.0.0.1"):
        self.url = f"https://{address}:{gateway_port}{path}"
        self.host, self.token, self.rate, self.body = host, token, rate, body
        self.context = ssl.create_default_context(cafile=ca_file)
        # (id, monotonic time of the answer) of each acknowledged write, in order.
        self.acked: list[tuple[int, float]] = []
        self.refused: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self.started_at = self.stopped_at = None
        # The last attempt's answer was lost: it may have landed.
        self._unsure = False

    def __enter__(self) -> "Writer":
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.stopped_at = time.monotonic()

    def _client(self) -> httpx.Client:
        return httpx.Client(verify=self.context, timeout=10, headers={
            "Host": self.host, "Authorization": f"Bearer {self.token}"})

    def _run(self) -> None:
        next_id, tick = 1, time.monotonic()
        client = self._client()
        try:
            while not self._stop.is_set():
                try:
                    response = client.post(self.url, json=self.body(next_id),
                                           extensions={"sni_hostname": self.host})
                    outcome = str(response.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                    self._unsure = True
                    client.close()
                    client = self._client()
                if outcome.startswith("2") or (outcome == "409" and self._unsure):
                    # 409 after an attempt whose answer was lost: that attempt landed.
                    self._unsure = False
                    self.acked.append((next_id, time.monotonic()))
                    next_id += 1
                else:
                    self.refused[outcome] = self.refused.get(outcome, 0) + 1
                tick += 1 / self.rate
                self._stop.wait(max(tick - time.monotonic(), 0))
        finally:
            client.close()

    @property
    def acked_ids(self) -> set[int]:
        return {i for i, _ in self.acked}

    def gaps(self) -> list[tuple[float, float]]:
        """(start, length) of each wait between two acknowledged writes, longest first."""
        times = [t for _, t in self.acked]
        return sorted(((a, b - a) for a, b in zip(times, times[1:])), key=lambda g: -g[1])

    def max_gap(self) -> float:
        gaps = self.gaps()
        return gaps[0][1] if gaps else 0.0

    def achieved_rate(self) -> float:
        span = (self.stopped_at or time.monotonic()) - self.started_at
        return len(self.acked) / span if span > 0 else 0.0
