-- PostgREST settings a dedicated project's owner chose (PGRST_* keys Flux does not set itself);
-- the API container is made with them.
ALTER TABLE projects ADD COLUMN api_env jsonb NOT NULL DEFAULT '{}';
