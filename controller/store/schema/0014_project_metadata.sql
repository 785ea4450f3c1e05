-- What a project's owner records about it (string values by key), beside what the catalog knows.
CREATE TABLE project_metadata (
    project_id  uuid PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    metadata    jsonb NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
