"""An agent's Prometheus metrics (served by observe.serve_metrics on `--metrics-listen`)."""

from prometheus_client import Counter, Gauge, Histogram

from observe import LOOP_LAG_BUCKETS

_JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

JOBS = Counter("flux_agent_jobs", "Jobs this agent ran, by kind and outcome (succeeded, failed)",
               ["kind", "outcome"])
JOB_SECONDS = Histogram("flux_agent_job_duration_seconds", "Time this agent took to run a job, by kind",
                        ["kind"], buckets=_JOB_BUCKETS)
JOBS_RUNNING = Gauge("flux_agent_jobs_running", "Jobs running on this agent now")
LOOP_LAG_SECONDS = Histogram("flux_agent_event_loop_lag_seconds",
                             "How late this agent's event loop woke a timer: how long its stream, its jobs and, "
                             "on a gateway, every request's token check waited meanwhile (observed ten times a second)",
                             buckets=LOOP_LAG_BUCKETS)
CONNECTED = Gauge("flux_agent_connected", "1 while this agent's stream to a controller is open")
GATEWAY_REQUESTS = Counter("flux_gateway_requests", "Requests this gateway's Caddy served, by project and "
                           "status (from its access log)", ["project", "status"])
GATEWAY_REQUEST_SECONDS = Histogram("flux_gateway_request_duration_seconds",
                                    "Time this gateway's Caddy took to answer a request, by project",
                                    ["project"], buckets=_REQUEST_BUCKETS)
POOL_API_UP = Gauge("flux_agent_pool_api_up", "1 while the pooled API this db agent supervises runs")
POOL_API_RESTARTS = Counter("flux_agent_pool_api_restarts", "Times the pooled API exited and was started again")
CADDY_RESTARTS = Counter("flux_gateway_caddy_restarts", "Times this gateway's Caddy stopped answering and was "
                         "started again")
