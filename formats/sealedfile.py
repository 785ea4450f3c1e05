"""Files at rest (dump files, backups): their plain bytes, encrypted with AES-256-GCM in independent chunks.

    header  b"FLUXDUMP" | version (1 byte) | chunk size (4 bytes, big-endian) | salt (16 random bytes)
    chunks  AES-256-GCM(file key, nonce = chunk index as 12 bytes big-endian, chunk, aad), each
            its ciphertext followed by its 16-byte tag

Every chunk but the last holds exactly `chunk size` bytes of SQL; the last one holds 0 to
`chunk size` bytes and is marked final. A chunk's associated data is the header, its index and
the final mark, so a chunk changed, moved, swapped or dropped, a file cut short (even at a chunk
boundary) or extended, and a header edited all fail to decrypt. The file key is HKDF-SHA256 of
the dump's data key and the header's salt: a data key used twice would still never repeat a
nonce under one key.

The data key comes with the job from the controller, which keeps it sealed in its catalog. It
lives in memory only: never in a file, a job record or a log line. Agents write and read these
files; the controller reads them too, to hand a backup's plain archive to its owner.
"""

import hashlib
import os
from typing import BinaryIO, Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"FLUXDUMP"
VERSION = 1
KEY_BYTES = 32
SALT_BYTES = 16
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 1 + 4 + SALT_BYTES
CHUNK_BYTES = 1 << 20
# A header may name any chunk size up to this; a reader never holds more than two chunks.
MAX_CHUNK_BYTES = 64 << 20


class DumpFileError(ValueError):
    """A file that is not one of these, or does not decrypt with the key given."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _file_key(key: bytes, salt: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise DumpFileError(f"a dump's data key is {KEY_BYTES} bytes, got {len(key)}")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=b"flux dump file v1").derive(key)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


class EncryptingWriter:
    """Writes a dump file to `out`: `write()` the SQL as it comes, then `close()` once, at its end.

    `bytes` and `sha256` describe the file as stored, header and tags included, so it can be
    checked without the key.
    """

    def __init__(self, out: BinaryIO, key: bytes, chunk_bytes: int = CHUNK_BYTES):
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk size must be 1 to {MAX_CHUNK_BYTES} bytes")
        salt = os.urandom(SALT_BYTES)
        self.header = MAGIC + bytes([VERSION]) + chunk_bytes.to_bytes(4, "big") + salt
        self.chunk_bytes = chunk_bytes
        self._aead = AESGCM(_file_key(key, salt))
        self._out = out
        self._digest = hashlib.sha256()
        self._pending = bytearray()
        self._index = 0
        self._closed = False
        self.bytes = 0
        self._emit(self.header)

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self._digest.update(data)
        self.bytes += len(data)

    def _seal(self, chunk: bytes, final: bool) -> None:
        self._emit(self._aead.encrypt(_nonce(self._index), chunk, _aad(self.header, self._index, final)))
        self._index += 1

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError("the dump file is closed")
        self._pending += data
        # A full chunk waits until more follows: only close() knows which chunk is the last.
        while len(self._pending) > self.chunk_bytes:
            self._seal(bytes(self._pending[:self.chunk_bytes]), final=False)
            del self._pending[:self.chunk_bytes]

    def close(self) -> None:
        if not self._closed:
            self._seal(bytes(self._pending), final=True)
            self._pending.clear()
            self._closed = True

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def _read_up_to(read: Callable[[int], bytes], size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        part = read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def decrypt(read: Callable[[int], bytes], key: bytes) -> Iterator[bytes]:
    """Yields the SQL of a dump file read with `read(n)`, chunk by chunk.

    Raises DumpFileError at the first chunk that does not decrypt, so the SQL yielded before
    it is all that can be trusted: consume the whole stream before acting on any of it.
    """
    header = _read_up_to(read, HEADER_BYTES)
    if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
        raise DumpFileError("not a Flux dump file (no FLUXDUMP header)")
    version = header[len(MAGIC)]
    if version != VERSION:
        raise DumpFileError(f"dump file format version {version} is not known to this agent (it reads {VERSION})")
    chunk_bytes = int.from_bytes(header[len(MAGIC) + 1:len(MAGIC) + 5], "big")
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise DumpFileError(f"dump file header names a chunk size of {chunk_bytes} bytes")
    aead = AESGCM(_file_key(key, header[-SALT_BYTES:]))
    stored = chunk_bytes + TAG_BYTES
    current = _read_up_to(read, stored)
    index = 0
    while True:
        following = _read_up_to(read, stored) if len(current) == stored else b""
        final = not following
        try:
            yield aead.decrypt(_nonce(index), current, _aad(header, index, final))
        except InvalidTag:
            raise DumpFileError(f"dump file chunk {index} does not decrypt: the file was changed, cut short, "
                                "extended or reordered, or the key is not its own") from None
        if final:
            return
        current, index = following, index + 1


def read_sql(path: str | os.PathLike, key: bytes) -> Iterator[bytes]:
    """The SQL of the dump file at `path`, streamed (see `decrypt`)."""
    with open(path, "rb") as handle:
        yield from decrypt(handle.read, key)
