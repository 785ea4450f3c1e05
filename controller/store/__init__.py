"""The catalog: the controller's state in PostgreSQL, one module per aggregate.

Every other module reaches the catalog through `Catalog`.
"""

from .agents import Agent, AgentStore
from .backups import BackupStore
from .controllers import ControllerStore, Lease
from .base import CatalogUnavailable, Migration, Store, available_migrations, connect, migrate, pending_migrations
from .dumps import DumpFile, DumpFileStore
from .housekeeping import HousekeepingStore, Retention
from .jobs import Job, JobStore
from .migrations import MigrationRow, MigrationStore, StepRow
from .projects import HashTaken, Project, ProjectStore
from .users import ApiToken, User, UserStore


class Catalog(HousekeepingStore, ControllerStore, BackupStore, UserStore, AgentStore, JobStore, ProjectStore, MigrationStore, DumpFileStore, Store):
    """Every aggregate's queries over one connection pool."""


__all__ = ["Agent", "ApiToken", "Catalog", "CatalogUnavailable", "DumpFile", "HashTaken", "Job", "Lease", "Migration", "MigrationRow", "Project", "Retention", "StepRow",
           "User", "available_migrations", "connect", "migrate", "pending_migrations"]
