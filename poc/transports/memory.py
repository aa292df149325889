"""Where a WebSocket data frame's bytes live once picows has read them: an Arrow buffer of its own, from one
allocator chosen here.

The gateway hands the batches read in place from these buffers to Flight, whose gRPC threads free them once sent,
without the GIL. The allocator decides what the kernel's copy of them into a client's socket costs: from Arrow's
default pool (mimalloc) that copy took three times the CPU per byte it takes from jemalloc's, and the system
allocator kept two to three times the memory at 100 streams (docs/results.md). The gateway's --frame-allocator
picks one; jemalloc is the default where pyarrow has it. (The Flight tunnel's frames stay gRPC's messages in
Python's memory: copying them here too cost more than it saved.)
"""

from __future__ import annotations

import pyarrow as pa

from ..config import FRAME_ALLOCATOR as DEFAULT, FRAME_ALLOCATORS as ALLOCATORS, ConfigError

_pool: pa.MemoryPool | None = None


def pool_named(name: str) -> pa.MemoryPool:
    """Arrow's pool of that allocator; ConfigError for a name not in ALLOCATORS or one this pyarrow lacks."""
    makers = {"jemalloc": pa.jemalloc_memory_pool, "mimalloc": pa.mimalloc_memory_pool,
              "system": pa.system_memory_pool}
    if name not in makers:
        raise ConfigError(f"unknown frame allocator {name!r}: one of {', '.join(ALLOCATORS)}")
    try:
        return makers[name]()
    except NotImplementedError:
        raise ConfigError(f"this pyarrow was built without {name}: choose one of "
                          f"{', '.join(pa.supported_memory_backends())}") from None


def use(name: str | None) -> pa.MemoryPool:
    """Take frames' buffers from `name`'s allocator from now on (the gateway, at start); None: jemalloc where this
    pyarrow has it, else Arrow's default pool."""
    global _pool
    if name is None and DEFAULT not in pa.supported_memory_backends():
        _pool = pa.default_memory_pool()
    else:
        _pool = pool_named(name or DEFAULT)
    return _pool


def frame_pool() -> pa.MemoryPool:
    """The pool frames come from: the one `use` chose, else use(None)'s."""
    return use(None) if _pool is None else _pool


def arrow_copy(data) -> pa.Buffer:
    """A copy of `data` (any bytes-like object) in a new Arrow buffer from the frames' pool, made without the GIL."""
    view = pa.py_buffer(data)
    copy = pa.allocate_buffer(view.size, memory_pool=frame_pool())
    pa.FixedSizeBufferWriter(copy).write(view)
    return copy
