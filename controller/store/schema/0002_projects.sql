-- Projects, and the version of the gateway route table.
CREATE TABLE projects (
    id                 uuid PRIMARY KEY,
    owner_id           bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name               text NOT NULL,
    slug               text NOT NULL CHECK (slug ~ '^[a-z0-9]+(-[a-z0-9]+)*$'),
    hash               text NOT NULL CHECK (hash ~ '^[0-9a-f]{7}$'),
    mode               text NOT NULL CHECK (mode IN ('v2_shared', 'v1_dedicated')),
    lifecycle          text NOT NULL DEFAULT 'provisioning'
                       CHECK (lifecycle IN ('provisioning', 'active', 'dormant', 'archived', 'deleting')),
    api_schema         text NOT NULL,
    jwt_secret_sealed  text NOT NULL,
    db_agent           text REFERENCES agents (name),
    maintenance        boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner_id, slug),
    UNIQUE (owner_id, hash)
);

CREATE TABLE gateway_routes_version (
    id       integer PRIMARY KEY CHECK (id = 1),
    version  bigint NOT NULL
);
INSERT INTO gateway_routes_version VALUES (1, 0);
