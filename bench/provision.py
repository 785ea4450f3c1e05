"""Dedicated provisioning benchmark: time from `create --mode v1_dedicated` until the
PostgREST probe passes (create returns only then), p50 over N stacks, and the time to
repair a stack whose api container was removed. The last line of output is one JSON
object with the figures.

    python bench/provision.py [--count 5]
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import LocalFleet  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5)
    args = parser.parse_args()
    fleet = LocalFleet(pathlib.Path(tempfile.mkdtemp(prefix="flux-bench-prov-")) / "dev")
    try:
        timings = []
        projects = []
        for i in range(args.count):
            started = time.perf_counter()
            projects.append(fleet.create(f"bench stack {i}", mode="v1_dedicated"))
            timings.append(time.perf_counter() - started)
            print(f"stack {i}: {timings[-1]:.2f}s", file=sys.stderr, flush=True)
        summary = projects[0]["summary"]
        subprocess.run(["docker", "rm", "-f", f"flux-{summary['hash']}-{summary['slug']}-api"],
                       check=True, capture_output=True)
        started = time.perf_counter()
        repaired = fleet.api("POST", f"projects/{summary['hash']}/repair")
        repair_s = time.perf_counter() - started
        repaired.raise_for_status()
    finally:
        fleet.close()
    print(json.dumps({"count": args.count, "provision_p50_s": round(statistics.median(timings), 2),
                      "provision_max_s": round(max(timings), 2), "repair_s": round(repair_s, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
