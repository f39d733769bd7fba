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
from ksm import _bench, _workers

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
            assert re.fullmatch("-" if row.ksm_only else NUMBER, cells[1]), (row.label, line)
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


# --------------------------------------------------------------------------- --sweep


def test_sweep_prints_a_row_per_size_draws_it_and_restores_knobs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    before = knobs()
    png = tmp_path / "sweep.png"
    r = bench("--sweep", "--sweep-sizes", "128K,64K", "--only", "identical", "--plot", str(png))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "ksm bench --sweep: workload identical" in out
    rows = [x.split() for x in out.splitlines() if re.match(r"(64|128) KiB ", x)]
    assert [row[:2] for row in rows] == [["64", "KiB"], ["128", "KiB"]], out
    for row, saved in zip(rows, ("15", "31"), strict=True):
        # Settle times (the kernel's "-" without it), and pages saved: all but the one
        # page each frame keeps (16 and 32 identical pages).
        assert re.fullmatch(">?" + NUMBER, row[3]), row
        assert re.fullmatch(">?" + NUMBER if KERNEL else "-", row[4]), row
        assert row[13] == saved and row[14] == (saved if KERNEL else "-"), row
    assert "cost per GiB against the smallest size" in out
    assert png.stat().st_size > 0
    if KERNEL:
        assert "kernel KSM knobs restored" in r.stderr
    assert knobs() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sweep", "--sweep-sizes", "lots"), "cannot parse size"),
        (("--sweep", "--sweep-sizes", ","), "at least one size"),
        (("--sweep", "--only", "identical", "--only", "pairs"), "one workload"),
        (("--sweep", "--only", "workers"), "one workload"),
        (("--plot", "x.png"), "give --sweep too"),
        (("--workers-data", "dataset"), "give --only workers too"),
        (("--only", "workers", "--workers-data", "numbers"), "invalid choice"),
    ],
)
def test_sweep_bad_arguments(args: tuple[str, ...], message: str) -> None:
    before = knobs()
    r = bench(*args, timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ksm bench:" in r.stderr and message in r.stderr, r.stderr
    assert knobs() == before


def test_sweep_plot_without_matplotlib_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "
        "sys.argv = ['ksm', 'bench', '--sweep', '--sweep-sizes', '64K', '--plot', sys.argv[1]]; "
        "runpy.run_module('ksm', run_name='__main__')"
    )
    png = tmp_path / "sweep.png"
    r = subprocess.run([sys.executable, "-c", code, str(png)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--plot needs matplotlib" in r.stderr and "pip install" in r.stderr
    assert not png.exists()


def test_sweep_plans_more_copies_where_the_files_run_out() -> None:
    from ksm import _sweep

    page, mib = 4096, 1 << 20
    assert _sweep.parse_sizes("1G, 64M,64M") == [64 * mib, 1 << 30]
    # Enough files: 4 copies of a quarter of the size.
    assert _sweep.plan(64 * mib, page, "dataset", 932 * mib) == (64 * mib, 4)
    # 932 MiB of files for 8 GiB: 9 copies of 910 MiB (1 % of each changed).
    size, copies = _sweep.plan(8 << 30, page, "dataset", 932 * mib)
    assert copies == 9 and size <= 8 << 30 and size // copies <= 932 * mib and size % page == 0
    assert _sweep.plan(1 << 30, page, "identical", None) == (1 << 30, None)
    # The cost per GiB against the smallest size: linear is 1.00 at every size.
    points = [
        _sweep.SweepPoint(s, s // page, 4, ksm=_bench.Figures(settle_s=t), kernel=None)
        for s, t in ((64 * mib, 0.1), (256 * mib, 0.4), (1 << 30, 3.2))
    ]
    (line,) = _sweep.linearity(points)
    assert line.endswith("64 MiB 1.00, 256 MiB 1.00, 1 GiB 2.00"), line


def test_a_worker_configuration_says_what_each_worker_held() -> None:
    mib = 1 << 20
    assert _workers._label(16, 64.0, 64 * mib) == "16 workers x 64 MiB"
    # A data set smaller than asked: the workers hold all of it, and say so.
    assert _workers._label(4, 256.0, 211 * mib) == "4 workers x 256 MiB (211 MiB of data each: all there is)"
