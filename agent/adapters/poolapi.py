"""The pooled API (PostgREST in front of the shared cluster), run and supervised by the db agent.

With `db.pool_api` in settings.json the agent starts the command at start (once the shared
cluster's `authenticator` role has its password), writes its output to `pool-api.log` in the
state directory, and starts it again whenever it exits, each time with a warning in the agent's
log naming the exit code; it stops it when the agent stops, and it dies with the agent. Its
environment is the setting's `env` (PGRST_DB_URI and the rest), which is never logged.
"""

import asyncio
import ctypes
import logging
import os
import pathlib
import signal
import subprocess
import time

from ..runtime import metrics

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0
# Restarts wait 1 s, then twice as long each time, up to this; a run of a minute resets it.
MAX_RESTART_DELAY_S = 30.0
STABLE_AFTER_S = 60.0
LOG_FILE = "pool-api.log"


# Looked up here, in the agent: the child, between fork and exec, only calls it (loading a library
# there could deadlock on a lock another thread of the agent held at the fork).
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None
PR_SET_PDEATHSIG = 1
# pool-api.log is moved aside to pool-api.log.1 once this big, so a crash loop cannot fill the disk.
MAX_LOG_BYTES = 16 * 1024 * 1024


def _die_with_parent() -> None:  # runs in the child, before exec
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class PoolApi:
    def __init__(self, state_dir: pathlib.Path, command: list[str], env: dict[str, str]):
        self.state_dir = state_dir
        self.command = command
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._started_at = 0.0
        self._delay = 1.0
        self._task: asyncio.Task | None = None

    @property
    def log_path(self) -> pathlib.Path:
        return self.state_dir / LOG_FILE

    def _spawn(self) -> None:
        try:
            if self.log_path.stat().st_size > MAX_LOG_BYTES:
                os.replace(self.log_path, self.log_path.with_name(LOG_FILE + ".1"))
        except FileNotFoundError:
            pass
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.env},
                                         preexec_fn=_die_with_parent, start_new_session=True)
        self._started_at = time.monotonic()
        metrics.POOL_API_UP.set(1)
        log.info("pooled API started (pid %d): %s; its output goes to %s", self.proc.pid, self.command[0],
                 self.log_path)

    async def start(self) -> None:
        try:
            self._spawn()
        except OSError as exc:
            log.error("cannot start the pooled API (%s): %s; trying again", self.command[0], exc.strerror)
            self.proc = None
        self._task = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            code = self.proc.poll() if self.proc is not None else -1
            if code is None:
                if time.monotonic() - self._started_at > STABLE_AFTER_S:
                    self._delay = 1.0
                continue
            metrics.POOL_API_UP.set(0)
            self.restarts += 1
            metrics.POOL_API_RESTARTS.inc()
            log.warning("the pooled API exited with code %s (see %s); starting it again in %.0fs (restart %d)",
                        code, self.log_path, self._delay, self.restarts)
            await asyncio.sleep(self._delay)
            self._delay = min(MAX_RESTART_DELAY_S, self._delay * 2)
            try:
                self._spawn()
            except OSError as exc:
                log.error("cannot start the pooled API (%s): %s", self.command[0], exc.strerror)
                self.proc = None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        metrics.POOL_API_UP.set(0)
