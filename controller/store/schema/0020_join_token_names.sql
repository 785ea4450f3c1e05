-- A join token may be made for one agent name: only such a token enrolls an agent again under the
-- name of one whose certificate ran out (any other token is refused that name).
ALTER TABLE join_tokens ADD COLUMN agent_name text;
