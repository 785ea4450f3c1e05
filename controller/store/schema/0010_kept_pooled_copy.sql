-- After cutover the pooled copy of a migrated project is kept, read-only, until it is dropped;
-- its size at cutover, NULL when there is none.
ALTER TABLE projects ADD COLUMN kept_copy_bytes bigint;
