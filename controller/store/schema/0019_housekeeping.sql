-- Housekeeping deletes finished jobs by when they finished, and operations by when they ran.
CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE state IN ('succeeded', 'failed');
CREATE INDEX operations_at ON operations (at);
