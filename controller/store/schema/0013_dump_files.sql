-- Dump files a migrate wrote in a db agent's spool, encrypted each under its own data key
-- (sealed with the master key, bound to the row's id). A row stays, with removed_at, once its
-- file is gone, until its project is deleted.
--
-- A project cannot be deleted while it has rows (RESTRICT, not CASCADE): deleting it must first
-- remove its files and then its rows, so a file the catalog knows of is never forgotten while it
-- may still be on a host.
CREATE TABLE dump_files (
    id            uuid PRIMARY KEY,
    project_id    uuid NOT NULL REFERENCES projects (id) ON DELETE RESTRICT,
    migration_id  uuid REFERENCES migrations (id) ON DELETE SET NULL,
    agent         text NOT NULL REFERENCES agents (name),
    path          text NOT NULL,
    -- The file as stored (encrypted): it can be checked without the key.
    bytes         bigint NOT NULL CHECK (bytes >= 0),
    sha256        text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    -- The SQL the file decrypts to.
    sql_bytes     bigint NOT NULL CHECK (sql_bytes >= 0),
    sql_sha256    text NOT NULL CHECK (sql_sha256 ~ '^[0-9a-f]{64}$'),
    key_sealed    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    removed_at    timestamptz,
    removed_why   text CHECK (removed_why IN ('retention', 'tenant_dropped', 'project_deleted')),
    -- The file was already gone when it was to be removed.
    missing       boolean NOT NULL DEFAULT false,
    CHECK ((removed_at IS NULL) = (removed_why IS NULL))
);
-- One key per file: a path names one kept file at a time.
CREATE UNIQUE INDEX dump_files_one_per_path ON dump_files (agent, path) WHERE removed_at IS NULL;
CREATE INDEX dump_files_by_project ON dump_files (project_id, created_at);
