"""The soak (``ksm soak``, ``make soak``) runs briefly here so that it cannot rot.

The real run is an hour (docs/reliability.md, "Soak"); here a few seconds of the same
mixed load must find no mismatch and no error, and must really have exercised
what it claims: writes, merges, copies on write, regions created and closed,
advice flips, run changes, and a check of every byte every second.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

from conftest import PAGE

import ksm
from ksm import _soak


def test_a_short_soak_finds_nothing_wrong() -> None:
    out = io.StringIO()
    report = _soak.Soak(6, report_every=1, seed=3, out=out).run()
    text = out.getvalue()
    assert report.errors == [], text
    assert report.mismatches == 0
    assert report.ok
    # A check of every byte every second, and one at the end.
    assert report.checks >= 6
    assert report.bytes_checked >= report.checks * 3 * 16 * _soak.PAGE
    # The load really ran.
    assert report.writes > 1000
    assert report.merges > 100 and report.cows > 100
    assert report.regions_closed >= 1 and report.regions_created >= 5
    assert report.advice_flips > 0 and report.run_changes > 0 and report.caller_scans > 0
    # One line per report interval (and a last one), and a verdict.
    assert len(report.samples) >= 7
    assert set(report.samples[0]) == set(_soak.COLUMNS)
    assert text.count("\n") >= len(report.samples) + 3
    assert text.rstrip().splitlines()[-1].startswith("PASS: 0 mismatches, 0 errors")
    # Everything closed: no frame, no tracked page left.
    assert report.final["frames"] == report.final["deferred_frames"] + report.final["suspect_frames"]
    assert report.final["tracked_pages"] == 0


def test_ksm_soak_command_line() -> None:
    # Exit status 0 and a JSON report (the table is for people).
    r = subprocess.run(
        [sys.executable, "-m", "ksm", "soak", "--seconds", "2", "--json", "--regions", "4", "--pages", "64"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    assert doc["mismatches"] == 0 and doc["errors"] == []
    assert doc["checks"] >= 2
    assert doc["verdict"].startswith("PASS")


# Found by the soak: FrameTable::alloc_run appended every run of frames at the end of
# the table and never reused freed ids, so the bookkeeping grew with every run ever
# merged (metadata_bytes 18 KiB -> 7.1 MiB in 30 minutes with nothing tracked at the end).
def test_bookkeeping_returns_to_its_size_after_regions_come_and_go() -> None:
    # Copied runs (merged with consecutive frames) in regions that are created, merged
    # and closed again and again: with nothing left tracked, the bookkeeping must not grow.
    a, b = bytes([1]) * PAGE, bytes([2]) * PAGE

    def cycle() -> None:
        with ksm.mmap(64 * PAGE) as m:
            m[:] = (a + b) * 32
            m.madvise(ksm.MADV_MERGEABLE)
            ksm.scan(2)
            assert ksm.stats()["pages_sharing"] > 0

    cycle()
    before = ksm.stats()["metadata_bytes"]
    for _ in range(300):
        cycle()
    s = ksm.stats()
    assert s["tracked_pages"] == 0
    assert s["metadata_bytes"] <= before + 1024, (before, s["metadata_bytes"])
