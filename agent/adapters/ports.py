"""Ports for servers that start after their port is chosen (a dev fleet's processes, a stack's
published ports).

A port the kernel hands out for `bind(0)` comes from the same range it gives outgoing
connections their local ports from, so a client connecting anywhere on the host can take it
before the server binds it (the server then fails with "address already in use"). The ports
chosen here lie below that range: only another server choosing the same port can take them.

A caller often asks for several ports before it starts any of their servers (a dev fleet chooses
a dozen, then starts its processes): a port is not handed out again while it is among the last
`RECENT` this process handed out, though it still looks free.
"""

import collections
import pathlib
import random
import socket
import threading

# The lowest port chosen, and where the kernel's range for outgoing connections starts when it
# cannot be read.
LOWEST = 10_000
DEFAULT_EPHEMERAL_LOW = 32_768
TRIES = 200
RECENT = 1024

_recent: collections.deque[int] = collections.deque(maxlen=RECENT)
_lock = threading.Lock()


def ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections."""
    try:
        return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing on `host` listens on, below the range of outgoing connections' ports; one
    from the kernel (bind 0) when that range leaves none below it or all tried are taken."""
    high = ephemeral_low()
    with _lock:
        if high - LOWEST >= TRIES:
            for port in random.sample(range(LOWEST, high), TRIES):
                if port not in _recent and _bindable(host, port):
                    _recent.append(port)
                    return port
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        _recent.append(port)
        return port
