"""Keep the resident size of a long-running exporter flat across large /metrics renders.

Rendering 500 models allocates a few MB-sized buffers (the exposition, its gzip copy) and
tens of thousands of short-lived objects. glibc raises its mmap threshold each time such a
buffer is freed, so later buffers come from heaps that are never given back: measured with
500 models, the resident size climbed ~24 MB over the first scrapes and stayed there.
Pinning the threshold (``configure_allocator``, once at start) keeps big buffers in mmap
and returns them on free; after a large render, a full collection (which also empties
CPython's free lists) and ``malloc_trim`` hand back what the small objects left. Both are
glibc-only and do nothing elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

# Below this, a render is too small to be worth a full collection (which holds the GIL).
LARGE_RENDER_BYTES = 1 << 20


# glibc's mallopt parameter number for M_MMAP_THRESHOLD, and the value it starts with.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 128 * 1024


def _libc_function(name: str) -> Callable[..., int] | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(path), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None
    return function


_malloc_trim = _libc_function("malloc_trim")


def configure_allocator() -> bool:
    """Fix glibc's mmap threshold (setting it disables the dynamic raise). True if applied."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1


def release_after_render(size: int) -> None:
    if size < LARGE_RENDER_BYTES:
        return
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
