"""ksm: Kernel Samepage Merging rebuilt in userspace.

Pages of identical content in memory you advise with ``MADV_MERGEABLE`` are
replaced by one write-protected copy; a later write gets a private copy
again, transparently. See the README for the model and its limits.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os as _os
import sys as _sys
from typing import Any

from . import _ksm
from ._ksm import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    PAGE_SIZE,
    available,
    ksmd,
    madvise,
    scan,
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
    "ksmd",
    "madvise",
    "mmap",
    "scan",
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
    Indexing follows the stdlib ``mmap.mmap``: an integer index (negative counts
    from the end) or a slice; a slice assignment must keep the length.
    """

    def __getitem__(self, key: int | slice) -> Any:
        size = len(self)  # ValueError("mmap closed or invalid") once closed, like the stdlib
        if isinstance(key, slice):
            with memoryview(self) as view:
                return bytes(view[key])
        i = _index(key, size)
        with memoryview(self) as view:
            return view[i]

    def __setitem__(self, key: int | slice, value: Any) -> None:
        size = len(self)
        if isinstance(key, slice):
            want = len(range(*key.indices(size)))  # a bad slice is refused first, like the stdlib
            try:
                src = memoryview(value)
            except TypeError:
                raise TypeError(
                    f"ksm.mmap slice assignment takes a bytes-like object, not {type(value).__name__}"
                ) from None
            with src:
                if not src.c_contiguous:
                    raise TypeError("ksm.mmap slice assignment takes a contiguous buffer")
                with src.cast("B") as data, memoryview(self) as view:
                    if data.nbytes != want:
                        raise ValueError(
                            f"ksm.mmap slice assignment is wrong size: the slice has {want} bytes, "
                            f"the value {data.nbytes} (a ksm.mmap cannot be resized)"
                        )
                    view[key] = data
            return
        i = _index(key, size)
        try:
            byte = operator.index(value)
        except TypeError:
            raise TypeError(f"ksm.mmap item value must be an int, not {type(value).__name__}") from None
        if not 0 <= byte < 256:
            raise ValueError(f"ksm.mmap item value must be in range(0, 256), got {byte}")
        with memoryview(self) as view:
            view[i] = byte

    def __delitem__(self, key: int | slice) -> None:
        size = len(self)
        # The stdlib mmap checks the index or slice first.
        if isinstance(key, slice):
            key.indices(size)
        else:
            _index(key, size)
        raise TypeError("ksm.mmap does not support item deletion (its length is fixed)")

    def __enter__(self) -> mmap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _index(key: Any, size: int) -> int:
    """``key`` as an index into ``size`` bytes (negative counts from the end), like the stdlib mmap."""
    try:
        i = operator.index(key)
    except TypeError:
        raise TypeError(f"ksm.mmap indices must be integers or slices, not {type(key).__name__}") from None
    j = i + size if i < 0 else i
    if not 0 <= j < size:
        raise IndexError(f"ksm.mmap index {i} out of range (length {size})")
    return j


def _shape(shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints (numpy's rules), with a clear error."""
    try:
        dims: tuple[int, ...] = (operator.index(shape),)
    except TypeError:
        try:
            dims = tuple(operator.index(d) for d in shape)
        except TypeError:
            raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimensions are not allowed, got shape {dims}")
    return dims


def _array(shape: Any, dtype: Any, mergeable: bool, zero: bool) -> Any:
    import numpy as np

    mergeable = bool(mergeable)  # before allocating: a failing __bool__ leaves nothing behind
    dt = np.dtype(dtype)  # numpy's order: the dtype, then the shape
    dims = _shape(shape)
    if dt.hasobject:
        raise ValueError(f"dtype {dt} holds Python object references; ksm arrays take plain-data dtypes")
    if dt.itemsize == 0:
        raise ValueError(f"dtype {dt} has itemsize 0; ksm arrays need a non-zero item size")
    # numpy's rule: the non-zero dimensions times the item size must fit in an intp.
    if math.prod(d for d in dims if d) * dt.itemsize > _sys.maxsize:
        raise ValueError(f"array is too big: shape {dims} of {dt} is more bytes than the address space")
    count = math.prod(dims)
    buf = mmap(max(count * dt.itemsize, 1))
    try:
        if mergeable:
            buf.madvise(MADV_MERGEABLE)
        # Fresh anonymous memory reads as zeros, so `empty` and `zeros` are the same
        # allocation; the array keeps `buf` alive through its base.
        del zero
        return np.frombuffer(memoryview(buf), dtype=dt, count=count).reshape(dims)
    except BaseException:
        # Not left to the traceback, which would keep the memory until it is dropped.
        with contextlib.suppress(BufferError):
            buf.close()
        raise


def empty(shape: Any, dtype: Any = float, mergeable: bool = True) -> Any:
    """A numpy array backed by ksm memory (contents are zero: fresh anonymous pages)."""
    return _array(shape, dtype, mergeable, zero=False)


def zeros(shape: Any, dtype: Any = float, mergeable: bool = True) -> Any:
    """A zero-filled numpy array backed by ksm memory."""
    return _array(shape, dtype, mergeable, zero=True)


# Threads do not survive fork(): restart ksmd in the child if it was running.
_os.register_at_fork(after_in_child=_ksm._after_fork_child)
