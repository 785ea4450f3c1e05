-- What each docker agent last reported of its stacks (it pushes them on change and periodically),
-- so listing projects reads the catalog and never waits on an agent. NULL: nothing reported since
-- it last connected.
ALTER TABLE agents ADD COLUMN stacks_reported_at timestamptz,
                   ADD COLUMN engine_error text NOT NULL DEFAULT '';
