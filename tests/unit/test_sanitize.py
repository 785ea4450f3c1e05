"""Dump lines a Postgres older than 17 rejects are dropped, never inside COPY data."""

import io

import pytest

from agent.dumps import sanitize

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
    copies = []
    out = b"".join(sanitize(io.BytesIO(data).read, major, chunk_size=chunk, on_copy=copies.append))
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
