"""The memory of a controller that holds thousands of agents' connections: the C allocator, and
Python's cyclic garbage collector.

gRPC's threads and each connection's TLS allocate through glibc's malloc, which gives threads
arenas of their own (up to eight per core) and keeps what is freed in them for later. When
connections come and go (a fleet reconnecting after a restart, handshakes given up on while
thousands connect at once), the process goes on holding memory it no longer uses.
`limit_arenas` makes every thread share a few arenas, and `keep_trimmed` hands freed pages
back to the system now and then. Where the C library is not glibc, both do nothing.

Each connected agent is some hundred objects the cyclic collector tracks (gRPC's stream, its
tasks and coroutines), alive as long as the connection, and each message an agent sends leaves
a few dozen more alive until its next one. Python collects its oldest generation once a quarter
more objects have lived long than at the last full collection: with 5,000 agents' heartbeats,
every 10 s, each time walking half a million objects (half a second with the event loop
stopped). `tune_collector` makes such a collection rarer, and `keep_collected` moves what has
lived a minute out of the collector's sight (gc.freeze), so the collections that do run walk
only younger objects; every quarter of an hour it brings everything back and collects it all,
so that garbage among the frozen objects lasts at most that long.
"""

import asyncio
import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

# mallopt's parameter for the most arenas glibc makes (malloc.h).
M_ARENA_MAX = -8
ARENAS = 2
TRIM_EVERY_S = 60.0
# Collections of the middle generation between two looks at the oldest (Python's default: 10).
OLDEST_EVERY = 100
FREEZE_EVERY_S = 60.0
FULL_COLLECTION_EVERY_S = 900.0


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


def tune_collector(oldest_every: int = OLDEST_EVERY) -> None:
    youngest, middle, _ = gc.get_threshold()
    gc.set_threshold(youngest, middle, oldest_every)


async def keep_collected(freeze_every: float = FREEZE_EVERY_S,
                         full_every: float = FULL_COLLECTION_EVERY_S) -> None:
    loop = asyncio.get_running_loop()
    last_full = loop.time()
    try:
        while True:
            await asyncio.sleep(freeze_every)
            if loop.time() - last_full >= full_every:
                gc.unfreeze()
                collected = gc.collect()
                last_full = loop.time()
                log.debug("full collection: %d objects freed", collected)
            gc.freeze()
    finally:
        gc.unfreeze()
