"""The dump file format: chunked AES-256-GCM that reads back only whole, in order and unchanged."""

import hashlib
import io
import os

import pytest

from agent.adapters.dumpfile import (CHUNK_BYTES, HEADER_BYTES, TAG_BYTES, DumpFileError, EncryptingWriter, decrypt,
                            read_sql)

KEY = bytes(range(32))
SMALL = 64  # plaintext bytes per chunk in most tests, so a few hundred bytes make several chunks


def _encrypt(data: bytes, key: bytes = KEY, chunk: int = SMALL, pieces: int = 7) -> tuple[bytes, EncryptingWriter]:
    out = io.BytesIO()
    writer = EncryptingWriter(out, key, chunk)
    for start in range(0, len(data), pieces):  # written in odd pieces, as pg_dump's output comes
        writer.write(data[start:start + pieces])
    writer.close()
    return out.getvalue(), writer


def _decrypt(blob: bytes, key: bytes = KEY) -> bytes:
    return b"".join(decrypt(io.BytesIO(blob).read, key))


def _chunks(blob: bytes, chunk: int = SMALL) -> tuple[bytes, list[bytes]]:
    stored = chunk + TAG_BYTES
    body = blob[HEADER_BYTES:]
    return blob[:HEADER_BYTES], [body[i:i + stored] for i in range(0, len(body), stored)]


@pytest.mark.parametrize("size", [0, 1, SMALL - 1, SMALL, SMALL + 1, 3 * SMALL, 3 * SMALL + 5])
def test_round_trip_at_every_chunk_boundary(size):
    data = os.urandom(size)
    blob, writer = _encrypt(data)
    assert _decrypt(blob) == data
    # What is recorded describes the file as stored, checkable without the key.
    assert writer.bytes == len(blob) and writer.sha256 == hashlib.sha256(blob).hexdigest()
    full, last = divmod(size, SMALL)
    chunks = full + (1 if last or not full else 0)
    assert len(blob) == HEADER_BYTES + size + TAG_BYTES * chunks


def test_a_large_dump_round_trips_through_a_file_with_the_default_chunk_size(tmp_path):
    data = (b"COPY t_0123456789ab_api.notes (id, body) FROM stdin;\n" + os.urandom(CHUNK_BYTES * 2 + 1000))
    path = tmp_path / "big.sql.enc"
    with open(path, "wb") as handle:
        writer = EncryptingWriter(handle, KEY)
        for start in range(0, len(data), 300_000):
            writer.write(data[start:start + 300_000])
        writer.close()
    assert b"".join(read_sql(path, KEY)) == data
    assert b"COPY" not in path.read_bytes()


def test_the_same_sql_under_the_same_key_never_gives_the_same_file():
    data = b"INSERT INTO notes VALUES ('same');\n" * 10
    first, _ = _encrypt(data)
    second, _ = _encrypt(data)
    assert first[:HEADER_BYTES - 16] == second[:HEADER_BYTES - 16] and first != second
    assert _decrypt(first) == _decrypt(second) == data


def _fails(blob: bytes, key: bytes = KEY, match: str = "does not decrypt") -> None:
    with pytest.raises(DumpFileError, match=match):
        _decrypt(blob, key)


def test_a_flipped_byte_anywhere_is_detected():
    blob, _ = _encrypt(os.urandom(3 * SMALL + 10))
    for position in [HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + SMALL, HEADER_BYTES + SMALL + TAG_BYTES + 3,
                     len(blob) - 1]:
        changed = bytearray(blob)
        changed[position] ^= 0x01
        _fails(bytes(changed))


def test_an_edited_header_is_detected():
    blob, _ = _encrypt(os.urandom(2 * SMALL))
    _fails(b"FLUXDUMQ" + blob[8:], match="not a Flux dump file")
    _fails(blob[:8] + bytes([2]) + blob[9:], match="version 2 is not known")
    # Another chunk size changes how the file is cut into chunks, and the associated data.
    _fails(blob[:9] + (SMALL * 2).to_bytes(4, "big") + blob[13:])
    _fails(blob[:9] + (1 << 30).to_bytes(4, "big") + blob[13:], match="chunk size")
    _fails(blob[:HEADER_BYTES - 10], match="not a Flux dump file")


def test_truncation_is_detected_even_at_a_chunk_boundary():
    blob, _ = _encrypt(os.urandom(3 * SMALL + 10))
    header, chunks = _chunks(blob)
    assert len(chunks) == 4
    for kept in range(0, 4):
        _fails(header + b"".join(chunks[:kept]))  # whole chunks dropped from the end
    _fails(blob[:-1])
    _fails(blob[:HEADER_BYTES + SMALL + TAG_BYTES + 5])
    # The same when the last chunk is a full one.
    exact, _ = _encrypt(os.urandom(2 * SMALL))
    header, chunks = _chunks(exact)
    assert len(chunks) == 2
    _fails(header + chunks[0])


def test_swapped_repeated_extended_or_dropped_chunks_are_detected():
    blob, _ = _encrypt(os.urandom(3 * SMALL + 10))
    header, (c0, c1, c2, c3) = _chunks(blob)
    _fails(header + c1 + c0 + c2 + c3)
    _fails(header + c0 + c2 + c1 + c3)
    _fails(header + c0 + c0 + c2 + c3)
    _fails(header + c0 + c2 + c3)
    _fails(blob + c3)
    _fails(blob + b"\n-- appended\n")


def test_a_chunk_of_another_file_under_the_same_key_does_not_fit():
    first, _ = _encrypt(os.urandom(2 * SMALL + 1))
    second, _ = _encrypt(os.urandom(2 * SMALL + 1))
    header, chunks = _chunks(first)
    _, others = _chunks(second)
    _fails(header + chunks[0] + others[1] + chunks[2])


def test_another_key_does_not_open_it():
    blob, _ = _encrypt(b"SELECT 1;\n")
    _fails(blob, key=bytes(32))
    with pytest.raises(DumpFileError, match="32 bytes"):
        _decrypt(blob, key=KEY[:16])


def test_sql_read_before_a_bad_chunk_comes_out_and_then_the_error():
    blob, _ = _encrypt(b"a" * SMALL + b"b" * SMALL + b"c")
    header, (c0, c1, c2) = _chunks(blob)
    stream = decrypt(io.BytesIO(header + c0 + c2).read, KEY)
    assert next(stream) == b"a" * SMALL
    with pytest.raises(DumpFileError, match="chunk 1 does not decrypt"):
        next(stream)
