"""Which controller leads, when several share one catalog.

A lease row in the catalog names the leader; it renews it every RENEW_EVERY_S for LEASE_TTL_S
(the catalog's clock). Only the leader takes agents' streams, runs migrations and the background
work (recovery of what a stopped controller left, retention, schedules, gateway routes). The
others serve reads from the catalog and forward everything else to the leader's HTTP API. When
the leader stops renewing (killed, or cut off from the catalog), another takes the lease once it
ran out and settles what the old one left, as a restarted controller would.

The leader counts its lease from before it asked for it, by its own clock, and stops leading a
margin before that runs out: by the time another controller can take the lease, it has stepped
down.
"""

import asyncio
import logging
import time

from .errors import FluxError
from .store import Catalog, Lease

log = logging.getLogger(__name__)

LEASE_TTL_S = 5.0
RENEW_EVERY_S = 1.0
RETAKE_EVERY_S = 0.2
# The leader steps down this long before its lease runs out by its own clock.
MARGIN_S = 1.0


class Leadership:
    def __init__(self, catalog: Catalog, controller_id: str, grpc_address: str, http_address: str,
                 ttl_seconds: float = LEASE_TTL_S):
        self.catalog = catalog
        self.id = controller_id
        self.grpc_address = grpc_address
        self.http_address = http_address
        self.ttl = ttl_seconds
        self.lease = Lease(None, 0, None, None)
        self._leading_until = 0.0
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def leading(self) -> bool:
        return self.lease.holder == self.id and time.monotonic() < self._leading_until

    @property
    def leader_id(self) -> str | None:
        """The controller that leads now, as last read from the catalog (None: nobody)."""
        if self.lease.holder == self.id:
            return self.id if self.leading else None
        return self.lease.holder

    def describe(self) -> str:
        if self.leading:
            return f"controller {self.id} (leader)"
        if self.lease.holder:
            return f"controller {self.id} (follower; the leader is {self.lease.holder})"
        return f"controller {self.id} (follower; no leader right now)"

    async def renew(self) -> None:
        asked = time.monotonic()
        try:
            await self.catalog.controller_seen(self.id, self.grpc_address, self.http_address)
            lease = await self.catalog.take_lease(self.id, self.ttl)
        except Exception as exc:  # whatever it is, the lease is not renewed and the loop goes on
            if self.leading:
                log.warning("cannot renew the leader's lease: %s",
                            exc.message if isinstance(exc, FluxError) else f"{type(exc).__name__}: {exc}")
            return
        if lease.holder == self.id:
            self._leading_until = asked + self.ttl - MARGIN_S
        if lease.holder != self.lease.holder:
            log.info("the leader is now %s (lease epoch %d)", lease.holder or "nobody", lease.epoch)
        self.lease = lease

    async def keep(self, lead, step_down) -> None:
        """Renews or takes the lease for as long as it runs; while this controller leads, `lead()`
        runs (cancelled when it stops leading, then `step_down()` is called)."""
        while not self._stopping:
            await self.renew()
            if self.leading and self._task is None:
                log.info("leading the controllers on this catalog (lease epoch %d)", self.lease.epoch)
                self._task = asyncio.create_task(lead())
            elif not self.leading and self._task is not None:
                log.warning("no longer the leader: stopping the leader's work")
                await self._end_task()
                step_down()
            # A lease of its own that lapsed (the catalog was away) is taken back as soon as it can be.
            await asyncio.sleep(RENEW_EVERY_S if self.leading or self.lease.holder != self.id else RETAKE_EVERY_S)

    async def _end_task(self) -> None:
        task, self._task = self._task, None
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("the leader's work ended with an error")

    async def stop(self) -> None:
        """The leader's work ends; the lease is kept until release()."""
        self._stopping = True
        if self._task is not None:
            await self._end_task()

    async def release(self) -> None:
        """Gives up the lease, once nothing of this controller runs any more: another leads at once."""
        if self.lease.holder == self.id:
            try:
                await self.catalog.release_lease(self.id)
            except FluxError as exc:
                log.warning("cannot give up the leader's lease: %s", exc.message)
