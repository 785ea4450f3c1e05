"""The C allocator of a controller that holds thousands of agents' connections.

gRPC's threads and each connection's TLS allocate through glibc's malloc, which gives threads
arenas of their own (up to eight per core) and keeps what is freed in them for later. When
connections come and go (a fleet reconnecting after a restart, handshakes given up on while
thousands connect at once), the process goes on holding memory it no longer uses.
`limit_arenas` makes every thread share a few arenas, and `keep_trimmed` hands freed pages
back to the system now and then. Where the C library is not glibc, both do nothing.
"""

import asyncio
import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt's parameter for the most arenas glibc makes (malloc.h).
M_ARENA_MAX = -8
ARENAS = 2
TRIM_EVERY_S = 60.0


def _glibc():
    # glibc's own name first: find_library runs ldconfig, a process at every import.
    for name in ("libc.so.6", None):
        try:
            libc = ctypes.CDLL(name or ctypes.util.find_library("c") or "libc.so")
        except OSError:
            continue
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    return None


_LIBC = _glibc()


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Caps glibc's arenas; to be called before the process starts any thread. True if it did."""
    return _LIBC is not None and _LIBC.mallopt(M_ARENA_MAX, arenas) == 1


def trim() -> bool:
    """Gives what malloc holds free back to the system; True if any was."""
    return _LIBC is not None and _LIBC.malloc_trim(0) == 1


async def keep_trimmed(every: float = TRIM_EVERY_S) -> None:
    if _LIBC is None:
        return
    while True:
        await asyncio.sleep(every)
        try:
            # Off the loop: it walks every arena under their locks.
            await asyncio.to_thread(trim)
        except Exception:  # the next round tries again
            log.exception("returning free memory to the system failed")
