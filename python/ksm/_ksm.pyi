"""Type stubs and documentation for the compiled core, ``ksm._ksm``."""

from typing import Final, Self, final

from typing_extensions import Buffer

PAGE_SIZE: Final[int]
"""The system page size in bytes."""
MADV_MERGEABLE: Final[int]
"""12, the same value as ``mmap.MADV_MERGEABLE``."""
MADV_UNMERGEABLE: Final[int]
"""13, the same value as ``mmap.MADV_UNMERGEABLE``."""
__version__: Final[str]
__all__ = [
    "MADV_MERGEABLE",
    "MADV_UNMERGEABLE",
    "PAGE_SIZE",
    "Ksmd",
    "Mmap",
    "__version__",
    "_after_fork_child",
    "_uffd_info",
    "available",
    "ksmd",
    "madvise",
    "scan",
    "stats",
    "unavailable_reason",
    "wait_settled",
]

class Mmap(Buffer):
    """Anonymous private memory owned by ksm (base class of ``ksm.mmap``).

    Memory allocated here is unmapped only by ksm, under its lock, so the
    scanner reads it directly: the safe, fast path for merging. The pages are
    ``MADV_NOHUGEPAGE`` (write-protecting 4 KiB inside a huge page would split it).

    Args:
        *args: ``(length)`` or ``(-1, length)`` like the stdlib ``mmap.mmap``;
            the length is rounded up to whole pages.

    Raises:
        ValueError: length not positive, or a fileno other than -1.
        OSError: the kernel refused the mapping (errno kept).
    """

    def __new__(cls, *args: int) -> Self: ...
    @property
    def address(self) -> int:
        """Address of byte 0 (page aligned).

        Raises:
            ValueError: the mmap is closed.
        """
    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
    def __len__(self) -> int: ...
    def madvise(self, option: int, start: int = 0, length: int | None = None) -> None:
        """Advise ``[start, start+length)`` of this mapping, like ``mmap.mmap.madvise``.

        Args:
            option: ``MADV_MERGEABLE`` or ``MADV_UNMERGEABLE``.
            start: byte offset, a multiple of ``PAGE_SIZE``.
            length: bytes (rounded up to pages); default: to the end.

        Raises:
            OSError: with ``errno`` set as ``ksm.madvise`` documents.
            ValueError: the mmap is closed or ``start`` is past the end.
        """
    def page_state(self, offset: int) -> str:
        """State of the page holding byte ``offset``.

        Returns:
            ``"merged"`` (maps a shared frame), ``"unmerged"`` (a private page:
            never merged, not advised, or copied by a write since the last scan),
            ``"volatile"`` (advised, changed since the previous visit) or
            ``"unshared"`` (advised, stable, no twin found: the kernel's unstable tree).

        Raises:
            ValueError: offset out of range, or the mmap is closed.
        """
    def close(self) -> None:
        """Unmap the memory (merged pages release their share of the frame).

        Raises:
            BufferError: a ``memoryview`` or other export is still alive.
        """
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, buffer: memoryview, /) -> None: ...

@final
class Ksmd:
    """The daemon: knobs and statistics of ``/sys/kernel/mm/ksm/``, per process.

    Knobs (read-write, the kernel's names, defaults and ranges):
    ``run`` (0 stop and keep merges, 1 run, 2 stop and unmerge everything,
    which also resets ``full_scans``), ``pages_to_scan`` (100; 0..2**32-1),
    ``sleep_millisecs`` (20; 0..2**32-1), ``max_page_sharing`` (256;
    2..2**31-1, changeable only while ``pages_shared`` is 0: OSError EBUSY).

    Statistics (read-only, the kernel's definitions): ``pages_shared``,
    ``pages_sharing``, ``pages_unshared``, ``pages_volatile``, ``full_scans``,
    ``pages_scanned``, ``general_profit``.

    An unknown name raises AttributeError; a value out of range raises
    ValueError naming the range, and nothing changes.
    """

    run: int
    pages_to_scan: int
    sleep_millisecs: int
    max_page_sharing: int
    @property
    def pages_shared(self) -> int: ...
    @property
    def pages_sharing(self) -> int: ...
    @property
    def pages_unshared(self) -> int: ...
    @property
    def pages_volatile(self) -> int: ...
    @property
    def full_scans(self) -> int: ...
    @property
    def pages_scanned(self) -> int: ...
    @property
    def general_profit(self) -> int: ...
    def __getattr__(self, name: str) -> int: ...
    def __setattr__(self, name: str, value: int, /) -> None: ...

ksmd: Ksmd
"""The process's daemon."""

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

def scan(full_scans: int = 1) -> None:
    """Run ``full_scans`` full scans now, in the calling thread (GIL released).

    A scan already in progress (by ksmd) is finished first and not counted.
    A page merges on its second visit, so ``scan(2)`` merges what was written before.

    Raises:
        ValueError: ``full_scans`` is negative.
    """

def wait_settled(timeout: float | None = None) -> bool:
    """Wait until a full scan completes with nothing changed (no merge, unmerge or new checksum).

    Args:
        timeout: seconds to wait at most; None waits as long as ksmd runs.

    Returns:
        True once settled. With ksmd stopped (``run != 1``) it answers at once.
    """

def stats() -> dict[str, int]:
    """Every statistic in one consistent snapshot.

    The kernel's (``pages_shared``, ``pages_sharing``, ``pages_unshared``,
    ``pages_volatile``, ``full_scans``, ``pages_scanned``, ``general_profit``)
    and ours: ``rmap_items`` (pages with a record), ``frames`` (frames holding
    bytes), ``deferred_frames`` (kept for a forked child), ``suspect_frames`` (kept
    until no mapping holds them, after the application unmapped merged memory), ``pool_bytes``
    (memory of the frame pool), ``merges``, ``merge_failures``, ``cows``
    (merged pages found written), ``vmas_added`` (VMAs merging added),
    ``vmas_used`` (VMAs of the process when last counted), ``vma_budget_skips``
    (merges not attempted because they could pass the VMA budget, half of
    ``vm.max_map_count``), ``metadata_bytes`` (our bookkeeping of advised
    memory), ``tracked_pages``, ``advised_pages``, ``settled`` (bool: the last
    full scan changed nothing).
    ``general_profit`` = pages_sharing * PAGE_SIZE - metadata_bytes - vmas_added * 210.
    """

def available() -> bool:
    """Whether merging can work in this process (userfaultfd with write-protect)."""

def unavailable_reason() -> str | None:
    """Why merging cannot work here and what to change, or None when it can."""

def _uffd_info() -> tuple[str, int] | None: ...
def _after_fork_child() -> None: ...
