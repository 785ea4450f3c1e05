"""The controller's Prometheus metrics (served by observe.serve_metrics on `--metrics-listen`)."""

from prometheus_client import Counter, Gauge, Histogram

from observe import LOOP_LAG_BUCKETS

# Seconds, from a ping to a full copy of a large tenant.
_JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_PAUSE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

JOBS = Counter("flux_controller_jobs", "Jobs run on agents, by kind and outcome (succeeded, failed, timeout)",
               ["kind", "outcome"])
JOB_SECONDS = Histogram("flux_controller_job_duration_seconds", "Time from sending a job to its end, by kind",
                        ["kind"], buckets=_JOB_BUCKETS)
HEARTBEATS = Counter("flux_controller_heartbeats", "Heartbeats received from agents on their streams")
AGENTS_CONNECTED = Gauge("flux_controller_agents_connected", "Agents with a stream open to this controller")
LOOP_LAG_SECONDS = Histogram("flux_controller_event_loop_lag_seconds",
                             "How late the controller's event loop woke a timer: how long every agent's stream "
                             "and API request waited meanwhile (observed ten times a second)",
                             buckets=LOOP_LAG_BUCKETS)
LEADING = Gauge("flux_controller_leading", "1 while this controller leads the controllers on its catalog")
MIGRATIONS = Counter("flux_migrations", "Migrations ended, by outcome (succeeded, rolled_back, "
                     "failed_after_cutover)", ["outcome"])
MIGRATION_STEP_SECONDS = Histogram("flux_migration_step_duration_seconds", "Time each step of a migration took",
                                   ["step"], buckets=_JOB_BUCKETS)
MIGRATION_PAUSE_SECONDS = Histogram("flux_migration_write_pause_seconds",
                                    "How long a migration paused the project's writes (lock to unlock)",
                                    buckets=_PAUSE_BUCKETS)
REPLICATION_LAG_BYTES = Gauge("flux_migration_replication_lag_bytes",
                              "How far an online migration's stack trails the pooled copy, by project",
                              ["project"])
REPLICATION_LAG_SECONDS = Gauge("flux_migration_replication_lag_seconds",
                                "How long ago the stack's last applied change was made on the pooled copy, by project",
                                ["project"])
