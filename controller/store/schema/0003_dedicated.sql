-- Dedicated stacks: where a project's containers run and how to reach them.
ALTER TABLE projects
    ADD COLUMN docker_agent                   text REFERENCES agents (name),
    ADD COLUMN postgres_password_sealed       text,
    ADD COLUMN authenticator_password_sealed  text,
    ADD COLUMN api_upstream                   text,
    ADD COLUMN api_port                       integer,
    ADD COLUMN db_host                        text,
    ADD COLUMN db_port                        integer,
    ADD COLUMN observed_status                text;
