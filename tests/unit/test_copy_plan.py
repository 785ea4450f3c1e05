"""The plan of a schema copy (agent/domain/copyplan.py): chunks of rows, and post-data steps."""

import pytest

from agent.domain.copyplan import EXCLUSIVE, SHARE, Chunk, Statement, chunks, post_data, split

MiB = 1024 * 1024


@pytest.mark.parametrize("tables, split_bytes, expected", [
    ({"small": (10, 80_000)}, MiB, [Chunk("small", None, None, 80_000)]),
    ({"empty": (0, 0)}, MiB, [Chunk("empty", None, None, 0)]),
    # 3 MiB over 384 blocks in three ranges; the last is open so rows added later still go.
    ({"big": (384, 3 * MiB)}, MiB, [Chunk("big", None, 128, MiB), Chunk("big", 128, 256, MiB),
                                    Chunk("big", 256, None, MiB)]),
    # Mostly TOAST: a few heap blocks, still cut by the bytes they lead to.
    ({"toasty": (2, 5 * MiB)}, MiB, [Chunk("toasty", None, 1, 5 * MiB // 2), Chunk("toasty", 1, None, 5 * MiB // 2)]),
    ({"a": (10, 100), "b": (10, 300), "c": (10, 200)}, MiB,
     [Chunk("b", None, None, 300), Chunk("c", None, None, 200), Chunk("a", None, None, 100)]),
    ({"big": (100, 10 * MiB)}, 0, [Chunk("big", None, None, 10 * MiB)]),
])
def test_chunks(tables, split_bytes, expected):
    assert chunks(tables, split_bytes) == expected


def test_chunks_cover_every_block_once():
    got = chunks({"t": (1000, 7 * MiB + 123)}, MiB)
    ranges = sorted(((c.first or 0), c.end if c.end is not None else 1000) for c in got)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert sum(1 for c in got if c.end is None) == 1 and sum(1 for c in got if c.first is None) == 1


POST_DATA = """
SET statement_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);
SET default_tablespace = '';
--
-- Name: small small_pkey; Type: CONSTRAINT; Schema: s; Owner: o
--
ALTER TABLE ONLY s.small
    ADD CONSTRAINT small_pkey PRIMARY KEY (id);
ALTER TABLE ONLY s.big
    ADD CONSTRAINT big_pkey PRIMARY KEY (id);
ALTER TABLE ONLY s.parent
    ADD CONSTRAINT parent_pkey PRIMARY KEY (id, at);
ALTER TABLE ONLY s.child
    ADD CONSTRAINT child_pkey PRIMARY KEY (id, at);
CREATE INDEX big_name ON s.big USING btree (name);
COMMENT ON INDEX s.big_name IS 'it; has
-- Name: x; Type: INDEX; Schema: s; Owner: o
DROP TABLE s.small; semicolons';
ALTER INDEX s.parent_pkey ATTACH PARTITION s.child_pkey;
CREATE TRIGGER t BEFORE UPDATE ON s.big FOR EACH ROW EXECUTE FUNCTION s.touch();
ALTER TABLE ONLY s.big
    ADD CONSTRAINT big_small_fkey FOREIGN KEY (small_id) REFERENCES s.small(id);
CREATE POLICY p ON s.big USING ((name <> ';'));
ALTER TABLE s.big ENABLE ROW LEVEL SECURITY;
"""


def test_post_data_steps_in_order_with_their_locks():
    steps = post_data(split(POST_DATA), {("s", "big"): 100, ("s", "small"): 10})
    assert [(s.name, s.parallel, len(s.statements)) for s in steps] == [
        ("indexes", True, 5), ("attach", False, 1), ("foreign keys", True, 1), ("rest", False, 4)]
    indexes = steps[0].statements
    assert [s.locks for s in indexes] == [
        ((("s", "big"), EXCLUSIVE),), ((("s", "big"), SHARE),), ((("s", "small"), EXCLUSIVE),),
        ((("s", "parent"), EXCLUSIVE),), ((("s", "child"), EXCLUSIVE),)]
    assert steps[2].statements[0].locks == ((("s", "big"), EXCLUSIVE), (("s", "small"), EXCLUSIVE))
    # A comment whose text imitates pg_dump's headers and holds statements stays one statement.
    comment = steps[3].statements[0].sql
    assert comment.startswith("COMMENT ON INDEX") and comment.endswith("semicolons'")
    assert all(len(s.settings) == 3 and s.settings[1].startswith("SELECT pg_catalog.set_config")
               for step in steps for s in step.statements)


def test_statements_that_would_wait_on_each_other_conflict():
    build = Statement("CREATE INDEX", locks=((("s", "t"), SHARE),))
    other_build = Statement("CREATE INDEX", locks=((("s", "t"), SHARE),))
    key = Statement("ADD PRIMARY KEY", locks=((("s", "t"), EXCLUSIVE),))
    elsewhere = Statement("ADD PRIMARY KEY", locks=((("s", "u"), EXCLUSIVE),))
    assert not other_build.conflicts([build]) and not elsewhere.conflicts([build, key])
    assert key.conflicts([build]) and build.conflicts([key]) and not key.conflicts([])


def test_a_statement_the_parser_does_not_know_keeps_the_dump_order():
    statements = split("SET a = 1;\nCREATE INDEX i ON s.t (x);\nCREATE FUTURE THING s.t;\n")
    [step] = post_data(statements, {})
    assert step.name == "post-data" and not step.parallel
    assert [s.sql for s in step.statements] == statements and all(not s.settings for s in step.statements)
