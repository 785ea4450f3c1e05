"""The dump stream on its way into the target: lines the restore cannot take are dropped,
never inside COPY data. Pure logic over bytes; the pg tools themselves run in adapters/dumps.py."""

from typing import Iterator

RESTRICT_LINES = (b"\\restrict", b"\\unrestrict")
TRANSACTION_TIMEOUT_LINES = (b"SET transaction_timeout",)
# psql releases that understand `\restrict`/`\unrestrict` (added with the pg_dump that
# writes them, in these minor releases of each supported major, and from 18 on).
_RESTRICT_SINCE = {17: 6, 16: 10, 15: 14, 14: 19, 13: 22}
# The line after the last row of a COPY block is exactly "\.".
_END_OF_DATA = b"\n\\.\n"
# Lines outside COPY are read whole up to this length. pg_dump never writes a COPY header
# this long (1,600 columns of 63-byte names); a longer line passes (or is dropped) as it streams.
MAX_LINE = 1 << 20


def psql_understands_restrict(psql_version: str | None) -> bool:
    parts = [int(p) for p in (psql_version or "").split(".") if p.isdigit()]
    if not parts:
        return False
    major, minor = parts[0], (parts[1] if len(parts) > 1 else 0)
    return major >= 18 or (major in _RESTRICT_SINCE and minor >= _RESTRICT_SINCE[major])


def dropped_lines(psql_version: str | None, server_major: int | None) -> tuple[bytes, ...]:
    """Starts of dump lines the restore cannot take: meta-commands the psql that runs it does not
    know, and settings the target server does not have. Without a psql or a server (a dump kept in
    the spool for later) the file is made for any."""
    dropped = () if psql_understands_restrict(psql_version) else RESTRICT_LINES
    return dropped + (TRANSACTION_TIMEOUT_LINES if server_major is None or server_major < 17 else ())


def sanitize(read, dropped: tuple[bytes, ...], chunk_size: int = 1 << 20, on_copy=None) -> Iterator[bytes]:
    """Yields a plain-format dump read with `read(n)`, minus the lines that start with `dropped`
    (see `dropped_lines`), never inside COPY data.

    Outside COPY blocks the dump is read line by line; inside them (nearly all of its bytes)
    data passes through as it comes up to the `\\.` line that ends the block, whatever the
    length of its lines. Time is linear in the dump's size and memory is bounded by
    `chunk_size` and `MAX_LINE`. `on_copy(line)` hears each COPY statement as it starts.
    """
    line_parts: list[bytes] = []  # outside COPY: the line read so far (at most MAX_LINE bytes)
    line_size = 0
    long_line = None  # outside COPY, past MAX_LINE: "pass" or "drop" up to its newline
    in_copy = False
    # In COPY: the last bytes read that may begin the end-of-data line; the first `synthetic`
    # of them stand for the newline before the block, which was already yielded.
    carry, synthetic = b"", 0
    while True:
        data = read(chunk_size)
        if not data:
            break
        out = []
        pos, size = 0, len(data)
        while pos < size:
            if in_copy:
                seg = carry + data[pos:] if carry else data[pos:]
                end = seg.find(_END_OF_DATA)
                if end >= 0:
                    out.append(seg[synthetic:end + 4])
                    pos += end + 4 - len(carry)
                    carry, synthetic, in_copy = b"", 0, False
                    continue
                keep = next((k for k in (3, 2, 1) if seg.endswith(_END_OF_DATA[:k])), 0)
                cut = len(seg) - keep
                if cut >= synthetic:
                    out.append(seg[synthetic:cut])
                    carry, synthetic = seg[cut:], 0
                else:
                    carry = seg
                pos = size
            elif long_line is not None:
                newline = data.find(b"\n", pos)
                end = size if newline < 0 else newline + 1
                if long_line == "pass":
                    out.append(data[pos:end])
                pos = end
                if newline >= 0:
                    long_line = None
            else:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    line_parts.append(data[pos:])
                    line_size += size - pos
                    pos = size
                    if line_size > MAX_LINE:
                        line = b"".join(line_parts)
                        line_parts, line_size = [], 0
                        long_line = "drop" if line.startswith(dropped) else "pass"
                        if long_line == "pass":
                            out.append(line)
                    continue
                line = data[pos:newline + 1]
                if line_parts:
                    line = b"".join(line_parts) + line
                    line_parts, line_size = [], 0
                pos = newline + 1
                if line.startswith(b"COPY ") and line.rstrip().endswith(b"FROM stdin;"):
                    in_copy = True
                    carry, synthetic = b"\n", 1
                    if on_copy is not None:
                        on_copy(line)
                elif line.startswith(dropped):
                    continue
                out.append(line)
        if out:
            yield b"".join(out)
    rest = carry[synthetic:] if in_copy else b"".join(line_parts)
    if rest:
        yield rest
