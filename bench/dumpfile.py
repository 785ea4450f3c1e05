"""Dump file benchmark: what writing the dump encrypted costs against writing it plain.

Both write the same SQL, in pipe-sized pieces as pg_dump's stdout delivers them, to a file
in a temporary directory, and hash what they write (the plain path hashes the SQL, as the
agent did before files were encrypted). Reading the file back through the decrypting reader
is measured too. Compare the ratio, measured in this one run; the last line of output is one
JSON object.

    python bench/dumpfile.py [--mib 256] [--read-kib 64]
"""

import argparse
import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.adapters.dumpfile import EncryptingWriter, read_sql  # noqa: E402

ROW = b"42\tsome customer's order, with a note of moderate length\t2026-11-26 12:00:00+00\n"


def sql(mib: int) -> bytes:
    rows = ROW * (mib * 1048576 // len(ROW) + 1)
    return b"COPY t_x_api.orders (id, note, at) FROM stdin;\n" + rows[:mib * 1048576] + b"\\.\n"


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--read-kib", type=int, default=64)
    args = parser.parse_args()
    data, piece = sql(args.mib), args.read_kib * 1024
    key = os.urandom(32)
    with tempfile.TemporaryDirectory() as tmp:
        plain_path, sealed_path = pathlib.Path(tmp, "plain.sql"), pathlib.Path(tmp, "sealed.sql.enc")

        def plain() -> None:
            digest = hashlib.sha256()
            with open(plain_path, "wb") as out:
                for i in range(0, len(data), piece):
                    out.write(data[i:i + piece])
                    digest.update(data[i:i + piece])

        def sealed() -> None:
            digest = hashlib.sha256()
            with open(sealed_path, "wb") as out:
                writer = EncryptingWriter(out, key)
                for i in range(0, len(data), piece):
                    writer.write(data[i:i + piece])
                    digest.update(data[i:i + piece])
                writer.close()

        def read_back() -> None:
            got = hashlib.sha256()
            for chunk in read_sql(sealed_path, key):
                got.update(chunk)
            if got.digest() != hashlib.sha256(data).digest():
                raise SystemExit("the decrypted SQL differs from what was written")

        plain_s, sealed_s = timed(plain), timed(sealed)
        read_s = timed(read_back)
        overhead = sealed_path.stat().st_size - plain_path.stat().st_size
    mib = len(data) / 1048576
    figures = {"mib": round(mib, 1), "plain_mib_per_s": round(mib / plain_s, 1),
               "encrypted_mib_per_s": round(mib / sealed_s, 1), "decrypt_mib_per_s": round(mib / read_s, 1),
               "encrypted_over_plain_time": round(sealed_s / plain_s, 2), "size_overhead_bytes": overhead}
    print(f"plain write   {figures['plain_mib_per_s']:>8} MiB/s")
    print(f"encrypted     {figures['encrypted_mib_per_s']:>8} MiB/s ({figures['encrypted_over_plain_time']}x the time)")
    print(f"decrypt       {figures['decrypt_mib_per_s']:>8} MiB/s; file overhead {overhead} bytes")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
