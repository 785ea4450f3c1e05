"""Names both sides derive from a project: its short id and its pooled tenant's schema and roles."""


def short_id(project_id: str) -> str:
    """The first 12 hex digits of the project's UUID."""
    return project_id.replace("-", "")[:12]


def tenant_schema(short: str) -> str:
    return f"t_{short}_api"


def runtime_role(short: str) -> str:
    """The role a pooled tenant's requests (and a migrated project's app tokens) act as."""
    return f"t_{short}_role"


def owner_role(short: str) -> str:
    """The role that owns a pooled tenant's schema; pushes and dumps log in as it."""
    return f"t_{short}_ddl"


def tenant_comment(project_id: str) -> str:
    """The comment on a tenant schema, naming the project it belongs to."""
    return f"tenant:{project_id}"
