"""``ksm.advise``: merge the pages of any writable buffer (numpy arrays, bytearrays, ...).

Objects are kept alive, their buffers exported, while any of their pages is
advised: a freed or resized buffer would leave ksm tracking memory the
allocator hands to someone else.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from . import _ksm

PAGE = _ksm.PAGE_SIZE

_lock = threading.Lock()
# (start, end) of the whole pages advised, with the exported view keeping the object.
_kept: list[tuple[int, int, memoryview]] = []


def _span(obj: Any) -> tuple[memoryview, int, int]:
    """A writable export of ``obj`` with the address and length of its bytes."""
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"ksm.advise takes a writable buffer (bytearray, numpy array, private mmap.mmap, "
            f"memoryview), not {type(obj).__name__}"
        ) from None
    if view.readonly:
        view.release()
        raise TypeError(
            f"ksm.advise needs a writable buffer; this {type(obj).__name__} is read-only "
            "(use a bytearray or a writable numpy array)"
        )
    if not view.contiguous:
        view.release()
        raise ValueError(
            "ksm.advise needs a contiguous buffer; advise the array this is a view of (its .base)"
        )
    if view.nbytes == 0:
        return view, 0, 0
    # from_buffer takes a writable contiguous export of its own, released at once.
    probe = ctypes.c_char.from_buffer(view)
    address = ctypes.addressof(probe)
    del probe
    return view, address, view.nbytes


def _prune() -> None:
    """Let go of objects none of whose pages is advised any more."""
    with _lock:
        keep = []
        for start, end, view in _kept:
            if _ksm._advised_pages(start, end - start) > 0:
                keep.append((start, end, view))
            else:
                view.release()
        _kept[:] = keep


def kept() -> int:
    """Objects ``ksm.advise`` keeps alive now (tests)."""
    with _lock:
        return len(_kept)


def advise(obj: Any, advice: int = _ksm.MADV_MERGEABLE) -> int:
    # The advice is checked first, with madvise's own errors (TypeError, OSError EINVAL).
    _ksm.madvise(0, 0, advice)
    view, address, length = _span(obj)
    start = -(-address // PAGE) * PAGE
    end = (address + length) // PAGE * PAGE
    if end <= start:
        view.release()
        return 0
    pages = (end - start) // PAGE
    if advice == _ksm.MADV_MERGEABLE:
        why = _ksm._never_merges(start, end - start)
        if why is not None:
            view.release()
            raise ValueError(
                f"the memory of this {type(obj).__name__} can never merge: it is {why}. Use private "
                "anonymous memory instead: mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE), ksm.mmap(n), "
                "a bytearray or a numpy array"
            )
        from . import _publish

        _publish.start()
        try:
            _ksm.madvise(start, end - start, advice)
        except BaseException:
            view.release()
            raise
        with _lock:
            _kept.append((start, end, view))
        return pages
    if advice == _ksm.MADV_UNMERGEABLE:
        try:
            _ksm.madvise(start, end - start, advice)
        finally:
            view.release()
            _prune()
        return pages
    view.release()
    raise AssertionError("unreachable: the advice was checked above")
