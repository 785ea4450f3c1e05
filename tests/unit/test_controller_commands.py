"""flux-controller's commands other than `run` (init, users, ...) load nothing that serves: the
API, gRPC and the web framework cost a second at every start (`flux dev up` runs `init` each
time, operators run `users add` by hand)."""

import subprocess
import sys

SERVING = ("controller.app", "fastapi", "starlette", "uvicorn", "grpc")


def test_the_commands_load_nothing_that_serves_until_run():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, controller.main; "
                               f"print(' '.join(m for m in {SERVING!r} if m in sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []

