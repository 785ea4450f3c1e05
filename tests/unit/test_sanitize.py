"""Dump lines the restore cannot take are dropped, never inside COPY data: `\\restrict` when the
psql that restores predates it, `SET transaction_timeout` when the target server is older than 17."""

import io

import pytest

from agent.domain.dumpstream import dropped_lines, psql_understands_restrict, sanitize

DUMP = b"".join([
    b"--\n",
    b"\\restrict AbCdEf123\n",
    b"SET statement_timeout = 0;\n",
    b"SET transaction_timeout = 0;\n",
    b"COPY t_x_api.notes (id, body) FROM stdin;\n",
    b"1\t\\restrict is data here\n",
    b"2\tSET transaction_timeout = 0;\n",
    b"3\tends with \\\\.\n",
    b"\\.\n",
    b"COPY t_x_api.empty (id) FROM stdin;\n",
    b"\\.\n",
    b"\\unrestrict AbCdEf123\n",
])
EXPECTED = b"".join(line for line in DUMP.splitlines(keepends=True)
                    if line not in (b"\\restrict AbCdEf123\n", b"SET transaction_timeout = 0;\n",
                                    b"\\unrestrict AbCdEf123\n"))


def run(data: bytes, major: int, chunk: int) -> tuple[bytes, list[bytes]]:
    """A restore into a server of `major` by a psql of the same release line, before or after `\\restrict`."""
    copies = []
    dropped = dropped_lines("15.13" if major < 17 else "17.6", major)
    out = b"".join(sanitize(io.BytesIO(data).read, dropped, chunk_size=chunk, on_copy=copies.append))
    return out, copies


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_meta_commands_and_settings_are_dropped_below_17_at_any_chunk_size(chunk):
    out, copies = run(DUMP, 15, chunk)
    assert out == EXPECTED
    assert copies == [b"COPY t_x_api.notes (id, body) FROM stdin;\n", b"COPY t_x_api.empty (id) FROM stdin;\n"]


def test_copy_data_passes_untouched():
    out, _ = run(DUMP, 15, 5)
    assert b"1\t\\restrict is data here\n" in out
    assert b"2\tSET transaction_timeout = 0;\n" in out


def test_targets_from_17_get_the_dump_as_it_is():
    assert run(DUMP, 17, 4)[0] == DUMP


def test_a_dump_without_a_final_newline_loses_nothing():
    assert run(b"SELECT 1;", 15, 2)[0] == b"SELECT 1;"


def reference(data: bytes, major: int) -> bytes:
    """The semantics, read off whole lines: what sanitize must yield at any chunk size."""
    out, in_copy = [], False
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            out.append(line)
        elif in_copy:
            out.append(line)
            in_copy = line != b"\\.\n"
        elif line.startswith(b"COPY ") and line.rstrip().endswith(b"FROM stdin;"):
            out.append(line)
            in_copy = True
        elif not (major < 17 and line.startswith((b"\\restrict", b"\\unrestrict", b"SET transaction_timeout"))):
            out.append(line)
    return b"".join(out)


PIECES = [b"\\restrict k\n", b"\\unrestrict k\n", b"SET transaction_timeout = 0;\n", b"SET x = 1;\n",
          b"COPY t (a) FROM stdin;\n", b"\\.\n", b"1\tx\n", b"\\.", b"\n", b"\\", b".", b"a\\.\n", b"\\.\\.\n",
          b"COPY t FROM stdin;  \n", b"COPY not a copy\n", b"\\restrict", b"x" * 5]


@pytest.mark.parametrize("seed", range(300))
def test_any_dump_at_any_chunk_size_matches_the_line_by_line_semantics(seed):
    import random

    rng = random.Random(seed)
    data = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))
    chunk = rng.choice([1, 2, 3, 4, 5, 8, 13, 64])
    for major in (15, 17):
        assert run(data, major, chunk)[0] == reference(data, major), (data, chunk)


def test_a_huge_copy_value_streams_through_in_chunk_sized_pieces():
    value = b"v" * (16 * 1024 * 1024)
    data = (b"SET transaction_timeout = 0;\nCOPY t_x_api.blobs (id, body) FROM stdin;\n1\t" + value
            + b"\n2\t\\\\.\n\\.\n\\unrestrict k\n")
    chunk = 64 * 1024
    pieces = list(sanitize(io.BytesIO(data).read, dropped_lines(None, 15), chunk_size=chunk))
    assert b"".join(pieces) == data[len(b"SET transaction_timeout = 0;\n"):-len(b"\\unrestrict k\n")]
    # Nothing accumulates: memory stays bounded by the chunk size, whatever the line length.
    assert max(len(p) for p in pieces) <= chunk + 3


def test_a_huge_line_outside_copy_streams_too():
    from agent.domain.dumpstream import MAX_LINE

    long = b"COMMENT ON TABLE t IS '" + b"c" * (3 * MAX_LINE) + b"';\n"
    data = b"\\restrict " + b"k" * (2 * MAX_LINE) + b"\n" + long + b"SET transaction_timeout = 0;\nSELECT 1;\n"
    pieces = list(sanitize(io.BytesIO(data).read, dropped_lines(None, 15), chunk_size=64 * 1024))
    assert b"".join(pieces) == long + b"SELECT 1;\n"
    assert max(len(p) for p in pieces) <= MAX_LINE + 128 * 1024


@pytest.mark.parametrize("version, understands", [
    ("15.13", False), ("15.14", True), ("15.18", True), ("16.9", False), ("16.10", True), ("17.5", False),
    ("17.6", True), ("18.0", True), ("18", True), ("14.19", True), ("13.21", False), ("12.22", False),
    (None, False), ("", False),
])
def test_restrict_is_kept_for_a_psql_that_understands_it(version, understands):
    assert psql_understands_restrict(version) is understands


def test_what_is_dropped_follows_the_psql_for_restrict_and_the_server_for_settings():
    # psql 15.18 (Debian bookworm) restoring into a 15 server: \restrict stays, transaction_timeout goes.
    assert dropped_lines("15.18", 15) == (b"SET transaction_timeout",)
    # An old psql restoring into a 17 server: the server knows transaction_timeout, psql not \restrict.
    assert dropped_lines("16.4", 17) == (b"\\restrict", b"\\unrestrict")
    assert dropped_lines("17.6", 17) == ()
    out = b"".join(sanitize(io.BytesIO(DUMP).read, dropped_lines("15.18", 15)))
    assert out == b"".join(line for line in DUMP.splitlines(keepends=True) if line != b"SET transaction_timeout = 0;\n")
