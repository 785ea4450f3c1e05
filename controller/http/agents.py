"""Agents: join tokens, the fleet's agents and the jobs an admin runs on them."""

import datetime

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from contract.jobs import KINDS, job_kind
from contract.messages import ContractError

from ..errors import BadRequest, NotFound
from ..fleet import check_agent_name, check_roles, shown
from ..store import Agent, User
from ..tokens import new_join_token, token_hash
from .common import PREFIX, Services, admin, agent_view, as_json, job_view, services

router = APIRouter(prefix=PREFIX)

# Job kinds an operator may run by hand through the API; operations send others.
DIAGNOSTIC_JOBS = ("facts.collect", "diag.wait")
MAX_JOIN_TOKEN_TTL = 30 * 24 * 3600


class JoinTokenRequest(BaseModel):
    roles: list[str] = Field(description="roles the enrolling agent may take: db, docker, gateway")
    ttl_seconds: int = Field(3600, ge=60, le=MAX_JOIN_TOKEN_TTL)
    name: str | None = Field(None, description="the only agent name it enrolls; needed to enroll an agent "
                             "again under its own name once its certificate expired")


class JobRequest(BaseModel):
    kind: str = Field(description=f"one of {', '.join(DIAGNOSTIC_JOBS)}")
    params: dict = Field(default_factory=dict)
    job_id: str | None = Field(None, min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
                               description="idempotency key: a job sent twice with one id runs once")


def gateway_view(s: Services, agent: Agent) -> dict | None:
    return s.projects.gateways.view(agent.name) if "gateway" in agent.roles else None


async def known_agent(s: Services, name: str) -> Agent:
    check_agent_name(name)
    agent = await s.catalog.get_agent(name)
    if agent is None:
        raise NotFound(f"no agent named {name}")
    return agent


@router.post("/agents/tokens", status_code=201)
async def create_join_token(body: JoinTokenRequest, user: User = Depends(admin), s: Services = Depends(services)):
    roles = check_roles(body.roles)
    name = check_agent_name(body.name) if body.name is not None else None
    token = new_join_token()
    expires_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
        seconds=body.ttl_seconds)
    await s.catalog.create_join_token(token_hash(token), roles, expires_at, user.id, name)
    return {"token": token, "roles": roles, "expires_at": expires_at.isoformat(), "name": name,
            "ca_fingerprint": s.ca_fingerprint, "enroll_address": s.enroll_address}

@router.get("/agents")
async def list_agents(_: User = Depends(admin), s: Services = Depends(services)):
    return as_json([agent_view(a, s.fleet.connected(a.name), gateway_view(s, a))
                    for a in await s.catalog.list_agents()])

@router.get("/agents/{name}")
async def show_agent(name: str, _: User = Depends(admin), s: Services = Depends(services)):
    agent = await known_agent(s, name)
    return agent_view(agent, s.fleet.connected(agent.name), gateway_view(s, agent))

@router.post("/agents/{name}/revoke")
async def revoke_agent(name: str, _: User = Depends(admin), s: Services = Depends(services)):
    agent = await known_agent(s, name)
    await s.catalog.revoke_agent(agent.name)
    s.fleet.revoke(agent.name)
    return {"ok": True, "name": agent.name, "revoked": True}

@router.post("/agents/{name}/ping")
async def ping_agent(name: str, _: User = Depends(admin), s: Services = Depends(services)):
    agent = await known_agent(s, name)
    rtt_ms = await s.fleet.ping(agent.name)
    return {"name": agent.name, "rtt_ms": round(rtt_ms, 3)}

@router.post("/agents/{name}/jobs", status_code=202)
async def run_job(name: str, body: JobRequest, _: User = Depends(admin), s: Services = Depends(services)):
    agent = await known_agent(s, name)
    if body.kind not in KINDS:
        raise BadRequest(f"unknown job kind {shown(body.kind)}; one of {', '.join(DIAGNOSTIC_JOBS)}")
    if body.kind not in DIAGNOSTIC_JOBS:
        raise BadRequest(f"job kind {body.kind} is sent by the operations that need it, not by hand; "
                         f"one of {', '.join(DIAGNOSTIC_JOBS)}")
    try:
        job_kind(body.kind).parse_params(body.params)
    except ContractError as exc:
        raise BadRequest(str(exc)) from None
    job = await s.fleet.submit(agent.name, body.kind, body.params, body.job_id)
    return job_view(job)

@router.get("/jobs/{job_id}")
async def get_job(job_id: str, wait: float = 0, _: User = Depends(admin), s: Services = Depends(services)):
    if not 0 <= wait <= 60:
        raise BadRequest("wait must be between 0 and 60 seconds")
    return job_view(await s.fleet.wait(job_id, wait))
