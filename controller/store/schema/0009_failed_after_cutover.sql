-- A migration whose step after cutover failed: the project serves from its dedicated stack,
-- the pooled copy stays read-only, and `flux migrate resume` finishes what is left.
ALTER TABLE migrations DROP CONSTRAINT migrations_state_check;
ALTER TABLE migrations ADD CONSTRAINT migrations_state_check
    CHECK (state IN ('running', 'succeeded', 'failed', 'rolled_back', 'failed_after_cutover'));
