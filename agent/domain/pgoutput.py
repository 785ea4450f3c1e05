"""The pgoutput logical replication protocol (version 1), decoded: the messages a logical slot
returns from `pg_logical_slot_peek_binary_changes(slot, ..., 'proto_version', '1',
'publication_names', pub)`, one message per row.

Pure parsing; no I/O. A message this decoder does not know is an error (`DecodeError`), never
skipped: a change that is not applied must stop the sync, not vanish.
"""

import struct
from dataclasses import dataclass, field

# 2000-01-01 in Unix seconds: pgoutput's timestamps count microseconds from there.
PG_EPOCH = 946684800


class DecodeError(ValueError):
    pass


def lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def lsn_int(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True)
class Column:
    name: str
    key: bool
    type_oid: int


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    # d (default: primary key), n (nothing), f (full), i (index)
    replica_identity: str
    columns: tuple[Column, ...]


# A value in a tuple: None (SQL NULL), UNCHANGED (a TOASTed value the update left alone) or text.
UNCHANGED = object()


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_time: float
    xid: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: float


@dataclass(frozen=True)
class Insert:
    relation: int
    new: tuple


@dataclass(frozen=True)
class Update:
    relation: int
    new: tuple
    # The old key ('K') or whole old row ('O', replica identity full); None when the key did not change.
    old: tuple | None = None
    old_is_key: bool = True


@dataclass(frozen=True)
class Delete:
    relation: int
    old: tuple
    old_is_key: bool = True


@dataclass(frozen=True)
class Truncate:
    relations: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True)
class TypeInfo:
    oid: int
    schema: str
    name: str


@dataclass
class _Reader:
    data: bytes
    at: int = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise DecodeError(f"message ends after {len(self.data)} bytes; {self.at + n} needed")
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def byte(self) -> str:
        return chr(self.take(1)[0])

    def int8(self) -> int:
        return self.take(1)[0]

    def int16(self) -> int:
        return struct.unpack("!h", self.take(2))[0]

    def int32(self) -> int:
        return struct.unpack("!i", self.take(4))[0]

    def uint32(self) -> int:
        return struct.unpack("!I", self.take(4))[0]

    def int64(self) -> int:
        return struct.unpack("!q", self.take(8))[0]

    def uint64(self) -> int:
        return struct.unpack("!Q", self.take(8))[0]

    def string(self) -> str:
        end = self.data.find(b"\x00", self.at)
        if end < 0:
            raise DecodeError("unterminated string")
        text = self.data[self.at:end].decode()
        self.at = end + 1
        return text

    def timestamp(self) -> float:
        return PG_EPOCH + self.int64() / 1_000_000

    def tuple(self) -> tuple:
        values = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED)
            elif kind == "t":
                values.append(self.take(self.int32()).decode())
            else:
                raise DecodeError(f"unknown tuple value kind {kind!r} (binary values are never asked for)")
        return tuple(values)


@dataclass
class Decoder:
    """Decodes one message at a time; remembers the relations the stream described."""

    relations: dict[int, Relation] = field(default_factory=dict)

    def decode(self, data: bytes):
        r = _Reader(bytes(data))
        tag = r.byte()
        if tag == "B":
            return Begin(r.uint64(), r.timestamp(), r.uint32())
        if tag == "C":
            r.int8()
            return Commit(r.uint64(), r.uint64(), r.timestamp())
        if tag == "O":
            return Origin(r.uint64(), r.string())
        if tag == "R":
            oid, schema, name, identity = r.uint32(), r.string(), r.string(), r.byte()
            columns = []
            for _ in range(r.int16()):
                flags, column, type_oid = r.int8(), r.string(), r.uint32()
                r.int32()  # atttypmod
                columns.append(Column(column, bool(flags & 1), type_oid))
            relation = Relation(oid, schema, name, identity, tuple(columns))
            self.relations[oid] = relation
            return relation
        if tag == "Y":
            return TypeInfo(r.uint32(), r.string(), r.string())
        if tag == "I":
            oid = r.uint32()
            if r.byte() != "N":
                raise DecodeError("insert without a new tuple")
            return Insert(self._known(oid), r.tuple())
        if tag == "U":
            oid = self._known(r.uint32())
            kind = r.byte()
            old, old_is_key = None, True
            if kind in ("K", "O"):
                old, old_is_key = r.tuple(), kind == "K"
                kind = r.byte()
            if kind != "N":
                raise DecodeError("update without a new tuple")
            return Update(oid, r.tuple(), old, old_is_key)
        if tag == "D":
            oid = self._known(r.uint32())
            kind = r.byte()
            if kind not in ("K", "O"):
                raise DecodeError("delete without an old key or row")
            return Delete(oid, r.tuple(), kind == "K")
        if tag == "T":
            count, options = r.int32(), r.int8()
            return Truncate(tuple(self._known(r.uint32()) for _ in range(count)), bool(options & 1),
                            bool(options & 2))
        raise DecodeError(f"unknown pgoutput message {tag!r}")

    def _known(self, oid: int) -> int:
        if oid not in self.relations:
            raise DecodeError(f"a change to relation {oid}, which the stream never described")
        return oid
