"""The controller's and the agent's commands other than `run` (init, users, enroll, ...) load
nothing that only serving needs: the API, gRPC's server side, the agent's handlers and what they
use cost the better part of a second at every start (`flux dev up` runs `init` each time and
enrolls four agents, operators run `users add` by hand)."""

import subprocess
import sys

import pytest


def _loaded(module: str, candidates: tuple[str, ...]) -> list[str]:
    return subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; "
                               f"print(' '.join(m for m in {candidates!r} if m in sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.parametrize("module, serving", [
    ("controller.main", ("controller.app", "fastapi", "starlette", "uvicorn", "grpc")),
    ("agent.runtime.main", ("agent.runtime.connection", "agent.handlers", "psycopg", "docker")),
])
def test_the_commands_load_nothing_that_serves_until_run(module, serving):
    assert _loaded(module, serving) == []
