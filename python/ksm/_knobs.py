"""The one table of ksmd's knobs and statistics, in the order ``/sys/kernel/mm/ksm/`` lists them.

``ksm.ksmd`` (its ``dir()`` and its docstring), ``ksm info``, and the records
each process publishes for ``ksm top`` all read it; the compiled core checks
values against its own ranges, and the tests check that both agree (names,
order, defaults). docs/kernel-contract.md has the same table with the kernel's
behaviour beside each entry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    """One read-write knob of ``ksm.ksmd``."""

    name: str
    default: str
    """The default, in words where it depends on the machine."""
    accepts: str
    meaning: str
    own: bool = False
    """ksm's own knob (the kernel's KSM has no such file)."""


@dataclass(frozen=True)
class Statistic:
    """One read-only statistic of ``ksm.ksmd`` (the kernel's name and definition)."""

    name: str
    meaning: str


U32 = "0 .. 2**32-1"

KNOBS: tuple[Knob, ...] = (
    Knob("run", "0", "0, 1, 2", "0 stop and keep merges, 1 run, 2 stop and unmerge everything"),
    Knob("pages_to_scan", "100", U32, "pages per batch (refused while advisor_mode is 'scan-time')"),
    Knob(
        "sleep_millisecs",
        "20",
        U32,
        "pause between batches (in a merge domain, at least 1-20 ms after full scans that changed nothing)",
    ),
    Knob(
        "max_page_sharing",
        "256",
        "2 .. 2**31-1",
        "most pages per frame; changes only while pages_shared is 0 (else OSError EBUSY)",
    ),
    Knob("use_zero_pages", "0", "0/1", "drop all-zero pages to the kernel's zero page (ksm_zero_pages)"),
    Knob("merge_across_nodes", "1", "0/1", "accepted; one NUMA node changes nothing (EBUSY while shared)"),
    Knob(
        "stable_node_chains_prune_millisecs",
        "2000",
        U32,
        "accepted; frames are freed when their last user leaves, nothing to prune",
    ),
    Knob("smart_scan", "1", "0/1", "skip pages that keep failing to merge (pages_skipped)"),
    Knob("advisor_mode", "'none'", "'none', 'scan-time'", "let the advisor set pages_to_scan"),
    Knob("advisor_max_cpu", "70", U32, "percent of a CPU the advisor may give the scanner"),
    Knob("advisor_min_pages_to_scan", "500", U32, "pages_to_scan when the advisor is switched on"),
    Knob("advisor_max_pages_to_scan", "30000", U32, "the most pages_to_scan the advisor sets"),
    Knob("advisor_target_scan_time", "200", "1 .. 2**32-1", "seconds a full scan should take"),
    Knob(
        "vma_reserve",
        "half of vm.max_map_count",
        "0 .. 2**31-1",
        "VMAs kept for the application: merging adds VMAs only below max_map_count - vma_reserve",
        own=True,
    ),
    Knob(
        "write_tracking",
        "1",
        "0/1",
        "scans skip unmerged ksm.mmap pages not written since the previous scan",
        own=True,
    ),
    Knob("hash_threads", "the cores available", "1 .. 1024", "threads a scan hashes pages on", own=True),
)

STATISTICS: tuple[Statistic, ...] = (
    Statistic("pages_shared", "frames in use (the kernel's KSM pages)"),
    Statistic("pages_sharing", "pages mapping a frame beyond its first user: pages saved"),
    Statistic("pages_unshared", "pages in the unstable index"),
    Statistic("pages_volatile", "tracked pages in no index (changed since the last visit, skipped, failed)"),
    Statistic("full_scans", "completed full scans (reset by run = 2)"),
    Statistic("pages_scanned", "pages visited (skipped pages not counted; never reset)"),
    Statistic("pages_skipped", "pages smart_scan skipped (never reset)"),
    Statistic("stable_node_chains", "contents that reached max_page_sharing"),
    Statistic("stable_node_dups", "frames holding those contents"),
    Statistic("ksm_zero_pages", "pages dropped to the zero page by use_zero_pages"),
    Statistic("general_profit", "bytes saved minus ksm's bookkeeping and the VMAs merging added"),
)

KNOB_NAMES: tuple[str, ...] = tuple(k.name for k in KNOBS)
STATISTIC_NAMES: tuple[str, ...] = tuple(s.name for s in STATISTICS)


def describe() -> str:
    """The knobs and statistics as text, for ``help(ksm.ksmd)``."""
    lines = ["Knobs (read-write; name, default, accepted values):", ""]
    for k in KNOBS:
        own = " [ksm's own]" if k.own else ""
        lines.append(f"    {k.name} = {k.default} ({k.accepts}){own}: {k.meaning}.")
    lines += ["", "Statistics (read-only, the kernel's definitions):", ""]
    lines += [f"    {s.name}: {s.meaning}." for s in STATISTICS]
    return "\n".join(lines)
