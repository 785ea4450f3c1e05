"""Controllers on one catalog: their addresses and the leader's lease."""

from dataclasses import dataclass

from .base import Store


@dataclass(frozen=True)
class Lease:
    # The controller whose lease is current, or None when it ran out.
    holder: str | None
    epoch: int
    http_address: str | None
    grpc_address: str | None


class ControllerStore(Store):
    async def controller_seen(self, controller_id: str, grpc_address: str, http_address: str) -> None:
        await self._one(
            "INSERT INTO controllers (id, grpc_address, http_address) VALUES (%s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET grpc_address = excluded.grpc_address,"
            " http_address = excluded.http_address, seen_at = now() RETURNING 1",
            (controller_id, grpc_address, http_address), lease=True)

    async def take_lease(self, controller_id: str, ttl_seconds: float) -> Lease:
        """Renews the lease when this controller holds it, takes it when it ran out; then the lease
        as it stands, whoever holds it."""
        row = await self._one(
            "WITH taken AS ("
            " UPDATE controller_lease SET holder = %(me)s,"
            "  epoch = epoch + (holder IS DISTINCT FROM %(me)s)::int,"
            "  expires_at = now() + make_interval(secs => %(ttl)s)"
            " WHERE id = 1 AND (holder = %(me)s OR expires_at < now()) RETURNING holder, epoch, expires_at)"
            " SELECT l.holder, l.epoch, l.expires_at > now() AS current, c.http_address, c.grpc_address"
            " FROM (SELECT holder, epoch, expires_at FROM taken"
            "       UNION ALL SELECT holder, epoch, expires_at FROM controller_lease"
            "       WHERE id = 1 AND NOT EXISTS (SELECT 1 FROM taken)) l"
            " LEFT JOIN controllers c ON c.id = l.holder",
            {"me": controller_id, "ttl": ttl_seconds}, lease=True)
        if not row["current"]:
            return Lease(None, row["epoch"], None, None)
        return Lease(row["holder"], row["epoch"], row["http_address"], row["grpc_address"])

    async def release_lease(self, controller_id: str) -> None:
        """Ends this controller's lease now (a clean stop), so another one leads at once."""
        await self._one("UPDATE controller_lease SET expires_at = '-infinity' WHERE id = 1 AND holder = %s"
                        " RETURNING 1", (controller_id,), lease=True)

    async def controller_addresses(self) -> list[str]:
        """The fleet gRPC address of every controller seen in the last week, for agents to fail over;
        none when there is only one (an agent keeps the address it was given, a proxy's maybe)."""
        rows = await self._all("SELECT DISTINCT grpc_address FROM controllers"
                               " WHERE seen_at > now() - interval '7 days' ORDER BY grpc_address")
        return [r["grpc_address"] for r in rows] if len(rows) > 1 else []

    async def agent_connected(self, name: str, controller_id: str | None, was: str | None = None) -> None:
        """Records which controller an agent's stream is open to; with `was`, only if it still is that one."""
        if was is None:
            await self._one("UPDATE agents SET connected_to = %s WHERE name = %s RETURNING 1", (controller_id, name))
        else:
            await self._one("UPDATE agents SET connected_to = %s WHERE name = %s AND connected_to = %s RETURNING 1",
                            (controller_id, name, was))
