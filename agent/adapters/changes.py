"""Online sync of a pooled tenant (db role): its changes, read from a logical replication slot
on the shared cluster, applied by this agent to the dedicated database.

No shared-cluster credential ever leaves the db host: the target gets no subscription (whose
connection string its superuser, the project's owner, could read), and no role with
REPLICATION is made. The agent's own cluster login creates the publication (the tenant
schema's tables only) and the slot, and reads the stream with fixed SQL; the tenant's rows are
only ever parameters of INSERT, UPDATE and DELETE statements on the target.

The slot is created over a replication connection that exports its snapshot: the initial copy
(pg_dump --snapshot) sees exactly the transactions before the slot's consistent point, and the
stream carries every one after it. Each batch of source transactions is applied on the target
in one transaction that also records the last one applied (flux.sync_position); only then does
the slot move on. An agent that stops between the two skips on restart what the target has.

A sync that falls further behind than its lag limit, or meets a change it cannot apply, drops
its slot and publication itself and stops with the reason: a slot nobody reads must never fill
the shared cluster's disk, and such a sync can only be rolled back.
"""

import logging
import threading
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from contract.failures import FailureKind

from ..domain import pgoutput
from ..errors import AgentError
from .dumps import CHECKSUM, tables_of
from .tenants import Tenant

log = logging.getLogger(__name__)

BATCH_CHANGES = 5000
IDLE_POLL_S = 0.05
RETRY_S = 1.0
DEFAULT_MAX_LAG_BYTES = 1024 ** 3

POSITION_TABLE = """
CREATE TABLE IF NOT EXISTS flux.sync_position (
  slot text PRIMARY KEY,
  lsn pg_lsn NOT NULL,
  at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON flux.sync_position FROM PUBLIC;
"""


def slot_name(tenant: Tenant) -> str:
    return f"flux_sync_{tenant.short_id}"


class SyncFailed(AgentError):
    """A change could not be applied, or the sync fell too far behind: it cannot go on."""


# the slot and the publication

def create_slot(admin_url: str, tenant: Tenant) -> tuple[psycopg.Connection, str, str]:
    """A fresh publication and slot for the tenant; returns the replication connection (which
    keeps the exported snapshot alive until it closes), the snapshot's name and the consistent
    point. A slot an earlier attempt left is dropped first: the copy starts over."""
    drop_slot(admin_url, tenant)
    name = slot_name(tenant)
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLES IN SCHEMA {}")
                     .format(sql.Identifier(name), sql.Identifier(tenant.schema)))
    replication = psycopg.connect(admin_url, autocommit=True, connect_timeout=10, replication="database")
    result = replication.pgconn.exec_(f"CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput (SNAPSHOT 'export')"
                                      .encode())
    if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
        message = (result.error_message or b"").decode(errors="replace").strip()
        replication.close()
        drop_slot(admin_url, tenant)
        raise AgentError(f"could not create the replication slot {name}: {message}", kind=FailureKind.UNAVAILABLE)
    lsn, snapshot = result.get_value(0, 1).decode(), result.get_value(0, 2).decode()
    return replication, snapshot, lsn


def create_reverse_slot(stack_url: str, tenant: Tenant) -> str:
    """On the stack's database, drained and before it takes a write: a publication of the tenant
    schema and a slot recording every change from now on, for the way back to the kept pooled
    copy. Returns the slot's LSN."""
    drop_slot(stack_url, tenant)
    name = slot_name(tenant)
    with psycopg.connect(stack_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLES IN SCHEMA {}")
                     .format(sql.Identifier(name), sql.Identifier(tenant.schema)))
        try:
            return conn.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
                                (name,)).fetchone()[0]
        except psycopg.Error as exc:
            conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
            raise AgentError(f"no slot for the way back on the stack: {str(exc).strip()[:300]}",
                             kind=FailureKind.UNAVAILABLE) from None


def drop_slot(admin_url: str, tenant: Tenant) -> dict:
    """Drops the tenant's slot and publication, whichever exist; a walsender still holding the
    slot is ended first."""
    name = slot_name(tenant)
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                     " WHERE slot_name = %s AND active_pid IS NOT NULL AND active_pid <> pg_backend_pid()", (name,))
        slot = False
        for _ in range(50):
            try:
                slot = conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                                    " WHERE slot_name = %s", (name,)).fetchone() is not None
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
        else:
            raise AgentError(f"replication slot {name} stays in use", retryable=True, kind=FailureKind.CONFLICT)
        publication = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone() is not None
        if publication:
            conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
    return {"slot_dropped": slot, "publication_dropped": publication}


def slot_state(conn, tenant: Tenant) -> dict | None:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
        " pg_current_wal_lsn()::text, wal_status FROM pg_replication_slots WHERE slot_name = %s",
        (slot_name(tenant),)).fetchone()
    if row is None:
        return None
    return {"confirmed_lsn": row[0], "lag_bytes": max(int(row[1] or 0), 0), "source_lsn": row[2],
            "wal_status": row[3]}


def pause_lsn(admin_url: str) -> str:
    """An LSN past the commit of every transaction acknowledged so far: a transaction that wrote
    WAL (a logical message no publication carries) commits synchronously, so the WAL is flushed
    through it, asynchronous commits before it included."""
    with psycopg.connect(admin_url, connect_timeout=10) as conn:
        conn.execute("SET LOCAL synchronous_commit = on")
        conn.execute("SELECT pg_logical_emit_message(true, 'flux', 'pause')")
        conn.commit()
        return conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]


# applying changes

class Applier:
    """Applies decoded changes of the tenant's tables to the target, as the source made them."""

    def __init__(self, tenant: Tenant, decoder: pgoutput.Decoder):
        self.tenant = tenant
        self.decoder = decoder

    def relation(self, oid: int) -> pgoutput.Relation:
        relation = self.decoder.relations[oid]
        if relation.schema != self.tenant.schema:
            # The publication covers the tenant's schema only; anything else is never applied.
            raise SyncFailed(f"a change to {relation.schema}.{relation.name}, outside {self.tenant.schema}")
        return relation

    def apply(self, conn, change) -> None:
        if isinstance(change, pgoutput.Insert):
            self._insert(conn, self.relation(change.relation), change.new)
        elif isinstance(change, pgoutput.Update):
            self._update(conn, self.relation(change.relation), change)
        elif isinstance(change, pgoutput.Delete):
            relation = self.relation(change.relation)
            where, values = self._match(relation, change.old, change.old_is_key)
            self._one(conn, relation, "delete", sql.SQL("DELETE FROM {} WHERE {}").format(
                self._table(relation), where), values)
        elif isinstance(change, pgoutput.Truncate):
            tables = sql.SQL(", ").join(self._table(self.relation(oid)) for oid in change.relations)
            conn.execute(sql.SQL("TRUNCATE {}{}{}").format(
                tables, sql.SQL(" RESTART IDENTITY" if change.restart_identity else ""),
                sql.SQL(" CASCADE" if change.cascade else "")))

    def _table(self, relation: pgoutput.Relation):
        return sql.Identifier(relation.schema, relation.name)

    def _insert(self, conn, relation, values: tuple) -> None:
        columns = [c.name for c, v in zip(relation.columns, values) if v is not pgoutput.UNCHANGED]
        params = [v for v in values if v is not pgoutput.UNCHANGED]
        conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            self._table(relation), sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(params))), params)

    def _update(self, conn, relation, change: pgoutput.Update) -> None:
        sets = [(c.name, v) for c, v in zip(relation.columns, change.new) if v is not pgoutput.UNCHANGED]
        if change.old is None:
            where, values = self._match(relation, change.new, True)
        else:
            where, values = self._match(relation, change.old, change.old_is_key)
        assignments = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(name)) for name, _ in sets)
        self._one(conn, relation, "update", sql.SQL("UPDATE {} SET {} WHERE {}").format(
            self._table(relation), assignments, where), [v for _, v in sets] + values)

    def _match(self, relation, row: tuple, key_only: bool):
        """A WHERE clause for the one target row `row` names: by its key columns, or (replica
        identity full) by every column, limited to one physical row."""
        pairs = [(c.name, v) for c, v in zip(relation.columns, row)
                 if (c.key or not key_only) and v is not pgoutput.UNCHANGED]
        if not pairs:
            raise SyncFailed(f"a change to {relation.name} names no key to find its row by")
        if key_only:
            return sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(n)) for n, _ in pairs), \
                [v for _, v in pairs]
        same = sql.SQL(" AND ").join(sql.SQL("{} IS NOT DISTINCT FROM %s").format(sql.Identifier(n))
                                     for n, _ in pairs)
        return sql.SQL("ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)").format(self._table(relation), same), \
            [v for _, v in pairs]

    def _one(self, conn, relation, what: str, statement, params) -> None:
        if conn.execute(statement, params).rowcount != 1:
            raise SyncFailed(f"the target has no row of {relation.name} for a source {what}: the copies "
                             "differ, and the sync stops")


# following the slot

@dataclass
class Checkpoint:
    """The source as a snapshot sees it at `lsn` (valid while `replication` is open) and a target
    transaction that sees every change before `lsn` applied, and nothing after."""

    lsn: str
    replication: psycopg.Connection
    snapshot: str
    target: psycopg.Connection

    def close(self) -> None:
        self.replication.close()
        self.target.close()


@dataclass
class _Request:
    done: threading.Event = field(default_factory=threading.Event)
    result: Checkpoint | None = None
    error: AgentError | None = None


def temporary_snapshot(admin_url: str, tenant: Tenant) -> tuple[psycopg.Connection, str, str]:
    """A temporary slot's exported snapshot and consistent point; both end with the connection."""
    replication = psycopg.connect(admin_url, autocommit=True, connect_timeout=10, replication="database")
    name = f"flux_check_{tenant.short_id}"
    result = replication.pgconn.exec_(f"CREATE_REPLICATION_SLOT {name} TEMPORARY LOGICAL pgoutput "
                                      "(SNAPSHOT 'export')".encode())
    if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
        message = (result.error_message or b"").decode(errors="replace").strip()
        replication.close()
        raise AgentError(f"could not take a snapshot for the checksum: {message}", kind=FailureKind.UNAVAILABLE)
    return replication, result.get_value(0, 2).decode(), result.get_value(0, 1).decode()


@dataclass
class Follow:
    """One tenant's sync: the slot read and applied in a thread, until stopped."""

    tenant: Tenant
    admin_url: str
    target_url: str
    max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES
    applied_lsn: str | None = None
    applied_at: float | None = None
    pending: bool = False
    error: str | None = None
    transactions: int = 0
    changes: int = 0
    # Apply through this LSN, then stop (the pause before cutover).
    stop_at: str | None = None
    stopped_at: str | None = None

    def __post_init__(self):
        self._request: _Request | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sync-{self.tenant.short_id}", daemon=True)

    def start(self) -> "Follow":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def drain(self, lsn: str, timeout: float) -> dict:
        """Applies everything committed before `lsn`, then stops; returns when it has."""
        self.stop_at = lsn
        started = time.monotonic()
        if not self._done.wait(timeout):
            raise AgentError(f"the target did not catch up to {lsn} within {timeout:g}s (applied through "
                             f"{self.applied_lsn or 'nothing yet'})", kind=FailureKind.TIMEOUT)
        if self.error:
            raise SyncFailed(self.error)
        return {"lsn": lsn, "applied_lsn": self.applied_lsn, "waited_s": round(time.monotonic() - started, 3)}

    def status(self) -> dict:
        return {"running": self.running, "error": self.error, "applied_lsn": self.applied_lsn,
                "transactions": self.transactions, "changes": self.changes,
                "lag_s": 0.0 if not self.pending or self.applied_at is None
                else round(max(time.time() - self.applied_at, 0), 3),
                "stopped_at": self.stopped_at}

    def _run(self) -> None:
        try:
            self._follow()
        except SyncFailed as exc:
            self._fail(exc.message)
        except Exception as exc:  # the thread must record why it ended
            log.exception("sync of %s failed", self.tenant.schema)
            self._fail(f"internal error: {exc}")
        finally:
            self._done.set()

    def _fail(self, message: str) -> None:
        self.error = message
        log.warning("sync of %s stopped: %s; dropping its slot", self.tenant.schema, message)
        try:
            drop_slot(self.admin_url, self.tenant)
        except Exception as exc:
            log.warning("could not drop the slot of %s: %s", self.tenant.schema, exc)

    def _follow(self) -> None:
        source = target = None
        decoder = pgoutput.Decoder()
        applier = Applier(self.tenant, decoder)
        slot = slot_name(self.tenant)
        while not self._stop.is_set():
            try:
                if source is None or source.closed:
                    source = psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10)
                if target is None or target.closed:
                    target = psycopg.connect(self.target_url, connect_timeout=10)
                    with target.transaction():
                        target.execute(POSITION_TABLE)
                    row = target.execute("SELECT lsn::text FROM flux.sync_position WHERE slot = %s",
                                         (slot,)).fetchone()
                    target.commit()
                    self.applied_lsn = row[0] if row else self.applied_lsn
                    decoder.relations.clear()
                if self._request is not None:
                    self._checkpoint(source, target, decoder, applier, slot)
                stop_at = self.stop_at
                if self._step(source, target, decoder, applier, slot, limit=stop_at) and stop_at is not None:
                    self.stopped_at = stop_at
                    return
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                # A connection lost (a restarted server, a network cut): the slot kept everything.
                log.warning("sync of %s: %s; retrying", self.tenant.schema, str(exc).strip()[:200])
                for conn in (source, target):
                    if conn is not None:
                        conn.close()
                source = target = None
                self._stop.wait(RETRY_S)
            except psycopg.Error as exc:
                raise SyncFailed(f"applying a change failed: {str(exc).strip()[:500]}") from None
        for conn in (source, target):
            if conn is not None:
                conn.close()

    def _step(self, source, target, decoder, applier, slot: str, limit: str | None = None) -> bool:
        """Reads and applies one batch, never past `limit`; True once everything that commits before
        `limit` is applied."""
        state = slot_state(source, self.tenant)
        if state is None:
            raise SyncFailed(f"the replication slot {slot} is gone")
        if state["lag_bytes"] > self.max_lag_bytes:
            raise SyncFailed(f"the sync fell {state['lag_bytes']} bytes behind the shared cluster (the limit is "
                             f"{self.max_lag_bytes}); it was stopped before its slot could fill the disk")
        if limit is not None and pgoutput.lsn_int(state["confirmed_lsn"]) >= pgoutput.lsn_int(limit):
            # The slot only moves on after the target has applied what it moved past.
            return True
        upto = source.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]
        if limit is not None and pgoutput.lsn_int(upto) > pgoutput.lsn_int(limit):
            upto = limit
        rows = source.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, %s, 'proto_version', '1',"
            " 'publication_names', %s)", (slot, upto, BATCH_CHANGES, slot)).fetchall()
        complete = len(rows) < BATCH_CHANGES
        last_end = self._apply_batch(target, decoder, applier, slot, rows)
        advance_to = upto if complete else last_end
        if advance_to is not None:
            source.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (slot, advance_to))
        self.pending = not complete
        if complete:
            if limit is not None and upto == limit:
                return True
            if not rows and limit is None:
                self._stop.wait(IDLE_POLL_S)
        return False

    def _checkpoint(self, source, target, decoder, applier, slot: str) -> None:
        """Serves a checkpoint request: a temporary slot's snapshot of the source at LSN X, the target
        with everything before X applied, and a transaction on the target that sees exactly that."""
        request = self._request
        try:
            replication, snapshot, lsn = temporary_snapshot(self.admin_url, self.tenant)
            try:
                while not self._step(source, target, decoder, applier, slot, limit=lsn):
                    if self._stop.is_set():
                        raise AgentError("the sync was stopped during a checkpoint", kind=FailureKind.CONFLICT)
                pinned = psycopg.connect(self.target_url, connect_timeout=10)
                pinned.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                pinned.execute("SELECT 1")
            except BaseException:
                replication.close()
                raise
            request.result = Checkpoint(lsn, replication, snapshot, pinned)
        except AgentError as exc:
            request.error = exc
        except psycopg.Error as exc:
            request.error = AgentError(f"checkpoint failed: {str(exc).strip()[:300]}", retryable=True,
                                       kind=FailureKind.UNAVAILABLE)
        finally:
            self._request = None
            request.done.set()

    def checkpoint(self, timeout: float) -> "Checkpoint":
        """Asks the sync for a checkpoint (see _checkpoint); the caller closes it."""
        if not self.running:
            raise SyncFailed(self.error or "the sync is not running")
        request = _Request()
        self._request = request
        if not request.done.wait(timeout):
            raise AgentError(f"the sync reached no checkpoint within {timeout:g}s", kind=FailureKind.TIMEOUT)
        if request.error is not None:
            raise request.error
        return request.result

    def _apply_batch(self, target, decoder, applier, slot: str, rows) -> str | None:
        """Applies the batch's whole transactions in one target transaction; returns the end LSN of
        the last one, or None when the batch had none."""
        skip_through = pgoutput.lsn_int(self.applied_lsn) if self.applied_lsn else -1
        last_end = None
        count = transactions = 0
        commit_time = None
        with target.transaction():
            target.execute("SET LOCAL session_replication_role = replica")
            skipping = False
            for (data,) in rows:
                message = decoder.decode(data)
                if isinstance(message, pgoutput.Begin):
                    skipping = message.final_lsn < skip_through
                elif isinstance(message, pgoutput.Commit):
                    last_end = pgoutput.lsn_text(message.end_lsn)
                    commit_time = message.commit_time
                    transactions += not skipping
                elif not skipping and isinstance(message, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete,
                                                           pgoutput.Truncate)):
                    applier.apply(target, message)
                    count += 1
            if last_end is not None and transactions:
                target.execute("INSERT INTO flux.sync_position (slot, lsn) VALUES (%s, %s::pg_lsn)"
                               " ON CONFLICT (slot) DO UPDATE SET lsn = excluded.lsn, at = now()", (slot, last_end))
        if transactions:
            self.applied_lsn, self.applied_at = last_end, commit_time
            self.transactions += transactions
            self.changes += count
        return last_end


class Syncs:
    """The syncs this agent runs, one per tenant and direction (forward: the pooled copy to the
    stack; back: the stack to the kept pooled copy), for as long as the agent runs."""

    def __init__(self):
        self._running: dict[tuple[str, str], Follow] = {}
        self._lock = threading.Lock()

    def follow(self, tenant: Tenant, source_url: str, target_url: str, max_lag_bytes: int,
               direction: str = "forward") -> Follow:
        """The tenant's running sync, or a new one from its slot (an agent that restarted resumes)."""
        with self._lock:
            current = self._running.get((tenant.schema, direction))
            if current is not None and current.running:
                return current
            follow = Follow(tenant, source_url, target_url, max_lag_bytes)
            self._running[(tenant.schema, direction)] = follow
            return follow.start()

    def get(self, tenant: Tenant, direction: str = "forward") -> Follow | None:
        return self._running.get((tenant.schema, direction))

    def end(self, tenant: Tenant, source_url: str, direction: str = "forward") -> dict:
        """Stops the tenant's sync here and drops its slot and publication (on `source_url`)."""
        with self._lock:
            follow = self._running.pop((tenant.schema, direction), None)
        if follow is not None:
            follow.stop()
        dropped = drop_slot(source_url, tenant)
        return {**dropped, "error": follow.error if follow is not None else None}

    def close(self) -> None:
        with self._lock:
            running, self._running = list(self._running.values()), {}
        for follow in running:
            follow.stop(5)


def forget_position(target_url: str, tenant: Tenant) -> None:
    """Removes the sync's row from the target once the sync is over."""
    with psycopg.connect(target_url, connect_timeout=10) as conn, conn.transaction():
        if conn.execute("SELECT to_regclass('flux.sync_position')").fetchone()[0] is not None:
            conn.execute("DELETE FROM flux.sync_position WHERE slot = %s", (slot_name(tenant),))


def set_sequences(source_url: str, tenant: Tenant, target_url: str) -> int:
    """Sets every sequence of the tenant's schema on the target as it stands on the source."""
    with psycopg.connect(source_url, connect_timeout=10) as source:
        names = [r[0] for r in source.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind = 'S' ORDER BY 1", (tenant.schema,))]
        values = [(name, *source.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(
            sql.Identifier(tenant.schema, name))).fetchone()) for name in names]
    with psycopg.connect(target_url, connect_timeout=10) as target, target.transaction():
        for name, value, called in values:
            target.execute("SELECT setval(%s::regclass, %s, %s)",
                           (sql.Identifier(tenant.schema, name).as_string(target), value, called))
    return len(values)


def _sums(conn, schema: str) -> dict:
    return {name: conn.execute(sql.SQL(CHECKSUM).format(sql.Identifier(schema, name))).fetchone()
            for name in tables_of(conn, schema)}


def verify_checkpoint(source_url: str, tenant: Tenant, checkpoint: Checkpoint, strict: bool = True) -> dict:
    """Every table's row count and checksum, on the source as of the checkpoint's snapshot and on the
    target as its transaction sees it; an error naming each table that differs (without `strict`,
    those differences under `problems`). The sync goes on meanwhile: nothing here holds a write."""
    started = time.monotonic()
    try:
        with psycopg.connect(source_url, connect_timeout=10) as source:
            source.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            source.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(checkpoint.snapshot)))
            checkpoint.replication.close()  # imported: the temporary slot can go
            before = _sums(source, tenant.schema)
        after = _sums(checkpoint.target, tenant.schema)
    finally:
        checkpoint.close()
    problems = []
    for name, (rows, checksum) in before.items():
        got = after.get(name)
        if got is None:
            problems.append(f"table {name} is missing on the target")
        elif got != (rows, checksum):
            problems.append(f"table {name}: source {rows} rows, target {got[0]} rows"
                            + (", checksums differ" if got[0] == rows else ""))
    if problems and strict:
        raise AgentError(f"the copies differ at LSN {checkpoint.lsn}: " + "; ".join(problems))
    return {"lsn": checkpoint.lsn, "tables": {name: rows for name, (rows, _) in before.items()},
            "seconds": round(time.monotonic() - started, 3), "problems": problems}
