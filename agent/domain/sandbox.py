"""Parses tenant SQL in a child process with memory, CPU and time limits.

The SQL parser is C code: hostile input (`SELECT 1+1+...+1` with 100,000 terms) makes
it recurse until it crashes the process. The agent runs other tenants' jobs and holds
migration write guards, so that process must never be the agent's own. The parent
sends the files on stdin; the child announces each file on stdout before it parses it
and ends with one result line, so a child that dies still names the file that killed it.

Run as `python -m agent.domain.sandbox`; the agent uses `rewrite_files`.
"""

import json
import resource
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass

from contract.failures import FailureKind

from ..errors import AgentError
from .sqlrewrite import Limits, RewriteError, Rewritten, rewrite


@dataclass(frozen=True)
class ChildLimits:
    memory_bytes: int = 1024 * 1024 * 1024
    base_seconds: float = 20.0
    seconds_per_mib: float = 8.0

    def seconds(self, input_bytes: int) -> float:
        return self.base_seconds + self.seconds_per_mib * input_bytes / (1024 * 1024)


def _refusal(filename: str, reason: str) -> str:
    return (f"{filename}: SQL is too large or too deeply nested to parse safely ({reason}); "
            "split it into smaller files and statements")


def rewrite_files(files: list[tuple[str, str]], schema: str, runtime_role: str, limits: Limits = Limits(),
                  child: ChildLimits = ChildLimits()) -> list[Rewritten]:
    """`rewrite` of each (filename, sql) in a child process; refusals are AgentError(kind=FailureKind.INVALID)."""
    if not files:
        return []
    payload = json.dumps({"schema": schema, "runtime_role": runtime_role, "limits": asdict(limits),
                          "memory_bytes": child.memory_bytes,
                          "files": [{"filename": f, "sql": text} for f, text in files]}).encode()
    seconds = child.seconds(len(payload))
    proc = subprocess.Popen([sys.executable, "-m", "agent.domain.sandbox", str(int(seconds) + 1)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timed_out = False
    try:
        out, err = proc.communicate(payload, timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    current, result = None, None
    for line in out.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        current = message.get("parsing", current)
        result = message if "parsing" not in message else result
    if result is not None and "rewritten" in result:
        return [Rewritten(**r) for r in result["rewritten"]]
    if result is not None and "refused" in result:
        raise AgentError(result["refused"], kind=FailureKind.INVALID)
    if current is None:
        # Died before reading any file: a broken installation, not the tenant's input.
        tail = err.decode(errors="replace").strip()[-800:]
        raise AgentError(f"the SQL parser process failed (exit {proc.returncode}): {tail}")
    if timed_out:
        reason = f"parsing took longer than {seconds:.0f}s"
    elif proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        reason = "parsing used more than its CPU time"
    elif proc.returncode < 0:
        reason = f"the parser crashed with {signal.Signals(-proc.returncode).name}"
    else:
        reason = f"the parser process exited with {proc.returncode}"
    raise AgentError(_refusal(current, reason), kind=FailureKind.INVALID)


def _limit_self(memory_bytes: int, cpu_seconds: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def child_main(cpu_seconds: int) -> None:
    request = json.loads(sys.stdin.buffer.read())
    _limit_self(int(request["memory_bytes"]), cpu_seconds)
    # Printing a rewritten statement recurses once per level; `Limits.max_depth` bounds the levels.
    sys.setrecursionlimit(20_000)
    limits = Limits(**request["limits"])
    rewritten = []
    for item in request["files"]:
        _say({"parsing": item["filename"]})
        try:
            rewritten.append(asdict(rewrite(item["sql"], request["schema"], request["runtime_role"],
                                            item["filename"], limits)))
        except RewriteError as exc:
            _say({"refused": str(exc)})
            return
        except MemoryError:
            _say({"refused": _refusal(item["filename"], f"parsing needs more than "
                                                        f"{request['memory_bytes'] // (1024 * 1024)} MiB")})
            return
        except RecursionError:
            _say({"refused": _refusal(item["filename"], "the parser ran out of stack")})
            return
    _say({"rewritten": rewritten})


if __name__ == "__main__":
    child_main(int(sys.argv[1]))
