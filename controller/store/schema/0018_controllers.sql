-- Controllers sharing this catalog. Each one records its addresses; the one holding the lease
-- leads (agents connect to it, it runs migrations and the background work), the others serve
-- reads and forward the rest to it. The lease's times are the catalog's clock.
CREATE TABLE controllers (
    id            text PRIMARY KEY,
    grpc_address  text NOT NULL,
    http_address  text NOT NULL,
    seen_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE controller_lease (
    id          integer PRIMARY KEY CHECK (id = 1),
    holder      text,
    -- Grows each time the lease changes hands.
    epoch       bigint NOT NULL DEFAULT 0,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO controller_lease (id) VALUES (1);

-- The controller an agent's stream is open to (NULL when none).
ALTER TABLE agents ADD COLUMN connected_to text;
