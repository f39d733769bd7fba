"""No write is ever lost while pages are being merged under the writers.

Each writer thread owns one page. Every page holds the same content except a
counter word; a writer stores an incrementing value there, reads it back, then
puts the common value back and reads that back too, and rests a moment. At
rest all pages are identical, so the main thread, scanning continuously, keeps
merging them, and the next write copies the page again (COW). A store that
landed on a page just before it was replaced would read back wrong.

Runs ~4 s by default; set KSM_STRESS_SECONDS for a longer run, and ``-s`` to see
how many writes raced with how many merges (docs/reliability.md, "Racing writes").
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable

from conftest import PAGE, page_pattern

import ksm

SECONDS = float(os.environ.get("KSM_STRESS_SECONDS", "4"))
WRITERS = 8
WORD = 8
COUNTER = 100  # word index of the counter inside each page
WORDS_PER_PAGE = PAGE // WORD


def writer(words: memoryview, index: int, stop: threading.Event, errors: list[str], last: list[int]) -> None:
    base = index * WORDS_PER_PAGE + COUNTER
    rng = random.Random(index)
    rest = words[base]
    value = 0
    try:
        while not stop.is_set():
            value += 1
            words[base] = value
            got = words[base]
            if got != value:
                errors.append(f"writer {index}: wrote {value}, read back {got}")
                return
            words[base] = rest
            got = words[base]
            if got != rest:
                errors.append(f"writer {index}: restored {rest}, read back {got} (after {value})")
                return
            last[index] = value
            # Rest so the page stays identical to the others for a few scans.
            if rng.random() < 0.5:
                time.sleep(rng.random() * 0.003)
        value += 1
        words[base] = value | (index << 48)
        last[index] = value | (index << 48)
    except BaseException as exc:  # pragma: no cover - reported below
        errors.append(f"writer {index}: {exc!r}")


def race(common: bytes, drive: Callable[[threading.Event, list[str]], int]) -> None:
    """Run the writers while ``drive`` merges until it returns; check every write survived."""
    with ksm.mmap(WRITERS * PAGE) as m:
        m[:] = common * WRITERS
        m.madvise(ksm.MADV_MERGEABLE)
        before = ksm.stats()
        words = memoryview(m).cast("Q")
        stop = threading.Event()
        errors: list[str] = []
        last = [0] * WRITERS
        threads = [
            threading.Thread(target=writer, args=(words, i, stop, errors, last), daemon=True)
            for i in range(WRITERS)
        ]
        for t in threads:
            t.start()
        scans = drive(stop, errors)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        ksm.ksmd.run = 0
        assert not any(t.is_alive() for t in threads), "a writer is stuck (blocked in a fault?)"
        during = ksm.stats()
        assert not errors, errors
        ksm.scan(3)
        after = ksm.stats()

        counter = int.from_bytes(common[COUNTER * WORD : (COUNTER + 1) * WORD], "little")
        for i in range(WRITERS):
            assert words[i * WORDS_PER_PAGE + COUNTER] == last[i], f"page {i}: final value lost"
            with memoryview(m) as view:
                got = bytes(view[i * PAGE : (i + 1) * PAGE])
            expected = bytearray(common)
            expected[COUNTER * WORD : (COUNTER + 1) * WORD] = last[i].to_bytes(WORD, "little")
            assert got == bytes(expected), f"page {i} changed outside its counter"
            assert last[i] != counter
        words.release()

        merges = during["merges"] - before["merges"]
        cows = during["cows"] - before["cows"]
        # Each counter value was stored, read back, restored and read back: 2 writes.
        writes = 2 * sum(v & ((1 << 48) - 1) for v in last)
        print(f"{writes:,} writes by {WRITERS} writers, {merges:,} merges, {cows:,} copies on write", end="")
        print(f", {scans} scans")
        assert merges > 0, f"no merge happened in {scans} scans"
        assert cows > 0, f"no merged page was written in {scans} scans ({merges} merges)"
        assert (
            after["pages_shared"] + after["pages_sharing"] + after["pages_unshared"] + after["pages_volatile"]
            == after["rmap_items"]
        )


def test_no_lost_writes_while_merging() -> None:
    def scan_continuously(stop: threading.Event, errors: list[str]) -> int:
        deadline = time.monotonic() + SECONDS
        scans = 0
        while time.monotonic() < deadline and not errors:
            ksm.scan()
            scans += 1
        return scans

    race(page_pattern(77), scan_continuously)


def test_no_lost_writes_while_ksmd_merges() -> None:
    # The same with the background ksmd instead of the caller's scans.
    def run_ksmd(stop: threading.Event, errors: list[str]) -> int:
        before = ksm.ksmd.full_scans
        ksm.ksmd.sleep_millisecs = 0
        ksm.ksmd.run = 1
        stop.wait(max(1.0, SECONDS / 2))
        ksm.ksmd.run = 0
        return int(ksm.ksmd.full_scans - before)

    race(page_pattern(78), run_ksmd)
