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
    "_advised_pages",
    "_after_fork_child",
    "_broker",
    "_domain",
    "_domain_dir",
    "_domain_socket",
    "_domain_stats",
    "_domain_sync",
    "_domains",
    "_inject",
    "_injected",
    "_join",
    "_leave",
    "_member_stats",
    "_never_merges",
    "_numpy_allocator_stats",
    "_numpy_handler",
    "_numpy_owns",
    "_numpy_set_handler",
    "_numpy_set_hugepages",
    "_numpy_set_max_live",
    "_numpy_trim",
    "_uffd_info",
    "available",
    "get_memory_merge",
    "ksm_stat",
    "ksmd",
    "madvise",
    "scan",
    "set_memory_merge",
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
            ``"merged"`` (maps a shared frame), ``"zero"`` (dropped to the kernel's
            zero page by ``use_zero_pages``, not written since), ``"unmerged"`` (a
            private page: never merged, not advised, or copied by a write since the
            last scan), ``"volatile"`` (advised, changed since the previous visit) or
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

    Knobs (read-write; the kernel's names, defaults and ranges):

    - ``run`` (0): 0 stop and keep merges, 1 run, 2 stop and unmerge everything
      (which also resets ``full_scans``).
    - ``pages_to_scan`` (100; 0..2**32-1): pages per batch. Refused (ValueError)
      while ``advisor_mode`` is ``"scan-time"``, which sets it.
    - ``sleep_millisecs`` (20; 0..2**32-1): pause between batches. In a merge
      domain, after full scans that changed nothing, the next full scan waits at
      least 1 ms, doubling up to 20 ms, unless something arrives from the domain.
    - ``max_page_sharing`` (256; 2..2**31-1): most pages per frame; a content with
      more users gets more frames (``stable_node_chains``/``stable_node_dups``).
      Changeable only while ``pages_shared`` is 0 (OSError EBUSY).
    - ``use_zero_pages`` (0; 0/1 or bool): all-zero pages are dropped to the
      kernel's zero page instead of merged, counted in ``ksm_zero_pages``.
    - ``merge_across_nodes`` (1; 0/1): accepted as the kernel's; with one NUMA
      node it changes nothing. Changeable only while ``pages_shared`` is 0 (EBUSY).
    - ``stable_node_chains_prune_millisecs`` (2000; 0..2**32-1): accepted; ksm
      frees a frame as soon as its last user leaves, so there is nothing to prune.
    - ``smart_scan`` (1; 0/1): skip pages that keep failing to merge (``pages_skipped``).
    - ``advisor_mode`` (``"none"``; or ``"scan-time"``): let the advisor set
      ``pages_to_scan`` so that a full scan takes ``advisor_target_scan_time``
      seconds (1..2**32-1, default 200) within ``advisor_max_cpu`` percent of a
      CPU (70; 0..2**32-1), capped at ``advisor_max_pages_to_scan`` (30000);
      switching it on sets ``pages_to_scan`` to ``advisor_min_pages_to_scan``
      (500), switching it off to 100, as the kernel does.

    ksm's own knobs (the kernel's KSM needs no VMAs and walks page tables):

    - ``vma_reserve`` (half of ``vm.max_map_count`` when ksm started, 32765 with
      the default limit; 0..2**31-1): VMAs kept for the application. Merging adds
      VMAs only while the process has fewer than ``vm.max_map_count -
      vma_reserve`` (``stats()["vma_budget"]``); a merge that could pass it is not
      attempted (``vma_budget_skips``). Takes effect at once; merges already made
      stay. A reserve at or above the limit lets merging add no VMA.
    - ``write_tracking`` (1; 0/1): track writes to the unmerged pages of
      ``ksm.mmap`` memory with an asynchronous write-protect userfaultfd, so that a
      scan hashes only the pages written since the previous one (``pages_hashed``
      counts what it hashed); the first write to such a page after each scan costs
      about 2 microseconds more. Needs ``UFFD_FEATURE_WP_ASYNC`` (Linux 6.7);
      without it this stays 1 and nothing is tracked. 0 stops tracking at once;
      1 tracks again the unmerged pages of memory advised before (the next scan
      hashes them once more) and memory advised (or unmerged) from then on.
    - ``hash_threads`` (the cores available to the process: CPU affinity and
      cgroup quota, as Rust's ``available_parallelism`` counts them; 1..1024):
      threads a scan reads and hashes pages on. With more than 1, each batch
      takes the checksums its visits would take ahead of them (up to 4096 at a
      time, no further than the batch's visits reach; 64 after a merge made some
      useless, doubling again while none is), spread over that many threads,
      this one included, if each can have 1024 pages, so at most 4 take part
      (the others end before the batch does; after they came late, a few
      batches go without). Memory ksm does not own is read 64 pages per
      system call ahead of the visits whatever this is. Merging is unchanged:
      bytes are still read before they are compared, and compared under
      write-protection. 1 hashes each page of ksm's own memory in the scanning
      thread at its visit, as the kernel's ksmd does. The threads' CPU time
      counts as the scanner's. On a 2-core machine a second thread gains
      little and not reliably, for more CPU (docs/design.md, "Threads"): 1 saves
      that CPU there.

    Statistics (read-only, the kernel's definitions): ``pages_shared``,
    ``pages_sharing``, ``pages_unshared``, ``pages_volatile``, ``full_scans``,
    ``pages_scanned``, ``pages_skipped``, ``stable_node_chains``,
    ``stable_node_dups``, ``ksm_zero_pages``, ``general_profit``.

    An unknown name raises AttributeError; a value out of range raises
    ValueError naming the range, a value of the wrong type TypeError, and
    nothing changes.
    """

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
    def pages_skipped(self) -> int: ...
    @property
    def stable_node_chains(self) -> int: ...
    @property
    def stable_node_dups(self) -> int: ...
    @property
    def ksm_zero_pages(self) -> int: ...
    @property
    def general_profit(self) -> int: ...
    def __getattr__(self, name: str) -> int | str: ...
    def __setattr__(self, name: str, value: int | str, /) -> None: ...

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

def scan(full_scans: int) -> None:
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
    ``pages_volatile``, ``full_scans``, ``pages_scanned``, ``pages_skipped``,
    ``stable_node_chains``, ``stable_node_dups``, ``ksm_zero_pages``,
    ``general_profit``) and ours: ``rmap_items`` (pages with a record), ``frames`` (frames holding
    bytes), ``deferred_frames`` (kept for a forked child), ``suspect_frames`` (kept
    until no mapping holds them, after the application unmapped or moved merged memory), ``pool_bytes``
    (memory of the frame pool), ``merges`` (pages remapped onto a frame, pages moved from
    one frame to another included: into a longer run, or off a merge domain's retired
    segment), ``merge_failures``, ``pages_hashed`` (pages whose
    visit took a checksum, read at the visit or ahead of it; with
    ``ksmd.write_tracking`` unchanged ones are not), ``cows``
    (merged pages found written), ``vmas_added`` (VMAs merging added),
    ``vmas_used`` (VMAs of the process when last counted), ``vma_budget`` (the
    most VMAs merging lets the process have: ``vm.max_map_count`` minus the
    ``ksmd.vma_reserve`` knob, when last counted), ``vma_budget_skips``
    (merges not attempted because they could pass the VMA budget; once the
    budget has no room for a pair, a page whose checksum matches one of the
    unstable index counts without its bytes being compared, at every scan),
    ``vma_budget_bytes`` (the memory the merges put off by the VMA budget would
    have saved: bytes of the pages whose merge the latest complete full scan did
    not attempt because of the budget, one page each; a page counts once per full
    scan however many merges its visit was refused, and the figure is replaced at
    the end of every full scan, never added up across scans; before the first full
    scan completes, the scan in progress so far; smart scan does not age pages
    put off, so every full scan counts them all. ``sysctl vm.max_map_count=N`` (as
    root) raises the budget with the limit, at about 200 bytes of kernel memory
    per VMA: see ``ksm info``),
    ``unmergeable_pages`` (pages advised that ksm never merges: shared,
    file-backed, hugetlb, locked or special memory; cumulative),
    ``metadata_bytes`` (our bookkeeping: records of advised memory and of all
    ``ksm.mmap`` memory, frame table, indexes), ``metadata_peak_bytes`` (the most
    bookkeeping a full scan needs: ``metadata_bytes``, or what the last full scan held
    at its end, before its unstable index was given back, if that was more),
    ``tracked_pages``, ``advised_pages``,
    ``settled`` (bool: the last full scan changed nothing).
    ``general_profit`` = (pages_sharing + ksm_zero_pages) * PAGE_SIZE - metadata_bytes
    - vmas_added * 380. ``pages_shared + pages_sharing + pages_unshared +
    pages_volatile == rmap_items`` in every snapshot. VMAs per merged page:
    ``ksm.vmas_per_merged_page()``. In a merge domain, a page on a frame of the
    domain counts in ``pages_sharing`` (a page saved); the frame itself is counted
    once, by ``ksm.domain_stats()``, by no member.
    """

def ksm_stat() -> dict[str, int | bool]:
    """This process's ``/proc/self/ksm_stat``, one consistent snapshot.

    Keys: ``ksm_rmap_items`` (pages with a record), ``ksm_zero_pages`` (pages
    dropped to the zero page by ``use_zero_pages``), ``ksm_merging_pages``
    (pages mapping a shared frame, first sharers included), ``ksm_process_profit``
    ((merging + zero pages) * PAGE_SIZE minus our bookkeeping and added VMAs),
    ``ksm_merge_any`` (bool, :func:`get_memory_merge`), ``ksm_mergeable``
    (bool: some page is advised).
    """

def set_memory_merge(enable: bool) -> None:
    """Like ``prctl(PR_SET_MEMORY_MERGE, enable)`` for the memory ksm owns.

    True: every ``ksm.mmap`` region, existing and future, is mergeable.
    False: every region (advised ones of any kind too) is unmerged and loses its
    advice. Setting the current state does nothing.

    Raises:
        TypeError: ``enable`` is not a bool or int.
        OSError: EINVAL when merging is unavailable here; EAGAIN when merged
            pages could not get private copies (merge-any then stays on,
            nothing is lost).
    """

def get_memory_merge() -> bool:
    """Like ``prctl(PR_GET_MEMORY_MERGE)``: whether merge-any is on."""

def available() -> bool:
    """Whether merging can work in this process (userfaultfd with write-protect)."""

def unavailable_reason() -> str | None:
    """Why merging cannot work here and what to change, or None when it can."""

def _uffd_info() -> tuple[str, int] | None: ...
def _after_fork_child() -> None: ...
def _inject(point: str, every: int, errno: int) -> None:
    """Tests only: make every ``every``-th call at ``point`` fail with ``errno`` (0: off).

    Points: map_fixed, move_over, anonymous, register, writeprotect, punch, read_foreign.
    """

def _injected() -> int:
    """Tests only: failures injected so far."""

# Merge domains (the public functions are in ksm/_domain.py).
def _join(name: str, argv: list[str], env: list[str]) -> None: ...
def _leave() -> None: ...
def _domain() -> str | None: ...
def _domain_stats(name: str) -> dict[str, int]: ...
def _member_stats() -> dict[str, object]: ...
def _broker(name: str) -> bool: ...
def _domains() -> list[str]: ...
def _domain_sync(timeout: float = 10.0) -> bool: ...
def _domain_dir() -> str: ...
def _domain_socket(name: str) -> str: ...

# ---- no code changes: used by ksm.advise and ksm's numpy allocator -------------------

def _never_merges(address: int, length: int) -> str | None:
    """Why ``[address, address+length)`` can never merge, or None.

    Returns:
        A description (MAP_SHARED, file-backed or special memory, or not mapped), or
        None for private anonymous memory.
    """

def _advised_pages(address: int, length: int) -> int:
    """Pages of ``[address, address+length)`` advised ``MADV_MERGEABLE`` now."""

def _numpy_handler(array_api: object, min_bytes: int) -> object:
    """The capsule of ksm's numpy memory handler for arrays of at least ``min_bytes``.

    Args:
        array_api: numpy's ``_ARRAY_API`` capsule (its C-API table).
        min_bytes: arrays smaller than this use numpy's default handler.

    Raises:
        TypeError: ``array_api`` is not a capsule.
        RuntimeError: numpy's default handler cannot be read.
    """

def _numpy_set_handler(array_api: object, handler: object) -> object:
    """``PyDataMem_SetHandler(handler)`` in the current context.

    Returns:
        The handler it replaced.

    Raises:
        TypeError: ``handler`` is not a capsule named ``"mem_handler"``.
    """

def _numpy_set_max_live(n: int) -> None:
    """The most ksm allocations the numpy handler keeps alive at once (each is a VMA)."""

def _numpy_set_hugepages(on: bool) -> None:
    """Whether the numpy handler asks for transparent huge pages for arrays of 4 MiB and more."""

def _numpy_owns(address: int) -> bool:
    """Whether ``address`` is the start of array data the numpy handler put in ksm memory."""

def _numpy_trim() -> int:
    """Give back the freed blocks the numpy handler keeps for reuse.

    Returns:
        How many there were.
    """

def _numpy_allocator_stats() -> dict[str, int]:
    """Counters of the numpy handler (see ``ksm.numpy_allocator_stats``)."""
