"""Pure parts: fact parsers, schema migration planning, addresses, durations, backoff."""

import click
import pytest

from agent.runtime.connection import Backoff
from agent.runtime.facts import parse_docker_server_version, parse_pg_tool_version
from agent.runtime.identity import parse_address
from agent.runtime.main import parse_roles
from cli.config import normalise_api_base
from cli.errors import CliError
from cli.main import parse_duration
from controller.store import Migration, available_migrations, pending_migrations
from controller.errors import BadRequest, FluxError
from controller.fleet import check_agent_name, check_roles
from controller.main import redact_url
from agent.errors import AgentError


@pytest.mark.parametrize("output, expected", [
    ("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n", "15.18"),
    ("psql (PostgreSQL) 17.2\n", "17.2"),
    ("pg_dump: command not found", None),
])
def test_pg_tool_versions(output, expected):
    assert parse_pg_tool_version(output) == expected


@pytest.mark.parametrize("output, expected", [("26.1.5+dfsg1\n", "26.1.5"), ("", None), ("Cannot connect", None)])
def test_docker_engine_version(output, expected):
    assert parse_docker_server_version(output) == expected


def test_pending_migrations_in_order_and_refuses_a_newer_catalog():
    available = [Migration(1, "a", ""), Migration(2, "b", ""), Migration(3, "c", "")]
    assert [m.version for m in pending_migrations(available, {1})] == [2, 3]
    assert pending_migrations(available, {1, 2, 3}) == []
    with pytest.raises(FluxError, match=r"\[4\]"):
        pending_migrations(available, {1, 4})


def test_shipped_migrations_are_numbered_without_gaps():
    versions = [m.version for m in available_migrations()]
    assert versions == list(range(1, len(versions) + 1))


@pytest.mark.parametrize("raw, expected", [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080/api"),
    ("http://127.0.0.1:8080/api/", "http://127.0.0.1:8080/api"),
    ("https://flux.example.com/api/api", "https://flux.example.com/api"),
    ("https://example.com/flux", "https://example.com/flux/api"),
])
def test_api_base_ends_in_exactly_one_api(raw, expected):
    assert normalise_api_base(raw) == expected


def test_api_base_must_be_http():
    with pytest.raises(CliError, match="http"):
        normalise_api_base("ftp://x")


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_duration():
    with pytest.raises(click.BadParameter):
        parse_duration("an hour")


def test_agent_names_and_roles():
    assert check_agent_name("db-1") == "db-1"
    for bad in ("", "DB", "a.b", "-x", "x" * 64, "a_b"):
        with pytest.raises(BadRequest):
            check_agent_name(bad)
    assert check_roles(["docker", "db", "db"]) == ["db", "docker"]
    with pytest.raises(BadRequest, match="unknown role"):
        check_roles(["db", "root"])
    assert parse_roles("docker, db") == ["db", "docker"]
    with pytest.raises(AgentError):
        parse_roles("db,superuser")


def test_addresses():
    assert parse_address("ctl.example.com:7444") == ("ctl.example.com", 7444)
    assert parse_address("[::1]:7444") == ("::1", 7444)
    for bad in ("ctl", "ctl:0", ":7444", "ctl:http"):
        with pytest.raises(AgentError):
            parse_address(bad)


def test_backoff_is_capped_and_resets():
    backoff = Backoff(initial=0.5, cap=5)
    delays = [backoff.next_delay() for _ in range(10)]
    assert delays[0] <= 0.5 and max(delays) <= 5 and delays[-1] >= 4
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_catalog_password_is_redacted():
    assert redact_url("postgresql://flux:s3cret@db:5432/cat") == "postgresql://flux:***@db:5432/cat"
    assert redact_url("postgresql://db/cat") == "postgresql://db/cat"
