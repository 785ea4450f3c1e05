"""Faults at every phase of a migrate: the whole (fault x phase) matrix of tests/faults.py.

Starts a fleet of separate hosts (`flux dev up --hosts`, so root), then runs each case: a
migrate with a writer through the gateway, a fault put in at the case's phase, healed, and the
checks (migration ended within its bound, resumed when it failed after the cutover, no
acknowledged write lost, nothing left behind, every agent back). Prints a table; the last line
is one JSON object: {"cases", "passed", "lost_writes", "stuck", "missed_phase"}.

    python bench/faults.py                      # every case
    python bench/faults.py --cases kill-db-agent@sync,partition-db-docker-5s
    python bench/faults.py --list
"""

import argparse
import pathlib
import shutil
import signal
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import faults  # noqa: E402
from tests.support import LocalFleet  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help="comma-separated FAULT[@PHASE] (default: all)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args()
    try:
        chosen = faults.cases(args.cases.split(",") if args.cases else None)
    except ValueError as exc:
        parser.error(str(exc))
    if args.list:
        print("\n".join(f"{fault}@{phase}" for fault, phase in chosen))
        return 0
    # Stopped (SIGTERM), it still takes its fleet down: namespaces, clusters, a fault's mount.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = pathlib.Path(tempfile.mkdtemp(prefix="flux-bench-faults-"))
    outcomes = []
    fleet = LocalFleet(root / "dev", hosts=True)
    try:
        matrix = faults.Matrix(fleet, say=lambda m: print(m, file=sys.stderr, flush=True))
        for fault, phase in chosen:
            started = time.monotonic()
            outcome = matrix.run(fault, phase)
            outcomes.append(outcome)
            print(f"{outcome.case}: {'pass' if outcome.passed else 'FAIL'} ({outcome.state or 'no end'}, "
                  f"{time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one would cut the cleanup short
        fleet.close()
    # Only once the fleet is down: its state (pids, namespaces, clusters) is what takes it down.
    shutil.rmtree(root, ignore_errors=True)
    print(faults.table(outcomes))
    print(faults.dumps(outcomes))
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
