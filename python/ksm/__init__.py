"""ksm: Kernel Samepage Merging rebuilt in userspace.

Pages of identical content in memory you advise with ``MADV_MERGEABLE`` are
replaced by one write-protected copy; a later write gets a private copy
again, transparently. ``help(ksm.ksmd)`` lists the knobs and statistics; the
repository's docs/ folder describes the design, the kernel contract and the
limitations.
"""

from __future__ import annotations

import contextlib as _contextlib
import math as _math
import operator as _operator
import os as _os
import sys as _sys
import typing as _typing

from . import _advise, _domain, _knobs, _ksm, _numpy, _publish
from ._domain import domain, domain_stats, join, leave, member_stats
from ._ksm import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    PAGE_SIZE,
    available,
    get_memory_merge,
    ksm_stat,
    stats,
    unavailable_reason,
    wait_settled,
)

if _typing.TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Self

# Only the public API in dir(ksm): helpers are imported under private names, and
# the __future__ import's binding is dropped (the compiler flag stays).
del annotations

__version__: str = _ksm.__version__

__all__ = [
    "MADV_MERGEABLE",
    "MADV_UNMERGEABLE",
    "PAGE_SIZE",
    "Ksmd",
    "__version__",
    "advise",
    "available",
    "domain",
    "domain_stats",
    "empty",
    "get_memory_merge",
    "install_numpy_allocator",
    "join",
    "ksm_stat",
    "ksmd",
    "leave",
    "madvise",
    "member_stats",
    "mmap",
    "mmap_of",
    "numpy_allocator",
    "numpy_allocator_stats",
    "scan",
    "set_memory_merge",
    "stats",
    "unavailable_reason",
    "uninstall_numpy_allocator",
    "vmas_per_merged_page",
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

    def __new__(cls, *args: int) -> Self:
        _publish.start()
        return super().__new__(cls, *args)

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
            byte = _operator.index(value)
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


def scan(full_scans: int = 1) -> None:
    """Run ``full_scans`` full scans now, in the calling thread (GIL released).

    A scan already in progress (by ksmd) is finished first and not counted. A page
    merges on its second visit, so ``scan(2)`` merges what was written before.
    Ctrl-C (any pending signal) stops between two full scans.

    Raises:
        TypeError: ``full_scans`` is not an int.
        ValueError: ``full_scans`` is negative.
        OverflowError: ``full_scans`` is 2**63 or more.
    """
    _ksm.scan(full_scans)


def madvise(address: int, length: int, advice: int) -> None:
    """``madvise(2)`` for merging, on any address range of this process.

    ``MADV_MERGEABLE`` registers the range (also while ksmd is stopped);
    ``MADV_UNMERGEABLE`` gives every merged page in it a private copy before
    returning and clears the advice. Never-advised ranges are a no-op.
    MAP_SHARED, file-backed and special mappings are accepted and never
    merged. Memory ksm does not own is read fault-safely.

    Args:
        address: page-aligned start address.
        length: bytes, rounded up to whole pages; 0 does nothing.
        advice: ``MADV_MERGEABLE`` (12) or ``MADV_UNMERGEABLE`` (13).

    Raises:
        OSError: ``errno`` as the kernel gives it: EINVAL (unaligned address,
            unknown advice, overflow, merging unavailable here), ENOMEM (part of
            the range is not mapped; the mapped parts were advised), EAGAIN (not
            enough memory for the private copies; nothing was lost and the range
            stays mergeable).
    """
    _publish.start()
    _ksm.madvise(address, length, advice)
    if advice == MADV_UNMERGEABLE and length:
        _advise._prune()  # objects ksm.advise kept for these pages are let go


def set_memory_merge(enable: bool) -> None:
    """Like ``prctl(PR_SET_MEMORY_MERGE, enable)`` for the memory ksm owns.

    True: every ``ksm.mmap`` region, existing and future, is mergeable.
    False: every region (advised ones of any kind too) is unmerged and loses its
    advice; objects ``ksm.advise`` kept alive are let go. Setting the current state
    does nothing.

    Raises:
        TypeError: ``enable`` is not a bool or int.
        OSError: EINVAL when merging is unavailable here; EAGAIN when merged
            pages could not get private copies (merge-any then stays on,
            nothing is lost).
    """
    _ksm.set_memory_merge(enable)
    if not enable:
        _advise._prune()


def advise(obj: Any, advice: int = MADV_MERGEABLE) -> int:
    """Advise the memory of any writable buffer: merging with no change to how it was allocated.

    The whole pages inside the object's buffer are advised (its start is rounded
    up to a page, its end down): a numpy array, a bytearray, a private
    ``mmap.mmap``, a memoryview of any of them. With ``MADV_MERGEABLE`` the object
    is kept alive, its buffer exported (a bytearray cannot be resized, an mmap not
    closed), while any of those pages stays advised: until ``advise(obj,
    MADV_UNMERGEABLE)``, ``ksm.madvise(..., MADV_UNMERGEABLE)`` over them or
    ``ksm.set_memory_merge(False)``.

    Args:
        obj: a writable, contiguous buffer-protocol object.
        advice: ``MADV_MERGEABLE`` (default) or ``MADV_UNMERGEABLE``.

    Returns:
        The number of whole pages advised (0 when the buffer holds no whole page).

    Raises:
        TypeError: not a buffer, or a read-only one (bytes, a read-only array).
        ValueError: memory that can never merge (a ``MAP_SHARED`` mapping such as
            the stdlib's default ``mmap.mmap(-1, n)``, a file mapping), saying what
            to use instead; or a non-contiguous view.
        OSError: as ``ksm.madvise`` (errno kept), e.g. EINVAL where merging is
            unavailable, or for an unknown advice.
    """
    return _advise.advise(obj, advice)


def install_numpy_allocator(min_bytes: int = _numpy.DEFAULT_MIN_BYTES) -> None:
    """Put the data of numpy arrays of at least ``min_bytes`` in ksm memory, advised mergeable.

    Sets ksm's handler (NEP 49, named ``"ksm"`` in ``get_handler_name()``) in the
    current context and at the start of every thread started through ``threading``
    from now on. Array data is page aligned, so identical arrays have identical
    pages; smaller arrays, and any allocation ksm cannot make (out of memory, VMA
    budget, merging unavailable), use numpy's default (counted in
    ``numpy_allocator_stats()["fallbacks"]``). Arrays keep working after
    ``uninstall_numpy_allocator()``. Installing again changes ``min_bytes``.

    Raises:
        ModuleNotFoundError: numpy is not installed (``pip install 'ksm[numpy]'``).
        RuntimeError: numpy older than 1.22.
        TypeError, ValueError: ``min_bytes`` is not an int of 0 or more.
    """
    _numpy.install_numpy_allocator(min_bytes)


def uninstall_numpy_allocator() -> None:
    """Undo ``install_numpy_allocator``: the handler it replaced is back in the context it was
    installed in, and new threads get numpy's default. Arrays made under it stay valid."""
    _numpy.uninstall_numpy_allocator()


def numpy_allocator(min_bytes: int = _numpy.DEFAULT_MIN_BYTES) -> _contextlib.AbstractContextManager[None]:
    """Context manager: ksm's numpy handler (as ``install_numpy_allocator``) inside the ``with``
    block only, in the current context only (other threads are not affected).

    Raises:
        ModuleNotFoundError: numpy is not installed.
        TypeError, ValueError: ``min_bytes`` is not an int of 0 or more.
    """
    return _numpy.numpy_allocator(min_bytes)


def numpy_allocator_stats() -> dict[str, int]:
    """Counters of ksm's numpy handler (all handlers and contexts of this process).

    Keys: ``allocations`` (arrays given ksm memory), ``frees``, ``live_allocations``,
    ``live_bytes`` (bytes of ksm memory arrays hold now), ``fallbacks`` (arrays of at
    least ``min_bytes`` that got numpy's default memory because ksm's could not be
    had), ``fallbacks_budget`` (of those, because ``max_live_allocations`` ksm
    allocations were alive: each is a VMA, and merging needs VMAs too),
    ``last_fallback_errno`` (errno of the last failed allocation, 0 if none),
    ``max_live_allocations``.
    """
    return _numpy.numpy_allocator_stats()


class Ksmd:
    # The docstring is set below, from the table of knobs and statistics (ksm._knobs).

    __slots__ = ()
    _made = False

    def __new__(cls) -> Self:
        if Ksmd._made:
            raise TypeError("ksm.Ksmd cannot be instantiated: use ksm.ksmd, the process's daemon")
        Ksmd._made = True
        return super().__new__(cls)

    run: int
    pages_to_scan: int
    sleep_millisecs: int
    max_page_sharing: int
    use_zero_pages: int
    merge_across_nodes: int
    stable_node_chains_prune_millisecs: int
    smart_scan: int
    advisor_mode: str
    advisor_max_cpu: int
    advisor_min_pages_to_scan: int
    advisor_max_pages_to_scan: int
    advisor_target_scan_time: int
    vma_reserve: int
    write_tracking: int
    hash_threads: int

    # Read-only statistics (writing one raises AttributeError).
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    full_scans: int
    pages_scanned: int
    pages_skipped: int
    stable_node_chains: int
    stable_node_dups: int
    ksm_zero_pages: int
    general_profit: int

    def __getattr__(self, name: str) -> int | str:
        value: int | str = getattr(_ksm.ksmd, name)
        return value

    def __setattr__(self, name: str, value: int | str, /) -> None:
        setattr(_ksm.ksmd, name, value)
        _publish.start()  # a knob write is a use of ksm: publish for `ksm top`

    def __dir__(self) -> list[str]:
        return [*_knobs.KNOB_NAMES, *_knobs.STATISTIC_NAMES]

    def __repr__(self) -> str:
        return repr(_ksm.ksmd)


Ksmd.__doc__ = f"""The daemon: knobs and statistics of ``/sys/kernel/mm/ksm/``, per process (``ksm.ksmd``).

Same names, defaults and accepted ranges as the kernel's files, plus three
knobs of ksm's own. Read and write them as attributes: ``ksm.ksmd.run = 1``.
Writing a knob also starts publishing this process's statistics for
``ksm top``. An unknown name raises AttributeError; a value out of range raises
ValueError naming the range, a value of the wrong type TypeError, and nothing
changes; writing a statistic raises AttributeError.

{_knobs.describe()}

``ksm.stats()`` gives every statistic, with ksm's own, in one consistent snapshot.
"""

ksmd = Ksmd()
"""The process's daemon."""


def vmas_per_merged_page(snapshot: Mapping[str, int] | None = None) -> float | None:
    """VMAs merging added per page it saved: ``vmas_added / pages_sharing``.

    The price of merging in VMAs (the kernel's KSM adds none): about 2 for pages
    merged alone, far below 1 when runs of duplicated data are merged with one
    mapping. The same figure as ``ksm bench``'s "VMAs per merged page".

    Args:
        snapshot: a ``ksm.stats()`` result to compute it from (default: a fresh one),
            so that it agrees with the other figures of that snapshot.

    Returns:
        The ratio, or None while no page is saved (``pages_sharing`` is 0).
    """
    s = stats() if snapshot is None else snapshot
    saved = int(s["pages_sharing"])
    return int(s["vmas_added"]) / saved if saved else None


def mmap_of(obj: object) -> mmap:
    """The ``ksm.mmap`` that holds ``obj``'s memory.

    ``obj`` is a ``ksm.mmap``, a ``memoryview`` of one, or a numpy array from
    ``ksm.empty``/``ksm.zeros`` (or any view or slice of one). Use it to look at
    an array's pages (``ksm.mmap_of(a).page_state(0)``) or advise part of it.

    Raises:
        ValueError: ``obj``'s memory is not a ``ksm.mmap``'s.
    """
    seen: object = obj
    for _ in range(64):  # numpy keeps base chains short; a cycle cannot hang this
        if isinstance(seen, mmap):
            return seen
        nxt = seen.obj if isinstance(seen, memoryview) else getattr(seen, "base", None)
        if nxt is None:
            break
        seen = nxt
    raise ValueError(
        f"{type(obj).__name__} object is not backed by a ksm.mmap "
        "(ksm.mmap_of takes a ksm.mmap, a memoryview of one, or an array from ksm.empty/ksm.zeros)"
    )


def _index(key: Any, size: int) -> int:
    """``key`` as an index into ``size`` bytes (negative counts from the end), like the stdlib mmap."""
    try:
        i = _operator.index(key)
    except TypeError:
        raise TypeError(f"ksm.mmap indices must be integers or slices, not {type(key).__name__}") from None
    j = i + size if i < 0 else i
    if not 0 <= j < size:
        raise IndexError(f"ksm.mmap index {i} out of range (length {size})")
    return j


def _shape(shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints (numpy's rules), with a clear error."""
    try:
        dims: tuple[int, ...] = (_operator.index(shape),)
    except TypeError:
        try:
            dims = tuple(_operator.index(d) for d in shape)
        except TypeError:
            raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimensions are not allowed, got shape {dims}")
    return dims


def _array(shape: Any, dtype: Any, mergeable: bool, zero: bool) -> Any:
    try:
        import numpy as np
    except ImportError as e:
        raise ModuleNotFoundError(
            "ksm.empty and ksm.zeros need numpy, which is not installed: "
            "pip install 'ksm[numpy]' (or pip install numpy)",
            name="numpy",
        ) from e

    mergeable = bool(mergeable)  # before allocating: a failing __bool__ leaves nothing behind
    dt = np.dtype(dtype)  # numpy's order: the dtype, then the shape
    dims = _shape(shape)
    if dt.hasobject:
        raise ValueError(f"dtype {dt} holds Python object references; ksm arrays take plain-data dtypes")
    if dt.itemsize == 0:
        raise ValueError(f"dtype {dt} has itemsize 0; ksm arrays need a non-zero item size")
    # numpy's rule: the non-zero dimensions times the item size must fit in an intp.
    if _math.prod(d for d in dims if d) * dt.itemsize > _sys.maxsize:
        raise ValueError(f"array is too big: shape {dims} of {dt} is more bytes than the address space")
    count = _math.prod(dims)
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
        with _contextlib.suppress(BufferError):
            buf.close()
        raise


def empty(shape: Any, dtype: Any = float, mergeable: bool = True) -> Any:
    """A numpy array backed by a fresh ``ksm.mmap`` (contents are zero: fresh anonymous pages).

    Args:
        shape: an int or a sequence of ints, as for ``numpy.empty``.
        dtype: any plain-data numpy dtype (not ``object``).
        mergeable: advise the memory ``MADV_MERGEABLE`` at once (default True).

    The array keeps its memory alive, and so does any view of it; ``ksm.mmap_of(a)``
    gives the ``ksm.mmap`` behind it.

    Raises:
        ModuleNotFoundError: numpy is not installed (``pip install 'ksm[numpy]'``).
        TypeError, ValueError: a bad shape or dtype, as numpy would say.
    """
    return _array(shape, dtype, mergeable, zero=False)


def zeros(shape: Any, dtype: Any = float, mergeable: bool = True) -> Any:
    """A zero-filled numpy array backed by a fresh ``ksm.mmap``; the same as ``ksm.empty``."""
    return _array(shape, dtype, mergeable, zero=True)


# Threads do not survive fork(): restart ksmd in the child if it was running.
_os.register_at_fork(after_in_child=_ksm._after_fork_child)
_os.register_at_fork(after_in_child=_publish._after_fork_child)
# A forked child is in no domain (its link was the parent's); KSM_DOMAIN joins it.
_os.register_at_fork(after_in_child=_domain._join_from_env)
_domain._join_from_env()
