"""Dump sanitizing benchmark: throughput on one huge COPY value, on many short rows, and on
a huge line outside COPY, read in pipe-sized pieces as pg_dump's stdout delivers them.

Linear time shows as the same throughput whatever the line length; bounded memory as a
largest yielded piece near the read size. The last line of output is one JSON object.

    python bench/sanitize.py [--mib 128] [--read-kib 64]
"""

import argparse
import io
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.domain.dumpstream import dropped_lines, sanitize  # noqa: E402

HEAD = b"\\restrict k\nSET transaction_timeout = 0;\nCOPY t_x_api.t (id, body) FROM stdin;\n"
TAIL = b"\\.\n\\unrestrict k\n"


def measure(data: bytes, read_size: int) -> dict:
    source = io.BytesIO(data)
    started = time.perf_counter()
    total = largest = 0
    for piece in sanitize(lambda n: source.read(min(n, read_size)), dropped_lines(None, 15)):
        total += len(piece)
        largest = max(largest, len(piece))
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "mib_per_s": round(len(data) / 1048576 / seconds, 1),
            "largest_piece_bytes": largest, "bytes_out": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--read-kib", type=int, default=64)
    args = parser.parse_args()
    size, read_size = args.mib * 1048576, args.read_kib * 1024
    cases = {
        "one_value": HEAD + b"1\t" + b"v" * size + b"\n" + TAIL,
        "short_rows": HEAD + b"".join([b"1\tsome row of text\n"] * (size // 19)) + TAIL,
        "long_line_outside_copy": b"COMMENT ON TABLE t IS '" + b"c" * size + b"';\n",
    }
    figures = {"mib": args.mib, "read_kib": args.read_kib}
    for name, data in cases.items():
        result = measure(data, read_size)
        print(f"{name:24} {result['seconds']:8.3f} s  {result['mib_per_s']:8.1f} MiB/s  "
              f"largest piece {result['largest_piece_bytes']} bytes")
        figures.update({f"{name}_{k}": v for k, v in result.items() if k != "bytes_out"})
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
