-- Operations on projects (create, start, stop, repair) with their outcome, for the dashboard.
CREATE TABLE operations (
    id          bigserial PRIMARY KEY,
    project_id  uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind        text NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('succeeded', 'failed')),
    detail      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX operations_by_project ON operations (project_id, at DESC);
