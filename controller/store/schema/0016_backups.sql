-- Backups: made next to a project's data, kept encrypted on a backup host. Rows outlive their
-- project (no foreign key): a deleted project's backups can still be restored into a new one.
CREATE TABLE backup_keys (
    project_id  uuid PRIMARY KEY,
    -- The project's backup key, sealed with the master key and bound to the project.
    key_sealed  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE backups (
    id               uuid PRIMARY KEY,
    project_id       uuid NOT NULL,
    owner_id         bigint NOT NULL,
    slug             text NOT NULL,
    hash             text NOT NULL,
    -- tenant_export (a pooled tenant's schema) or project_db (a dedicated stack's).
    kind             text NOT NULL,
    -- manual or schedule.
    made_by          text NOT NULL,
    -- running, complete, failed or removed.
    status           text NOT NULL,
    error            text,
    source_agent     text NOT NULL,
    agent            text NOT NULL,
    path             text,
    bytes            bigint,
    sha256           text,
    archive_bytes    bigint,
    archive_sha256   text,
    manifest         jsonb,
    artifact_status  text,
    artifact_at      timestamptz,
    artifact_error   text,
    restore_status   text,
    restore_at       timestamptz,
    restore_error    text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz,
    removed_at       timestamptz,
    removed_why      text
);
CREATE INDEX backups_of_project ON backups (project_id, created_at DESC);

CREATE TABLE backup_schedules (
    project_id    uuid PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    every_seconds integer NOT NULL CHECK (every_seconds > 0),
    keep_daily    integer NOT NULL CHECK (keep_daily >= 0),
    keep_weekly   integer NOT NULL CHECK (keep_weekly >= 0),
    next_at       timestamptz NOT NULL,
    last_error    text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
