-- Whether a migration provisioned the dedicated stack itself (none was staged before it):
-- rolling it back then removes that stack rather than leaving it running.
ALTER TABLE migrations ADD COLUMN created_stack boolean NOT NULL DEFAULT false;
