"""settings.json is checked when the agent starts: each mistake is named with its field and what
it must be, and a secret's value is never repeated back."""

import json

import pytest

from agent.errors import AgentError
from agent.runtime import settings
from agent.runtime.config import StateDir

GOOD = {
    "db": {"shared_cluster_url": "postgresql://flux_shared:pw@127.0.0.1/flux_shared",
           "authenticator_password": "s3cret-pw", "runtime_connection_limit": 20},
    "docker": {"postgres_image": "flux-local/postgres:1", "cpus": 1, "api_healthcheck": ["CMD", "true"]},
    "gateway": {"listen": "127.0.0.1:8443", "auth_listen": "127.0.0.1:8444", "pool_upstream": "127.0.0.1:3000",
                "pool_jwt_secret": "x" * 32},
    "backup": {"dir": "/var/lib/flux-agent/backups"},
}


def _load(tmp_path, body) -> dict:
    state = StateDir(tmp_path)
    state.path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "settings.json").write_text(json.dumps(body))
    return settings.load(state)


def test_good_settings_load_with_their_defaults(tmp_path):
    loaded = _load(tmp_path, GOOD)
    assert loaded["db"].runtime_statement_timeout == "15s" and loaded["docker"].cpus == 1
    assert loaded["docker"].labels == {}
    assert (loaded["db"].write_guard_lock_timeout, loaded["db"].drop_lock_timeout) == ("15s", "10s")
    assert loaded["gateway"].manage_caddy is True and loaded["backup"].dir.endswith("backups")


@pytest.mark.parametrize("change, message", [
    ({"dbb": {}}, "unknown role(s) 'dbb'; the roles are db, docker, gateway, backup"),
    ({"db": {"authenticator_password": "pw"}}, "db settings lack db.shared_cluster_url, which have no default"),
    ({"db": {**GOOD["db"], "runtime_connection_limit": "20"}}, "db.runtime_connection_limit must be a whole number, not str"),
    ({"db": {**GOOD["db"], "shared_cluster_url": "mysql://x"}}, "db.shared_cluster_url must be a postgresql:// URL"),
    ({"db": {**GOOD["db"], "write_guard_lock_timeout": "soon"}}, "db.write_guard_lock_timeout must look like 15s"),
    ({"db": {**GOOD["db"], "drop_lock_timeout": "10"}}, "db.drop_lock_timeout must look like 15s"),
    ({"docker": {"cpus": "two"}}, "docker.cpus must be a number, not str"),
    ({"docker": {"memory": "1g"}}, "unknown docker setting(s) memory; the docker settings are postgres_image,"),
    ({"docker": {"labels": ["team=data"]}}, "docker.labels must be an object, not list"),
    ({"docker": {"labels": {"team": 7}}}, "docker.labels must name each label and give it a string, like"),
    ({"docker": {"labels": {"": "x"}}}, "docker.labels must name each label"),
    ({"docker": {"labels": {"flux.project": "x"}}}, "docker.labels may not set 'flux.project': labels starting"),
    ({"gateway": {**GOOD["gateway"], "listen": "8443"}}, "gateway.listen must be HOST:PORT, like 127.0.0.1:8443"),
    ({"gateway": {**GOOD["gateway"], "manage_caddy": "yes"}}, "gateway.manage_caddy must be true or false, not str"),
    ({"backup": {"dir": "backups"}}, "backup.dir must be an absolute path"),
    ({"backup": []}, "backup must be an object of settings"),
])
def test_each_mistake_is_named_with_its_field(tmp_path, change, message):
    with pytest.raises(AgentError) as raised:
        _load(tmp_path, {**GOOD, **change} if "dbb" not in change else change)
    assert message in raised.value.message


def test_a_secret_of_the_wrong_type_is_not_repeated_back(tmp_path):
    with pytest.raises(AgentError) as raised:
        _load(tmp_path, {"db": {**GOOD["db"], "authenticator_password": 123456789}})
    assert "db.authenticator_password must be a string or null, not int" in raised.value.message
    assert "123456789" not in raised.value.message
