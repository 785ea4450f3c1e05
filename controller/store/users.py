"""Users, their API tokens and dashboard sessions."""

import datetime
from dataclasses import dataclass

import psycopg

from ..errors import Conflict
from .base import Store


@dataclass(frozen=True)
class User:
    id: int
    name: str
    plan: str
    cli_role: str

@dataclass(frozen=True)
class ApiToken:
    id: int
    user_id: int
    user: str
    token_hash: str
    created_at: datetime.datetime
    last_used_at: datetime.datetime | None


class UserStore(Store):
    async def user_for_token(self, token_hash: str) -> User | None:
        row = await self._one(
            "UPDATE api_tokens SET last_used_at = now() FROM users"
            " WHERE api_tokens.token_hash = %s AND users.id = api_tokens.user_id"
            " RETURNING users.id, users.name, users.plan, users.cli_role",
            (token_hash,),
        )
        return User(**row) if row else None

    async def list_users(self) -> list[User]:
        return [User(**r) for r in await self._all("SELECT id, name, plan, cli_role FROM users ORDER BY name")]

    _TOKENS = ("SELECT t.id, t.user_id, u.name AS user, t.token_hash, t.created_at, t.last_used_at"
               " FROM api_tokens t JOIN users u ON u.id = t.user_id")

    async def api_tokens(self, user_id: int | None) -> list[ApiToken]:
        """The user's API tokens, or every user's with None."""
        rows = await self._all(self._TOKENS + " WHERE %s::bigint IS NULL OR t.user_id = %s ORDER BY t.id",
                               (user_id, user_id))
        return [ApiToken(**r) for r in rows]

    async def api_token(self, token_id: int) -> ApiToken | None:
        row = await self._one(self._TOKENS + " WHERE t.id = %s", (token_id,))
        return ApiToken(**row) if row else None

    async def add_api_token(self, user_id: int, token_hash: str) -> ApiToken:
        await self._one("INSERT INTO api_tokens (token_hash, user_id) VALUES (%s, %s) RETURNING id",
                        (token_hash, user_id))
        return next(t for t in await self.api_tokens(user_id) if t.token_hash == token_hash)

    async def delete_api_token(self, token_id: int) -> bool:
        return await self._one("DELETE FROM api_tokens WHERE id = %s RETURNING id", (token_id,)) is not None

    async def has_users(self) -> bool:
        return await self._one("SELECT 1 FROM users LIMIT 1") is not None

    async def create_user(self, name: str, token_hash: str, cli_role: str = "admin", plan: str = "pro") -> User:
        async with self._connection() as conn, conn.transaction():
            try:
                row = await (await conn.execute(
                    "INSERT INTO users (name, cli_role, plan) VALUES (%s, %s, %s)"
                    " RETURNING id, name, plan, cli_role", (name, cli_role, plan)
                )).fetchone()
            except psycopg.errors.UniqueViolation:
                raise Conflict(f"a user named {name} already exists") from None
            await conn.execute(
                "INSERT INTO api_tokens (token_hash, user_id) VALUES (%s, %s)", (token_hash, row["id"])
            )
        return User(**row)

    async def create_session(self, id_hash: str, user_id: int, csrf: str, ttl: datetime.timedelta) -> None:
        await self._one("INSERT INTO sessions (id_hash, user_id, csrf, expires_at) VALUES (%s, %s, %s, now() + %s)"
                        " RETURNING 1", (id_hash, user_id, csrf, ttl))

    async def session_user(self, id_hash: str) -> tuple[User, str] | None:
        row = await self._one(
            "SELECT u.id, u.name, u.plan, u.cli_role, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id"
            " WHERE s.id_hash = %s AND s.expires_at > now()", (id_hash,))
        if row is None:
            return None
        csrf = row.pop("csrf")
        return User(**row), csrf

    async def delete_session(self, id_hash: str) -> None:
        await self._one("DELETE FROM sessions WHERE id_hash = %s RETURNING 1", (id_hash,))
