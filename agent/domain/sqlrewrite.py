"""Makes migration SQL written for a dedicated database run in a pooled tenant schema.

The same files work on both engines: on the pooled engine objects aimed at `public`
land in the tenant schema, and grants and policies naming `authenticated` apply to
the tenant's runtime role. Statements are parsed with PostgreSQL's own parser
(pglast); a statement that needs no change is kept exactly as written. Changing
the session's role is refused: a push runs as the tenant's owner role and no other.
Bodies of functions (`$$ ... $$`) are not rewritten; they run with the tenant's
search_path pinned, so unqualified names resolve to the tenant schema.

Files are bounded (`Limits`: size, statements, nesting depth) and refused by name past
them. The parser is C code that can crash on hostile input, so the agent calls this
module only through `agent.sandbox`, in a child process.
"""

from dataclasses import dataclass, field

from pglast import ast, parse_sql
from pglast.enums import VariableSetKind
from pglast.parser import ParseError
from pglast.stream import RawStream

FORBIDDEN_SETTINGS = {"role", "session_authorization"}


class RewriteError(Exception):
    pass


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 4 * 1024 * 1024
    max_statements: int = 50_000
    # Nodes from a statement down to its deepest leaf; real migrations stay far below.
    max_depth: int = 500


@dataclass
class Rewritten:
    sql: str
    tables_moved: int = 0
    sequences_moved: int = 0
    views_moved: int = 0
    warnings: list[str] = field(default_factory=list)


class _Rewriter:
    def __init__(self, schema: str, runtime_role: str):
        self.schema = schema
        self.runtime_role = runtime_role
        self.changed = False

    def visit(self, root) -> None:
        # A loop, not recursion: how deep a tree goes is up to the tenant.
        pending = [root]
        while pending:
            node = pending.pop()
            if isinstance(node, (list, tuple)):
                pending.extend(node)
                continue
            if not isinstance(node, ast.Node):
                continue
            if isinstance(node, ast.RangeVar) and node.schemaname == "public":
                node.schemaname = self.schema
                self.changed = True
            elif isinstance(node, ast.RoleSpec) and node.rolename == "authenticated":
                node.rolename = self.runtime_role
                self.changed = True
            elif isinstance(node, (ast.CreateFunctionStmt, ast.FuncCall, ast.TypeName, ast.DropStmt)):
                self._requalify_names(node)
            pending.extend(getattr(node, name, None) for name in node.__slots__)

    def _requalify_names(self, node) -> None:
        """`public.name` in a qualified-name list becomes `<tenant schema>.name`."""
        lists = []
        if isinstance(node, ast.CreateFunctionStmt):
            lists.append(node.funcname)
        elif isinstance(node, ast.FuncCall):
            lists.append(node.funcname)
        elif isinstance(node, ast.TypeName):
            lists.append(node.names)
        elif isinstance(node, ast.DropStmt) and node.objects:
            lists.extend(o for o in node.objects if isinstance(o, (list, tuple)))
        for names in lists:
            if names and len(names) >= 2 and isinstance(names[0], ast.String) and names[0].sval == "public":
                names[0].sval = self.schema
                self.changed = True


def _search_path_args(stmt: ast.VariableSetStmt, schema: str) -> bool:
    changed = False
    for arg in stmt.args or ():
        if isinstance(arg, ast.A_Const) and isinstance(arg.val, ast.String) and arg.val.sval == "public":
            arg.val.sval = schema
            changed = True
    return changed


def depth(root, stop_after: int) -> int:
    """How many nodes deep `root` goes, counting no further than `stop_after` + 1."""
    deepest = 0
    pending = [(root, 1)]
    while pending:
        node, level = pending.pop()
        if isinstance(node, (list, tuple)):
            pending.extend((item, level) for item in node)
        elif isinstance(node, ast.Node):
            deepest = max(deepest, level)
            if deepest > stop_after:
                break
            pending.extend((getattr(node, name, None), level + 1) for name in node.__slots__)
    return deepest


def rewrite(text: str, schema: str, runtime_role: str, filename: str = "<sql>",
            limits: Limits = Limits()) -> Rewritten:
    size = len(text.encode())
    if size > limits.max_bytes:
        raise RewriteError(f"{filename}: {size} bytes; a migration file may have at most {limits.max_bytes}. "
                           "Split it into several files")
    try:
        statements = parse_sql(text)
    except ParseError as exc:
        raise RewriteError(f"{filename}: SQL does not parse: {exc}") from None
    if len(statements) > limits.max_statements:
        raise RewriteError(f"{filename}: {len(statements)} statements; a migration file may have at most "
                           f"{limits.max_statements}. Split it into several files")
    for raw in statements:
        if depth(raw.stmt, limits.max_depth) > limits.max_depth:
            line = text.encode()[:raw.stmt_location or 0].count(b"\n") + 1
            raise RewriteError(f"{filename}: the statement at line {line} nests deeper than "
                               f"{limits.max_depth} levels; simplify it")
    encoded = text.encode()
    out = Rewritten(sql="")
    pieces = []
    for raw in statements:
        stmt = raw.stmt
        if isinstance(stmt, ast.VariableSetStmt) and (stmt.name or "").lower() in FORBIDDEN_SETTINGS:
            verb = "RESET" if stmt.kind == VariableSetKind.VAR_RESET else "SET"
            raise RewriteError(f"{filename}: {verb} {stmt.name.upper().replace('_', ' ')} is not allowed; "
                               "migrations run as the project's owner role")
        if isinstance(stmt, ast.TransactionStmt):
            raise RewriteError(f"{filename}: transaction control (BEGIN, COMMIT, ...) is not allowed; "
                               "each push runs in one transaction")
        rewriter = _Rewriter(schema, runtime_role)
        if isinstance(stmt, ast.VariableSetStmt) and (stmt.name or "").lower() == "search_path":
            rewriter.changed = _search_path_args(stmt, schema)
        else:
            rewriter.visit(stmt)
        if rewriter.changed:
            if isinstance(stmt, ast.CreateStmt):
                out.tables_moved += 1
            elif isinstance(stmt, ast.CreateSeqStmt):
                out.sequences_moved += 1
            elif isinstance(stmt, ast.ViewStmt):
                out.views_moved += 1
            pieces.append(RawStream()(stmt))
        else:
            start = raw.stmt_location or 0
            end = start + raw.stmt_len if raw.stmt_len else len(encoded)
            pieces.append(encoded[start:end].decode().strip())
    out.sql = ";\n".join(p for p in pieces if p) + (";\n" if pieces else "")
    return out
