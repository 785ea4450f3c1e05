-- Users, API tokens, agents, join tokens and agent jobs.
CREATE TABLE users (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    plan        text NOT NULL DEFAULT 'pro' CHECK (plan IN ('hobby', 'pro')),
    cli_role    text NOT NULL DEFAULT 'admin' CHECK (cli_role IN ('admin', 'operator')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_tokens (
    token_hash   text PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);

CREATE TABLE join_tokens (
    token_hash  text PRIMARY KEY,
    roles       text[] NOT NULL,
    created_by  bigint REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    used_by     text
);

CREATE TABLE agents (
    name             text PRIMARY KEY,
    roles            text[] NOT NULL,
    cert_serial      text NOT NULL,
    cert_expires_at  timestamptz NOT NULL,
    enrolled_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz,
    last_seen        timestamptz,
    facts            jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE jobs (
    id           text PRIMARY KEY,
    agent        text NOT NULL REFERENCES agents (name) ON DELETE CASCADE,
    kind         text NOT NULL,
    -- Parameters may carry secrets (route tables hold project JWT secrets): they are
    -- stored sealed with the master key, never in the clear.
    params_sealed text NOT NULL,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'sent', 'succeeded', 'failed')),
    output       jsonb,
    error        text,
    retryable    boolean,
    error_code   text,
    progress     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

CREATE INDEX jobs_open_by_agent ON jobs (agent) WHERE state IN ('pending', 'sent');
