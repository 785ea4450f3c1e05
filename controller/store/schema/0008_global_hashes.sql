-- Project hashes are unique across the catalog, not only per owner: containers, volumes,
-- networks and Service URL host names are global, so two owners' projects must not share one.
--
-- Projects that already share their hash with an older project of another owner keep it:
-- their Service URLs and Docker objects are in use, and renaming them would break clients.
-- They are marked `hash_shared`; the oldest holder of each hash stays in the unique index, and
-- new hashes are chosen free of every row (marked or not), so no new project joins a group.
ALTER TABLE projects ADD COLUMN hash_shared boolean NOT NULL DEFAULT false;

UPDATE projects AS p SET hash_shared = true
 WHERE EXISTS (SELECT 1 FROM projects AS o
                WHERE o.hash = p.hash AND (o.created_at, o.id) < (p.created_at, p.id));

CREATE UNIQUE INDEX projects_hash_key ON projects (hash) WHERE NOT hash_shared;
