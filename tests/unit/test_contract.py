"""The generated stubs are current, and every RPC has a handler and a caller."""

import inspect
import subprocess
import sys

from agent.runtime import wire as agent_wire
from controller.rpc.servicers import EnrollmentService, FleetService
from proto import fleet_pb2
from proto import fleet_pb2_grpc


def test_generated_stubs_are_current():
    proc = subprocess.run([sys.executable, "-m", "proto.generate", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_rpc_has_a_controller_handler_and_an_agent_caller():
    handlers = {"Enrollment": EnrollmentService, "Fleet": FleetService}
    caller_source = inspect.getsource(agent_wire)
    services = fleet_pb2.DESCRIPTOR.services_by_name
    assert set(services) == set(handlers)
    for name, service in services.items():
        base = getattr(fleet_pb2_grpc, f"{name}Servicer")
        for method in service.methods:
            implemented = getattr(handlers[name], method.name)
            assert implemented is not getattr(base, method.name), f"{name}.{method.name} has no handler"
            assert f"{name}Stub(" in caller_source and f".{method.name}(" in caller_source, \
                f"{name}.{method.name} has no caller in agent/wire.py"


def test_both_sides_agree_on_the_message_limit():
    from controller.rpc import server
    from controller.rpc import wire as controller_wire

    assert agent_wire.MAX_MESSAGE_BYTES == controller_wire.MAX_MESSAGE_BYTES
    options = dict(server.FLEET_OPTIONS)
    assert options["grpc.max_send_message_length"] == controller_wire.MAX_MESSAGE_BYTES
    assert options["grpc.max_receive_message_length"] == controller_wire.MAX_MESSAGE_BYTES
    assert dict(server.ENROLL_OPTIONS)["grpc.max_receive_message_length"] <= 64 * 1024


# The job contract: every kind, both sides, the proto wire in between.

import ast
import pathlib
import re

import pytest

from contract.failures import FailureKind
from contract.jobs import KINDS, job_kind
from contract.messages import ContractError

PROJECT_ID = "0b5f3a9e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
SHORT_ID = "0b5f3a9e1c2d"
TENANT = {"project_id": PROJECT_ID, "short_id": SHORT_ID}
STACK = {"project_id": PROJECT_ID, "slug": "my-app", "hash": "a1b2c3d", "api_schema": f"t_{SHORT_ID}_api",
         "app_role": f"t_{SHORT_ID}_role"}
SECRETS = {"jwt_secret": "s" * 48, "postgres_password": "p" * 24, "authenticator_password": "a" * 24,
           "api_port": 41234, "db_port": None, "api_env": {"PGRST_DB_MAX_ROWS": "1000"}}
FILES = [{"filename": "0001_init.sql", "sql": "CREATE TABLE todos (id int);", "version": "0001",
          "checksum": "0" * 64}, {"filename": "0002_more.sql", "sql": "SELECT 1;", "version": None, "checksum": None}]
PUSHED = {"applied": ["0001_init.sql"], "skipped": [], "tablesMoved": 1, "sequencesMoved": 0, "viewsMoved": 0,
          "dryRun": False}
LEDGER = {"applied": [{"version": "0001", "filename": "0001_init.sql", "checksum": "0" * 64,
                       "appliedAt": "2024-05-01T10:00:00+00:00"}]}
ROUTE = {"project_id": PROJECT_ID, "hosts": ["api--my-app--a1b2c3d.example.test"], "mode": "v2_shared",
         "schema": f"t_{SHORT_ID}_api", "app_role": f"t_{SHORT_ID}_role", "jwt_secret": "s" * 48,
         "upstream": "pool", "maintenance": False}

KEY = "A" * 43 + "="
BACKUP_ID = "5e0c3b1a-2d4f-4a6b-8c9d-0e1f2a3b4c5d"
MANIFEST = {"schema": f"t_{SHORT_ID}_api", "owner": f"t_{SHORT_ID}_ddl",
            "tables": {"todos": {"rows": 3, "checksum": "-12345", "bytes": 16384}}, "sequences": {"todos_id_seq": 3},
            "ledger": [{"version": "0001", "filename": "0001_init.sql", "checksum": "0" * 64,
                        "applied_at": "2026-11-27 03:12:45+00"}],
            "roles": [f"t_{SHORT_ID}_ddl", f"t_{SHORT_ID}_role"], "server_version": "15.6"}
MADE = {"bytes": 2120, "sha256": "f" * 64, "archive_bytes": 2048, "archive_sha256": "e" * 64, "manifest": MANIFEST,
        "seconds": 0.4}
RESTORED = {"problems": [], "tables": 1, "rows": 3, "archive_bytes": 2048, "seconds": 0.9}

# An example of each kind's params and result, as the controller sends and the agent returns them.
EXAMPLES = {
    "facts.collect": ({}, {"hostname": "db-1", "agent_version": "0.1.0", "tools": {"pg_dump": "15.6"},
                           "spool_free_bytes": 10 ** 10, "roles": ["db"]}),
    "diag.wait": ({"seconds": 0.5, "pad": ""}, {"waited_s": 0.501, "pid": 4242}),
    "tenant.create": (TENANT, {"schema": f"t_{SHORT_ID}_api", "runtime_role": f"t_{SHORT_ID}_role",
                               "owner_role": f"t_{SHORT_ID}_ddl", "steps": {f"schema t_{SHORT_ID}_api": "changed"}}),
    "tenant.drop": (TENANT, {"schema_dropped": True, "roles_dropped": [f"t_{SHORT_ID}_role"], "dumps_removed": 2}),
    "tenant.migrations": (TENANT, LEDGER),
    "tenant.push": ({**TENANT, "files": FILES, "dry_run": True}, {**PUSHED, "dryRun": True}),
    "gateway.sync": ({"version": 7, "base_version": 6, "part": 0, "parts": 2, "upsert": [ROUTE],
                      "remove": [PROJECT_ID]}, {"version": 7, "received_parts": 1, "parts": 2}),
    "gateway.logs": ({"hosts": ["api--my-app--a1b2c3d.example.test"], "tail": 100, "since": None},
                     {"lines": [{"at": "2026-11-27T03:12:45.000001+00:00", "line": "GET /todos 200 3.1ms 52B 127.0.0.1"}],
                      "until": "2026-11-27T03:12:45.000001+00:00"}),
    "stack.provision": ({**STACK, **SECRETS, "bulk_load": True}, {"steps": {"network": "ok", "role bootstrap": "changed"},
                                               "changed": True, "api_upstream": "127.0.0.1:41234",
                                               "api_port": 41234, "db_host": "127.0.0.1", "db_port": 41235}),
    "stack.observe": (STACK, {"state": "Running", "containers": {"flux-a1b2c3d-my-app-db": "running"},
                              "foreign": []}),
    "stack.start": ({**STACK, **SECRETS}, {"api_upstream": "127.0.0.1:41234"}),
    "stack.stop": (STACK, {"stopped": ["flux-a1b2c3d-my-app-api"]}),
    "stack.remove": ({**STACK, "app_role": None}, {"removed": ["flux-a1b2c3d-my-app-net"]}),
    "stack.logs": ({**STACK, "app_role": None, "service": "db", "tail": 50, "since": "2026-11-27T03:12:44.123456789Z"},
                   {"lines": [{"at": "2026-11-27T03:12:45.000000001Z", "line": "LOG:  checkpoint starting"}],
                    "running": True, "until": "2026-11-27T03:12:45.000000001Z"}),
    "stack.find": ({"hash": "a1b2c3d"}, {"stacks": [{"project_id": "0b5f3a9e-0000-4000-8000-000000000000",
                                                    "slug": "my-app", "objects": ["container flux-a1b2c3d-my-app-db",
                                                                                  "volume flux-a1b2c3d-my-app-data"]}]}),
    "stack.probe": ({**STACK, **SECRETS}, {"status": 200}),
    "stack.bootstrap": ({**STACK, **SECRETS}, {"role bootstrap": "ok", "restarted_s": 1.2}),
    "stack.image_info": ({}, {"postgres_major": 15, "postgres_image": "postgres:15",
                              "postgrest_image": "postgrest/postgrest:v12.2.3"}),
    "stack.push": ({**STACK, **SECRETS, "files": FILES, "dry_run": False}, PUSHED),
    "stack.migrations": ({**STACK, **SECRETS}, LEDGER),
    "tenant.preflight": (TENANT, {
        "schema": f"t_{SHORT_ID}_api", "tables": [{"name": "todos", "rows": 3, "bytes": 16384, "rls": True}],
        "views": [], "sequences": [{"name": "todos_id_seq", "last_value": None}], "extensions": ["pgcrypto"],
        "ledger": [{"version": "0001", "filename": "0001_init.sql", "checksum": "0" * 64}],
        "policy_roles": [f"t_{SHORT_ID}_role"], "roles": [f"t_{SHORT_ID}_ddl"],
        "large_objects": {"owners": [f"t_{SHORT_ID}_ddl"], "count": 0}, "total_bytes": 16384,
        "tools": {"pg_dump": "15.6", "psql": None}, "spool_free_bytes": 10 ** 10,
        "logical": {"wal_level": "logical", "max_slots": 10, "free_slots": 9, "max_senders": 10, "free_senders": 10,
                    "max_slot_wal_keep_mb": 4096, "tables_without_key": []}}),
    "tenant.lock": ({**TENANT, "target_url": None}, {"locked": True, "changed": True, "tables": 3}),
    "tenant.unlock": ({**TENANT, "revoke_writes": True, "target_url": None}, {"locked": False, "held": True, "source_read_only": True,
                                                          "frozen": True, "bytes": 16384}),
    "tenant.dump": ({**TENANT, "name": "my-app-a1b2c3d-0b5f3a9e", "expected_bytes": 16384, "table_count": 1,
                     "target_url": "postgresql://postgres:pw@127.0.0.1:41235/postgres", "target_major": 15,
                     "require_guard": True, "dump_key": "A" * 43 + "=", "sync": False, "max_lag_bytes": None,
                     "frozen_copy": False},
                    {"path": "/var/lib/flux-agent/spool/dumps/x.sql.enc", "bytes": 2120, "sha256": "f" * 64,
                     "sql_bytes": 2048, "sql_sha256": "e" * 64, "tables": 1, "restored": True, "ledger_rows": 1,
                     "seconds": 0.42}),
    "tenant.copy": ({**TENANT, "target_url": "postgresql://postgres:pw@127.0.0.1:41235/postgres",
                     "expected_bytes": 16384, "require_guard": True},
                    {"tables": 1, "rows": 3, "bytes": 2048, "ledger_rows": 1, "seconds": 0.42,
                     "phases": {"schema": 0.1, "data": 0.2, "post_data": 0.1, "total": 0.42}}),
    "tenant.dump_stat": ({**TENANT, "paths": ["/var/lib/flux-agent/spool/dumps/t_x_api/a.sql.enc"]},
                         {"files": [{"path": "/var/lib/flux-agent/spool/dumps/t_x_api/a.sql.enc", "exists": True,
                                     "bytes": 2120}]}),
    "tenant.dump_remove": ({**TENANT, "paths": ["/var/lib/flux-agent/spool/dumps/t_x_api/a.sql.enc"]},
                           {"removed": ["/var/lib/flux-agent/spool/dumps/t_x_api/a.sql.enc"], "missing": []}),
    "tenant.verify": ({**TENANT, "target_url": "postgresql://postgres:pw@127.0.0.1:41235/postgres"},
                      {"tables": {"todos": 3}, "sequences": 1, "ledger_rows": 1, "ok": True}),
    "tenant.sync_status": ({**TENANT, "direction": "forward", "target_url": "postgresql://postgres:pw@127.0.0.1:41235/postgres",
                            "max_lag_bytes": 1 << 30},
                           {"slot": True, "running": True, "error": None, "applied_lsn": "0/1A2B3C4",
                            "source_lsn": "0/1A2B400", "lag_bytes": 140, "lag_s": 0.0, "transactions": 12,
                            "changes": 40, "stopped_at": None}),
    "tenant.sync_drain": ({**TENANT, "target_url": "postgresql://postgres:pw@127.0.0.1:41235/postgres",
                           "timeout_s": 10.0, "direction": "forward", "reverse": True},
                          {"lsn": "0/1A2B400", "applied_lsn": "0/1A2B3C4", "waited_s": 0.08, "sequences": 1,
                           "reverse": True, "reverse_error": None}),
    "tenant.sync_stop": ({**TENANT, "direction": "forward", "target_url": None}, {"slot_dropped": True, "publication_dropped": True,
                                                          "error": None}),
    "tenant.thaw": (TENANT, {"thawed": True, "grants": 3}),
    "tenant.sync_check": ({**TENANT, "timeout_s": 600.0, "direction": "back",
                           "target_url": "postgresql://postgres:pw@127.0.0.1:41235/postgres"},
                          {"lsn": "0/1A2B400", "tables": {"todos": 3}, "seconds": 0.3,
                           "problems": ["table todos: source 3 rows, target 2 rows"]}),
    "tenant.backup": ({**TENANT, "transfer_id": "ab" * 16, "backup_key": KEY}, MADE),
    "stack.backup": ({**STACK, **SECRETS, "transfer_id": "ab" * 16, "backup_key": KEY}, MADE),
    "backup.store": ({"project_id": PROJECT_ID, "backup_id": BACKUP_ID, "transfer_id": "ab" * 16},
                     {"path": f"/var/lib/flux-agent/backups/{PROJECT_ID}/{BACKUP_ID}.fluxbackup", "bytes": 2120,
                      "sha256": "f" * 64}),
    "backup.send": ({"project_id": PROJECT_ID, "backup_id": BACKUP_ID, "transfer_id": "ab" * 16},
                    {"bytes": 2120, "sha256": "f" * 64}),
    "backup.check": ({"project_id": PROJECT_ID, "backup_ids": [BACKUP_ID]},
                     {"files": [{"backup_id": BACKUP_ID, "exists": True, "bytes": 2120, "sha256": "f" * 64}]}),
    "backup.remove": ({"project_id": PROJECT_ID, "backup_ids": [BACKUP_ID]}, {"removed": [BACKUP_ID], "missing": []}),
    "scratch.verify": ({"backup_id": BACKUP_ID, "transfer_id": "ab" * 16, "backup_key": KEY, "manifest": MANIFEST},
                       RESTORED),
    "tenant.restore": ({**TENANT, "transfer_id": "ab" * 16, "backup_key": KEY, "manifest": MANIFEST}, RESTORED),
    "stack.restore": ({**STACK, **SECRETS, "transfer_id": "ab" * 16, "backup_key": KEY, "manifest": MANIFEST,
                       "renames": {f"t_{SHORT_ID}_api": "t_aaaaaaaaaaaa_api"}}, RESTORED),
    "tenant.dump_stream": ({**TENANT, "transfer_id": "ab" * 16, "flags": {"schema_only": True, "data_only": False,
                                                                          "clean": True, "api_schema_only": False}},
                           {"bytes": 4096, "seconds": 0.2}),
    "stack.dump_stream": ({**STACK, **SECRETS, "transfer_id": "ab" * 16,
                           "flags": {"schema_only": False, "data_only": True, "clean": False, "api_schema_only": True}},
                          {"bytes": 4096, "seconds": 0.2}),
}


def _required_keys(message_type) -> list[str]:
    import dataclasses

    from contract.messages import _required, _wire_name
    return [_wire_name(f) for f in dataclasses.fields(message_type) if _required(f)]


def test_the_agent_handles_exactly_the_kinds_of_the_contract():
    from agent.handlers import every_handler, handler

    assert set(every_handler()) == set(KINDS)
    # Each is found where `run` looks for it: the module of its kind's family.
    assert [kind for kind in KINDS if handler(kind) is None] == []
    assert set(EXAMPLES) == set(KINDS)


def _sent_kinds() -> set[str]:
    """Literal job kinds passed to `run` or `submit` anywhere in the controller."""
    found = set()
    for path in pathlib.Path("controller").glob("**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("run", "submit"):
                found |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                          and re.fullmatch(r"[a-z_]+\.[a-z_]+", a.value)}
    return found


def test_every_kind_the_controller_sends_is_in_the_contract():
    from controller.http.agents import DIAGNOSTIC_JOBS

    sent = _sent_kinds() | set(DIAGNOSTIC_JOBS)
    assert len(sent) >= 18, sent
    assert sent <= set(KINDS), sent - set(KINDS)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_params_and_results_round_trip(kind):
    params, result = EXAMPLES[kind]
    spec = job_kind(kind)
    parsed = spec.parse_params(params)
    assert isinstance(parsed, spec.params) and parsed.to_wire() == params
    assert spec.parse_params(parsed.to_wire()) == parsed
    out = spec.parse_result(result)
    assert isinstance(out, spec.result)
    assert spec.parse_result(out.to_wire()) == out
    # Optional fields left out come back as their defaults; nothing else changes.
    assert {k: v for k, v in out.to_wire().items() if k in result} == result


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_params_and_results_cross_the_proto_wire(kind):
    from agent.runtime import wire as agent_wire
    from controller.rpc import wire as controller_wire
    from proto import fleet_pb2 as pb

    params, result = EXAMPLES[kind]
    spec = job_kind(kind)
    sent = controller_wire.job_request("job-1", kind, spec.parse_params(params).to_wire())
    received = agent_wire.decode(pb.ControllerMessage.FromString(sent.SerializeToString()))
    assert (received.job_id, received.kind) == ("job-1", kind)
    assert spec.parse_params(received.params) == spec.parse_params(params)

    answered = agent_wire.result("job-1", True, spec.parse_result(result).to_wire(), "", False)
    event = controller_wire.decode_agent_message(pb.AgentMessage.FromString(answered.SerializeToString()))
    assert event.ok and event.failure is None
    assert spec.parse_result(event.output) == spec.parse_result(result)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_a_missing_key_or_an_unknown_key_is_refused_naming_it(kind):
    params, _ = EXAMPLES[kind]
    spec = job_kind(kind)
    with pytest.raises(ContractError, match=rf"^{re.escape(kind)} params: surplus: unknown key$"):
        spec.parse_params({**params, "surplus": 1})
    for key in _required_keys(spec.params):
        with pytest.raises(ContractError, match=rf"^{re.escape(kind)} params: {key}: missing required key$"):
            spec.parse_params({k: v for k, v in params.items() if k != key})
    for key in _required_keys(spec.result):
        with pytest.raises(ContractError, match=rf"^{re.escape(kind)} result: .*{re.escape(key)}"):
            spec.parse_result({k: v for k, v in EXAMPLES[kind][1].items() if k != key})


@pytest.mark.parametrize("params, key, problem", [
    ({"seconds": True}, "seconds", "expected a number, got a boolean"),
    ({"seconds": "1"}, "seconds", "expected a number, got a string"),
    ({"seconds": 4000}, "seconds", "must be from 0 to 3600"),
])
def test_wrong_types_are_refused_naming_the_key(params, key, problem):
    with pytest.raises(ContractError) as refused:
        job_kind("diag.wait").parse_params(params)
    assert (refused.value.key, refused.value.problem) == (key, problem)
    assert str(refused.value).startswith("diag.wait params: ")


def test_nested_values_and_cross_field_rules_are_checked():
    sync, _ = EXAMPLES["gateway.sync"]
    with pytest.raises(ContractError, match=r"gateway.sync params: upsert\[0\].maintenance: expected a boolean, "
                                            r"got an integer"):
        job_kind("gateway.sync").parse_params({**sync, "upsert": [{**ROUTE, "maintenance": 0}]})
    with pytest.raises(ContractError, match="part: must be from 0 to parts - 1"):
        job_kind("gateway.sync").parse_params({**sync, "part": 2})
    dump, _ = EXAMPLES["tenant.dump"]
    # A dump into a target must say the target's major version: no default of 15 any more.
    with pytest.raises(ContractError, match="tenant.dump params: target_major: required with target_url"):
        job_kind("tenant.dump").parse_params({k: v for k, v in dump.items() if k != "target_major"})
    kept = {k: v for k, v in dump.items() if k not in ("target_url", "target_major")}
    assert job_kind("tenant.dump").parse_params(kept).target_major is None
    # A required key may be null only where the type says so.
    with pytest.raises(ContractError, match="stack.observe params: app_role: missing required key"):
        job_kind("stack.observe").parse_params({k: v for k, v in STACK.items() if k != "app_role"})
    with pytest.raises(ContractError, match="stack.observe params: slug: expected a string, got null"):
        job_kind("stack.observe").parse_params({**STACK, "slug": None})


def test_an_unknown_kind_is_refused():
    with pytest.raises(ContractError, match="unknown job kind"):
        job_kind("tenant.explode")


@pytest.mark.parametrize("failure", list(FailureKind))
def test_every_failure_kind_crosses_the_proto_wire(failure):
    from agent.runtime import wire as agent_wire
    from controller.rpc import wire as controller_wire
    from proto import fleet_pb2 as pb

    assert failure.proto_name in pb.FailureKind.keys()
    answered = agent_wire.result("job-1", False, None, "it broke", True, failure)
    event = controller_wire.decode_agent_message(pb.AgentMessage.FromString(answered.SerializeToString()))
    assert (event.ok, event.failure, event.error, event.retryable) == (False, failure, "it broke", True)


def test_every_proto_failure_kind_is_in_the_contract_and_unknown_ones_are_internal():
    from proto import fleet_pb2 as pb

    names = set(pb.FailureKind.keys()) - {"FAILURE_KIND_UNSPECIFIED"}
    assert names == {kind.proto_name for kind in FailureKind}
    assert FailureKind.from_proto_name("FAILURE_KIND_UNSPECIFIED") is FailureKind.INTERNAL
    assert FailureKind.from_proto_name("FAILURE_KIND_FROM_THE_FUTURE") is FailureKind.INTERNAL


def test_the_contract_is_plain_python():
    allowed = {"dataclasses", "enum", "math", "types", "typing"}
    for path in pathlib.Path("contract").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported = {node.module.split(".")[0]}
            else:
                continue
            assert imported <= allowed, f"{path}: imports {imported - allowed}"


def test_only_the_rpc_side_of_each_program_imports_grpc():
    """grpc and the generated stubs stay behind controller/rpc and agent/runtime."""
    allowed = (pathlib.Path("controller/rpc"), pathlib.Path("agent/runtime"))
    importers = []
    for path in [*pathlib.Path("controller").rglob("*.py"), *pathlib.Path("agent").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "grpc" or n.startswith("grpc.") or n.startswith("proto") for n in names):
                importers.append(path)
    assert importers and all(any(a in p.parents for a in allowed) for p in importers), importers


def test_an_owner_cannot_choose_what_flux_sets_on_a_dedicated_api():
    provision, _ = EXAMPLES["stack.provision"]
    for key in ("PGRST_JWT_SECRET", "PGRST_DB_URI", "PATH", "pgrst_db_max_rows"):
        with pytest.raises(ContractError, match=f"stack.provision params: api_env: '{key}' is not a PostgREST setting"):
            job_kind("stack.provision").parse_params({**provision, "api_env": {key: "x"}})
