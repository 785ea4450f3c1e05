-- Engine migrations (pooled to dedicated), one durable row each; at most one running per project.
CREATE TABLE migrations (
    id                     uuid PRIMARY KEY,
    project_id             uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind                   text NOT NULL CHECK (kind IN ('dump_only', 'staged', 'full')),
    options                jsonb NOT NULL,
    phase                  text NOT NULL,
    state                  text NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'rolled_back')),
    error                  text,
    result                 jsonb,
    new_jwt_secret_sealed  text,
    started_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    finished_at            timestamptz
);
CREATE UNIQUE INDEX migrations_one_running_per_project ON migrations (project_id) WHERE state = 'running';
