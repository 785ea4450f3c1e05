"""Who calls: the caller's identity, users and API tokens."""

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from ..errors import NotFound
from ..store import User
from ..tokens import new_api_token, token_hash
from .access import ADMIN, OPERATOR, require_admin
from .common import PREFIX, Services, admin, current_user, services, token_view

router = APIRouter(prefix=PREFIX)


class UserRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
    role: str = Field(OPERATOR, pattern=f"^({ADMIN}|{OPERATOR})$")
    plan: str = Field("pro", pattern="^(hobby|pro)$")


def caller_token_hash(request: Request) -> str:
    return token_hash(request.headers.get("authorization", "").partition(" ")[2].strip())


@router.get("/auth/verify")
async def verify(user: User = Depends(current_user), s: Services = Depends(services)):
    return {"ok": True, "user": user.name, "plan": user.plan,
            "defaultMode": "v2_shared", "cliRole": user.cli_role}

@router.get("/users")
async def list_users(_: User = Depends(admin), s: Services = Depends(services)):
    return [{"name": u.name, "cliRole": u.cli_role, "plan": u.plan} for u in await s.catalog.list_users()]

@router.post("/users", status_code=201)
async def add_user(body: UserRequest, _: User = Depends(admin), s: Services = Depends(services)):
    token = new_api_token()
    user = await s.catalog.create_user(body.name, token_hash(token), body.role, body.plan)
    return {"user": user.name, "cliRole": user.cli_role, "plan": user.plan, "token": token}

@router.get("/tokens")
async def list_tokens(request: Request, all: bool = False, user: User = Depends(current_user),
                      s: Services = Depends(services)):
    if all:
        require_admin(user)
    tokens = await s.catalog.api_tokens(None if all else user.id)
    return [token_view(t, caller_token_hash(request)) for t in tokens]

@router.post("/tokens", status_code=201)
async def create_token(user: User = Depends(current_user), s: Services = Depends(services)):
    token = new_api_token()
    created = await s.catalog.add_api_token(user.id, token_hash(token))
    return {**token_view(created, None), "token": token}

@router.delete("/tokens/{token_id}")
async def revoke_token(token_id: int, user: User = Depends(current_user), s: Services = Depends(services)):
    token = await s.catalog.api_token(token_id)
    if token is None or (token.user_id != user.id and user.cli_role != ADMIN):
        raise NotFound(f"no API token {token_id}")
    await s.catalog.delete_api_token(token_id)
    return {"ok": True, "id": token_id, "revoked": True}
