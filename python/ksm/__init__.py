"""ksm: Kernel Samepage Merging rebuilt in userspace.

Pages of identical content in memory you advise with ``MADV_MERGEABLE`` are
replaced by one write-protected copy; a later write gets a private copy
again, transparently. See the README for the model and its limits.
"""

from __future__ import annotations

import os as _os
from typing import Any

from . import _ksm
from ._ksm import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    PAGE_SIZE,
    available,
    get_memory_merge,
    ksm_stat,
    ksmd,
    madvise,
    scan,
    set_memory_merge,
    stats,
    unavailable_reason,
    wait_settled,
)

__version__: str = _ksm.__version__

__all__ = [
    "MADV_MERGEABLE",
    "MADV_UNMERGEABLE",
    "PAGE_SIZE",
    "__version__",
    "available",
    "empty",
    "get_memory_merge",
    "ksm_stat",
    "ksmd",
    "madvise",
    "mmap",
    "scan",
    "set_memory_merge",
    "stats",
    "unavailable_reason",
    "wait_settled",
    "zeros",
]


class mmap(_ksm.Mmap):
    """Anonymous private memory owned by ksm: the safe, fast path for merging.

    ``ksm.mmap(length)`` or ``ksm.mmap(-1, length)``. Supports ``len``,
    indexing, slicing, slice assignment, the writable buffer protocol
    (``memoryview``, ``numpy.frombuffer``) and the context-manager protocol.
    """

    def __getitem__(self, key: int | slice) -> Any:
        with memoryview(self) as view:
            if isinstance(key, slice):
                return bytes(view[key])
            return view[key]

    def __setitem__(self, key: int | slice, value: Any) -> None:
        with memoryview(self) as view:
            view[key] = value

    def __enter__(self) -> mmap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _array(shape: Any, dtype: Any, mergeable: bool, zero: bool) -> Any:
    import numpy as np

    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = max(count * dt.itemsize, 1)
    buf = mmap(nbytes)
    if mergeable:
        buf.madvise(MADV_MERGEABLE)
    # Fresh anonymous memory reads as zeros, so `empty` and `zeros` are the same
    # allocation; the array keeps `buf` alive through its base.
    del zero
    return np.frombuffer(memoryview(buf), dtype=dt, count=count).reshape(shape)


def empty(shape: Any, dtype: Any = float, mergeable: bool = True) -> Any:
    """A numpy array backed by ksm memory (contents are zero: fresh anonymous pages)."""
    return _array(shape, dtype, mergeable, zero=False)


def zeros(shape: Any, dtype: Any = float, mergeable: bool = True) -> Any:
    """A zero-filled numpy array backed by ksm memory."""
    return _array(shape, dtype, mergeable, zero=True)


# Threads do not survive fork(): restart ksmd in the child if it was running.
_os.register_at_fork(after_in_child=_ksm._after_fork_child)
