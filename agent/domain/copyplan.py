"""The plan of a schema copy, computed before anything runs (adapters/fastcopy.py runs it): the
tables' rows cut into chunks, biggest first, and pg_dump's post-data statements grouped into
steps whose statements may run side by side. Pure logic over names, sizes and SQL text.

Statements are told apart by PostgreSQL's own lexer (pglast), never by the `-- Name:` comments
pg_dump writes: a string in a tenant's policy or comment can imitate those, not the lexer. The
text that runs is the text pg_dump wrote; the parse tree only decides where it goes.
"""

from dataclasses import dataclass, field

import pglast
from pglast import enums

SHARE, EXCLUSIVE = "share", "exclusive"
_INDEX_CONSTRAINTS = (enums.ConstrType.CONSTR_PRIMARY, enums.ConstrType.CONSTR_UNIQUE,
                      enums.ConstrType.CONSTR_EXCLUSION)


@dataclass(frozen=True)
class Chunk:
    """Rows of one table: blocks [first, end) of its heap; None for either end means open, so
    rows a table gained after its size was read still belong to the last chunk."""

    table: str
    first: int | None
    end: int | None
    bytes: int

    @property
    def whole(self) -> bool:
        return self.first is None and self.end is None


def chunks(tables: dict[str, tuple[int, int]], split_bytes: int) -> list[Chunk]:
    """Chunks of the tables, given as name: (heap blocks, bytes with TOAST): each table in one,
    or, when bigger than `split_bytes`, in ranges of heap blocks of about that many bytes (TOAST
    follows its rows), so that several workers share a big table. Biggest chunks first."""
    out = []
    for table, (blocks, size) in tables.items():
        pieces = min(-(-size // split_bytes), blocks) if split_bytes > 0 else 1
        if pieces <= 1:
            out.append(Chunk(table, None, None, size))
            continue
        step = -(-blocks // pieces)
        bounds = list(range(step, blocks, step))
        for first, end in zip([None, *bounds], [*bounds, None]):
            width = (end if end is not None else blocks) - (first or 0)
            out.append(Chunk(table, first, end, size * width // blocks))
    return sorted(out, key=lambda c: (-c.bytes, c.table, c.first or 0))


@dataclass(frozen=True)
class Statement:
    """One statement of the dump; `settings` are the session settings before it in the dump,
    `locks` the tables it locks (schema, name) and how, for statements that run side by side."""

    sql: str
    settings: tuple[str, ...] = ()
    locks: tuple[tuple[tuple[str, str], str], ...] = ()

    def conflicts(self, running: list["Statement"]) -> bool:
        """Whether it would wait for a lock one of `running` holds."""
        held = {}
        for other in running:
            for table, mode in other.locks:
                held[table] = EXCLUSIVE if EXCLUSIVE in (mode, held.get(table)) else mode
        return any(table in held and EXCLUSIVE in (mode, held[table]) for table, mode in self.locks)


@dataclass(frozen=True)
class Step:
    name: str
    statements: tuple[Statement, ...]
    parallel: bool = False


@dataclass
class _Sorted:
    indexes: list = field(default_factory=list)
    attach: list = field(default_factory=list)
    foreign_keys: list = field(default_factory=list)
    rest: list = field(default_factory=list)


def split(script: str) -> list[str]:
    """The statements of an SQL script, as PostgreSQL's lexer cuts them."""
    return [s for s in pglast.split(script, with_parser=False) if s.strip()]


def _table(rangevar) -> tuple[str, str]:
    return rangevar.schemaname or "", rangevar.relname


def _is_setting(stmt) -> bool:
    if isinstance(stmt, pglast.ast.VariableSetStmt):
        return True
    # pg_dump's `SELECT pg_catalog.set_config('search_path', '', false)`
    return (isinstance(stmt, pglast.ast.SelectStmt) and not stmt.fromClause and stmt.targetList is not None
            and all(isinstance(t.val, pglast.ast.FuncCall)
                    and [n.sval for n in t.val.funcname] in (["set_config"], ["pg_catalog", "set_config"])
                    for t in stmt.targetList))


def _place(stmt, text: str, settings: tuple[str, ...], into: _Sorted) -> None:
    if isinstance(stmt, pglast.ast.IndexStmt):
        into.indexes.append(Statement(text, settings, ((_table(stmt.relation), SHARE),)))
        return
    if isinstance(stmt, pglast.ast.AlterTableStmt) and stmt.cmds and len(stmt.cmds) == 1:
        cmd = stmt.cmds[0]
        if stmt.objtype == enums.ObjectType.OBJECT_INDEX and cmd.subtype == enums.AlterTableType.AT_AttachPartition:
            into.attach.append(Statement(text, settings))
            return
        if (stmt.objtype == enums.ObjectType.OBJECT_TABLE and cmd.subtype == enums.AlterTableType.AT_AddConstraint
                and isinstance(cmd.def_, pglast.ast.Constraint)):
            if cmd.def_.contype in _INDEX_CONSTRAINTS:
                into.indexes.append(Statement(text, settings, ((_table(stmt.relation), EXCLUSIVE),)))
                return
            if cmd.def_.contype == enums.ConstrType.CONSTR_FOREIGN:
                tables = {_table(stmt.relation), _table(cmd.def_.pktable)}
                into.foreign_keys.append(Statement(text, settings, tuple((t, EXCLUSIVE) for t in sorted(tables))))
                return
    into.rest.append(Statement(text, settings))


def post_data(statements: list[str], sizes: dict[tuple[str, str], int]) -> list[Step]:
    """The post-data statements in steps, each after the one before:

    1. indexes, primary keys, unique and exclusion constraints, side by side, biggest table first;
    2. indexes attached to a partitioned table's index, in dump order (a foreign key may need
       the parent's index whole);
    3. foreign keys, side by side (they need the unique indexes they refer to);
    4. everything else (triggers, policies, row security, comments, rules...), in dump order.

    A statement the parser does not know makes the whole post-data one step in dump order.
    """
    into = _Sorted()
    settings: list[str] = []
    try:
        for text in statements:
            [raw] = pglast.parse_sql(text)
            if _is_setting(raw.stmt):
                settings.append(text)
            else:
                _place(raw.stmt, text, tuple(settings), into)
    except (pglast.parser.ParseError, ValueError):
        return [Step("post-data", tuple(Statement(s) for s in statements))]

    def biggest_first(items: list[Statement]) -> tuple[Statement, ...]:
        return tuple(sorted(items, key=lambda s: -max((sizes.get(t, 0) for t, _ in s.locks), default=0)))

    steps = [Step("indexes", biggest_first(into.indexes), True), Step("attach", tuple(into.attach)),
             Step("foreign keys", biggest_first(into.foreign_keys), True), Step("rest", tuple(into.rest))]
    return [s for s in steps if s.statements]
