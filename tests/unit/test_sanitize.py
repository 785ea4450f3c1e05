"""Dump lines a Postgres older than 17 rejects are dropped, never inside COPY data."""

from agent.dumps import sanitize

DUMP = [
    b"--\n",
    b"\\restrict AbCdEf123\n",
    b"SET statement_timeout = 0;\n",
    b"SET transaction_timeout = 0;\n",
    b"COPY t_x_api.notes (id, body) FROM stdin;\n",
    b"1\t\\restrict is data here\n",
    b"2\tSET transaction_timeout = 0;\n",
    b"\\.\n",
    b"\\unrestrict AbCdEf123\n",
]


def test_meta_commands_and_settings_are_dropped_below_17():
    out = list(sanitize(DUMP, 15))
    assert b"\\restrict AbCdEf123\n" not in out and b"\\unrestrict AbCdEf123\n" not in out
    assert b"SET transaction_timeout = 0;\n" not in out
    assert b"SET statement_timeout = 0;\n" in out


def test_copy_data_passes_untouched():
    out = list(sanitize(DUMP, 15))
    assert b"1\t\\restrict is data here\n" in out
    assert b"2\tSET transaction_timeout = 0;\n" in out


def test_targets_from_17_get_the_dump_as_it_is():
    assert list(sanitize(DUMP, 17)) == DUMP
