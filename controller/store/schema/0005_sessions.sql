-- Dashboard sessions: only a hash of the cookie's value is stored, with the form token.
CREATE TABLE sessions (
    id_hash     text PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
