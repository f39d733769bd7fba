"""`ksm bench`: a small run prints every row with numbers and leaves kernel KSM as it was."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ksm
from ksm import _bench

KSYS = Path("/sys/kernel/mm/ksm")
KERNEL = _bench.kernel_unavailable_reason() is None

pytestmark = pytest.mark.skipif(not ksm.available(), reason="merging unavailable here")


def knobs() -> dict[str, str]:
    """Every writable knob of kernel KSM (empty without kernel KSM)."""
    if not KSYS.is_dir():
        return {}
    return {p.name: p.read_text().strip() for p in sorted(KSYS.iterdir()) if p.stat().st_mode & 0o200}


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ksm", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


NUMBER = r"[\d,]+(?:\.\d+)?"


def test_small_bench_prints_rows_and_restores_knobs() -> None:
    before = knobs()
    r = bench("--size", "16M", "--only", "identical")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "16 MiB per workload" in out
    for row in _bench.ROWS:
        line = next((x for x in out.splitlines() if row.label in x), None)
        assert line is not None, (row.label, out)
        cells = line.split(row.label, 1)[1].split()
        # ksm's figure, and with kernel KSM its figure and the ratio (which may be "-").
        assert re.fullmatch(">?" + NUMBER, cells[0]), (row.label, line)
        if KERNEL:
            assert re.fullmatch(NUMBER, cells[1]), (row.label, line)
            assert len(cells) == 3, (row.label, line)
    assert re.search(r"contents verified\s+yes", out), out
    # pages saved: all but one page per max_page_sharing pages, on both sides.
    line = next(x for x in out.splitlines() if "pages saved" in x)
    assert line.split()[-3 if KERNEL else -1] == "4,080", line
    if KERNEL:
        assert "ksm/kernel" in out
        assert "targets, each a ratio measured in this run" in out
        # Each target says why it is there.
        assert re.search(r"PASS|MISS", out) and _bench.REASONS["identical: pages saved"] in out
        assert re.search(r"^\s+(PASS|MISS)\s+identical: pages saved within 1%", out, re.M), out
        assert "kernel KSM knobs restored" in r.stderr
    else:
        assert "kernel KSM not driven" in out
    assert knobs() == before


def test_json_and_no_kernel() -> None:
    before = knobs()
    r = bench("--size", "4M", "--only", "zero", "--only", "unique", "--no-kernel", "--json", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["kernel"] is None and doc["kernel_note"] == "--no-kernel given"
    # The budget the targets use: the limit less the reserve (default half of it).
    assert doc["vma_budget"] == doc["max_map_count"] - doc["max_map_count"] // 2 > 0
    assert list(doc["workloads"]) == ["zero", "unique"]
    zero = doc["workloads"]["zero"]
    assert zero["kernel"] is None
    assert zero["ksm"]["verified"] is True
    assert zero["ksm"]["pages_sharing"] > 0.9 * zero["pages"]
    assert zero["ksm"]["settle_s"] > 0 and zero["ksm"]["unmerge_s"] >= 0
    assert doc["workloads"]["unique"]["ksm"]["pages_sharing"] == 0
    assert r.stderr == ""
    assert knobs() == before


@pytest.mark.parametrize(
    "args",
    [("--only", "nosuch"), ("--size", "lots"), ("--size", "0"), ("--max-scans", "1")],
)
def test_bad_arguments(args: tuple[str, ...]) -> None:
    r = bench(*args, timeout=30)
    assert r.returncode == 2
    assert "ksm bench:" in r.stderr


def test_parse_size() -> None:
    assert _bench.parse_size("1G") == 1 << 30
    assert _bench.parse_size("64M") == 64 << 20
    assert _bench.parse_size("16MiB") == 16 << 20
    assert _bench.parse_size("4096") == 4096
    with pytest.raises(ValueError):
        _bench.parse_size("-1M")


@pytest.mark.skipif(not KERNEL, reason="kernel KSM cannot be driven here (needs root)")
def test_sigterm_restores_knobs() -> None:
    before = knobs()
    p = subprocess.Popen(
        [sys.executable, "-m", "ksm", "bench", "--size", "256M", "--only", "unique"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert p.stderr is not None
    # Wait until the kernel side is merging (knobs changed), then terminate.
    for line in p.stderr:
        if line.startswith("unique/kernel: filled"):
            break
    p.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert "could not restore" not in err
    assert knobs() == before


@pytest.mark.parametrize(
    ("ksm_sharing", "skips", "vmas", "status"),
    [
        (131_000, 0, 1_000, "PASS"),  # saved what the kernel did
        (10_000, 372_000, 32_760, "PASS"),  # stopped by the VMA budget, which is full
        (10_000, 0, 32_760, "MISS"),  # fewer pages, and not because of the budget
        (10_000, 372_000, 20_000, "MISS"),  # merges put off, yet the budget is far from full
    ],
)
def test_pairs_time_counts_when_only_the_vma_budget_stopped_merging(
    ksm_sharing: int, skips: int, vmas: int, status: str
) -> None:
    kernel = _bench.Figures(settle_s=3.0, settled=True, pages_sharing=131_072)
    mine = _bench.Figures(
        settle_s=1.5, settled=True, pages_sharing=ksm_sharing, vma_budget_skips=skips, vmas_after=vmas
    )
    r = _bench.WorkloadResult("pairs", 262_144, mine, kernel)
    (t,) = [t for t in _bench.targets([r], budget=32_765) if t.text.startswith("pairs: no worse")]
    assert t.status == status, t.detail


def test_every_target_states_its_reason() -> None:
    def figures(**kw: Any) -> _bench.Figures:
        base: dict[str, Any] = {
            "settle_s": 1.0,
            "settled": True,
            "scan_after_cpu_s": 0.01,
            "first_write_us": 3.0,
            "unmerge_s": 0.3,
            "pages_sharing": 1000,
            "vmas_after": 100,
            "vmas_per_merged_page": 0.005,
            "metadata_per_page": 8.0,
        }
        return _bench.Figures(**{**base, **kw})

    results = []
    for name in _bench.WORKLOAD_HELP:
        r = _bench.WorkloadResult(name, 262_144, figures(), figures(settle_s=4.5, scan_after_cpu_s=2.0))
        _bench.compute_ratios(r)
        results.append(r)
    found = _bench.targets(results, budget=32_765)
    assert len(found) == len(_bench.REASONS), [t.text for t in found]
    for t in found:
        assert t.status in ("PASS", "MISS"), t
        assert t.reason, f"target without a reason: {t.text}"
    assert {t.reason for t in found} == set(_bench.REASONS.values())
