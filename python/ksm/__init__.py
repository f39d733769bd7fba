"""ksm: Kernel Samepage Merging rebuilt in userspace.

Pages of identical content in memory you advise with ``MADV_MERGEABLE`` are
replaced by one write-protected copy; a later write gets a private copy
again, transparently. See the README for the model and its limits.
"""

from __future__ import annotations

import os as _os
from typing import Any, Self

from . import _ksm, _publish
from ._ksm import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    PAGE_SIZE,
    available,
    get_memory_merge,
    ksm_stat,
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
    "Ksmd",
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

    def __new__(cls, *args: int) -> Self:
        _publish.start()
        return super().__new__(cls, *args)

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


class Ksmd:
    """The daemon: knobs and statistics of ``/sys/kernel/mm/ksm/``, per process (``ksm.ksmd``).

    A thin proxy of ``ksm._ksm.ksmd`` (whose docstring lists every knob with its
    default and range, and every statistic); writing a knob also starts
    publishing this process's statistics for ``ksm top``. An unknown name raises
    AttributeError; a value out of range raises ValueError naming the range, and
    nothing changes.
    """

    __slots__ = ()

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

    @property
    def pages_shared(self) -> int:
        return _ksm.ksmd.pages_shared

    @property
    def pages_sharing(self) -> int:
        return _ksm.ksmd.pages_sharing

    @property
    def pages_unshared(self) -> int:
        return _ksm.ksmd.pages_unshared

    @property
    def pages_volatile(self) -> int:
        return _ksm.ksmd.pages_volatile

    @property
    def full_scans(self) -> int:
        return _ksm.ksmd.full_scans

    @property
    def pages_scanned(self) -> int:
        return _ksm.ksmd.pages_scanned

    @property
    def pages_skipped(self) -> int:
        return _ksm.ksmd.pages_skipped

    @property
    def stable_node_chains(self) -> int:
        return _ksm.ksmd.stable_node_chains

    @property
    def stable_node_dups(self) -> int:
        return _ksm.ksmd.stable_node_dups

    @property
    def ksm_zero_pages(self) -> int:
        return _ksm.ksmd.ksm_zero_pages

    @property
    def general_profit(self) -> int:
        return _ksm.ksmd.general_profit

    def __getattr__(self, name: str) -> int | str:
        value: int | str = getattr(_ksm.ksmd, name)
        return value

    def __setattr__(self, name: str, value: int | str, /) -> None:
        setattr(_ksm.ksmd, name, value)
        _publish.start()  # a knob write is a use of ksm: publish for `ksm top`

    def __dir__(self) -> list[str]:
        return list(dir(_ksm.ksmd))

    def __repr__(self) -> str:
        return repr(_ksm.ksmd)


ksmd = Ksmd()
"""The process's daemon."""


def _array(shape: Any, dtype: Any, mergeable: bool, zero: bool) -> Any:
    try:
        import numpy as np
    except ImportError as e:
        raise ModuleNotFoundError(
            "ksm.empty and ksm.zeros need numpy, which is not installed: "
            "pip install 'ksm[numpy]' (or pip install numpy)",
            name="numpy",
        ) from e

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
_os.register_at_fork(after_in_child=_publish._after_fork_child)
