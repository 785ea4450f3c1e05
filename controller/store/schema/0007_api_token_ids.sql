-- API tokens get an id so their owner (or an admin) can list and revoke them.
ALTER TABLE api_tokens ADD COLUMN id bigserial UNIQUE;
