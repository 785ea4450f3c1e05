"""Engine migrations: the plan of a migration (plan.py) and the runner that executes it (runner.py)."""

from .plan import MESSAGES, Options, build, check, cut_over, data_timeout, preflight_refusals
from .runner import MigrationFailed, Migrations, step_states

__all__ = ["MESSAGES", "MigrationFailed", "Migrations", "Options", "build", "check", "cut_over", "data_timeout",
           "preflight_refusals", "step_states"]
