-- Each step of a migration's plan, as the runner last recorded it: running, done, failed,
-- undone (rolled back) or undo_failed. A restarted controller reads these to know which
-- steps to undo (before cutover) or which are left (after it); their outputs rebuild the
-- migration's summary.
CREATE TABLE migration_steps (
    migration_id  uuid NOT NULL REFERENCES migrations (id) ON DELETE CASCADE,
    step          text NOT NULL,
    position      int NOT NULL,
    state         text NOT NULL CHECK (state IN ('running', 'done', 'failed', 'undone', 'undo_failed')),
    output        jsonb,
    error         text,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    PRIMARY KEY (migration_id, step)
);
